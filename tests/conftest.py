"""Shared fixtures: one local Ray cluster per test session, for tests marked `ray`."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with more logical CPUs than cores, so Ray Data never starves."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
