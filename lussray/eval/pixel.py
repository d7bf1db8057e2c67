"""The pixel-level protocol of scene-centric benchmarks (COCO-Stuff-27, Cityscapes-27).

Run::

    lussray evaluate --protocol pixel --pred run/predict/val --gt data/cocostuff27/val-segmentation \\
        --classes 27 --clusters 27                     # Hungarian matching (default)
    lussray evaluate --protocol pixel --pred DIR --gt DIR --classes 27 --match identity   # a linear probe

The protocol of PiCIE, STEGO and HP (shared/reference/seed-methods.md, sections 1.7, 2.5 and 7):

1. one confusion matrix ``hist[class, cluster]`` over every labelled pixel of the split: ground
   truth 0..C-1 are classes, 1000 is ignore (excluded), predictions hold cluster ids 0..K-1;
2. one matching for the whole split: ``scipy.optimize.linear_sum_assignment(hist, maximize=True)``
   assigns a distinct cluster to each class (K >= C allowed); ``--match identity`` skips it for
   predictions already in class ids (a linear probe's: cluster k is class k);
3. pixel accuracy ``Acc = sum_c tp_c / labelled pixels`` and ``IoU_c = tp_c / (tp_c + fp_c + fn_c)``
   on the matched matrix, ``mIoU`` the mean over the classes where it is defined (a class absent
   from the ground truth and never predicted is NaN and skipped, as the references' ``nanmean``),
   both in percent; optional group means (COCO-Stuff-27: things 0..11, stuff 12..26, the preset's
   ``dataset.thing_classes``; :func:`things_stuff`).

Deviation from STEGO's ``UnsupervisedMetrics``: the pixels of clusters left unmatched when K > C
count as wrong (false negatives of their class, in ``Acc`` and ``IoU``); STEGO drops predictions
outside 0..C-1 from its histogram. PiCIE's partitioned (thing/stuff) means split the matrix by
cluster position; here the groups are ground-truth classes.

Files: ``--pred`` and ``--gt`` hold label PNGs in the lussray codec (id = R + 256 G,
:mod:`lussray.data.imagenet_s`) at the same relative paths, in any folder depth. The pass streams
the images through worker processes (:func:`lussray.eval.runner.stream`); each returns its (C, K)
counts. Bad input (a missing prediction, another size than the ground truth, ids out of range) ends
with a :class:`~lussray.errors.UserError` that counts the files and names the first ones.

This module is pure: no Ray, no torch.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lussray.data.imagenet_s import IGNORE_ID, MAX_ENCODABLE_ID
from lussray.errors import UserError
from lussray.eval.io import PNG_SUFFIX, EvalItem
from lussray.eval.runner import ItemError, read_pair, stream

HUNGARIAN = "hungarian"
IDENTITY = "identity"
MATCH_MODES = (HUNGARIAN, IDENTITY)
UNMATCHED = -1

def list_pixel_items(gt_dir: str | os.PathLike, pred_dir: str | os.PathLike) -> list[EvalItem]:
    """Pair every ground-truth PNG under ``gt_dir`` (any depth) with the prediction at its path.

    Keys are the relative paths without ``.png``, sorted; hidden files and folders are skipped.

    Raises:
        UserError: if a folder is missing, ``gt_dir`` holds no PNG, or predictions are missing
            (how many, and the first paths).
    """
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    for role, folder in (("ground-truth", gt_dir), ("prediction", pred_dir)):
        if not folder.is_dir():
            raise UserError(f"{role} folder {folder} not found")
    keys = []
    for top, dirs, files in os.walk(gt_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        relative = Path(top).relative_to(gt_dir)
        keys += [(relative / f[: -len(PNG_SUFFIX)]).as_posix() for f in files
                 if f.endswith(PNG_SUFFIX) and not f.startswith(".")]
    if not keys:
        raise UserError(f"no ground-truth PNGs under {gt_dir}")
    keys.sort()
    items = [EvalItem(k, gt_dir / f"{k}{PNG_SUFFIX}", pred_dir / f"{k}{PNG_SUFFIX}") for k in keys]
    missing = [str(item.pred_path) for item in items if not item.pred_path.is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise UserError(f"{len(missing)} of {len(items)} prediction files are missing: "
                        f"{', '.join(missing[:3])}{more}")
    return items


class PixelLabelError(ValueError):
    """An image whose ids or size do not fit the protocol; ``kind`` names the problem."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _size(array: np.ndarray) -> str:
    return "x".join(str(s) for s in array.shape)


