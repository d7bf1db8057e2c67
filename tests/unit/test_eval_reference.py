"""A slow, literal transcription of the official ImageNet-S evaluator, and the fast one checked
against it on random inputs.

The transcription follows shared/reference/pass-imagenet-s.md, section 3 (ImageNet-S
``data/data.py`` + ``evaluation/match.py`` + PASS ``evaluator.py`` / ``src/metric.py``) step by
step: per-label erosion for the boundaries (zero pad, 3x3 square, d iterations, the border does
not erode, as cv2.erode), the ignore mask after the boundaries, the matching applied to labels
and to boundary labels, ``histc``-style histograms, size buckets through explicit concatenation,
per-image F and Img-Acc, and for the tau sweep one full re-pass per threshold. It is written in
float64 except where the official arithmetic is float32 on purpose (the size of a class).
Other test modules and tools/bench_evaluate.py import it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from lussray.eval.matching import cooccurrence, hungarian_mapping
from lussray.eval.metrics import compute_metrics
from lussray.eval.stats import StatsAccumulator, image_stats
from lussray.eval.sweep import TauSweep

IGNORE = 1000


def official_boundary_map(label: np.ndarray, ratio: float = 0.03) -> np.ndarray:
    """``get_boundary_mask(label + 1)``: per value, mask - erode(pad(mask)), summed times value."""
    label = np.asarray(label).astype(np.int64) + 1
    h, w = label.shape
    d = int(round(ratio * np.sqrt(h**2 + w**2)))
    d = max(d, 1)
    out = np.zeros(label.shape, np.int64)
    for v in np.unique(label):
        padded = np.pad(label == v, 1)  # copyMakeBorder(..., BORDER_CONSTANT, value=0)
        eroded = ndimage.binary_erosion(padded, structure=np.ones((3, 3), bool), iterations=d, border_value=1)
        out += (padded & ~eroded)[1:-1, 1:-1] * int(v)
    return out


def _histc(values: np.ndarray, bins: int) -> np.ndarray:
    values = values[(values >= 0) & (values <= bins - 1)]
    return np.bincount(values.astype(np.int64), minlength=bins)[:bins].astype(np.float64)


def _iou_stats(output: np.ndarray, target: np.ndarray, bins: int):
    return _histc(output[output == target], bins), _histc(output, bins), _histc(target, bins)


def official_size_bucket(count: int, total: int) -> int:
    """``math.ceil(100.0 * counts[c] / sum(counts))`` on torch tensors: float32 arithmetic."""
    size = math.ceil(float(np.float32(np.float32(100.0) * np.float32(count)) / np.float32(total)))
    return 0 if size <= 5 else 1 if size <= 25 else 2 if size <= 50 else 3


def official_metrics(
    preds, gts, num_classes: int, match: dict[int, int] | None = None, boundary_map=official_boundary_map
) -> dict[str, float]:
    """The official metric pass over (H, W) maps (any iterables); NaN for an empty size bucket.

    ``boundary_map`` draws the boundary label map of ``label + 1`` (tools/bench_evaluate.py passes
    a faster erosion with the same result, as cv2.erode is faster than binary_erosion).
    """
    k = num_classes + 1
    t, p, tp, bt, bp, btp = (np.zeros(k) for _ in range(6))
    ts, ps, tps, bts, bps, btps = ([np.zeros(k) for _ in range(4)] for _ in range(6))
    fmeasure = acc = 0.0
    image_count = 0
    for pred, gt in zip(preds, gts):
        image_count += 1
        pred, gt = np.asarray(pred).astype(np.int64), np.asarray(gt).astype(np.int64)
        boundary_gt = boundary_map(gt).ravel()
        boundary_pred = boundary_map(pred).ravel()
        g, q = gt.ravel(), pred.ravel()
        mask = g != IGNORE
        g, q, boundary_gt, boundary_pred = g[mask], q[mask], boundary_gt[mask], boundary_pred[mask]
        if match is not None:
            q_m, b_m = np.zeros_like(q), np.zeros_like(boundary_pred)
            for v in np.unique(q):
                q_m[q == v] = match[int(v)]
                b_m[boundary_pred == v + 1] = match[int(v)] + 1
            q, boundary_pred = q_m, b_m
        a_i, a_o, a_t = _iou_stats(q, g, k)
        b_i, b_o, b_t = _iou_stats(boundary_pred, boundary_gt, k + 1)
        t += a_o
        p += a_t
        tp += a_i
        bt += b_o[1:]
        bp += b_t[1:]
        btp += b_i[1:]
        label = int(np.argmax(a_o[1:])) + 1
        acc += float(a_t[label] > 0 and a_o[label] > 0)
        positives, predicted = float((g > 0).sum()), float((q > 0).sum())
        hits = float(((g > 0) & (q > 0)).sum())
        recall, precision = hits / (positives + 1e-20), hits / (predicted + 1e-20)
        fmeasure += 1.3 * precision * recall / (0.3 * precision + recall + 1e-20)
        counts = np.bincount(g) if g.size else np.zeros(1, np.int64)
        groups: list[list[int]] = [[], [], [], []]
        for c in np.unique(g):
            if c != 0:
                groups[official_size_bucket(int(counts[c]), int(counts.sum()))].append(int(c))
        for b, members in enumerate(groups):
            if not members:
                continue
            keep = [g == 0] + [g == c for c in members]
            g_b = np.concatenate([g[m] for m in keep])
            q_b = np.concatenate([q[m] for m in keep])
            a_i, a_o, a_t = _iou_stats(q_b, g_b, k)
            ts[b] += a_o
            ps[b] += a_t
            tps[b] += a_i
            bg_b = np.concatenate([boundary_gt[m] for m in keep])
            bq_b = np.concatenate([boundary_pred[m] for m in keep])
            b_i, b_o, b_t = _iou_stats(bq_b, bg_b, k + 1)
            bts[b] += b_o[1:]
            bps[b] += b_t[1:]
            btps[b] += b_i[1:]
    n = image_count

    def mean_present(inter, out, target):
        iou = inter / (out + target - inter + 1e-10)
        return float(iou[target > 0].mean() * 100) if (target > 0).any() else float("nan")

    result = {
        "mIoU": float((tp / (t + p - tp + 1e-10)).mean() * 100),
        "mBIoU": float((btp / (bt + bp - btp + 1e-10)).mean() * 100),
        "Acc": acc / n * 100,
        "FMeasure": fmeasure / n * 100,
    }
    for b, name in enumerate(("S", "MS", "ML", "L")):
        result[name] = mean_present(tps[b], ts[b], ps[b])
        result["B" + name] = mean_present(btps[b], bts[b], bps[b])
    return result


def official_presence(preds, gts) -> tuple[list[set[int]], list[set[int]]]:
    """``match.py``: per image, the ids present on non-ignored pixels, without 0."""
    pred_sets, gt_sets = [], []
    for pred, gt in zip(preds, gts):
        valid = np.asarray(gt) != IGNORE
        pred_sets.append(set(np.unique(np.asarray(pred)[valid]).tolist()) - {0})
        gt_sets.append(set(np.unique(np.asarray(gt)[valid]).tolist()) - {0})
    return pred_sets, gt_sets


def official_cooccurrence(pred_sets, gt_sets, num_classes: int) -> np.ndarray:
    """``hungarian.py``: the co-occurrence of presence, by explicit loops."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    for pred_set, gt_set in zip(pred_sets, gt_sets):
        for i in pred_set:
            for j in gt_set:
                matrix[i - 1, j - 1] += 1
    return matrix


