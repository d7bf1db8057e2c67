"""Sweep of the "other" threshold tau in one pass over the data.

PASS chooses the label-generation threshold on the validation set
(shared/reference/pass-imagenet-s.md, section 2.3): for each tau in {0.00, 0.01, ..., 0.80} the
prediction becomes ``pred`` with pixels whose foreground score is below tau set to 0 ("other"),
the image-level Hungarian matching is recomputed, every metric is computed, and the tau of the
best mIoU wins (the first on ties, ``np.argmax``). The official ``evaluator.py --curve`` re-reads
every file once per tau; here each image is read once and yields statistics for all thresholds
(:func:`lussray.eval.stats.image_stats` with ``scores`` and ``taus``), so the cost of extra
thresholds is a few matchings and reductions, not passes over the data.

Usage by label generation, where the per-image maps live in Ray tasks::

    sweep = TauSweep(num_classes=919)                      # taus 0.00..0.80 by default
    stats = sweep.image_stats(pred, scores, gt)            # pure: run it anywhere, ship the result
    sweep.add(stats)                                       # in the driver, once per image
    result = sweep.result(); result.best_tau, result.best.miou

or in one call over an iterable of (pred, scores, gt): :func:`sweep_tau`; over prediction folders
with ``<name>.npy`` scores: :func:`sweep_folders`.

This module is pure: no Ray, no torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from lussray.eval.io import EvalItem
from lussray.eval.matching import cooccurrence, hungarian_mapping
from lussray.eval.metrics import Metrics, compute_metrics
from lussray.eval.parallel import ordered_map
from lussray.eval.runner import accumulate
from lussray.eval.stats import ImageStats, StatsAccumulator, image_stats

DEFAULT_TAUS = np.round(np.arange(0, 81) * 0.01, 2)  # PASS: evaluator.py --curve --min 0 --max 80


def parse_taus(spec: str) -> np.ndarray:
    """Thresholds from ``"MIN:MAX:STEP"`` (inclusive, e.g. ``0:0.8:0.01``) or ``"a,b,c"``.

    Raises:
        ValueError: for a malformed or empty specification.
    """
    if ":" in spec:
        low, high, step = (float(x) for x in spec.split(":"))
        if step <= 0 or high < low:
            raise ValueError(f"bad threshold range {spec!r}")
        count = int(round((high - low) / step)) + 1
        taus = np.round(low + np.arange(count) * step, 10)
    else:
        taus = np.array(sorted(float(x) for x in spec.split(",") if x.strip()))
    if taus.size == 0 or np.any(np.diff(taus) <= 0):
        raise ValueError(f"thresholds must be non-empty and increasing: {spec!r}")
    return taus


@dataclass
class SweepResult:
    """Metrics at every threshold; the best is the first maximum of mIoU.

    Attributes:
        taus: (K,) thresholds.
        metrics: one :class:`Metrics` per threshold.
        mappings: the Hungarian matching of each threshold (lookup arrays, 0 -> 0).
    """

    taus: np.ndarray
    metrics: list[Metrics]
    mappings: list[np.ndarray]
    pair_table_bytes: int = 0  # memory the accumulated statistics held (for reports)

    @property
    def best_index(self) -> int:
        """Index of the best threshold (first maximum of mIoU, as the official ``np.argmax``)."""
        return int(np.argmax([m.miou for m in self.metrics]))

    @property
    def best_tau(self) -> float:
        """The threshold to use for label generation."""
        return float(self.taus[self.best_index])

    @property
    def best(self) -> Metrics:
        """Metrics at the best threshold."""
        return self.metrics[self.best_index]

    def curve(self) -> list[dict[str, Any]]:
        """One summary dict per threshold (tau, mIoU, mBIoU, Acc, FMeasure, S..BL)."""
        return [{"tau": float(t), **m.summary()} for t, m in zip(self.taus, self.metrics)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: best tau, its full metrics, and the curve."""
        return {"best_tau": self.best_tau, "best": self.best.to_dict(), "curve": self.curve()}


