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


# ---- --protocol pixel ----------------------------------------------------------------------------

PIXEL_CLASSES, PIXEL_CLUSTERS = 3, 5


@pytest.fixture()
def scene_gt(tmp_path) -> Path:
    """Six 12 x 16 scene label maps, classes 0..2 and 1000 (ignore), in nested folders."""
    rng = np.random.default_rng(3)
    root = tmp_path / "gt"
    for i in range(6):
        gt = rng.integers(0, PIXEL_CLASSES, (12, 16))
        gt[rng.random(gt.shape) < 0.1] = 1000
        write_label_png(root / f"town{i % 2}" / f"scene_{i}.png", gt)
    return root


def _pixel_predictions(gt_dir: Path, out: Path, make) -> list[Path]:
    paths = sorted(gt_dir.rglob("*.png"))
    for path in paths:
        write_label_png(out / path.relative_to(gt_dir), make(read_label_png(path)))
    return [out / p.relative_to(gt_dir) for p in paths]


def _pixel(gt: Path, pred: Path, *extra: str) -> int:
    return _evaluate("--protocol", "pixel", "--pred", str(pred), "--gt", str(gt),
                     "--classes", str(PIXEL_CLASSES), *extra)


def test_pixel_protocol_permuted_perfect_scores_100(scene_gt, tmp_path, capsys):
    perm = np.array([4, 0, 2])  # cluster of each class; clusters 1 and 3 unused (K > C)
    pred = tmp_path / "pred"
    _pixel_predictions(scene_gt, pred, lambda gt: np.where(gt == 1000, 3, perm[np.minimum(gt, 2)]))
    assert _pixel(scene_gt, pred, "--clusters", str(PIXEL_CLUSTERS), "--things", "0", "--per-class") == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "Acc" in out and "mIoU_things" in out
    metrics = json.loads((pred / "metrics.json").read_text())
    assert metrics["protocol"] == "pixel" and metrics["num_images"] == 6
    assert metrics["mIoU"] == pytest.approx(100) and metrics["Acc"] == pytest.approx(100)
    assert metrics["iou"] == pytest.approx([100, 100, 100])
    assert metrics["match"] == {"0": 1, "2": 2, "4": 0} and metrics["unmatched_clusters"] == [1, 3]
    assert metrics["groups"] == {"things": [0], "stuff": [1, 2]}
    assert metrics["mIoU_things"] == pytest.approx(100)


def test_pixel_protocol_identity_for_class_ids(scene_gt, tmp_path):
    pred = tmp_path / "pred"
    _pixel_predictions(scene_gt, pred, lambda gt: np.where(gt == 1000, 0, np.where(gt == 2, 1, gt)))
    assert _pixel(scene_gt, pred, "--match", "identity", "--out", str(tmp_path / "o")) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["matching"] == "identity" and metrics["match"] == {"0": 0, "1": 1, "2": 2}
    assert metrics["iou"][0] == pytest.approx(100) and metrics["iou"][2] == pytest.approx(0)
    assert metrics["Acc"] < 100
    assert not (pred / "metrics.json").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "2 of 6 prediction files are missing"),
        ("size", "1 of 6 files have another size than their ground truth"),
        ("ids", "1 of 6 files hold ids outside the clusters 0..K-1"),
        ("match", "--match must be one of hungarian, identity"),
    ],
)
def test_pixel_protocol_bad_input_exits_2(scene_gt, tmp_path, capsys, damage, message):
    pred = tmp_path / "pred"
    paths = _pixel_predictions(scene_gt, pred, lambda gt: np.where(gt == 1000, 0, gt))
    extra: tuple[str, ...] = ()
    if damage == "missing":
        paths[1].unlink()
        paths[4].unlink()
    elif damage == "size":
        write_label_png(paths[1], np.zeros((5, 7), np.int64))
    elif damage == "ids":
        write_label_png(paths[1], np.full((12, 16), PIXEL_CLASSES))  # K defaults to C: id C is out
    else:
        extra = ("--match", "best")
    assert _pixel(scene_gt, pred, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    if damage != "match":
        assert str(paths[1]) in err
    assert not (pred / "metrics.json").exists()


def test_scene_preset_selects_the_pixel_protocol_and_its_things(scene_gt, tmp_path):
    pred = tmp_path / "pred"
    _pixel_predictions(scene_gt, pred, lambda gt: np.where(gt == 1000, 0, gt))
    # synthetic-scenes: protocol pixel, 12 classes, things 0..5 (C = 12 here, classes 3..11 absent).
    assert _evaluate("--dataset", "synthetic-scenes", "--pred", str(pred), "--gt", str(scene_gt)) == 0
    metrics = json.loads((pred / "metrics.json").read_text())
    assert metrics["protocol"] == "pixel" and metrics["num_classes"] == 12
    assert metrics["groups"]["things"] == list(range(6)) and metrics["mIoU"] == pytest.approx(100)
