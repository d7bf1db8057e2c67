"""``lussray run`` end to end on tiny generated data: killed midway, rerun, finished stages are skipped."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lussray.cli import main
from tests.ray.kill import kill_driver

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LOOP = "use_gpu=false,cpus_per_worker=0.5,batch_size_per_worker=6,epochs=1,checkpoint_every_steps=2,log_every_steps=1"
TINY = [
    "ray.address=local", "ray.num_cpus=4",
    "dataset.num_classes=3", "pretrain.arch=resnet18",
    "pretrain.hidden_mlp=32", "pretrain.feat_dim=16", "pretrain.num_prototypes=8", "pretrain.queue_length=0",
    "pretrain.crops.num_crops=[2,2]", "pretrain.crops.crop_sizes=[64,32]",
    "pretrain.crops.min_scales=[0.3,0.1]", "pretrain.crops.max_scales=[1.0,0.3]",
    "attention.crops.crop_sizes=[64]", "attention.queue_length=0",
    *[f"{stage}.loop.{kv}" for stage in ("pretrain", "attention", "finetune") for kv in LOOP.split(",")],
    "ingest.map_batch_size=8", "ingest.cpus_per_map_task=0.5", "ingest.eval_short_side=64",
    "ingest.finetune_crop_size=64",
    "labelgen.crop_size=56", "labelgen.kmeans_redo=1", "labelgen.kmeans_iterations=5", "labelgen.batch_size=8",
    "labelgen.tau_step=0.2", "labelgen.actor_pool_max=1", "labelgen.kmeans_actors=1", "labelgen.torch_threads=1",
    "predict.batch_size=8", "predict.torch_threads=1",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    assert main(["synth", "--out", str(root / "tree"), "--classes", "3", "--train-per-class", "8",
                 "--val-per-class", "2", "--test-per-class", "1", "--semi-per-class", "1", "--size", "64",
                 "--workers", "1"]) == 0
    assert main(["prepare", "--src", str(root / "tree"), "--out", str(root / "shards"), "--workers", "1",
                 "--samples-per-shard", "12", "dataset.num_classes=3"]) == 0
    return root / "shards"


def _run_cmd(shards: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "lussray.cli", "run", "--data", str(shards), "--run", str(run), "--crf", *TINY]


def test_run_resumes_after_a_kill_skipping_completed_stages(shards, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # 1. kill the whole run once label generation is complete (fine-tuning has started or is about to)
    proc = subprocess.Popen(_run_cmd(shards, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not (run / "labelgen" / "summary.json").exists():
        time.sleep(0.5)
    kill_driver(proc)
    assert (run / "labelgen" / "summary.json").exists(), "the first run did not get through label generation"
    assert not (run / "metrics.json").exists()

    # 2. the rerun passes over pretraining, attention and labelgen, then finishes
    result = subprocess.run(_run_cmd(shards, run), env=env, capture_output=True, text=True, timeout=600, check=False)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert "[pretrain] complete at step" in out and "[attention] complete at step" in out
    assert "[labelgen] complete" in out
    assert "[labelgen] embed" not in out and "[pretrain] resumed" not in out

    # 3. metrics, predictions with and without CRF, the report, and the JSON last line
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {"pipeline", "pipeline + CRF"}
    last = json.loads(out.strip().splitlines()[-1])
    assert last["mIoU"] == pytest.approx(metrics["metrics"]["pipeline"]["mIoU"])
    assert set(last) == {"method", "seed", "mIoU", "Acc", "F", "baselines"} and last["method"] == "pass"
    assert last["seed"] == metrics["seed"]
    for folder in ("validation", "validation-crf"):
        assert len(list((run / "predict" / folder).glob("*/*.png"))) == 6
    report = (run / "report.html").read_text()
    assert report.count("<div class='row'>") >= 6 and "data:image/png;base64," in report
    assert "prediction + CRF" in report and "<svg" in report and "Nearest training images" in report

    # 4. a third run has nothing left to do but the report
    again = subprocess.run(_run_cmd(shards, run), env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0
    assert "[finetune] complete at step" in again.stdout and "validation: complete" in again.stdout

    # 5. the stage command on the pipeline's checkpoint scores as the pipeline did (same stage function)
    out = tmp_path / "predict-again"
    assert main(["predict", "--split", "validation", "--data", str(shards), "--run", str(run), "--out", str(out),
                 *TINY]) == 0
    again_summary = json.loads((out / "summary.json").read_text())
    assert again_summary["metrics"] == metrics["metrics"]["pipeline"]


def test_run_needs_data_and_run(tmp_path):
    assert main(["run", "--run", str(tmp_path / "run")]) == 2
    assert main(["run", "--data", str(tmp_path / "missing"), "--run", str(tmp_path / "run"),
                 "dataset.num_classes=3"]) == 2
