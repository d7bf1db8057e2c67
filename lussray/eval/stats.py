"""Per-image sufficient statistics of the official ImageNet-S metrics, and their running sum.

The official evaluator (shared/reference/pass-imagenet-s.md, section 3) reads every image, applies
the category matching to the prediction, and adds histograms to dataset totals. Here one pass
over the images computes, per image, statistics that do not depend on the matching, so the
matching (which needs every image's presence sets first) is applied afterwards without reading
any file again:

- A table over the (prediction id p, ground-truth id g, size tag t) combinations present on the
  non-ignored pixels, with four pixel counts: all pixels (n), pixels on the prediction's boundary
  (npb), on the ground truth's boundary (ngb) and on both (nbb). Every official histogram is a
  sum of these counts after mapping p through the matching: pred histogram = n by m(p), GT
  histogram = n by g, intersection = n where m(p) == g; the boundary histograms likewise, since
  the official boundary label of a pixel is (own label + 1) when the pixel is on the boundary of
  its own label (so boundary labels remap exactly as the labels do). ImageNet-S ``data/data.py``
  draws prediction boundaries before remapping, as here; PASS ``EvalDataset`` remaps first. Both
  agree for a one-to-one matching (Hungarian); for a many-to-one match.json this follows ImageNet-S.
- The size tag t replays the size buckets (``IoUDifferentSizeGPUWithBoundary``): a category c of
  the image has size ceil(100 |c| / |valid|) (in float32, as torch computes it) and bucket S
  (<= 5), MS (<= 25), ML (<= 50) or L; bucket b's statistics use the pixels of the categories in
  b plus the "other" (g = 0) pixels of every image that has a category in b. For g > 0 the tag
  is the bucket index; for g = 0 it is the bit set of the buckets present in the image.
- The image-level presence sets for the matching, the F-measure, and what Img-Acc needs.

With foreground scores and a list of thresholds tau (the "other" threshold of PASS label
generation, section 2.3), every statistic gets a leading tau axis, still in one pass: the
prediction at tau is ``pred`` with pixels whose score is below tau set to 0, and a pixel's boundary
state changes at most three times as tau grows (see :func:`_tau_segments`), so the counts at
all thresholds come from three histograms of the threshold indices where the state changes.

This module is pure: no Ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lussray.data.imagenet_s import IGNORE_ID, MAX_ENCODABLE_ID, OTHER_ID
from lussray.eval.boundary import boundary_mask, boundary_width, frame_mask, window_extrema

BUCKET_NAMES = ("S", "MS", "ML", "L")
BUCKET_LIMITS = (5, 25, 50)  # percent of the valid pixels: <= 5 is S, <= 25 MS, <= 50 ML, else L
NUM_VIEWS = 1 + len(BUCKET_NAMES)  # view 0: all pixels; views 1..4: the size buckets
TAG_RADIX = 1 << len(BUCKET_NAMES)  # a tag is a bucket index (g > 0) or a bucket bit set (g = 0)
PRED_RADIX = MAX_ENCODABLE_ID + 1  # index of (view, prediction id) in ImageStats.pred_index
FMEASURE_BETA_SQUARED = 0.3  # the official FMeasure's ``beta=0.3`` is used as beta^2


class LabelError(ValueError):
    """A label map the evaluator must refuse; ``kind`` is "size", "pred_ids", "gt_ids" or "unmatched"."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class ImageStats:
    """Statistics of one image; every count array has a leading axis over the K thresholds.

    Attributes:
        key: the sample key ``<wnid>/<name>`` (informational).
        pair_codes: (M,) sorted codes of the (p, g, t) combinations, see :func:`encode_pairs`.
        pair_counts: (K, M, 2) int64 pixel counts per combination: [all, on both boundaries].
        pred_index: (Q,) view * PRED_RADIX + p, unique: the prediction ids seen in each view.
        pred_counts: (K, Q, 2) int64 per (view, p): [all pixels, pixels on the prediction boundary].
        gt_index: (R,) view * PRED_RADIX + g, unique.
        gt_counts: (R, 2) int64 per (view, g): [all pixels, pixels on the GT boundary].
        gt_present: ground-truth ids >= 1 on the valid pixels (the matching's GT set).
        pred_labels: prediction ids >= 1 on the valid pixels at the lowest threshold.
        pred_kmax: (len(pred_labels),) id ``pred_labels[j]`` is present at threshold index k iff
            ``k < pred_kmax[j]`` (the matching's prediction set at every threshold).
        top: (K,) the prediction id >= 1 with the largest area (-1 when there is none), the
            argmax of Img-Acc before matching; ``ties[k]`` lists every id of a tied maximum.
        fmeasure: (K,) F-measure with foreground = id > 0 (the matching keeps 0 and only 0 at 0).
        correct: (K,) Img-Acc outcome when a fixed matching was given, else None (decided later).
    """

    key: str
    pair_codes: np.ndarray
    pair_counts: np.ndarray
    pred_index: np.ndarray
    pred_counts: np.ndarray
    gt_index: np.ndarray
    gt_counts: np.ndarray
    gt_present: np.ndarray
    pred_labels: np.ndarray
    pred_kmax: np.ndarray
    top: np.ndarray
    ties: dict[int, np.ndarray]
    fmeasure: np.ndarray
    correct: np.ndarray | None = None

    @property
    def num_taus(self) -> int:
        """K, the number of thresholds (1 without foreground scores)."""
        return int(self.top.shape[0])


