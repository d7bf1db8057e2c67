import numpy as np
import pytest

from lussray.eval.stats import (
    BUCKET_NAMES,
    LabelError,
    StatsAccumulator,
    decode_pairs,
    encode_pairs,
    fmeasure,
    image_stats,
    size_buckets,
)
from tests.unit.test_eval_reference import official_size_bucket


def test_size_bucket_ties_go_to_the_smaller_bucket():
    # 20 valid pixels: 1 px = 5% (S), 2 px = 10%, 5 px = 25% (MS), 6 px = 30%, 10 px = 50% (ML), 11 px = 55% (L).
    counts = np.array([1, 2, 5, 6, 10, 11])
    assert size_buckets(counts, 20).tolist() == [0, 1, 1, 2, 2, 3]
    assert [BUCKET_NAMES[b] for b in size_buckets(np.array([9375, 9376]), 187500)] == ["S", "MS"]


@pytest.mark.parametrize("count, total", [(1, 20), (9375, 187500), (2**23 + 7, 2**24 + 5), (3, 7), (5000001, 10**8)])
def test_size_buckets_replay_float32(count, total):
    assert size_buckets(np.array([count]), total)[0] == official_size_bucket(count, total)


def test_pair_codes_round_trip_and_sort_by_pred_then_gt():
    pred, gt, tag = np.array([0, 0, 3, 300]), np.array([0, 5, 1, 919]), np.array([15, 2, 0, 3])
    codes = encode_pairs(pred, gt, tag, 919)
    assert np.all(np.diff(codes) > 0)
    for a, b in zip(decode_pairs(codes, 919), (pred, gt, tag)):
        np.testing.assert_array_equal(a, b)


def test_fmeasure_by_hand():
    # tp = 8, t = 9, p = 9: P = R = 8/9, F = 1.3 P R / (0.3 P + R) = 8/9
    assert fmeasure(np.array([8]), 9, np.array([9]))[0] == pytest.approx(8 / 9, rel=1e-6)
    assert fmeasure(np.array([0]), 0, np.array([0]))[0] == 0  # no foreground anywhere


def test_statistics_are_summable():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, (20, 30))
    pred = rng.integers(0, 4, (20, 30))
    stats = image_stats(pred, gt, 3)
    assert stats.pair_counts[0, :, 0].sum() == gt.size
    double = StatsAccumulator(3)
    double.add(stats)
    double.add(stats)
    single = StatsAccumulator(3)
    single.add(stats)
    np.testing.assert_array_equal(double.pair_counts(), 2 * single.pair_counts())
    np.testing.assert_array_equal(double.gt_totals, 2 * single.gt_totals)
    np.testing.assert_array_equal(double.pred_totals, 2 * single.pred_totals)


@pytest.mark.parametrize(
    "pred, gt, kind",
    [
        (np.zeros((2, 3)), np.zeros((3, 2)), "size"),
        (np.full((2, 2), 4), np.zeros((2, 2)), "pred_ids"),
        (np.zeros((2, 2)), np.full((2, 2), 999), "gt_ids"),
    ],
)
def test_refuses_bad_maps(pred, gt, kind):
    with pytest.raises(LabelError) as error:
        image_stats(pred.astype(int), gt.astype(int), 3)
    assert error.value.kind == kind


def test_unmapped_ids_are_refused():
    with pytest.raises(LabelError) as error:
        image_stats(np.array([[1, 2]]), np.array([[1, 1]]), 3, mapping=np.array([0, 1, -1]))
    assert error.value.kind == "unmatched"


def test_threshold_axis_without_scores_equals_single_map():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 3, (12, 16))
    pred = rng.integers(1, 4, (12, 16))
    swept = image_stats(pred, gt, 3, scores=np.ones(gt.shape), taus=[0.0, 0.5, 2.0])
    single = image_stats(pred, gt, 3)
    zero = image_stats(np.zeros_like(pred), gt, 3)
    # scores 1.0 >= 0 and 0.5: the prediction is unchanged; tau 2 turns everything into "other".
    for k, ref in ((0, single), (1, single), (2, zero)):
        got = dict(zip(swept.pair_codes.tolist(), swept.pair_counts[k].tolist()))
        want = dict(zip(ref.pair_codes.tolist(), ref.pair_counts[0].tolist()))
        assert {c: v for c, v in got.items() if any(v)} == want
