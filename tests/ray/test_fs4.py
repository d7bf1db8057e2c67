"""FS^4 on Ray end to end on generated scenes: pseudo labels, 2 epochs on 2 Train workers, a kill, a resume, scores.

`lussray fs4 train` runs on its own cluster and is killed (SIGKILL of the driver) after its first
registered checkpoint, then resumed on the session's cluster: the resumed workers must restore that
checkpoint's Adam and method state (the epoch's pixel centroids and labels) exactly, and finish both
epochs. (The bitwise equality of a resumed and an unbroken run is tests/ray/test_picie.py's: FS^4
shares PiCIE's epoch hook and checkpointed state; a second, unbroken FS^4 run would double this
test's time.) Then PiCIE's final k-means of the FS^4 network and `lussray predict --method fs4` on
validation, scored with the pixel protocol.
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
from lussray.models.pass_model import PASSModel
from lussray.stages import fs4_labels, fs4_train, picie
from lussray.stages.loop import CHECKPOINT_FILE, METRICS_FILE, latest_checkpoint, state_fingerprint
from tests.ray.kill import kill_driver, registered_steps

pytestmark = [pytest.mark.ray, pytest.mark.slow]

IMAGES = 16
TINY = [
    "ray.num_cpus=4", "pretrain.hidden_mlp=32", "pretrain.feat_dim=16", "pretrain.num_prototypes=8",
    "fs4.labels.num_clusters=4", "fs4.labels.crop_view_size=48", "fs4.labels.resize=48", "fs4.labels.crop_size=40",
    "fs4.labels.kmeans_iterations=5", "fs4.labels.kmeans_redo=1", "labelgen.actor_pool_max=1",
    "labelgen.kmeans_actors=1", "fs4.base_size=48", "fs4.view_size=32",
    "fs4.loop.batch_size_per_worker=4", "fs4.loop.epochs=2", "fs4.loop.checkpoint_every_steps=1",
    "fs4.loop.log_every_steps=1", "fs4.loop.torch_threads=1",
    "picie.kmeans_pixels_per_image=8", "picie.kmeans_iterations=3", "picie.cluster.pixels_per_image=8",
    "picie.cluster.iterations=3", "picie.cluster.kmeans_actors=1",
    "ingest.map_batch_size=4", "ingest.cpus_per_map_task=0.5", "ingest.shuffle_window_rows=8",
    "ingest.eval_short_side=48", "dataset.eval_crop_size=48", "predict.batch_size=8", "predict.torch_threads=1",
]
KEPT = 38  # floor(0.4 x 16 images x 6 views)
STEPS = 8  # 38 views, 2 workers x 4: 4 steps per epoch


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Scene shards (16 training images of 48 px) and a random stage-1 checkpoint (the initial model)."""
    root = tmp_path_factory.mktemp("fs4")
    assert main(["synth", "--dataset", "synthetic-scenes", "--out", str(root / "tree"), "--train-images", str(IMAGES),
                 "--val-images", "4", "--size", "48", "--workers", "1"]) == 0
    assert main(["prepare", "--dataset", "synthetic-scenes", "--src", str(root / "tree"), "--out", str(root / "shards"),
                 "--workers", "1", "--samples-per-shard", "8"]) == 0
    torch.manual_seed(0)
    folder = root / "checkpoint_step=00000001"
    folder.mkdir()
    model = PASSModel(arch="resnet18", hidden_dim=32, feat_dim=16, num_prototypes=8, shallow_stages=())
    torch.save({"model": model.state_dict(), "step": 1}, folder / CHECKPOINT_FILE)
    return root


def _final(run: Path) -> tuple[dict, dict]:
    path = Path(latest_checkpoint(str(run / "fs4")))
    return (torch.load(path, weights_only=True),
            torch.load(path.parent / "method_rank1.pt", weights_only=True)["_extra_state"])


def test_fs4_labels_train_resume_after_a_kill_and_predict(data, tmp_path, ray_cluster):
    config = load_config("synthetic-scenes", overrides=TINY, method="fs4")
    shards, init = str(data / "shards"), str(data / "checkpoint_step=00000001" / CHECKPOINT_FILE)
    run_b = tmp_path / "b"
    summary = fs4_labels.generate(config, shards, str(run_b), checkpoint=init)
    assert summary["kept"] == KEPT

    # the command, killed after its first registered checkpoint, then resumed
    command = [sys.executable, "-m", "lussray.cli", "fs4", "train", "--dataset", "synthetic-scenes", "--data", shards,
               "--run", str(run_b), "--init", init, *TINY, "ray.address=local"]
    log = tmp_path / "b.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not registered_steps(run_b / "fs4"):
        time.sleep(0.2)
    kill_driver(proc)
    registered = registered_steps(run_b / "fs4")
    assert registered and max(registered) < STEPS, \
        f"killed too late or never checkpointed: {registered}\n{log.read_text()[-3000:]}"
    killed_at = run_b / "fs4" / f"checkpoint_step={max(registered):08d}" / CHECKPOINT_FILE
    expected = state_fingerprint(torch.load(killed_at, weights_only=True))
    fs4_train.train(config, str(run_b), init=init)
    rows = [json.loads(line) for line in (run_b / "fs4" / METRICS_FILE).read_text().splitlines()]
    resumes = [r for r in rows if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [max(registered)] and resumes[0]["state_fingerprint"] == expected

    a, a_rank1 = _final(run_b)
    assert a["step"] == STEPS
    assert any(key.startswith("cae.") for key in a["model"]) and any(key.startswith("cam_head.") for key in a["model"])
    clusters = a["method"]["_extra_state"]
    assert clusters["epoch"] == 1 and len(clusters["keys"]) == len(a_rank1["keys"]) == 16
    assert all("--view" in key for key in clusters["keys"])  # the selected views are the training images
    assert clusters["labels"].shape == (16, 1, 2, 4, 4)  # views, heads, PiCIE's two views, 32 / 8 (CAE)
    trained = [r for r in rows if "loss" in r]
    assert trained and all(torch.isfinite(torch.tensor([r["loss"], r["loss_global"], r["loss_pixel"]])).all()
                           for r in trained)
    assert all(abs(r["loss"] - r["loss_global"] - r["loss_pixel"]) < 1e-4 for r in trained)  # Eq. (5)

    # PiCIE's final k-means of the FS^4 network, and `lussray predict --method fs4`, scored with the pixel protocol
    clustered = picie.cluster(config, shards, str(run_b), stage="fs4")
    assert clustered["num_clusters"] == 12 and (run_b / "fs4-clusters" / "centroids.npy").is_file()
    assert main(["predict", "--method", "fs4", "--dataset", "synthetic-scenes", "--data", shards, "--run", str(run_b),
                 "--split", "validation", *TINY]) == 0
    summary = json.loads((run_b / "predict" / "validation" / "summary.json").read_text())
    metrics = summary["metrics"]
    assert summary["num_images"] == 4 and len(list((run_b / "predict" / "validation").rglob("*.png"))) == 4
    assert 0 < metrics["mIoU"] <= 100 and 0 < metrics["Acc"] <= 100 and metrics["matching"] == "hungarian"
