import json
import pickle

import numpy as np
import pytest

from lussray.eval.sweep import DEFAULT_TAUS, TauSweep, parse_taus, sweep_tau


def test_default_thresholds_are_pass_curve():
    assert len(DEFAULT_TAUS) == 81 and DEFAULT_TAUS[0] == 0 and DEFAULT_TAUS[-1] == 0.8
    np.testing.assert_allclose(parse_taus("0:0.8:0.01"), DEFAULT_TAUS)
    assert parse_taus("0.3,0.1").tolist() == [0.1, 0.3]
    for bad in ("0.5:0.1:0.1", "1,1", ""):
        with pytest.raises(ValueError):
            parse_taus(bad)


def _object_image(seed: int, size: int = 24):
    """GT: one object of class 1 on other; prediction 1 everywhere; scores high on the object."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((size, size), int)
    top, left = rng.integers(2, size // 2, 2)
    gt[top : top + size // 3, left : left + size // 3] = 1
    scores = np.where(gt == 1, 0.7, 0.2).astype(np.float32)
    return np.ones_like(gt), scores, gt


def test_best_tau_separates_object_from_other():
    samples = [_object_image(s) for s in range(6)]
    result = sweep_tau(samples, num_classes=1, taus=[0.1, 0.2, 0.3, 0.69, 0.7, 0.71])
    # tau <= 0.2: everything is class 1; 0.2 < tau <= 0.7 is perfect; above, everything is other.
    assert [round(m.miou, 6) for m in result.metrics[2:5]] == [100, 100, 100]
    assert result.best_tau == 0.3  # the first of the tied maxima, as np.argmax
    assert result.metrics[5].img_acc == 0 and result.metrics[5].fmeasure == 0
    assert result.metrics[0].miou < 100
    json.dumps(result.to_dict())  # JSON-ready


def test_scores_compare_in_float32():
    # float32(0.41) < 0.41 in float64: the official comparison is float32, so the pixel survives.
    pred, _, gt = _object_image(0)
    scores = np.full(gt.shape, np.float32(0.41))
    sweep = TauSweep(1, [0.41])
    stats = sweep.image_stats(pred, scores, gt)
    assert stats.pred_kmax.tolist() == [1]  # id 1 still present at tau = 0.41


def test_image_stats_travel_between_processes():
    sweep = TauSweep(1, [0.1, 0.5])
    stats = pickle.loads(pickle.dumps(sweep.image_stats(*_object_image(1))))
    sweep.add(stats)
    assert sweep.num_images == 1 and sweep.result().metrics[1].miou == pytest.approx(100)


def _load(seed: int):
    return _object_image(seed)


def test_sweep_tau_with_a_loader():
    loaded = sweep_tau(range(3), num_classes=1, taus=[0.3, 0.9], load=_load)
    direct = sweep_tau([_object_image(s) for s in range(3)], num_classes=1, taus=[0.3, 0.9])
    assert [m.summary() for m in loaded.metrics] == [m.summary() for m in direct.metrics]
