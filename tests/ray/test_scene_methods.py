"""STEGO and HP end to end on tiny generated scenes: 2 Ray Train workers, a driver kill, resume, predict, score.

The featurizer is a DINO ViT-S/8 layout file with random weights (``--featurizer``), so the runs
skip PASS pretraining and exercise the ViT path (HP's local hidden positives use its attention).
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
from lussray.models.vit import DinoViTFeaturizer
from lussray.stages.loop import CHECKPOINT_FILE, METHOD_FILE, METRICS_FILE
from tests.ray.kill import kill_driver, registered_steps

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _tiny(method: str) -> list[str]:
    common = [
        "ray.address=local", "ray.num_cpus=4",  # its own cluster: killing the driver ends the run, as on a laptop
        "dataset.eval_crop_size=48", "ingest.eval_short_side=48", "ingest.map_batch_size=2",
        "ingest.cpus_per_map_task=0.5", "predict.batch_size=4", "predict.torch_threads=1",
        "knn.res=32", "knn.k=8", "knn.batch_size=16", "knn.torch_threads=1",
        f"{method}.res=32", f"{method}.dim=16", f"{method}.max_steps=8", f"{method}.loop.batch_size_per_worker=4",
        f"{method}.loop.epochs=4", f"{method}.loop.checkpoint_every_steps=2", f"{method}.loop.log_every_steps=1",
        f"{method}.loop.torch_threads=1", f"{method}.head_lr=0.005",
        "frozen_kmeans.pixels_per_image=8", "frozen_kmeans.redo=1",
    ]
    if method == "hp":
        common += ["hp.pool_size=16", "hp.warmup=2", "hp.renew_interval=2", "hp.rho=0.5"]
    else:
        common += ["stego.feature_samples=5", "stego.neg_samples=2", "stego.num_neighbors=3"]
    return common


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scene-methods")
    assert main(["synth", "--kind", "scenes", "--out", str(root / "tree"), "--train-images", "18", "--val-images",
                 "6", "--size", "48", "--workers", "1", "--dataset", "synthetic-scenes"]) == 0
    assert main(["prepare", "--src", str(root / "tree"), "--out", str(root / "shards"), "--workers", "1",
                 "--samples-per-shard", "9", "--dataset", "synthetic-scenes"]) == 0
    torch.manual_seed(0)
    torch.save(DinoViTFeaturizer("vit_small", 8).vit.state_dict(), root / "dino_vits8_random.pth")
    return root


def _cmd(scenes: Path, run: Path, method: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lussray.cli", "run", "--method", method, "--dataset", "synthetic-scenes",
            "--data", str(scenes / "shards"), "--run", str(run), "--featurizer", str(scenes / "dino_vits8_random.pth"),
            *extra, *_tiny(method)]


@pytest.mark.parametrize("method,baselines", [("stego", False), ("hp", False)])
def test_method_trains_resumes_after_kill_predicts_and_scores(scenes, tmp_path, method, baselines):
    run = tmp_path / "run"
    stage_dir = run / method
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    extra = ["--baselines"] if baselines else []
    # 1. killed (SIGKILL of the driver) once the training stage has a registered checkpoint
    proc = subprocess.Popen(_cmd(scenes, run, method, *extra), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not registered_steps(stage_dir):
        time.sleep(0.5)
    kill_driver(proc)
    registered = registered_steps(stage_dir)
    assert registered, "no checkpoint was registered before the deadline"
    # 2. the rerun resumes at the last registered step, finishes, predicts and scores (HP: also the
    #    references' checkpoint choice on validation labels, as an extra row)
    select = ["--select-on-labels"] if method == "hp" else []
    result = subprocess.run(_cmd(scenes, run, method, *extra, *select), env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (stage_dir / METRICS_FILE).read_text().splitlines()]
    resume = [r for r in rows if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == max(registered) >= 2
    steps = [r for r in rows if "loss" in r]
    assert steps[-1]["step"] == 8 and all(torch.isfinite(torch.tensor([r["loss"] for r in steps])))
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert final["method"] == method and 0 <= final["mIoU"] <= 100 and 0 <= final["Acc"] <= 100
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["protocol"] == "pixel"
    names = list(metrics["metrics"])
    assert names[:2] == ["cluster probe", "linear probe (uses labels)"]
    if select:  # the kept checkpoints (the last two) scored on validation: the best one, marked as using labels
        assert len(names) == 3 and names[2].endswith("chosen on validation labels (uses labels)")
        chosen = metrics["metrics"][names[2]]
        assert chosen["uses_labels"] is True and chosen["checkpoint"] in ("checkpoint_step=00000006",
                                                                          "checkpoint_step=00000008")
    else:
        assert len(names) == 2
    assert metrics["metrics"]["linear probe (uses labels)"]["uses_labels"] is True
    assert metrics["metrics"]["cluster probe"]["num_images"] == 6
    assert metrics["metrics"]["cluster probe"]["mIoU"] == pytest.approx(final["mIoU"])
    if baselines:
        assert set(final["baselines"]) == {"frozen_kmeans", "random_head"}
    checkpoint = torch.load(stage_dir / "checkpoint_step=00000008" / CHECKPOINT_FILE, weights_only=True)
    assert checkpoint["step"] == 8 and checkpoint["config"]["heads"]["kind"] == method
    assert not any(key.startswith(("vit.", "blocks.")) for key in checkpoint["model"])  # no featurizer weights
    if method == "hp":
        assert any(key.startswith("ema_head.") for key in checkpoint["model"])
        for rank in (0, 1):  # each worker's pools beside the checkpoint, full and identical (all_gather)
            pools = torch.load(stage_dir / "checkpoint_step=00000008" / METHOD_FILE.format(rank=rank),
                               weights_only=True)
            assert int(pools["pools.num_agnostic"]) == 16
        pools = [torch.load(stage_dir / "checkpoint_step=00000008" / METHOD_FILE.format(rank=r), weights_only=True)
                 for r in (0, 1)]
        assert torch.equal(pools[0]["pools.agnostic"], pools[1]["pools.agnostic"])
