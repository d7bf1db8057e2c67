"""PASS pretraining on Ray Train end to end: 2 CPU workers, tiny generated data, kill and resume."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lussray.cli import main
from lussray.stages.loop import CHECKPOINT_FILE, METRICS_FILE, state_fingerprint
from tests.ray.kill import kill_driver
from tests.ray.tensorboard_events import scalars

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = [
    # its own local cluster: killing the driver then ends the whole run, as on a laptop
    "ray.address=local", "ray.num_cpus=4",
    "dataset.num_classes=3",
    "pretrain.hidden_mlp=64", "pretrain.feat_dim=32", "pretrain.num_prototypes=12",
    "pretrain.queue_length=32", "pretrain.queue_start_epoch=1", "pretrain.freeze_prototypes_steps=2",
    "pretrain.crops.num_crops=[2,2]", "pretrain.crops.crop_sizes=[64,32]",
    "pretrain.crops.min_scales=[0.3,0.1]", "pretrain.crops.max_scales=[1.0,0.3]",
    "pretrain.loop.batch_size_per_worker=8", "pretrain.loop.epochs=20", "pretrain.loop.base_lr=0.3",
    "pretrain.loop.checkpoint_every_steps=4", "pretrain.loop.log_every_steps=1",
    "ingest.map_batch_size=8", "ingest.cpus_per_map_task=0.5",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    assert main(["synth", "--out", str(root / "tree"), "--classes", "3", "--train-per-class", "22",
                 "--val-per-class", "1", "--test-per-class", "1", "--semi-per-class", "1", "--size", "64",
                 "--workers", "1"]) == 0
    assert main(["prepare", "--src", str(root / "tree"), "--out", str(root / "shards"), "--splits", "train",
                 "--workers", "1", "--samples-per-shard", "16", "dataset.num_classes=3"]) == 0
    return root / "shards"


def _train_cmd(shards: Path, run: Path, max_steps: int) -> list[str]:
    return [sys.executable, "-m", "lussray.train", "--data", str(shards), "--run", str(run),
            "--max-steps", str(max_steps), *TINY]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "pretrain" / METRICS_FILE).read_text().splitlines()]


def _checkpoints(run: Path) -> list[Path]:
    return sorted((run / "pretrain").glob("checkpoint_step=*"))


def _registered_steps(run: Path) -> list[int]:
    """Steps of the checkpoints Ray Train's snapshot records (a copied but unrecorded one is not resumed)."""
    snapshot = run / "pretrain" / "checkpoint_manager_snapshot.json"
    try:
        text = snapshot.read_text()
    except OSError:
        return []
    return [int(step) for step in re.findall(r"checkpoint_step=(\d+)", text)]


def test_pretrain_learns_checkpoints_and_resumes_after_kill(shards, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # 1. a run killed (SIGKILL of the driver) after its first checkpoint
    proc = subprocess.Popen(_train_cmd(shards, run, 400), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if _registered_steps(run):  # written and recorded by Ray Train, so a rerun resumes from it
            break
        time.sleep(0.5)
    kill_driver(proc)  # and wait for its workers, which can register one more checkpoint meanwhile
    registered = _registered_steps(run)
    assert registered, "no checkpoint was registered before the deadline"
    saved = {}
    for folder in _checkpoints(run):
        try:
            state = torch.load(folder / CHECKPOINT_FILE, weights_only=True)
        except Exception:  # killed while Ray copied it: never registered, so never resumed from
            continue
        saved[state["step"]] = state_fingerprint(state)

    # 2. the rerun resumes at that step with the same optimizer and queue state, then learns on
    result = subprocess.run(_train_cmd(shards, run, 24), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = _metrics(run)
    resume = [r for r in rows if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == max(registered) >= 4
    assert resume[0]["state_fingerprint"] == pytest.approx(saved[resume[0]["step"]], rel=1e-9)

    steps = [r for r in rows if "loss" in r]
    assert steps[-1]["step"] == 24
    losses = [r["loss"] for r in steps]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6, losses
    # 3. TensorBoard shows each step once: what the killed run logged beyond the resume step is purged
    curves = scalars(run / "pretrain")
    latest = {r["step"]: r for r in steps}  # the rerun's rows come last
    assert [step for step, _ in curves["loss/total"]] == list(range(1, 25))
    assert [value for _, value in curves["loss/total"]] == pytest.approx([latest[s]["loss"] for s in range(1, 25)],
                                                                        rel=1e-6)
    assert {"loss/i2i", "loss/d2s3", "train/lr", "train/images_per_s", "train/data_wait_s"} <= set(curves), sorted(curves)
    assert all(0 <= r["data_wait_s"] < r["step_seconds"] + 1 for r in steps)  # the slowest worker's wait per step
    final = torch.load(_checkpoints(run)[-1] / CHECKPOINT_FILE, weights_only=True)
    assert final["step"] == 24 and "prototypes.weight" in final["model"]
    assert final["config"]["pretrain"]["feat_dim"] == 32
    assert final["method"]["queue.embeddings"].abs().sum() > 0  # the queue filled after its start epoch