def confusion(pred: np.ndarray, gt: np.ndarray, num_classes: int, num_clusters: int) -> np.ndarray:
    """The (C, K) pixel counts ``hist[class, cluster]`` of one image, ignore excluded.

    One ``np.bincount`` over ``min(gt, C) * K + cluster``, in uint16 when the codes fit (the
    decoder's dtype: half the memory traffic of int64, no boolean masking): every ground-truth id
    >= C lands in row C, which is dropped once its count is checked against the ignore pixels.

    Args:
        pred: (H, W) cluster ids 0..K-1 (any integer dtype).
        gt: (H, W) class ids 0..C-1, or 1000 (ignore).
        num_classes: C.
        num_clusters: K.

    Raises:
        PixelLabelError: if the shapes differ (kind ``size``), a prediction id is outside 0..K-1
            (``cluster_ids``) or a ground-truth id is neither a class nor 1000 (``class_ids``).
    """
    if pred.shape != gt.shape:
        raise PixelLabelError("size", f"prediction {_size(pred)} vs ground truth {_size(gt)}")
    if pred.size and (int(pred.max()) >= num_clusters or int(pred.min()) < 0):
        raise PixelLabelError("cluster_ids", f"ids {int(pred.min())}..{int(pred.max())}, K = {num_clusters}")
    if gt.dtype != np.uint16:
        if gt.size and (int(gt.min()) < 0 or int(gt.max()) > MAX_ENCODABLE_ID):
            raise PixelLabelError("class_ids", f"ids {int(gt.min())}..{int(gt.max())}")
        gt = gt.astype(np.uint16)
    size = (num_classes + 1) * num_clusters
    dtype = np.uint16 if size <= MAX_ENCODABLE_ID + 1 else np.intp
    codes = np.minimum(gt, num_classes).astype(dtype, copy=False)
    codes *= num_clusters
    codes += pred.astype(dtype, copy=False)
    counts = np.bincount(codes.ravel(), minlength=size).reshape(num_classes + 1, num_clusters)
    if int(counts[num_classes].sum()) != np.count_nonzero(gt == IGNORE_ID):
        bad = np.unique(gt[(gt >= num_classes) & (gt != IGNORE_ID)])
        raise PixelLabelError("class_ids", f"ids {bad[:5].tolist()} (C = {num_classes}, ignore {IGNORE_ID})")
    return counts[:num_classes]


def item_confusion(item: EvalItem, *, num_classes: int, num_clusters: int) -> np.ndarray | ItemError:
    """Read one image's two PNGs and return its (C, K) counts (runs in a worker process)."""
    pair = read_pair(item)
    if isinstance(pair, ItemError):
        return pair
    gt, pred = pair
    try:
        return confusion(pred, gt, num_classes, num_clusters)
    except PixelLabelError as error:
        path = item.gt_path if error.kind == "class_ids" else item.pred_path
        return ItemError(item.key, str(path), error.kind, str(error))


@dataclass
class ConfusionAccumulator:
    """The running (C, K) confusion matrix of a split (int64, exact)."""

    num_classes: int
    num_clusters: int
    num_images: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.hist = np.zeros((self.num_classes, self.num_clusters), dtype=np.int64)

    def add(self, counts: np.ndarray) -> None:
        """Add one image's counts."""
        self.hist += counts
        self.num_images += 1


def hungarian_match(hist: np.ndarray) -> np.ndarray:
    """The cluster -> class matching that maximises the matched pixels over the split.

    Args:
        hist: (C, K) counts, classes x clusters.

    Returns:
        (K,) int64: the class of each cluster, :data:`UNMATCHED` (-1) for the K - C extra ones
        (with K < C, C - K classes get no cluster).
    """
    # Imported here: the worker processes never match, and scipy.optimize takes ~0.5 s to import.
    from scipy.optimize import linear_sum_assignment

    classes, clusters = linear_sum_assignment(hist, maximize=True)
    mapping = np.full(hist.shape[1], UNMATCHED, dtype=np.int64)
    mapping[clusters] = classes
    return mapping


