"""The pixel-level protocol against a slow literal transcription, on random and hand-built cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lussray.data.imagenet_s import IGNORE_ID, write_label_png
from lussray.errors import UserError
from lussray.eval.pixel import (
    UNMATCHED,
    ConfusionAccumulator,
    PixelLabelError,
    confusion,
    evaluate_pixel_items,
    hungarian_match,
    identity_match,
    list_pixel_items,
    parse_class_ids,
    pixel_metrics,
    things_stuff,
)


# ---- the slow transcription: loops over pixels, as the protocol is worded -------------------------

def slow_confusion(preds, gts, num_classes, num_clusters):
    hist = [[0] * num_clusters for _ in range(num_classes)]
    for pred, gt in zip(preds, gts):
        for y in range(gt.shape[0]):
            for x in range(gt.shape[1]):
                g = int(gt[y, x])
                if g != IGNORE_ID:
                    hist[g][int(pred[y, x])] += 1
    return hist


def slow_best_total(hist, num_classes, num_clusters):
    """The most pixels any one-to-one class -> cluster assignment can match (brute force)."""
    best = 0
    for clusters in itertools.permutations(range(num_clusters), min(num_classes, num_clusters)):
        total = sum(hist[c][k] for c, k in zip(range(num_classes), clusters))
        best = max(best, total)
    return best


def slow_metrics(preds, gts, mapping, num_classes):
    """Per-class IoU and pixel accuracy by counting pixels; mapping[k] = class or -1 (wrong)."""
    tp, fp, fn = [0] * num_classes, [0] * num_classes, [0] * num_classes
    correct = labelled = 0
    for pred, gt in zip(preds, gts):
        for y in range(gt.shape[0]):
            for x in range(gt.shape[1]):
                g = int(gt[y, x])
                if g == IGNORE_ID:
                    continue
                labelled += 1
                p = int(mapping[int(pred[y, x])])
                if p == g:
                    tp[g] += 1
                    correct += 1
                else:
                    fn[g] += 1
                    if p >= 0:
                        fp[p] += 1
    iou = [100.0 * tp[c] / (tp[c] + fp[c] + fn[c]) if tp[c] + fp[c] + fn[c] else math.nan for c in range(num_classes)]
    defined = [v for v in iou if not math.isnan(v)]
    miou = sum(defined) / len(defined) if defined else math.nan
    acc = 100.0 * correct / labelled if labelled else math.nan
    return iou, miou, acc


# ---- random cases -------------------------------------------------------------------------------

def random_case(seed, num_classes, num_clusters, num_images=5):
    """Images of random sizes; some classes absent; one all-ignored image; noisy permuted predictions."""
    rng = np.random.default_rng(seed)
    present = rng.choice(num_classes, size=max(1, num_classes - 1), replace=False)  # one class absent
    perm = rng.permutation(num_clusters)
    preds, gts = [], []
    for i in range(num_images):
        shape = tuple(rng.integers(3, 9, 2))
        gt = rng.choice(present, size=shape).astype(np.int64)
        gt[rng.random(shape) < 0.2] = IGNORE_ID
        if i == 1:
            gt[:] = IGNORE_ID
        pred = np.where(gt == IGNORE_ID, rng.integers(0, num_clusters, shape), perm[np.minimum(gt, num_classes - 1)])
        noise = rng.random(shape) < 0.3
        pred[noise] = rng.integers(0, num_clusters, int(noise.sum()))
        preds.append(pred)
        gts.append(gt)
    return preds, gts


def fast_protocol(preds, gts, num_classes, num_clusters, match="hungarian", groups=None):
    acc = ConfusionAccumulator(num_classes, num_clusters)
    for pred, gt in zip(preds, gts):
        acc.add(confusion(pred, gt.astype(np.uint16), num_classes, num_clusters))
    mapping = hungarian_match(acc.hist) if match == "hungarian" else identity_match(num_classes, num_clusters)
    return pixel_metrics(acc.hist, mapping, groups, acc.num_images)


def assert_close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-9), (a, b)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_classes, num_clusters", [(3, 3), (4, 4), (3, 5), (2, 6)])
def test_matches_the_slow_transcription(seed, num_classes, num_clusters):
    preds, gts = random_case(seed, num_classes, num_clusters)
    metrics = fast_protocol(preds, gts, num_classes, num_clusters)
    slow_hist = slow_confusion(preds, gts, num_classes, num_clusters)
    assert metrics.hist.tolist() == slow_hist
    mapping = metrics.mapping
    matched = mapping[mapping != UNMATCHED]
    assert sorted(matched.tolist()) == list(range(num_classes))  # every class gets one cluster
    assert (mapping == UNMATCHED).sum() == num_clusters - num_classes  # the extra ones get none
    total = sum(slow_hist[c][k] for k, c in enumerate(mapping.tolist()) if c != UNMATCHED)
    assert total == slow_best_total(slow_hist, num_classes, num_clusters)
    iou, miou, acc = slow_metrics(preds, gts, mapping, num_classes)
    assert_close(metrics.iou.tolist(), iou)
    assert_close([metrics.miou, metrics.acc], [miou, acc])
    assert metrics.num_images == len(preds) and metrics.labelled_pixels == sum(map(sum, slow_hist))


@pytest.mark.parametrize("seed", range(3))
def test_identity_mode_matches_the_slow_transcription(seed):
    num_classes = 4
    preds, gts = random_case(seed, num_classes, num_classes)
    rng = np.random.default_rng(seed)
    preds = [np.where(rng.random(g.shape) < 0.7, np.minimum(g, num_classes - 1), p) for p, g in zip(preds, gts)]
    metrics = fast_protocol(preds, gts, num_classes, num_classes, match="identity")
    assert metrics.mapping.tolist() == list(range(num_classes))
    iou, miou, acc = slow_metrics(preds, gts, np.arange(num_classes), num_classes)
    assert_close(metrics.iou.tolist() + [metrics.miou, metrics.acc], iou + [miou, acc])


def test_permuted_perfect_prediction_scores_100():
    rng = np.random.default_rng(0)
    num_classes, num_clusters = 5, 8
    perm = rng.permutation(num_clusters)[:num_classes]  # K > C: three clusters never used
    gts = [rng.integers(0, num_classes, (6, 7)) for _ in range(4)]
    for gt in gts:
        gt[0] = IGNORE_ID
    preds = [np.where(gt == IGNORE_ID, 7, perm[np.minimum(gt, num_classes - 1)]) for gt in gts]
    metrics = fast_protocol(preds, gts, num_classes, num_clusters)
    assert metrics.miou == pytest.approx(100) and metrics.acc == pytest.approx(100)
    assert metrics.mapping[perm].tolist() == list(range(num_classes))
    # Without the matching the permuted ids are mostly wrong.
    assert fast_protocol(preds, gts, num_classes, num_clusters, match="identity").miou < 100


def test_extra_clusters_count_as_wrong():
    # Class 0: 6 pixels as cluster 0, 4 as cluster 2; class 1: 10 as cluster 1. K = 3 > C = 2.
    hist = np.array([[6, 0, 4], [0, 10, 0]])
    metrics = pixel_metrics(hist, hungarian_match(hist))
    assert metrics.mapping.tolist() == [0, 1, UNMATCHED]
    assert metrics.acc == pytest.approx(80)
    assert metrics.iou.tolist() == pytest.approx([60, 100])
    assert metrics.to_dict()["unmatched_clusters"] == [2]


def test_absent_classes_are_skipped_and_all_ignored_gives_nan():
    hist = np.array([[5, 0, 0], [0, 0, 0], [1, 0, 4]])  # class 1 absent and cluster 1 empty
    metrics = pixel_metrics(hist, hungarian_match(hist))
    assert math.isnan(metrics.iou[1])
    assert metrics.miou == pytest.approx((500 / 6 + 80) / 2)
    empty = pixel_metrics(np.zeros((3, 3), np.int64), np.arange(3))
    assert math.isnan(empty.acc) and math.isnan(empty.miou) and empty.labelled_pixels == 0


def test_things_and_stuff_means():
    hist = np.diag([10, 10, 10, 10]).astype(np.int64)
    hist[3, 3], hist[3, 0] = 5, 5  # class 3: half wrong
    groups = things_stuff([0, 1], 4)
    assert groups == {"things": (0, 1), "stuff": (2, 3)}
    metrics = pixel_metrics(hist, np.arange(4), groups)
    assert metrics.group_miou["things"] == pytest.approx((100 * 10 / 15 + 100) / 2)
    assert metrics.group_miou["stuff"] == pytest.approx((100 + 50) / 2)
    assert metrics.summary()["mIoU_stuff"] == metrics.group_miou["stuff"]
    coco = things_stuff(range(12), 27)
    assert coco["things"] == tuple(range(12)) and coco["stuff"] == tuple(range(12, 27))
    assert parse_class_ids("0-2,5", 6) == (0, 1, 2, 5)
    with pytest.raises(UserError, match="outside"):
        parse_class_ids("0-27", 27)


@pytest.mark.parametrize(
    "pred, gt, kind",
    [
        (np.zeros((2, 3)), np.zeros((3, 2)), "size"),
        (np.full((2, 2), 4), np.zeros((2, 2)), "cluster_ids"),
        (np.zeros((2, 2)), np.array([[0, 3], [IGNORE_ID, 0]]), "class_ids"),
    ],
)
def test_bad_labels_raise_with_their_kind(pred, gt, kind):
    with pytest.raises(PixelLabelError) as error:
        confusion(pred.astype(np.int64), gt.astype(np.uint16), num_classes=3, num_clusters=4)
    assert error.value.kind == kind


def _write_case(root, preds, gts):
    for i, (pred, gt) in enumerate(zip(preds, gts)):
        key = f"city{i % 2}/deep/img_{i}"
        write_label_png(root / "gt" / f"{key}.png", gt)
        write_label_png(root / "pred" / f"{key}.png", pred)


def test_evaluate_files_streams_nested_folders_and_names_bad_files(tmp_path):
    preds, gts = random_case(7, 3, 4, num_images=6)
    _write_case(tmp_path, preds, gts)
    items = list_pixel_items(tmp_path / "gt", tmp_path / "pred")
    assert [i.key for i in items][:2] == ["city0/deep/img_0", "city0/deep/img_2"]
    evaluation = evaluate_pixel_items(items, num_classes=3, num_clusters=4, workers=1)
    assert evaluation.metrics.hist.tolist() == slow_confusion(preds, gts, 3, 4)

    write_label_png(tmp_path / "pred" / "city1" / "deep" / "img_3.png", np.full(gts[3].shape, 4))
    with pytest.raises(UserError, match=r"1 of 6 files hold ids outside the clusters .*img_3\.png"):
        evaluate_pixel_items(items, num_classes=3, num_clusters=4, workers=1)
    (tmp_path / "pred" / "city1" / "deep" / "img_5.png").unlink()
    with pytest.raises(UserError, match=r"1 of 6 prediction files are missing: .*img_5\.png"):
        list_pixel_items(tmp_path / "gt", tmp_path / "pred")


def test_fewer_clusters_than_classes_leave_classes_unmatched():
    hist = np.array([[9, 1], [2, 8], [5, 0]])  # C = 3, K = 2: class 2 loses to class 0 for cluster 0
    metrics = pixel_metrics(hist, hungarian_match(hist))
    assert metrics.mapping.tolist() == [0, 1]
    assert metrics.iou[2] == 0 and metrics.acc == pytest.approx(100 * 17 / 25)
