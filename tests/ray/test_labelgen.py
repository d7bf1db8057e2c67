"""Label generation end to end on tiny generated data: one pseudo label per image, resume after a kill."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lussray.cli import main
from lussray.config import load_config
from lussray.data.imagenet_s import label_from_png_bytes
from lussray.data.shards import iter_tar, shard_paths
from lussray.models.pass_model import PixelAttentionModel
from lussray.stages.labelgen import pixel_labeler
from lussray.stages.loop import CHECKPOINT_FILE
from lussray.pipelines.pass_ import pseudo_label_baseline
from tests.ray.kill import kill_driver

pytestmark = [pytest.mark.ray, pytest.mark.slow]

K = 3
MODEL = ["pretrain.hidden_mlp=32", "pretrain.feat_dim=16", "pretrain.num_prototypes=8"]
TINY = ["dataset.num_classes=3", *MODEL, "labelgen.crop_size=56", "ingest.eval_short_side=64",
        "labelgen.kmeans_redo=2", "labelgen.kmeans_iterations=5", "labelgen.batch_size=8",
        "labelgen.tau_step=0.2", "labelgen.actor_pool_max=1", "labelgen.kmeans_actors=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shards with 4 images per shard, and a random stage-2 checkpoint in the run folder layout."""
    root = tmp_path_factory.mktemp("labelgen")
    assert main(["synth", "--out", str(root / "tree"), "--classes", "3", "--train-per-class", "12",
                 "--val-per-class", "2", "--test-per-class", "1", "--semi-per-class", "1", "--size", "64",
                 "--workers", "1"]) == 0
    assert main(["prepare", "--src", str(root / "tree"), "--out", str(root / "shards"), "--workers", "1",
                 "--samples-per-shard", "4", "dataset.num_classes=3"]) == 0
    torch.manual_seed(0)
    model = PixelAttentionModel(arch="resnet18", hidden_dim=32, feat_dim=16, num_prototypes=8, shallow_stages=())
    folder = root / "checkpoint" / "attention" / "checkpoint_step=00000001"
    folder.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "step": 1}, folder / CHECKPOINT_FILE)
    return root


def _new_run(data: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "attention").mkdir(parents=True)
    os.symlink(data / "checkpoint" / "attention" / "checkpoint_step=00000001",
               run / "attention" / "checkpoint_step=00000001")
    return run


def _train_keys(shards: Path) -> dict[str, tuple[int, int]]:
    from lussray.data.augment import decode_image

    return {key: decode_image(members["jpg"]).shape[:2]
            for path in shard_paths(str(shards), "train") for key, members in iter_tar(path)}


def test_labelgen_writes_one_pseudo_label_per_training_image(data, tmp_path, ray_cluster):
    run = _new_run(data, tmp_path)
    args = ["labelgen", "--data", str(data / "shards"), "--run", str(run), *TINY, "labelgen.tau_split=validation"]
    assert main(args) == 0
    out = run / "labelgen"
    pseudo = {}
    for path in shard_paths(str(out / "pseudo"), "train"):
        for key, members in iter_tar(path):
            assert key not in pseudo
            pseudo[key] = label_from_png_bytes(members["seg.png"])
    images = _train_keys(data / "shards")
    assert sorted(pseudo) == sorted(images)
    for key, label in pseudo.items():
        assert label.shape == images[key]
        assert label.min() >= 0 and label.max() <= K
    tau = json.loads((out / "tau.json").read_text())
    assert tau["source"] == "validation sweep" and [c["tau"] for c in tau["curve"]] == [0.0, 0.2, 0.4, 0.6, 0.8]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == len(images) and sum(summary["histogram"]) == sum(h * w for h, w in images.values())
    assert summary["metrics"]["validation"] == tau["best"]
    assert 0 <= summary["metrics"]["train-semi"]["mIoU"] <= 100
    assert np.load(out / "centroids.npy").shape == (K, 512)
    # a complete run is not redone
    assert main(args) == 0