def identity_match(num_classes: int, num_clusters: int) -> np.ndarray:
    """Cluster k is class k (predictions in class ids); clusters >= C are unmatched."""
    mapping = np.arange(num_clusters, dtype=np.int64)
    mapping[mapping >= num_classes] = UNMATCHED
    return mapping


@dataclass
class PixelMetrics:
    """The protocol's numbers, in percent.

    Attributes:
        miou: mean IoU over the classes where it is defined (NaN if none).
        acc: pixel accuracy (NaN without labelled pixels).
        iou: (C,) IoU per class, NaN for a class absent from the ground truth and never predicted.
        group_miou: {group name: mean IoU of its classes} (e.g. things, stuff).
        mapping: (K,) class of each cluster, -1 unmatched.
        hist: (C, K) confusion matrix.
        num_images: images evaluated.
    """

    miou: float
    acc: float
    iou: np.ndarray
    group_miou: dict[str, float]
    mapping: np.ndarray
    hist: np.ndarray
    num_images: int

    @property
    def labelled_pixels(self) -> int:
        """Pixels with a class in the ground truth."""
        return int(self.hist.sum())

    def summary(self) -> dict[str, float]:
        """Headline numbers: mIoU, Acc and ``mIoU_<group>`` for every group."""
        return {"mIoU": self.miou, "Acc": self.acc, **{f"mIoU_{g}": v for g, v in self.group_miou.items()}}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready content (NaN stays NaN; the writer turns it into null)."""
        return {
            **self.summary(),
            "iou": self.iou.tolist(),
            "match": {str(k): int(c) for k, c in enumerate(self.mapping.tolist()) if c != UNMATCHED},
            "unmatched_clusters": [int(k) for k in np.flatnonzero(self.mapping == UNMATCHED)],
            "labelled_pixels": self.labelled_pixels,
            "num_images": self.num_images,
            "confusion": self.hist.tolist(),
        }


def pixel_metrics(
    hist: np.ndarray,
    mapping: np.ndarray,
    groups: Mapping[str, Sequence[int]] | None = None,
    num_images: int = 0,
) -> PixelMetrics:
    """Acc, per-class IoU, mIoU and group means of a confusion matrix under a matching.

    Args:
        hist: (C, K) counts, classes x clusters.
        mapping: (K,) class of each cluster, -1 for clusters that count as wrong.
        groups: {name: class ids}, e.g. COCO-Stuff-27's ``things_stuff(range(12), 27)``.
        num_images: recorded in the result.

    Raises:
        ValueError: if the mapping does not fit the matrix or a group names a class outside 0..C-1.
    """
    num_classes, num_clusters = hist.shape
    mapping = np.asarray(mapping, dtype=np.int64)
    if mapping.shape != (num_clusters,) or mapping.max(initial=-1) >= num_classes or mapping.min(initial=0) < -1:
        raise ValueError(f"mapping must be ({num_clusters},) classes 0..{num_classes - 1} or -1")
    matched = mapping != UNMATCHED
    # merged[c, c'] = pixels of class c predicted as a cluster matched to c'
    merged = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(merged.T, mapping[matched], hist[:, matched].T)
    tp = np.diag(merged)
    gt_pixels = hist.sum(axis=1)
    predicted = merged.sum(axis=0)
    union = gt_pixels + predicted - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, 100.0 * tp / union, np.nan)
    total = int(gt_pixels.sum())
    acc = 100.0 * float(tp.sum()) / total if total else math.nan
    group_miou = {}
    for name, ids in (groups or {}).items():
        ids = np.asarray(list(ids), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            raise ValueError(f"group {name!r} names classes outside 0..{num_classes - 1}")
        group_miou[name] = _nanmean(iou[ids])
    return PixelMetrics(_nanmean(iou), acc, iou, group_miou, mapping, hist, num_images)


def _nanmean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else math.nan


@dataclass
class PixelEvaluation:
    """What :func:`evaluate_pixel_items` found."""

    metrics: PixelMetrics
    seconds: float


def evaluate_pixel_items(
    items: Sequence[EvalItem],
    *,
    num_classes: int,
    num_clusters: int | None = None,
    match: str = HUNGARIAN,
    groups: Mapping[str, Sequence[int]] | None = None,
    workers: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> PixelEvaluation:
    """Score predictions on disk with the pixel protocol, in one streaming parallel pass.

    Args:
        items: (ground truth, prediction) pairs, see :func:`list_pixel_items`.
        num_classes: C; ground-truth ids 0..C-1, 1000 ignored.
        num_clusters: K (default C); prediction ids 0..K-1.
        match: ``"hungarian"`` (one matching over the split) or ``"identity"`` (class ids).
        groups: class groups whose mean IoU is reported (things / stuff).
        workers: processes (default one per core).
        progress: receives progress lines.

    Raises:
        UserError: for bad files (counted, the first named).
        ValueError: for an unknown ``match`` or sizes below 1.
    """
    num_clusters = num_classes if num_clusters is None else num_clusters
    if match not in MATCH_MODES:
        raise ValueError(f"match must be one of {MATCH_MODES}, got {match!r}")
    if not 1 <= num_classes <= IGNORE_ID or num_clusters < 1:
        raise ValueError(f"need 1 <= C <= {IGNORE_ID} (the ignore id) and K >= 1, got C = {num_classes}, "
                         f"K = {num_clusters}")
    started = time.perf_counter()
    acc = ConfusionAccumulator(num_classes, num_clusters)
    fn = partial(item_confusion, num_classes=num_classes, num_clusters=num_clusters)
    stream(items, fn, acc.add, workers=workers, progress=progress)
    mapping = hungarian_match(acc.hist) if match == HUNGARIAN else identity_match(num_classes, num_clusters)
    metrics = pixel_metrics(acc.hist, mapping, groups, acc.num_images)
    return PixelEvaluation(metrics, time.perf_counter() - started)


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def format_pixel_table(metrics: PixelMetrics) -> str:
    """One row: mIoU, Acc and the group means."""
    summary = metrics.summary()
    header = list(summary)
    cells = [_fmt(v) for v in summary.values()]
    widths = [max(len(h), len(c)) for h, c in zip(header, cells)]
    row = lambda values: "| " + " | ".join(v.rjust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([row(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", row(cells)])


def format_pixel_per_class(metrics: PixelMetrics, names: Sequence[str] | None = None) -> str:
    """Per class: its IoU, ground-truth pixel share and the cluster(s) matched to it."""
    lines = ["class                  IoU   GT %   clusters"]
    total = max(metrics.labelled_pixels, 1)
    for c, iou in enumerate(metrics.iou):
        name = names[c] if names and c < len(names) else str(c)
        clusters = ",".join(str(k) for k in np.flatnonzero(metrics.mapping == c)) or "-"
        share = 100.0 * metrics.hist[c].sum() / total
        lines.append(f"{name:<20} {_fmt(float(iou)):>6} {share:6.2f}   {clusters}")
    return "\n".join(lines)


def parse_class_ids(text: str, num_classes: int) -> tuple[int, ...]:
    """Class ids from ``"0-11"``, ``"0,3,5-7"``; each must lie in 0..C-1.

    Raises:
        UserError: naming the bad token.
    """
    ids: list[int] = []
    for token in (t.strip() for t in text.split(",")):
        try:
            low, _, high = token.partition("-")
            first, last = int(low), int(high) if high else int(low)
        except ValueError:
            raise UserError(f"--things: expected ids like 0-11 or 0,3,5-7, got {token!r}") from None
        if not 0 <= first <= last < num_classes:
            raise UserError(f"--things: {token!r} is outside the classes 0..{num_classes - 1}")
        ids += range(first, last + 1)
    return tuple(sorted(set(ids)))


def things_stuff(things: Sequence[int], num_classes: int) -> dict[str, tuple[int, ...]]:
    """``{"things": things, "stuff": the other classes}``."""
    chosen = set(things)
    return {"things": tuple(sorted(chosen)), "stuff": tuple(c for c in range(num_classes) if c not in chosen)}
