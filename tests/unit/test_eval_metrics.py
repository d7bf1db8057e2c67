"""Hand-computed metrics on tiny maps (every number below is worked out in the comments)."""

import math

import numpy as np
import pytest

from lussray.eval.metrics import compute_metrics
from lussray.eval.stats import StatsAccumulator, image_stats
from tests.unit.test_eval_reference import official_metrics

N = 300  # classes 0..300: 301 in the mean; ids above 255 exercise the G channel

# Image A (4 x 6, d = 1): two categories (257, 3), an ignore pixel, other everywhere else.
GT_A = np.array(
    [
        [0, 0, 0, 0, 0, 0],
        [0, 257, 257, 257, 0, 0],
        [0, 257, 257, 257, 1000, 3],
        [0, 0, 0, 0, 3, 3],
    ]
)
PRED_A = np.array(
    [
        [0, 0, 0, 0, 0, 0],
        [0, 257, 257, 0, 0, 0],
        [0, 257, 257, 257, 3, 3],
        [0, 0, 0, 3, 3, 3],
    ]
)
# 23 valid pixels. GT: 0 x14, 257 x6, 3 x3. Pred: 0 x14, 257 x5, 3 x4 ((2, 4) is ignored).
# Agreement: 0 x13, 257 x5, 3 x3. IoU: 0 -> 13/15, 257 -> 5/6, 3 -> 3/4.
# Every pixel of A is on a boundary (d = 1, and each inner 3x3 window meets two labels), so the
# boundary histograms equal the plain ones. Sizes: 257 -> ceil(600/23) = 27 (ML), 3 -> ceil(300/23)
# = 14 (MS). F: tp = 8, t = p = 9 -> 8/9. Img-Acc: argmax over ids >= 1 is 257, in the GT.

# Image B (5 x 5, d = 1): one category 300 with a one-pixel hole in the prediction.
GT_B = np.full((5, 5), 300)
PRED_B = np.full((5, 5), 300)
PRED_B[2, 2] = 0
# IoU: 300 -> 24/25; 0 -> 0/1. GT boundary: the 16-pixel frame (inner windows are uniform);
# prediction boundary: all 25 pixels (every inner window holds the hole): label 300 x24, 0 x1.
# Boundary IoU: 300 -> 16/24, 0 -> 0. Size 100 -> L. F: R = 24/25, P = 1 -> 1.3 * 0.96 / 1.26.


def evaluate(pairs, mapping=None, fixed=True):
    acc = StatsAccumulator(N)
    for pred, gt in pairs:
        acc.add(image_stats(pred, gt, N, mapping=np.arange(N + 1) if fixed else None))
    return compute_metrics(acc, mapping)


def test_image_a_by_hand():
    m = evaluate([(PRED_A, GT_A)])
    miou = (13 / 15 + 5 / 6 + 3 / 4) / 301 * 100  # 298 absent classes count 0
    assert m.miou == pytest.approx(miou)
    assert m.boundary_miou == pytest.approx(miou)
    assert m.iou[0] == pytest.approx(1300 / 15) and m.iou[257] == pytest.approx(500 / 6)
    assert m.iou[1] == 0 and m.iou[300] == 0
    assert m.img_acc == 100
    assert m.fmeasure == pytest.approx(800 / 9, rel=1e-6)
    # MS: "other" pixels + class 3: pred 0 x13, 3 x4 (one on other); IoU 0 -> 13/14, 3 -> 3/4.
    assert m.size_miou["MS"] == pytest.approx((13 / 14 + 3 / 4) / 2 * 100)
    # ML: "other" + class 257: pred 0 x14, 3 x1, 257 x5; IoU 0 -> 13/15, 257 -> 5/6; class 3 has no
    # GT pixel in ML, so it is skipped although it was predicted there.
    assert m.size_miou["ML"] == pytest.approx((13 / 15 + 5 / 6) / 2 * 100)
    assert m.size_boundary_miou["MS"] == pytest.approx(m.size_miou["MS"])
    assert math.isnan(m.size_miou["S"]) and math.isnan(m.size_miou["L"])
    assert m.summary()["S"] is None