def official_matching(preds, gts, num_classes: int) -> tuple[dict[int, int], np.ndarray]:
    """The official matching (cost 1 - C / num_images, minimised); returns (match, co-occurrence)."""
    pred_sets, gt_sets = official_presence(preds, gts)
    cooc = official_cooccurrence(pred_sets, gt_sets, num_classes)
    cost = (1 - cooc / max(len(preds), 1)).astype(np.float32)
    rows, cols = linear_sum_assignment(cost)
    match = {int(r) + 1: int(c) + 1 for r, c in zip(rows, cols)}
    match[0] = 0
    return match, cooc


def official_threshold(pred: np.ndarray, scores: np.ndarray, tau: float) -> np.ndarray:
    """``prediction[logit < threshold] = 0`` with float32 scores and a Python float threshold."""
    out = np.asarray(pred).copy()
    out[np.asarray(scores, np.float32) < np.float32(tau)] = 0
    return out


# ---------------------------------------------------------------- fast evaluator vs transcription


def random_map(rng: np.random.Generator, shape, values, cells: int) -> np.ndarray:
    """Blocky random label map: a cells x cells grid of values, upsampled (nearest)."""
    h, w = shape
    grid = rng.choice(np.asarray(values), size=(cells, cells))
    return np.kron(grid, np.ones((h // cells + 1, w // cells + 1), np.int64))[:h, :w]


def random_dataset(seed: int, num_images: int, num_classes: int, ids, max_size: int = 60, gt_ids=None):
    """Random (pred, gt) maps of random sizes; GT uses ``gt_ids`` (default ``ids``) plus 0 and 1000."""
    rng = np.random.default_rng(seed)
    gt_ids = list(ids if gt_ids is None else gt_ids)
    preds, gts = [], []
    for _ in range(num_images):
        shape = tuple(int(x) for x in rng.integers(1, max_size, 2))
        gts.append(random_map(rng, shape, [0, 0] + gt_ids + [IGNORE], int(rng.integers(1, 7))))
        preds.append(random_map(rng, shape, [0] + list(ids), int(rng.integers(1, 9))))
    return preds, gts


def fast_metrics(preds, gts, num_classes, mapping=None, fixed=True) -> dict:
    acc = StatsAccumulator(num_classes)
    lookup = None
    if fixed:
        lookup = np.arange(num_classes + 1) if mapping is None else mapping
    for pred, gt in zip(preds, gts):
        acc.add(image_stats(pred, gt, num_classes, mapping=lookup))
    return compute_metrics(acc, mapping).summary()


def assert_close(reference: dict, fast: dict, tol: float = 1e-4) -> None:
    for key, expected in reference.items():
        got = fast[key]
        if math.isnan(expected):
            assert got is None, key
        else:
            assert got == pytest.approx(expected, abs=tol), key


@pytest.mark.parametrize("seed", range(4))
def test_identity_matches_transcription(seed):
    ids = [1, 2, 255, 256, 257, 300]
    preds, gts = random_dataset(seed, 12, 300, ids)
    assert_close(official_metrics(preds, gts, 300), fast_metrics(preds, gts, 300))


@pytest.mark.parametrize("seed", range(3))
def test_hungarian_matches_transcription(seed):
    num_classes = 7
    preds, gts = random_dataset(100 + seed, 16, num_classes, range(1, num_classes + 1))
    match, cooc = official_matching(preds, gts, num_classes)
    acc = StatsAccumulator(num_classes)
    for pred, gt in zip(preds, gts):
        acc.add(image_stats(pred, gt, num_classes))
    fast_cooc = cooccurrence(*acc.presence(), acc.num_images, num_classes)
    np.testing.assert_array_equal(fast_cooc, cooc)
    mapping = hungarian_mapping(fast_cooc)
    # Same optimum; on ties the chosen assignment may differ, so score ours with the transcription.
    official_total = sum(cooc[i - 1, j - 1] for i, j in match.items() if i)
    assert sum(cooc[i - 1, mapping[i] - 1] for i in range(1, num_classes + 1)) == official_total
    ours = {i: int(mapping[i]) for i in range(num_classes + 1)}
    assert_close(official_metrics(preds, gts, num_classes, ours), compute_metrics(acc, mapping).summary())


def test_fixed_match_with_non_injective_map():
    num_classes = 5
    preds, gts = random_dataset(7, 10, num_classes, range(1, 8), gt_ids=range(1, 6))  # generated ids up to 7 > N
    match = {0: 0, 1: 2, 2: 2, 3: 1, 4: 0, 5: 5, 6: 3, 7: 4}  # two ids onto 2, one onto "other"
    lookup = np.array([match[i] for i in range(8)])
    acc = StatsAccumulator(num_classes, max_pred_id=7)
    for pred, gt in zip(preds, gts):
        acc.add(image_stats(pred, gt, num_classes, mapping=lookup))
    assert_close(official_metrics(preds, gts, num_classes, match), compute_metrics(acc, lookup).summary())


def test_large_generated_ids_match_transcription():
    # match.json keys far above N take the lookup-table path of the per-pixel counting.
    num_classes = 3
    preds, gts = random_dataset(11, 8, num_classes, [4097, 5000, 7], gt_ids=[1, 2, 3])
    match = {0: 0, 7: 1, 4097: 2, 5000: 3}
    lookup = np.full(5001, -1)
    for k, v in match.items():
        lookup[k] = v
    acc = StatsAccumulator(num_classes, max_pred_id=5000)
    for pred, gt in zip(preds, gts):
        acc.add(image_stats(pred, gt, num_classes, mapping=lookup))
    assert_close(official_metrics(preds, gts, num_classes, match), compute_metrics(acc, lookup).summary())


def test_larger_dilation_matches_transcription():
    # 120 x 90 images: d = round(0.03 * 150) = round(4.5) = 4 (half to even).
    rng = np.random.default_rng(3)
    preds = [random_map(rng, (90, 120), [0, 1, 2, 3], 6) for _ in range(3)]
    gts = [random_map(rng, (90, 120), [0, 1, 2, IGNORE], 5) for _ in range(3)]
    assert_close(official_metrics(preds, gts, 3), fast_metrics(preds, gts, 3, fixed=False))


@pytest.mark.parametrize("seed", range(2))
def test_sweep_matches_per_threshold_passes(seed):
    num_classes = 6
    preds, gts = random_dataset(200 + seed, 14, num_classes, range(1, num_classes + 1), max_size=50)
    rng = np.random.default_rng(seed)
    taus = [0.0, 0.2, 0.41, 0.5, 0.77, 1.5]
    scores = []
    for pred in preds:
        levels = np.array([0.0, 0.2, 0.41, 0.41, 0.6, 0.9], np.float32)  # exact hits of tau included
        scores.append(random_map(rng, pred.shape, levels, int(rng.integers(1, 9))).astype(np.float32))
    sweep = TauSweep(num_classes, taus)
    for pred, score, gt in zip(preds, scores, gts):
        sweep.add_image(pred, score, gt)
    result = sweep.result()
    for k, tau in enumerate(taus):
        thresholded = [official_threshold(p, s, tau) for p, s in zip(preds, scores)]
        match, cooc = official_matching(thresholded, gts, num_classes)
        mapping = result.mappings[k]
        assert sum(cooc[i - 1, mapping[i] - 1] for i in range(1, num_classes + 1)) == sum(
            cooc[i - 1, j - 1] for i, j in match.items() if i
        )
        ours = {i: int(mapping[i]) for i in range(num_classes + 1)}
        assert_close(official_metrics(thresholded, gts, num_classes, ours), result.metrics[k].summary())
