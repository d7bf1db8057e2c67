"""Unit tests run on tiny tensors: one intra-op thread avoids contention on small shared machines."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