def test_image_b_by_hand():
    m = evaluate([(PRED_B, GT_B)])
    assert m.miou == pytest.approx((24 / 25) / 301 * 100)
    assert m.boundary_miou == pytest.approx((16 / 24) / 301 * 100)
    assert m.size_miou["L"] == pytest.approx(96)
    assert m.size_boundary_miou["L"] == pytest.approx(200 / 3)
    assert m.fmeasure == pytest.approx(1.3 * 0.96 / 1.26 * 100, rel=1e-6)
    assert m.img_acc == 100


def test_two_images_sum_histograms_before_dividing():
    m = evaluate([(PRED_A, GT_A), (PRED_B, GT_B)])
    # class 0: TP 13 + 0, pred 14 + 1, GT 14 + 0 -> 13/16; boundary of 0 likewise 13/16.
    assert m.miou == pytest.approx((13 / 16 + 5 / 6 + 3 / 4 + 24 / 25) / 301 * 100)
    assert m.boundary_miou == pytest.approx((13 / 16 + 5 / 6 + 3 / 4 + 16 / 24) / 301 * 100)
    assert m.fmeasure == pytest.approx((8 / 9 + 1.3 * 0.96 / 1.26) / 2 * 100, rel=1e-6)
    assert m.num_images == 2
    reference = official_metrics([PRED_A, PRED_B], [GT_A, GT_B], N)
    for key, value in m.summary().items():
        assert value == pytest.approx(reference[key], abs=1e-4) if value is not None else math.isnan(reference[key])


def test_matching_is_applied_to_labels_and_boundaries():
    # Predicted ids 1 and 2 swapped; the matching swaps them back: a perfect score.
    gt = np.zeros((8, 8), int)
    gt[1:5, 1:5] = 1
    gt[5:8, 5:8] = 2
    swap = np.array([0, 2, 1] + list(range(3, N + 1)))
    m = evaluate([(swap[gt], gt)], mapping=swap, fixed=False)
    assert m.iou[:3].tolist() == pytest.approx([100, 100, 100])
    assert m.boundary_iou[:3].tolist() == pytest.approx([100, 100, 100])
    assert m.img_acc == 100


def test_all_other_prediction_is_an_img_acc_miss():
    gt = np.zeros((6, 6), int)
    gt[2:4, 2:4] = 5
    for fixed in (True, False):
        m = evaluate([(np.zeros_like(gt), gt)], fixed=fixed)
        assert m.img_acc == 0 and m.fmeasure == 0
        assert m.iou[0] == pytest.approx(32 / 36 * 100)


def test_all_ignored_image_counts_in_the_image_means():
    gt_empty = np.full((4, 4), 1000)
    m = evaluate([(PRED_B, GT_B), (np.ones((4, 4), int), gt_empty)])
    assert m.num_images == 2
    assert m.img_acc == 50  # no valid pixel: the argmax has no area
    assert m.fmeasure == pytest.approx(1.3 * 0.96 / 1.26 * 50, rel=1e-6)


@pytest.mark.parametrize("fixed", [True, False])
def test_img_acc_ties_take_the_smallest_matched_id(fixed):
    # Two predicted ids with 4 pixels each; the GT holds only class 2.
    gt = np.zeros((4, 4), int)
    gt[:2] = 2
    pred = np.zeros((4, 4), int)
    pred[0, :] = 1
    pred[1, :] = 2
    identity = np.arange(N + 1)
    assert evaluate([(pred, gt)], identity, fixed).img_acc == 0  # first maximum: id 1, not in GT
    if not fixed:  # a Hungarian-style permutation decided after the pass
        cycle = identity.copy()
        cycle[1], cycle[2], cycle[3] = 3, 2, 1  # the tied ids map to 3 and 2: class 2 comes first
        assert evaluate([(pred, gt)], cycle, fixed).img_acc == 100
