"""PiCIE on Ray end to end on generated scenes: 2 Train workers, 2 epochs, a kill, an exact resume, scored predictions.

Run A trains unbroken on the session's cluster. Run B is the command on its own cluster, killed
(SIGKILL of the driver) after its first registered checkpoint, then resumed: its final checkpoint
(model, Adam, the epoch's centroids and every worker's labels) must equal A's bit for bit. Then the
final k-means and the predictions of validation, scored with the pixel protocol.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lussray.cli import main
from lussray.config import load_config
from lussray.stages import picie
from lussray.stages.loop import CHECKPOINT_FILE, METRICS_FILE, latest_checkpoint
from tests.ray.kill import kill_driver, registered_steps

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = [
    "ray.num_cpus=4", "picie.base_size=48", "picie.crop_size=32", "picie.kmeans_pixels_per_image=8",
    "picie.kmeans_iterations=3", "picie.overcluster_k=8", "picie.cluster.pixels_per_image=8",
    "picie.cluster.iterations=3", "picie.cluster.kmeans_actors=1",
    "picie.loop.batch_size_per_worker=4", "picie.loop.epochs=2", "picie.loop.checkpoint_every_steps=1",
    "picie.loop.log_every_steps=1", "picie.loop.torch_threads=1",
    "ingest.map_batch_size=4", "ingest.cpus_per_map_task=0.5", "ingest.shuffle_window_rows=8",
    "ingest.eval_short_side=48", "dataset.eval_crop_size=48", "predict.batch_size=8", "predict.torch_threads=1",
]
STEPS = 6  # 24 images, 2 workers x 4: 3 steps per epoch


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("picie")
    assert main(["synth", "--dataset", "synthetic-scenes", "--out", str(root / "tree"), "--train-images", "24",
                 "--val-images", "6", "--size", "48", "--workers", "1"]) == 0
    assert main(["prepare", "--dataset", "synthetic-scenes", "--src", str(root / "tree"), "--out",
                 str(root / "shards"), "--workers", "1", "--samples-per-shard", "8"]) == 0
    return root / "shards"


def _final(run: Path) -> tuple[dict, dict]:
    """The last checkpoint (rank 0's) and rank 1's method state."""
    path = Path(latest_checkpoint(str(run / "picie")))
    return (torch.load(path, weights_only=True),
            torch.load(path.parent / "method_rank1.pt", weights_only=True)["_extra_state"])


def _differences(a, b, path="") -> list[str]:
    """Where two checkpoint trees differ (tensors bitwise), as paths."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [f"{path} (keys)"]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} (length)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def test_picie_trains_resumes_exactly_after_a_kill_and_predicts(shards, tmp_path, ray_cluster):
    config = load_config("synthetic-scenes", overrides=TINY, method="picie")
    # A: unbroken
    run_a = tmp_path / "a"
    picie.train(config, str(shards), str(run_a), init="random")

    # B: the command, killed after its first registered checkpoint, then resumed
    run_b = tmp_path / "b"
    command = [sys.executable, "-m", "lussray.cli", "picie", "train", "--dataset", "synthetic-scenes", "--data",
               str(shards), "--run", str(run_b), "--init", "random", *TINY, "ray.address=local"]
    log = tmp_path / "b.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not registered_steps(run_b / "picie"):
        time.sleep(0.2)
    kill_driver(proc)
    registered = registered_steps(run_b / "picie")
    assert registered and max(registered) < STEPS, \
        f"killed too late or never checkpointed: {registered}\n{log.read_text()[-3000:]}"
    picie.train(config, str(shards), str(run_b), init="random")
    rows = [json.loads(line) for line in (run_b / "picie" / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("event") == "resume"] == [max(registered)]

    (a, a_rank1), (b, b_rank1) = _final(run_a), _final(run_b)
    assert a["step"] == b["step"] == STEPS
    for name in ("model", "optimizer", "method"):
        assert not _differences(a[name], b[name]), (name, _differences(a[name], b[name])[:5])
    assert not _differences(a_rank1, b_rank1), _differences(a_rank1, b_rank1)[:5]
    clusters = a["method"]["_extra_state"]
    assert clusters["epoch"] == 1 and len(clusters["keys"]) == len(a_rank1["keys"]) == 12
    assert set(clusters["keys"]).isdisjoint(a_rank1["keys"])  # each worker labels its own images
    assert clusters["labels"].shape == (12, 2, 2, 8, 8)  # images, heads (12 and "+H" 8), views, 32 / 4
    losses = [r["loss"] for r in rows if "loss" in r]
    assert all(torch.isfinite(torch.tensor(losses)))

    # the final k-means and validation's predictions, scored with the pixel protocol
    clustered = picie.cluster(config, str(shards), str(run_b))
    assert clustered["num_clusters"] == 12 and clustered["num_points"] == 24 * 8
    summary = picie.predict(config, str(shards), str(run_b))
    metrics = summary["metrics"]
    assert summary["num_images"] == 6 and len(list((run_b / "predict" / "validation").rglob("*.png"))) == 6
    assert 0 < metrics["mIoU"] <= 100 and 0 < metrics["Acc"] <= 100 and metrics["matching"] == "hungarian"
    assert len(metrics["iou"]) == 12 and (run_b / "picie-clusters" / "centroids.npy").is_file()
    # a rerun with the same inputs is complete at once
    assert picie.predict(config, str(shards), str(run_b)) == summary
    assert CHECKPOINT_FILE in os.listdir(Path(latest_checkpoint(str(run_b / "picie"))).parent)