class TauSweep:
    """Accumulates per-image statistics over K thresholds and reduces them (see module doc).

    Args:
        num_classes: N (prediction ids must lie in 0..N).
        taus: increasing thresholds (default 0.00..0.80 by 0.01, 81 values).
    """

    def __init__(self, num_classes: int, taus: Sequence[float] | np.ndarray | None = None):
        self.num_classes = num_classes
        self.taus = np.asarray(DEFAULT_TAUS if taus is None else taus, dtype=np.float64)
        if self.taus.ndim != 1 or self.taus.size == 0 or np.any(np.diff(self.taus) <= 0):
            raise ValueError("taus must be a non-empty increasing 1-D sequence")
        self.accumulator = StatsAccumulator(num_classes, num_taus=len(self.taus))

    def image_stats(self, pred: np.ndarray, scores: np.ndarray, gt: np.ndarray, key: str = "") -> ImageStats:
        """Statistics of one image at every threshold (pure; may run in any process).

        Args:
            pred: (H, W) ids 0..N before thresholding (PASS label generation gives 1..K).
            scores: (H, W) foreground scores; a pixel is "other" at tau when its score < tau.
            gt: (H, W) ground truth (0 other, 1..N, 1000 ignore).
            key: sample key for messages.
        """
        return image_stats(pred, gt, self.num_classes, scores=scores, taus=self.taus, key=key)

    def add(self, stats: ImageStats) -> None:
        """Add one image's statistics (from :meth:`image_stats`)."""
        self.accumulator.add(stats)

    def add_image(self, pred: np.ndarray, scores: np.ndarray, gt: np.ndarray, key: str = "") -> None:
        """Compute and add one image's statistics in this process."""
        self.add(self.image_stats(pred, scores, gt, key))

    @property
    def num_images(self) -> int:
        """Images added so far."""
        return self.accumulator.num_images

    def result(self) -> SweepResult:
        """Match and reduce every threshold: K Hungarian matchings and metric reductions."""
        acc = self.accumulator
        metrics, mappings = [], []
        for k, tau in enumerate(self.taus):
            pred_images, pred_labels, gt_images, gt_labels = acc.presence(k)
            cooc = cooccurrence(pred_images, pred_labels, gt_images, gt_labels, acc.num_images, self.num_classes)
            mapping = hungarian_mapping(cooc)
            result = compute_metrics(acc, mapping, k)
            result.tau = float(tau)
            metrics.append(result)
            mappings.append(mapping)
        return SweepResult(self.taus.copy(), metrics, mappings, acc.pair_table_bytes)


def _sample_stats(
    sample: Any, *, num_classes: int, taus: np.ndarray, load: Callable[[Any], tuple] | None
) -> ImageStats:
    pred, scores, gt = load(sample) if load is not None else sample
    return image_stats(pred, gt, num_classes, scores=scores, taus=taus)


def sweep_tau(
    samples: Iterable[Any],
    *,
    num_classes: int,
    taus: Sequence[float] | np.ndarray | None = None,
    load: Callable[[Any], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
    workers: int = 1,
    chunk_size: int = 8,
    progress: Callable[[str], None] | None = None,
    total: int | None = None,
) -> SweepResult:
    """Sweep tau over an iterable of images in one pass.

    Args:
        samples: (pred, scores, gt) triples, or anything ``load`` turns into one.
        num_classes: N.
        taus: thresholds (default 0.00..0.80 by 0.01).
        load: optional picklable function run in the workers, e.g. reading files, so that only
            small descriptors cross process boundaries.
        workers: processes (1: in this process); at most 2 chunks per worker are in flight.
        chunk_size: samples per task.
        progress: receives a line about every 10% of ``total`` samples (when both are given).
        total: the number of samples, for progress lines.
    """
    sweep = TauSweep(num_classes, taus)
    fn = partial(_sample_stats, num_classes=num_classes, taus=sweep.taus, load=load)
    started, next_report = time.perf_counter(), 1
    for done, stats in enumerate(ordered_map(fn, samples, workers=workers, chunk_size=chunk_size), start=1):
        sweep.add(stats)
        if progress and total and done * 10 >= next_report * total:
            rate = done / max(time.perf_counter() - started, 1e-9)
            progress(f"sweep: {done}/{total} images ({rate:.0f} images/s)")
            next_report = done * 10 // total + 1
    return sweep.result()


def sweep_folders(
    items: Sequence[EvalItem],
    *,
    num_classes: int,
    taus: Sequence[float] | np.ndarray | None = None,
    workers: int | None = None,
) -> SweepResult:
    """Sweep tau over predictions on disk: ``<name>.png`` plus ``<name>.npy`` foreground scores.

    Raises:
        UserError: for missing or bad files (counted, first ones named).
    """
    sweep = TauSweep(num_classes, taus)
    accumulate(items, sweep.accumulator, taus=sweep.taus, workers=workers)
    return sweep.result()
