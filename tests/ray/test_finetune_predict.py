"""Fine-tuning and prediction end to end on tiny generated data: matching, evaluator, submission."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lussray.cli import main
from lussray.data.imagenet_s import (
    IGNORE_ID,
    OTHER_ID,
    label_from_png_bytes,
    label_to_png_bytes,
)
from lussray.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    iter_tar,
    shard_paths,
    write_tar,
)
from lussray.eval.io import discover_keys, prediction_path, read_label, read_size
from lussray.models.pass_model import PASSModel
from lussray.stages.loop import CHECKPOINT_FILE, METRICS_FILE

pytestmark = pytest.mark.ray

CLASSES = 3
TINY = [
    f"dataset.num_classes={CLASSES}", f"labelgen.num_clusters={CLASSES}", "pretrain.arch=resnet18",
    "ingest.eval_short_side=64", "ingest.finetune_crop_size=64", "ingest.map_batch_size=8",
    "ingest.cpus_per_map_task=0.5",
    "finetune.loop.batch_size_per_worker=4", "finetune.loop.epochs=4", "finetune.loop.base_lr=0.1",
    "finetune.loop.checkpoint_every_steps=2", "finetune.loop.log_every_steps=1", "finetune.loop.torch_threads=1",
    "predict.batch_size=4", "predict.torch_threads=1",
]


def write_pseudo_labels(shards: Path, out: Path) -> int:
    """Shards in labelgen's format (image + label 0..K, no ignore) from train-semi's ground truth."""
    records = []
    for index, shard in enumerate(shard_paths(str(shards), "train-semi")):
        samples = []
        for key, members in iter_tar(shard):
            label = label_from_png_bytes(members["seg.png"])
            label[label == IGNORE_ID] = OTHER_ID
            samples.append((key, {"jpg": members["jpg"], "seg.png": label_to_png_bytes(label)}))
        name = f"train-{index:06d}.tar"
        records.append({"name": name, **write_tar(samples, str(out / "train" / name))})
    manifest = {"format_version": FORMAT_VERSION, "created_by": "test", "split": "train", "num_classes": CLASSES,
                "num_samples": sum(r["num_samples"] for r in records), "num_shards": len(records),
                "has_segmentation": True, "shards": records, "skipped": []}
    (out / "train" / MANIFEST).write_text(json.dumps(manifest))
    return manifest["num_samples"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    assert main(["synth", "--out", str(root / "tree"), "--classes", str(CLASSES), "--train-per-class", "8",
                 "--val-per-class", "3", "--test-per-class", "2", "--semi-per-class", "8", "--size", "64",
                 "--workers", "1"]) == 0
    assert main(["prepare", "--src", str(root / "tree"), "--out", str(root / "shards"), "--splits", "train-semi",
                 "validation", "test", "--workers", "1", "--samples-per-shard", "8",
                 f"dataset.num_classes={CLASSES}"]) == 0
    run = root / "run"
    assert write_pseudo_labels(root / "shards", run / "labelgen" / "pseudo") == 24
    # a stage-1 checkpoint where `lussray finetune` looks by default
    torch.manual_seed(0)
    model = PASSModel("resnet18", hidden_dim=32, feat_dim=16, num_prototypes=8, shallow_stages=(3,))
    (run / "pretrain" / "checkpoint_step=00000001").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "step": 1}, run / "pretrain" / "checkpoint_step=00000001" / CHECKPOINT_FILE)
    return root


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "finetune" / METRICS_FILE).read_text().splitlines()]


def test_finetune_then_predict_matches_evaluates_and_packs(ray_cluster, setup, capsys):
    root, run = setup, setup / "run"
    shards, gt = str(setup / "shards"), setup / "tree" / "validation-segmentation"

    # fine-tune one epoch (3 steps) from the default stage-1 checkpoint; a rerun finds it complete
    # (resuming a stopped run is the shared loop's, tested by tests/ray/test_pretrain.py)
    assert main(["finetune", "--run", str(run), "--max-steps", "3", *TINY]) == 0
    steps = [r for r in _metrics(run) if "loss" in r]
    assert steps[-1]["step"] == 3 and all(np.isfinite(r["loss"]) and 0 <= r["pixel_acc"] <= 1 for r in steps)
    final = torch.load(run / "finetune" / "checkpoint_step=00000003" / CHECKPOINT_FILE, weights_only=True)
    assert final["config"]["segmenter"]["num_outputs"] == CLASSES + 1
    assert final["config"]["segmenter"]["init"].endswith("pretrain/checkpoint_step=00000001/checkpoint.pt")
    assert final["model"]["segmentation_head.weight"].shape[0] == CLASSES + 1
    capsys.readouterr()
    assert main(["finetune", "--run", str(run), "--max-steps", "3", *TINY]) == 0
    assert "complete at step 3" in capsys.readouterr().out

    # validation: every image predicted at ground-truth size, Hungarian match.json, metrics
    assert main(["predict", "--split", "validation", "--data", shards, "--run", str(run), *TINY]) == 0
    pred = run / "predict" / "validation"
    keys = discover_keys(gt)
    for key in keys:
        assert read_size(prediction_path(pred, key)) == read_size(prediction_path(gt, key))
        assert read_label(prediction_path(pred, key)).max() <= CLASSES
    match = json.loads((pred / "match.json").read_text())
    assert match["0"] == 0 and sorted(match.values()) == list(range(CLASSES + 1))
    summary = json.loads((pred / "summary.json").read_text())
    assert summary["num_images"] == len(keys) == 9 and summary["matching"] == "hungarian"

    # the official-format evaluator accepts the files and agrees with the in-pool statistics
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--classes", str(CLASSES),
                 "--match", str(pred / "match.json"), "--out", str(root / "eval")]) == 0
    evaluated = json.loads((root / "eval" / "metrics.json").read_text())
    for name in ("mIoU", "mBIoU", "Acc", "FMeasure"):
        assert evaluated[name] == pytest.approx(summary["metrics"][name], abs=1e-6)

    capsys.readouterr()
    assert main(["predict", "--split", "validation", "--data", shards, "--run", str(run), *TINY]) == 0
    assert "complete" in capsys.readouterr().out  # same inputs: skipped

    # test: the validation matching is shipped with the predictions in the submission zip
    assert main(["predict", "--split", "test", "--data", shards, "--run", str(run), "--submission",
                 "--method-text", "tiny test run", *TINY]) == 0
    test_dir = run / "predict" / "test"
    assert json.loads((test_dir / "match.json").read_text()) == match
    with zipfile.ZipFile(run / "predict" / "test.zip") as archive:
        names = set(archive.namelist())
        assert archive.read("method.txt").decode().strip() == "tiny test run"
    expected = {f"{key}.png" for key in discover_keys(setup / "tree" / "test-segmentation")}
    assert names == expected | {"match.json", "method.txt"} and len(expected) == 6


def test_bad_inputs_are_refused_with_the_path(ray_cluster, setup, tmp_path, capsys):
    assert main(["finetune", "--run", str(tmp_path / "empty"), *TINY]) == 2
    assert f"{tmp_path / 'empty'}/labelgen/pseudo/train/manifest.json" in capsys.readouterr().err
    missing = tmp_path / "nope.pt"
    assert main(["predict", "--split", "validation", "--data", str(setup / "shards"), "--checkpoint", str(missing),
                 "--out", str(tmp_path / "out"), *TINY]) == 2
    assert str(missing) in capsys.readouterr().err
    # a stage-1 checkpoint has no segmentation head
    stage1 = setup / "run" / "pretrain" / "checkpoint_step=00000001" / CHECKPOINT_FILE
    assert main(["predict", "--split", "validation", "--data", str(setup / "shards"), "--checkpoint", str(stage1),
                 "--out", str(tmp_path / "out"), *TINY]) == 2
    assert "no segmentation head" in capsys.readouterr().err