def test_labelgen_fits_tau_on_train_semi_and_scores_validation_apart(data, tmp_path, ray_cluster):
    run = _new_run(data, tmp_path)
    args = ["labelgen", "--data", str(data / "shards"), "--run", str(run), *TINY, "labelgen.tau_split=train-semi"]
    assert main(args) == 0
    tau = json.loads((run / "labelgen" / "tau.json").read_text())
    summary = json.loads((run / "labelgen" / "summary.json").read_text())
    assert tau["source"] == "train-semi sweep" and summary["metrics"]["train-semi"] == tau["best"]
    assert summary["tau"] == tau["tau"]
    # validation is scored at train-semi's tau, and that is the pipeline's pseudo-label baseline
    assert 0 <= summary["metrics"]["validation"]["mIoU"] <= 100
    assert pseudo_label_baseline(str(run)) == summary["metrics"]["validation"]


def test_labelgen_image_score_scale_splits_every_image_at_mid_threshold(data, tmp_path, ray_cluster):
    run = _new_run(data, tmp_path)
    args = ["labelgen", "--data", str(data / "shards"), "--run", str(run), "--tau", "0.5", *TINY,
            "labelgen.score_scale=image"]
    assert main(args) == 0
    # each image's scores span [0, 1], so tau 0.5 leaves some pixels "other" and labels others, in every image
    for path in shard_paths(str(run / "labelgen" / "pseudo"), "train"):
        for key, members in iter_tar(path):
            label = label_from_png_bytes(members["seg.png"])
            assert (label == 0).any() and (label > 0).any(), key
    assert json.loads((run / "labelgen" / "summary.json").read_text())["score_scale"] == "image"
    config = load_config("synthetic-demo", overrides=TINY)  # the report's labeller reads it from the summary
    assert pixel_labeler(config, str(run)).score_scale == "image"


def test_labelgen_refuses_an_unknown_score_scale(data, tmp_path):
    run = _new_run(data, tmp_path)
    args = ["labelgen", "--data", str(data / "shards"), "--run", str(run), *TINY, "labelgen.score_scale=minmax"]
    assert main(args) == 2
    assert not (run / "labelgen").exists()


def test_labelgen_refuses_a_tau_split_without_ground_truth_before_any_work(data, tmp_path):
    run = _new_run(data, tmp_path)
    args = ["labelgen", "--data", str(data / "shards"), "--run", str(run), *TINY, "labelgen.tau_split=train"]
    assert main(args) == 2
    assert not (run / "labelgen" / "embeddings").exists()


def test_labelgen_refuses_outputs_of_another_checkpoint(data, tmp_path, ray_cluster):
    run = _new_run(data, tmp_path)
    (run / "labelgen").mkdir()
    (run / "labelgen" / "inputs.json").write_text(json.dumps({"checkpoint": "elsewhere"}))
    assert main(["labelgen", "--data", str(data / "shards"), "--run", str(run), *TINY]) == 2


def _tar_of(record: Path) -> Path:
    return record.with_name(record.name.removesuffix(".done.json"))


def test_labelgen_resumes_after_kill_without_redoing_finished_shards(data, tmp_path):
    run = _new_run(data, tmp_path)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "lussray.cli", "labelgen", "--data", str(data / "shards"), "--run", str(run),
           "--tau", "0.3", "ray.address=local", "ray.num_cpus=4", *TINY]
    pseudo = run / "labelgen" / "pseudo" / "train"
    log = tmp_path / "killed-run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 600  # an upper bound only: the wait ends at the first finished shard
        while time.time() < deadline and proc.poll() is None and not list(pseudo.glob("*.done.json")):
            time.sleep(0.2)
        exit_code = proc.poll()
        kill_driver(proc)
    finished = {p.name: (_tar_of(p).stat().st_mtime_ns, p.read_text()) for p in pseudo.glob("*.done.json")}
    total = len(shard_paths(str(data / "shards"), "train"))
    assert 0 < len(finished) < total, (f"{len(finished)} of {total} shards were done at the kill (the run's exit "
                                       f"code before it: {exit_code}); its output:\n{log.read_text()[-4000:]}")
    assert not (pseudo / "manifest.json").exists()

    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"resuming, {len(finished)} of {total} shards already written" in result.stdout
    for name, (mtime, record) in finished.items():
        assert _tar_of(pseudo / name).stat().st_mtime_ns == mtime and (pseudo / name).read_text() == record
    manifest = json.loads((pseudo / "manifest.json").read_text())
    assert manifest["num_shards"] == total and manifest["num_samples"] == len(_train_keys(data / "shards"))
