"""A run owns its cluster: private by default, resource checks naming the key, one-line actor errors,
a readable console.

The first tests are pure (fake nodes, a fake clock: milliseconds); the others run the CLI in
subprocesses on tiny data, each with its own private local cluster.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lussray.cli import main
from lussray.config import RayConfig, load_config
from lussray.errors import UserError
from lussray.stages import ray_cluster as ray_cluster_module
from lussray.stages.ray_cluster import ERROR_COLUMN, Demand, Guarded, bundles_that_fit, require

TINY = [  # no ray.address: every command must start its own private cluster
    "ray.num_cpus=4", "dataset.num_classes=3", "pretrain.arch=resnet18",
    "pretrain.hidden_mlp=32", "pretrain.feat_dim=16", "pretrain.num_prototypes=8", "pretrain.queue_length=0",
    "pretrain.crops.num_crops=[2]", "pretrain.crops.crop_sizes=[48]",
    "pretrain.crops.min_scales=[0.3]", "pretrain.crops.max_scales=[1.0]",
    "pretrain.loop.batch_size_per_worker=6", "pretrain.loop.log_every_steps=1", "pretrain.loop.cpus_per_worker=0.5",
    "ingest.map_batch_size=8", "ingest.cpus_per_map_task=0.5",
]
GPU_DEMAND = Demand("pretrain training workers", 2, 0.5, 1.0, "pretrain.loop.num_workers",
                    "pretrain.loop.cpus_per_worker", "pretrain.loop.use_gpu / pretrain.loop.gpus_per_worker")
CPU_NODE = {"CPU": 4.0, "memory": 1e9}
GPU_NODE = {"CPU": 8.0, "GPU": 1.0}


# -- pure: fitting, messages, the autoscaler wait ------------------------------------------------


def test_bundles_never_span_nodes():
    assert bundles_that_fit([CPU_NODE], GPU_DEMAND) == 0
    assert bundles_that_fit([GPU_NODE, GPU_NODE], GPU_DEMAND) == 2
    assert bundles_that_fit([{"CPU": 0.75}, {"CPU": 0.75}], Demand("w", 2, 0.5, 0, "n", "c", "g")) == 2
    assert bundles_that_fit([{"CPU": 1.5}], Demand("w", 2, 1.0, 0, "n", "c", "g")) == 1  # 1.5 CPUs hold one


def test_no_autoscaler_fails_at_once_naming_the_key():
    calls = []
    with pytest.raises(UserError, match=r"pretrain\.loop\.use_gpu.*no autoscaler") as info:
        require(GPU_DEMAND, RayConfig(), nodes=lambda: [CPU_NODE], autoscaler=False, request=calls.append,
                sleep=lambda s: pytest.fail("must not wait"))
    assert "0 GPUs" in str(info.value) and calls == []


def test_too_many_workers_names_the_count_key():
    demand = Demand("labelgen embed actors", 3, 2.0, 0.0, "labelgen.actor_pool_min", "labelgen.cpus_per_actor",
                    "labelgen.gpus_per_actor")
    with pytest.raises(UserError, match=r"holds only 2 of them.*change labelgen\.actor_pool_min"):
        require(demand, RayConfig(), nodes=lambda: [CPU_NODE], autoscaler=False)
    with pytest.raises(UserError, match=r"no node with 8 CPUs.*change labelgen\.cpus_per_actor"):
        require(Demand("x", 1, 8.0, 0.0, "a", "labelgen.cpus_per_actor", "g"), RayConfig(), nodes=lambda: [CPU_NODE],
                autoscaler=False)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_autoscaler_wait_returns_once_nodes_join_and_clears_the_request():
    clock, requests = _Clock(), []
    views = iter([[CPU_NODE], [CPU_NODE], [CPU_NODE, GPU_NODE, GPU_NODE]])
    require(GPU_DEMAND, RayConfig(resource_wait_s=60), nodes=lambda: next(views), autoscaler=True,
            request=requests.append, clock=clock, sleep=clock.sleep)
    assert requests == [[{"CPU": 0.5, "GPU": 1.0}] * 2, []]
    assert 0 < clock.now <= 60


def test_autoscaler_wait_gives_up_after_resource_wait_s():
    clock, requests = _Clock(), []
    with pytest.raises(UserError, match=r"pretrain\.loop\.use_gpu.*waited ray\.resource_wait_s=30 s"):
        require(GPU_DEMAND, RayConfig(resource_wait_s=30), nodes=lambda: [CPU_NODE], autoscaler=True,
                request=requests.append, clock=clock, sleep=clock.sleep)
    assert clock.now == pytest.approx(30) and requests[-1] == []


class _Failing:
    def __init__(self, fail_init: bool = False):
        if fail_init:
            raise UserError("cannot read checkpoint /runs/a/checkpoint.pt with torch.load(weights_only=True): bad")

    def __call__(self, batch):
        if "bad" in str(batch["shard"][0]):
            raise OSError("truncated tar\nsecond line of detail")
        return {"shard": batch["shard"], "num_images": np.asarray([3])}


def test_guarded_turns_actor_errors_into_rows_naming_the_file():
    guarded = Guarded(_Failing, {}, "shard", "the actor")
    assert guarded({"shard": np.asarray(["/d/train-000000.tar"])})["num_images"][0] == 3
    row = guarded({"shard": np.asarray(["/d/bad-000001.tar"])})
    with pytest.raises(UserError) as info:
        ray_cluster_module.raise_error_rows({ERROR_COLUMN: row[ERROR_COLUMN][0]})
    assert str(info.value) == "/d/bad-000001.tar: OSError: truncated tar"
    broken = Guarded(_Failing, {"fail_init": True}, "shard", "/runs/a/checkpoint.pt")
    with pytest.raises(UserError, match=r"^cannot read checkpoint /runs/a/checkpoint\.pt"):
        ray_cluster_module.raise_error_rows(broken({"shard": np.asarray(["/d/train-000000.tar"])}))


# -- an actor pool on the session cluster ----------------------------------------------------------


@pytest.mark.ray
def test_corrupt_checkpoint_in_a_labelgen_actor_is_one_line(ray_cluster, tmp_path):
    from lussray.stages.labelgen import EmbedShards, map_shards, model_args

    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"\x80 not a torch checkpoint")
    config = load_config("synthetic-demo", None, [*TINY[1:], "labelgen.cpus_per_actor=1", "labelgen.torch_threads=1"])
    kwargs = dict(zip(("checkpoint", "model_kwargs", "short_side", "torch_threads"), model_args(config, str(bad))),
                  crop_size=32, batch_size=4)
    jobs = [{"shard": str(tmp_path / "train-000000.tar"), "out": str(tmp_path / "train-000000.parquet")}]
    with pytest.raises(UserError) as info:
        list(map_shards(jobs, EmbedShards, kwargs, config, "embed"))
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.ray
def test_a_plain_local_cluster_has_no_autoscaler(ray_cluster):
    assert not ray_cluster_module.has_autoscaler(RayConfig())
    assert ray_cluster_module.has_autoscaler(RayConfig(autoscaler=True))


# -- the CLI: private clusters, the GPU check, the console ----------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("owned")
    assert main(["synth", "--out", str(root / "tree"), "--classes", "3", "--train-per-class", "8",
                 "--val-per-class", "1", "--test-per-class", "1", "--semi-per-class", "1", "--size", "48",
                 "--workers", "1"]) == 0
    assert main(["prepare", "--src", str(root / "tree"), "--out", str(root / "shards"), "--splits", "train",
                 "--workers", "1", "--samples-per-shard", "12", "dataset.num_classes=3"]) == 0
    return root / "shards"


def _train(shards: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lussray.cli", "train", "--data", str(shards), "--run", str(run),
            "--max-steps", "2", *TINY, *extra]


def _env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)  # nothing to join: each command must start its own cluster
    return env


@pytest.mark.ray
@pytest.mark.slow
def test_two_trainings_at_once_each_own_their_cluster_and_console_is_readable(shards, tmp_path):
    procs = [subprocess.Popen(_train(shards, tmp_path / f"run{i}"), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [proc.communicate(timeout=500)[0] for proc in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
        lines = out.splitlines()
        # said among the first lines (Ray's own "Started a local Ray instance." may come first)
        assert any(line.startswith("[ray] started a private local cluster (4 CPUs") for line in lines[:3]), lines[:3]
        assert "Connecting to existing Ray cluster" not in out
        # the stage's own progress and summary are there; Ray's noise is not
        assert "[pretrain] step 2/2" in out and "[pretrain] done:" in out
        for noise in ("Failed to query Ray Train Controller", "Execution plan of Dataset",
                      "Starting execution of Dataset", "logging_progress", "Attempting to start training worker"):
            assert noise not in out, f"{noise!r} in the console:\n{out[-3000:]}"
    for i in range(2):
        assert (tmp_path / f"run{i}" / "pretrain" / "checkpoint_step=00000002").is_dir()


@pytest.mark.ray
@pytest.mark.slow
def test_use_gpu_without_gpus_exits_2_at_once_naming_the_key(shards, tmp_path):
    started = time.monotonic()
    proc = subprocess.Popen(_train(shards, tmp_path / "run", "pretrain.loop.use_gpu=true"), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # printed once the private cluster is up
    cluster_up = time.monotonic()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, first + out + err[-3000:]
    assert first.startswith("[ray] started a private local cluster")
    errors = [line for line in err.splitlines() if line.startswith("lussray train: error:")]
    assert len(errors) == 1 and "pretrain.loop.use_gpu" in errors[0] and "no autoscaler" in errors[0], err[-3000:]
    assert "Traceback" not in err
    assert time.monotonic() - cluster_up < 30, "the check must not wait for resources on a fixed cluster"
    assert time.monotonic() - started < 120


def _fake_init(monkeypatch, failures: list[Exception]) -> list[str]:
    """``ray.init`` raising ``failures`` in turn, then succeeding; the calls (init/shutdown) in order."""
    import ray

    calls = []

    def init(**kwargs):
        calls.append("init")
        if failures:
            raise failures.pop(0)

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    return calls


def test_a_local_cluster_that_times_out_at_start_is_started_again(monkeypatch, capsys):
    timeout = Exception("The current node timed out during startup. This could happen because ...")
    calls = _fake_init(monkeypatch, [timeout, timeout])
    ray_cluster_module._start_private_cluster(RayConfig())
    assert calls == ["init", "shutdown", "init", "shutdown", "init"]
    assert "did not start in time (attempt 2 of 3" in capsys.readouterr().out


def test_other_start_errors_and_the_last_timeout_are_raised(monkeypatch):
    calls = _fake_init(monkeypatch, [ValueError("bad num_cpus")])
    with pytest.raises(ValueError, match="bad num_cpus"):
        ray_cluster_module._start_private_cluster(RayConfig())
    assert calls == ["init"]
    timeouts = [Exception("timed out during startup")] * ray_cluster_module.PRIVATE_CLUSTER_ATTEMPTS
    calls = _fake_init(monkeypatch, timeouts)
    with pytest.raises(Exception, match="timed out during startup"):
        ray_cluster_module._start_private_cluster(RayConfig())
    assert calls.count("init") == ray_cluster_module.PRIVATE_CLUSTER_ATTEMPTS
