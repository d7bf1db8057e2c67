"""`lussray evaluate` end to end on a generated ImageNet-S tree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lussray.cli import main
from lussray.data.imagenet_s import read_label_png, segmentation_dir, write_label_png
from lussray.eval.io import discover_keys, prediction_path, write_foreground, write_prediction

CLASSES = 6


@pytest.fixture(scope="module")
def gt_dir(tmp_path_factory) -> Path:
    """validation-segmentation/ of a generated dataset (the synthetic generator, else numpy shapes)."""
    root = tmp_path_factory.mktemp("imagenet-s")
    try:
        from lussray.data.synthetic import generate_dataset
    except ImportError:  # pragma: no cover - the generator is optional here
        rng = np.random.default_rng(0)
        for c in range(1, CLASSES + 1):
            for i in range(4):
                gt = np.zeros((48, 64), np.int64)
                top, left = rng.integers(0, 24, 2)
                gt[top : top + 20, left : left + 30] = c
                gt[top, left : left + 30] = 1000
                write_label_png(root / segmentation_dir("validation") / f"n{c:08d}" / f"img_{c}_{i}.png", gt)
    else:
        generate_dataset(root, classes=CLASSES, train_per_class=0, val_per_class=4, test_per_class=0,
                         semi_per_class=0, size=64, seed=0)
    return root / segmentation_dir("validation")


def _write_predictions(gt_dir: Path, out: Path, make) -> None:
    for key in discover_keys(gt_dir):
        write_prediction(out, key, make(read_label_png(prediction_path(gt_dir, key))))


def _evaluate(*args: str) -> int:
    return main(["evaluate", *args])


def test_permuted_perfect_prediction_scores_100_after_matching(gt_dir, tmp_path, capsys):
    perm = np.array([0, 4, 6, 1, 3, 2, 5])  # generated id of each GT class
    pred = tmp_path / "pred"
    _write_predictions(gt_dir, pred, lambda gt: perm[np.where(gt == 1000, 0, gt)])
    args = ["--pred", str(pred), "--gt", str(gt_dir), "--classes", str(CLASSES)]
    assert _evaluate(*args, "--hungarian") == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "b-mIoU" in out and "Img-Acc" in out
    metrics = json.loads((pred / "metrics.json").read_text())
    assert metrics["mIoU"] == pytest.approx(100)
    assert metrics["Acc"] == pytest.approx(100) and metrics["FMeasure"] == pytest.approx(100)
    assert metrics["num_images"] == 4 * CLASSES
    match = json.loads((pred / "match.json").read_text())
    assert match == {str(perm[c]): c for c in range(CLASSES + 1)} | {"0": 0}

    # Applying the written match gives the same numbers; without it the ids are wrong.
    assert _evaluate(*args, "--match", str(pred / "match.json"), "--out", str(tmp_path / "m")) == 0
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["mIoU"] == pytest.approx(100)
    assert _evaluate(*args, "--out", str(tmp_path / "raw")) == 0
    assert json.loads((tmp_path / "raw" / "metrics.json").read_text())["mIoU"] < 50
    assert "not applied" in capsys.readouterr().out


def test_random_prediction_scores_near_chance(gt_dir, tmp_path):
    rng = np.random.default_rng(1)
    pred = tmp_path / "pred"
    _write_predictions(gt_dir, pred, lambda gt: rng.integers(0, CLASSES + 1, gt.shape))
    assert _evaluate("--pred", str(pred), "--gt", str(gt_dir), "--classes", str(CLASSES), "--hungarian",
                     "--workers", "1") == 0
    metrics = json.loads((pred / "metrics.json").read_text())
    # Uniform predictions over K = N + 1 ids: E[IoU_c] = (G_c / K) / (G_c + V / K - G_c / K).
    counts = np.zeros(CLASSES + 1)
    for key in discover_keys(gt_dir):
        gt = read_label_png(prediction_path(gt_dir, key))
        counts += np.bincount(gt[gt != 1000].ravel(), minlength=CLASSES + 1)
    k, valid = CLASSES + 1, counts.sum()
    chance = np.mean((counts / k) / (counts + valid / k - counts / k)) * 100
    assert metrics["mIoU"] == pytest.approx(chance, abs=1.0)
    assert metrics["mIoU"] < 20


def test_run_folder_list_and_table(gt_dir, tmp_path, capsys):
    pred = tmp_path / "pred"
    _write_predictions(gt_dir, pred, lambda gt: np.where(gt == 1000, 0, gt))
    keys = discover_keys(gt_dir)[:5]
    listing = tmp_path / "names.txt"
    listing.write_text("".join(f"{k}.JPEG {k}.png\n" for k in keys))
    run = tmp_path / "run"
    assert _evaluate("--pred", str(pred), "--gt", str(gt_dir), "--classes", str(CLASSES), "--list", str(listing),
                     "--run", str(run), "--per-class") == 0
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert metrics["num_images"] == 5 and metrics["Acc"] == 100
    assert "other" in capsys.readouterr().out


def test_sweep_over_foreground_scores(gt_dir, tmp_path, capsys):
    pred = tmp_path / "pred"
    for key in discover_keys(gt_dir):
        gt = read_label_png(prediction_path(gt_dir, key))
        label = np.where(gt == 1000, 0, gt)
        write_prediction(pred, key, np.where(label == 0, 1, label))  # "other" must come from tau
        write_foreground(pred, key, np.where(label > 0, 0.8, 0.3))
    assert _evaluate("--pred", str(pred), "--gt", str(gt_dir), "--classes", str(CLASSES), "--sweep", "0.1:0.9:0.2") == 0
    metrics = json.loads((pred / "metrics.json").read_text())
    assert metrics["best_tau"] == pytest.approx(0.5)
    assert metrics["best"]["mIoU"] == pytest.approx(100)
    assert len(metrics["curve"]) == 5
    assert "<- best" in capsys.readouterr().out


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "1 of 24 prediction files are missing"),
        ("size", "2 of 24 files have another size than their ground truth"),
        ("ids", "1 of 24 files use ids outside the allowed range"),
    ],
)
def test_bad_predictions_exit_2_with_a_clear_message(gt_dir, tmp_path, capsys, damage, message):
    pred = tmp_path / "pred"
    _write_predictions(gt_dir, pred, lambda gt: np.where(gt == 1000, 0, gt))
    keys = discover_keys(gt_dir)
    if damage == "missing":
        prediction_path(pred, keys[3]).unlink()
    elif damage == "size":
        for key in keys[:2]:
            write_label_png(prediction_path(pred, key), np.zeros((5, 7), np.int64))
    else:
        write_label_png(prediction_path(pred, keys[0]), np.full((64, 64), CLASSES + 1))
    assert _evaluate("--pred", str(pred), "--gt", str(gt_dir), "--classes", str(CLASSES)) == 2
    err = capsys.readouterr().err
    assert message in err
    assert str(prediction_path(pred, keys[3] if damage == "missing" else keys[0])) in err


def test_evaluator_loads_neither_ray_nor_torch():
    import subprocess
    import sys

    code = (
        "import sys, lussray.eval.evaluate, lussray.eval.sweep; "
        "assert not {'ray', 'torch'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