def encode_pairs(pred: np.ndarray, gt: np.ndarray, tag: np.ndarray, num_classes: int) -> np.ndarray:
    """Codes of (prediction id, ground-truth id, size tag), increasing with (pred, gt)."""
    return (pred.astype(np.int64) * (num_classes + 1) + gt) * TAG_RADIX + tag


def decode_pairs(codes: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_pairs`: (pred ids, ground-truth ids, tags)."""
    tag = codes % TAG_RADIX
    rest = codes // TAG_RADIX
    return rest // (num_classes + 1), rest % (num_classes + 1), tag


def in_view(gt: np.ndarray, tag: np.ndarray, view: int) -> np.ndarray:
    """Which (g, t) combinations count in ``view`` (0: all; b + 1: size bucket b)."""
    if view == 0:
        return np.ones(gt.shape, dtype=bool)
    bucket = view - 1
    return np.where(gt > 0, tag == bucket, (tag >> bucket) & 1 == 1)


def size_buckets(gt_counts: np.ndarray, total: int) -> np.ndarray:
    """Bucket index (0..3) of every id from its valid-pixel count, as ``IoUDifferentSizeGPU``.

    The official size is ``math.ceil(100.0 * count / sum(counts))`` on torch tensors, i.e. float32
    arithmetic; it is replayed in float32 so that sizes at exactly 5/25/50 percent (and the rare
    float32 rounding near them on huge images) fall in the same bucket.
    """
    size = np.float32(100.0) * gt_counts.astype(np.float32)
    size = np.ceil(size / np.float32(max(total, 1)))
    return np.searchsorted(np.asarray(BUCKET_LIMITS, dtype=np.float32), size, side="left")


def fmeasure(tp: np.ndarray, positives_gt: int, positives_pred: np.ndarray) -> np.ndarray:
    """Per-image F-measure of binary foreground, replaying the official float32 formula.

    F = (1 + beta^2) P R / (beta^2 P + R + eps) with P = tp / (p + eps), R = tp / (t + eps),
    eps = 1e-20 and beta^2 = 0.3 (``FMeasureGPU`` / PASS ``fscore``).
    """
    eps, beta = np.float32(1e-20), np.float32(FMEASURE_BETA_SQUARED)
    tp = np.asarray(tp, dtype=np.float32)
    recall = tp / (np.float32(positives_gt) + eps)
    precision = tp / (np.asarray(positives_pred, dtype=np.float32) + eps)
    return (np.float32(1 + FMEASURE_BETA_SQUARED) * precision * recall / (beta * precision + recall + eps)).astype(
        np.float64
    )


def _pixel_counts(
    pred: np.ndarray,
    gt: np.ndarray,
    gt_hist_all: np.ndarray,
    num_classes: int,
    scores: np.ndarray | None,
    taus: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Count the non-ignored pixels by (threshold index, prediction id, GT id, on-pred-boundary,
    on-GT-boundary).

    Boundaries are drawn on the full maps (the official code applies the ignore mask afterwards).
    Ignored pixels are counted in an extra GT slot that is dropped, which is cheaper than
    selecting the valid pixels of every map.

    Returns:
        (pred_labels, gt_labels, gt_hist, counts): the prediction ids seen (0 first, always
        included), the GT ids on valid pixels, the GT histogram over 0..N, and counts of shape
        (K, len(pred_labels), len(gt_labels), 2, 2).
    """
    d = boundary_width(*gt.shape)
    gt_edge, pred_edge = boundary_mask(gt, d), boundary_mask(pred, d)

    gt_hist = gt_hist_all[: num_classes + 1]
    gt_labels = np.flatnonzero(gt_hist)
    num_g = len(gt_labels)
    lut_g = np.full(len(gt_hist_all), num_g, dtype=np.int32)  # ignore -> the extra slot num_g
    lut_g[gt_labels] = np.arange(num_g, dtype=np.int32)
    slots = num_g + 1

    pred_max = int(pred.max(initial=0))
    if scores is None and pred_max < 4096:
        # Single map: the state of a pixel is fixed; index the histogram by the raw id.
        state = pred.astype(np.int32)
        state *= slots
        state += lut_g[gt]
        state <<= 2
        state += pred_edge.view(np.uint8) * np.uint8(2)
        state += gt_edge
        counts = np.bincount(state.ravel(), minlength=(pred_max + 1) * slots * 4).reshape(-1, slots, 2, 2)
        seen = counts.any(axis=(1, 2, 3))
        seen[OTHER_ID] = True
        pred_ids = np.flatnonzero(seen)
        return pred_ids, gt_labels, gt_hist, counts[pred_ids, :num_g][None]

    pred_ids = np.flatnonzero(np.bincount(pred.ravel(), minlength=1))
    pred_ids = pred_ids if pred_ids.size and pred_ids[0] == OTHER_ID else np.concatenate([[OTHER_ID], pred_ids])
    lut_v = np.zeros(int(pred_ids[-1]) + 1, dtype=np.int32)
    lut_v[pred_ids] = np.arange(len(pred_ids), dtype=np.int32)
    code = lut_v[pred].astype(np.intp)  # (prediction slot, GT slot, on-GT-boundary)
    code *= slots
    code += lut_g[gt]
    code <<= 1
    code += gt_edge
    code = code.ravel()
    num_codes = len(pred_ids) * slots * 2
    num_taus, km, kf, ka = _tau_segments(pred, scores, taus, pred_edge, d)

    def exceeding(k_index: np.ndarray) -> np.ndarray:
        # (K, codes): number of pixels of each code whose index is > k, for every k < K.
        index = k_index.ravel().astype(np.intp)
        index *= num_codes
        index += code
        cumulative = np.cumsum(np.bincount(index, minlength=(num_taus + 1) * num_codes).reshape(-1, num_codes), axis=0)
        return (cumulative[-1] - cumulative)[:num_taus]

    # Per pixel: (v, interior) while k < km, (v, boundary) while km <= k < kf, (0, boundary) while
    # kf <= k < ka, then (0, interior); so every state count is a difference of "index > k" counts.
    above_m, above_f, above_a = exceeding(km), exceeding(kf), exceeding(ka)
    shape = (num_taus, len(pred_ids), slots, 2)
    above_m, above_f, above_a = above_m.reshape(shape), above_f.reshape(shape), above_a.reshape(shape)
    totals = np.bincount(code, minlength=num_codes).reshape(shape[1:]).sum(axis=0)
    counts = np.zeros((num_taus, len(pred_ids), slots, 2, 2), dtype=np.int64)
    counts[:, :, :, 0] = above_m
    counts[:, :, :, 1] = above_f - above_m
    above_f_other, above_a_other = above_f.sum(axis=1), above_a.sum(axis=1)
    counts[:, 0, :, 1] += above_a_other - above_f_other
    counts[:, 0, :, 0] += totals - above_a_other
    return pred_ids, gt_labels, gt_hist, counts[:, :, :num_g]


def _tau_segments(
    pred: np.ndarray, scores: np.ndarray | None, taus: np.ndarray | None, pred_edge: np.ndarray, d: int
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Threshold indices where each pixel's (label, on-boundary) state changes.

    At threshold index k a pixel with prediction v != 0 keeps v iff k < kf (its score >= tau_k);
    otherwise it is 0. Its state over k is: (v, interior) on [0, km), (v, boundary) on [km, kf),
    (0, boundary) on [kf, ka), (0, interior) on [ka, K), with km <= kf <= ka. Reasons: a pixel
    with label v != 0 is on the boundary iff its window leaves the image, or holds another
    prediction id (then at every tau), or holds a pixel of v already turned to 0 (k >= the
    window's min kf). A pixel with label 0 is on the boundary iff its window leaves the image or
    holds a pixel still non-zero (k < the window's max kf; kf = 0 for v = 0). Without scores
    K = 1 and kf = 1 for v != 0.

    Args:
        pred_edge: the window leaves the image or holds two prediction ids.

    Returns:
        (K, km, kf, ka), each (H, W).
    """
    nonzero = pred != OTHER_ID
    if scores is None:
        kf = nonzero.astype(np.uint8)
        return 1, np.where(pred_edge, 0, kf), kf, (pred_edge | nonzero).astype(np.uint8)
    num_taus = len(taus)
    dtype = np.uint8 if num_taus < 255 else np.uint16
    kf = np.searchsorted(taus, scores, side="right").astype(dtype)  # both float32
    kf[~nonzero] = 0
    high, low = window_extrema(kf, d)
    km = np.where(pred_edge, 0, low)
    ka = np.where(frame_mask(pred.shape, d), num_taus, high)
    return num_taus, km, kf, ka


def _check_labels(pred: np.ndarray, gt: np.ndarray, num_classes: int, max_pred_id: int) -> np.ndarray:
    """Refuse bad maps; return the histogram of the ground truth over all its ids."""
    if pred.ndim != 2 or pred.shape != gt.shape:
        raise LabelError("size", f"prediction is {_size(pred)}, ground truth is {_size(gt)}")
    for name, kind, label in (("prediction", "pred_ids", pred), ("ground truth", "gt_ids", gt)):
        if not np.issubdtype(label.dtype, np.integer):
            raise LabelError(kind, f"{name} must hold integer ids, got {label.dtype}")
        if label.size and not np.issubdtype(label.dtype, np.unsignedinteger) and int(label.min()) < 0:
            raise LabelError(kind, f"{name} uses negative ids")
    if int(pred.max(initial=0)) > max_pred_id:
        bad = pred[pred > max_pred_id]
        raise LabelError("pred_ids", f"prediction uses id {int(bad[0])}, outside 0..{max_pred_id}")
    gt_hist_all = np.bincount(gt.ravel(), minlength=num_classes + 1)
    outside = np.flatnonzero(gt_hist_all[num_classes + 1 :]) + num_classes + 1
    outside = outside[outside != IGNORE_ID]
    if outside.size:
        raise LabelError("gt_ids", f"ground truth uses id {int(outside[0])}, outside 0..{num_classes} and {IGNORE_ID}")
    return gt_hist_all


def _size(array: np.ndarray) -> str:
    return "x".join(str(s) for s in array.shape)


def image_stats(
    pred: np.ndarray,
    gt: np.ndarray,
    num_classes: int,
    *,
    scores: np.ndarray | None = None,
    taus: np.ndarray | list[float] | None = None,
    mapping: np.ndarray | None = None,
    key: str = "",
) -> ImageStats:
    """Statistics of one (prediction, ground truth) pair, see the module docstring.

    Args:
        pred: (H, W) integer prediction ids (0 = other).
        gt: (H, W) integer ground truth (0 = other, 1..N categories, 1000 = ignore).
        num_classes: N.
        scores: optional (H, W) foreground scores; with ``taus``, pixels scoring below tau are
            "other" (compared in float32, as the official ``prediction[logit < t] = 0``).
        taus: increasing thresholds, required with ``scores``.
        mapping: a fixed matching (lookup array generated id -> GT id, -1 = unmapped); the
            prediction's ids must all be mapped. Without it ids must lie in 0..N and Img-Acc is
            decided after the matching is known.
        key: the sample key, carried along for messages.

    Returns:
        the image's :class:`ImageStats`.

    Raises:
        LabelError: for maps of different sizes, ids outside the allowed range, or unmapped ids.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    max_pred_id = num_classes if mapping is None else len(mapping) - 1
    gt_hist_all = _check_labels(pred, gt, num_classes, max_pred_id)
    if mapping is not None and pred.size and (mapping < 0).any():
        present = np.flatnonzero(np.bincount(pred.ravel().astype(np.intp)))
        unmapped = present[mapping[present] < 0]
        if unmapped.size:
            raise LabelError("unmatched", f"prediction uses id {int(unmapped[0])}, which the match file does not map")
    if (scores is None) != (taus is None):
        raise ValueError("scores and taus go together")
    if scores is not None:
        taus = np.asarray(taus, dtype=np.float32)
        if taus.ndim != 1 or taus.size == 0 or np.any(np.diff(taus) <= 0):
            raise ValueError("taus must be a non-empty increasing 1-D sequence")
        scores = np.asarray(scores, dtype=np.float32)
        if scores.shape != gt.shape:
            raise LabelError("size", f"foreground scores are {_size(scores)}, ground truth is {_size(gt)}")

    pred_labels, gt_labels, gt_hist, counts = _pixel_counts(pred, gt, gt_hist_all, num_classes, scores, taus)
    num_taus = counts.shape[0]
    total = int(gt_hist.sum())
    n = counts.sum(axis=(3, 4))  # (K, V, G): pixels per (threshold, prediction id, GT id)
    npb = counts[:, :, :, 1, :].sum(axis=3)  # ... on the prediction's boundary
    ngb = counts[:, :, :, :, 1].sum(axis=3)  # ... on the ground truth's boundary
    nbb = counts[:, :, :, 1, 1]  # ... on both

    buckets = size_buckets(gt_hist[gt_labels], total)
    positive = gt_labels > 0
    present_bits = np.bitwise_or.reduce(1 << buckets[positive]) if positive.any() else 0
    tags = np.where(positive, buckets, present_bits).astype(np.int64)

    keep_v, keep_g = np.nonzero(n.any(axis=0))
    pair_codes = encode_pairs(pred_labels[keep_v], gt_labels[keep_g], tags[keep_g], num_classes)
    pair_counts = np.stack([n[:, keep_v, keep_g], nbb[:, keep_v, keep_g]], axis=-1)

    pred_index, pred_counts, gt_index, gt_counts = _view_totals(
        pred_labels, gt_labels, tags, n, npb, ngb, num_taus
    )

    area = n.sum(axis=2)[:, 1:]  # (K, V - 1): area of every prediction id >= 1
    labels_pos = pred_labels[1:]
    kmax = (area > 0).sum(axis=0)
    present = kmax > 0
    top, ties = _top_labels(area, labels_pos)

    gt_positive_pixels = total - int(gt_hist[OTHER_ID])
    gt_pos_local = gt_labels > 0
    if mapping is None:
        pred_pos_local = np.ones(len(labels_pos), dtype=bool)
        correct = None
    else:
        pred_pos_local = mapping[labels_pos] > 0
        correct = _img_acc_fixed(area, mapping[labels_pos], gt_hist, num_classes)
    tp = n[:, 1:, :][:, pred_pos_local][:, :, gt_pos_local].sum(axis=(1, 2))
    pred_positive_pixels = area[:, pred_pos_local].sum(axis=1)
    return ImageStats(
        key=key,
        pair_codes=pair_codes,
        pair_counts=pair_counts,
        pred_index=pred_index,
        pred_counts=pred_counts,
        gt_index=gt_index,
        gt_counts=gt_counts,
        gt_present=gt_labels[gt_pos_local].astype(np.int32),
        pred_labels=labels_pos[present].astype(np.int32),
        pred_kmax=kmax[present].astype(np.int32),
        top=top,
        ties=ties,
        fmeasure=fmeasure(tp, gt_positive_pixels, pred_positive_pixels),
        correct=correct,
    )


def _view_totals(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    tags: np.ndarray,
    n: np.ndarray,
    npb: np.ndarray,
    ngb: np.ndarray,
    num_taus: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Prediction and GT totals per view (all pixels, then each size bucket)."""
    pred_index, pred_counts, gt_index, gt_counts = [], [], [], []
    for view in range(NUM_VIEWS):
        member = in_view(gt_labels, tags, view)
        if not member.any():
            continue
        pred_n = n[:, :, member].sum(axis=2)  # (K, V)
        pred_b = npb[:, :, member].sum(axis=2)
        seen = (pred_n > 0).any(axis=0) | (pred_b > 0).any(axis=0)
        pred_index.append(view * PRED_RADIX + pred_labels[seen])
        pred_counts.append(np.stack([pred_n[:, seen], pred_b[:, seen]], axis=-1))
        gt_index.append(view * PRED_RADIX + gt_labels[member])
        gt_counts.append(np.stack([n[0][:, member].sum(axis=0), ngb[0][:, member].sum(axis=0)], axis=-1))
    if not pred_index:
        empty = np.zeros(0, dtype=np.int64)
        return empty, np.zeros((num_taus, 0, 2), np.int64), empty, np.zeros((0, 2), np.int64)
    return (
        np.concatenate(pred_index).astype(np.int64),
        np.concatenate(pred_counts, axis=1),
        np.concatenate(gt_index).astype(np.int64),
        np.concatenate(gt_counts, axis=0),
    )


def _top_labels(area: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Per threshold, the id >= 1 of largest area (-1 if none) and the ids of tied maxima."""
    num_taus = area.shape[0]
    if area.shape[1] == 0:
        return np.full(num_taus, -1, dtype=np.int32), {}
    best = area.max(axis=1)
    top = np.where(best > 0, labels[area.argmax(axis=1)], -1).astype(np.int32)
    tied = (area == best[:, None]) & (best[:, None] > 0)
    ties = {int(k): labels[tied[k]].astype(np.int32) for k in np.flatnonzero(tied.sum(axis=1) > 1)}
    return top, ties


def _img_acc_fixed(area: np.ndarray, mapped: np.ndarray, gt_hist: np.ndarray, num_classes: int) -> np.ndarray:
    """Img-Acc under a fixed matching: argmax of the mapped histogram over ids >= 1 (first wins)."""
    num_taus = area.shape[0]
    hist = np.zeros((num_taus, num_classes + 1), dtype=np.int64)
    for j, c in enumerate(mapped.tolist()):
        hist[:, c] += area[:, j]
    label = hist[:, 1:].argmax(axis=1) + 1 if num_classes > 0 else np.zeros(num_taus, np.intp)
    return (hist[np.arange(num_taus), label] > 0) & (gt_hist[label] > 0)


@dataclass
class StatsAccumulator:
    """The running sum of :class:`ImageStats` over a dataset, for K thresholds.

    Memory: the pair table grows with the distinct (pred, GT, tag) combinations of the dataset
    (K x 2 int64 each); per image only a few small arrays are kept (presence sets, argmax ids).

    Attributes:
        pred_totals: (K, views, max_pred_id + 1, 2) [pixels, prediction-boundary pixels] per
            prediction id, for all pixels (view 0) and each size bucket (views 1..4).
        gt_totals: (views, N + 1, 2) [pixels, GT-boundary pixels] per ground-truth id.
    """

    num_classes: int
    num_taus: int = 1
    max_pred_id: int | None = None
    num_images: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.max_pred_id is None:
            self.max_pred_id = self.num_classes
        k = self.num_taus
        self.fmeasure_sum = np.zeros(k, dtype=np.float64)
        self.correct_sum = np.zeros(k, dtype=np.int64)
        self.fixed_matching: bool | None = None  # whether Img-Acc was decided per image
        self.pred_totals = np.zeros((k, NUM_VIEWS, self.max_pred_id + 1, 2), dtype=np.int64)
        self.gt_totals = np.zeros((NUM_VIEWS, self.num_classes + 1, 2), dtype=np.int64)
        self._pair_rows: dict[int, int] = {}
        self._pair_codes = np.zeros(1024, dtype=np.int64)
        self._pair_counts = np.zeros((1024, k, 2), dtype=np.int64)
        self._gt_present: list[np.ndarray] = []
        self._pred_labels: list[np.ndarray] = []
        self._pred_kmax: list[np.ndarray] = []
        self._top: list[np.ndarray] = []
        self._ties: dict[tuple[int, int], np.ndarray] = {}
        self._cache: dict[str, np.ndarray] = {}

    def add(self, stats: ImageStats) -> None:
        """Add one image's statistics.

        Raises:
            ValueError: if the statistics have another number of thresholds, or mix images
                measured under a fixed matching with images that were not.
        """
        if stats.num_taus != self.num_taus:
            raise ValueError(f"image statistics have {stats.num_taus} thresholds, expected {self.num_taus}")
        fixed = stats.correct is not None
        if self.fixed_matching is None:
            self.fixed_matching = fixed
        elif self.fixed_matching != fixed:
            raise ValueError("cannot mix statistics taken with and without a fixed matching")
        image = self.num_images
        self.num_images += 1
        self._cache.clear()
        rows = self._rows(stats.pair_codes)
        self._pair_counts[rows] += stats.pair_counts.transpose(1, 0, 2)
        view, ident = np.divmod(stats.pred_index, PRED_RADIX)
        self.pred_totals[:, view, ident] += stats.pred_counts
        view, ident = np.divmod(stats.gt_index, PRED_RADIX)
        self.gt_totals[view, ident] += stats.gt_counts
        self.fmeasure_sum += stats.fmeasure
        self._gt_present.append(stats.gt_present)
        self._pred_labels.append(stats.pred_labels)
        self._pred_kmax.append(stats.pred_kmax)
        if fixed:
            self.correct_sum += stats.correct
        else:
            self._top.append(stats.top)
            for k, labels in stats.ties.items():
                self._ties[(image, k)] = labels

    def _rows(self, codes: np.ndarray) -> np.ndarray:
        index = self._pair_rows
        rows = np.fromiter((index.setdefault(c, len(index)) for c in codes.tolist()), dtype=np.intp, count=len(codes))
        if len(index) > len(self._pair_codes):
            capacity = max(len(index), 2 * len(self._pair_codes))
            self._pair_codes = np.resize(self._pair_codes, capacity)
            grown = np.zeros((capacity,) + self._pair_counts.shape[1:], dtype=np.int64)
            grown[: len(self._pair_counts)] = self._pair_counts
            self._pair_counts = grown
        self._pair_codes[rows] = codes
        return rows

    @property
    def pair_codes(self) -> np.ndarray:
        """(M,) codes of every (pred, GT, tag) combination seen."""
        return self._pair_codes[: len(self._pair_rows)]

    def pair_counts(self, k: int = 0) -> np.ndarray:
        """(M, 2) counts [all, both boundaries] of every combination at threshold index k."""
        return self._pair_counts[: len(self._pair_rows), k]

    @property
    def pair_table_bytes(self) -> int:
        """Memory held by the pair table."""
        return int(self._pair_counts.nbytes + self._pair_codes.nbytes)

    def _concat(self, name: str) -> np.ndarray:
        if name not in self._cache:
            lists = {"gt": self._gt_present, "pred": self._pred_labels, "kmax": self._pred_kmax}
            if name in lists:
                parts = lists[name]
                value = np.concatenate(parts) if parts else np.zeros(0, np.int32)
            elif name in ("gt_image", "pred_image"):
                parts = self._gt_present if name == "gt_image" else self._pred_labels
                value = np.repeat(np.arange(len(parts)), [len(a) for a in parts])
            elif name == "top":
                value = np.stack(self._top) if self._top else np.zeros((0, self.num_taus), np.int32)
            else:  # "gt_codes": sorted image * (N + 1) + id, for membership queries
                value = np.sort(self._concat("gt_image").astype(np.int64) * (self.num_classes + 1) + self._concat("gt"))
            self._cache[name] = value
        return self._cache[name]

    def presence(self, k: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Presence sets at threshold index k as (pred image, pred id, GT image, GT id) arrays."""
        keep = self._concat("kmax") > k
        return (
            self._concat("pred_image")[keep],
            self._concat("pred")[keep],
            self._concat("gt_image"),
            self._concat("gt"),
        )

    def img_acc_correct(self, mapping: np.ndarray, k: int = 0) -> int:
        """Number of images that Img-Acc counts correct at threshold index k under ``mapping``.

        Under a fixed matching the count was made per image. Otherwise the matching must keep 0
        alone at 0 and be one-to-one on 1..N (a Hungarian matching): then the argmax of the
        mapped histogram is the mapping of the argmax, ties going to the smallest mapped id as
        ``torch.argmax`` returns the first maximum.
        """
        if self.fixed_matching or self.num_images == 0:
            return int(self.correct_sum[k])
        top = self._concat("top")[:, k]
        label = np.where(top > 0, mapping[np.maximum(top, 0)], -1)
        for (image, kk), labels in self._ties.items():
            if kk == k:
                label[image] = int(mapping[labels].min())
        gt_codes = self._concat("gt_codes")
        if len(gt_codes) == 0:
            return 0
        query = np.arange(len(top), dtype=np.int64) * (self.num_classes + 1) + label
        position = np.minimum(np.searchsorted(gt_codes, query), len(gt_codes) - 1)
        return int(((label > 0) & (gt_codes[position] == query)).sum())
