"""One streaming pass over prediction / ground-truth files: statistics per image, errors collected.

Workers read a (prediction, ground truth[, foreground scores]) triple, compute its
:class:`~lussray.eval.stats.ImageStats` and return it; the parent sums them as they arrive, so
memory stays bounded whatever the number of images. Bad files do not stop the pass: they are
counted per kind, and the pass ends with one :class:`~lussray.errors.UserError` that says how
many files are affected and names the first ones.

This module is pure: no Ray, no torch.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from lussray.errors import UserError
from lussray.eval.io import EvalItem, read_foreground, read_label
from lussray.eval.parallel import default_workers, ordered_map

if TYPE_CHECKING:
    from lussray.eval.stats import ImageStats, StatsAccumulator

log = logging.getLogger(__name__)

_KIND_TEXT = {
    "size": "have another size than their ground truth",
    "pred_ids": "use ids outside the allowed range (check --classes / --dataset, or --match)",
    "gt_ids": "are ground truths with ids outside 0..N and 1000",
    "unmatched": "use ids that the match file does not map",
    "unreadable": "cannot be read",
    "cluster_ids": "hold ids outside the clusters 0..K-1 (check --clusters, or --classes with --match identity)",
    "class_ids": "are ground truths with ids outside the classes 0..C-1 and 1000 (check --classes)",
}


@dataclass(frozen=True)
class ItemError:
    """Why one image could not be evaluated."""

    key: str
    path: str
    kind: str
    message: str


def read_pair(item: EvalItem) -> tuple[np.ndarray, np.ndarray] | ItemError:
    """An item's ground truth and prediction, or the error naming the file that could not be read."""
    try:
        gt = read_label(item.gt_path)
    except UserError as error:
        return ItemError(item.key, str(item.gt_path), "unreadable", str(error))
    try:
        return gt, read_label(item.pred_path)
    except UserError as error:
        return ItemError(item.key, str(item.pred_path), "unreadable", str(error))


def item_stats(
    item: EvalItem,
    *,
    num_classes: int,
    mapping: np.ndarray | None = None,
    taus: np.ndarray | None = None,
) -> ImageStats | ItemError:
    """Read one image's files and compute its statistics (runs in a worker process)."""
    # Imported here: the pixel protocol's workers share this module but not stats (scipy.ndimage).
    from lussray.eval.stats import LabelError, image_stats

    pair = read_pair(item)
    if isinstance(pair, ItemError):
        return pair
    gt, pred = pair
    try:
        scores = read_foreground(item.foreground_path) if taus is not None else None
    except UserError as error:
        return ItemError(item.key, str(item.pred_path), "unreadable", str(error))
    try:
        return image_stats(pred, gt, num_classes, scores=scores, taus=taus, mapping=mapping, key=item.key)
    except LabelError as error:
        path = item.gt_path if error.kind == "gt_ids" else item.pred_path
        return ItemError(item.key, str(path), error.kind, str(error))


def describe_errors(errors: dict[str, list[ItemError]], total: int, limit: int = 3) -> str:
    """One readable paragraph: per kind, how many files, and the first ``limit`` of them."""
    lines = []
    for kind, found in errors.items():
        shown = "; ".join(f"{e.path} ({e.message})" for e in found[:limit])
        more = f"; and {len(found) - limit} more" if len(found) > limit else ""
        lines.append(f"{len(found)} of {total} files {_KIND_TEXT.get(kind, kind)}: {shown}{more}")
    return "\n".join(lines)


def accumulate(
    items: Sequence[EvalItem],
    accumulator: StatsAccumulator,
    *,
    mapping: np.ndarray | None = None,
    taus: np.ndarray | None = None,
    workers: int | None = None,
    chunk_size: int = 16,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Add the statistics of every item to ``accumulator`` in one parallel, streaming pass.

    Args:
        items: the images, e.g. from :func:`lussray.eval.io.list_items`.
        accumulator: receives every image's statistics.
        mapping: a fixed matching (lookup array), or None.
        taus: thresholds for a sweep (reads ``<name>.npy`` foreground scores), or None.
        workers: processes (default: one per core; small inputs run in-process).
        chunk_size: images per task.
        progress: receives a progress line about every 10% of a pass over 500 images or more
            (default: the module logger).

    Raises:
        UserError: after the pass, if any file was missing, unreadable, of another size than its
            ground truth, or held ids out of range; the message counts them and names the first.
    """
    fn = partial(item_stats, num_classes=accumulator.num_classes, mapping=mapping, taus=taus)
    stream(items, fn, accumulator.add, workers=workers, chunk_size=chunk_size, progress=progress)


def stream(
    items: Sequence[EvalItem],
    fn: Callable[[EvalItem], Any],
    add: Callable[[Any], None],
    *,
    workers: int | None = None,
    chunk_size: int = 16,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Run ``fn`` on every item in parallel and pass each result to ``add``, in order.

    The shared pass of the evaluators: ``fn`` (picklable, run in worker processes) returns an
    image's statistics or an :class:`ItemError`; once an error is seen nothing more is added.

    Args:
        items: the images.
        fn: per-image statistics, or an :class:`ItemError`.
        add: receives every result that is not an error (in the parent process).
        workers, chunk_size, progress: as in :func:`accumulate`.

    Raises:
        UserError: after the pass, if any item gave an :class:`ItemError` (counted per kind).
    """
    workers = default_workers() if workers is None else workers
    if len(items) < 4 * chunk_size:
        workers = 1
    report = progress or log.info
    errors: dict[str, list[ItemError]] = defaultdict(list)
    started, next_report, total = time.perf_counter(), 1, len(items)
    for done, result in enumerate(ordered_map(fn, items, workers=workers, chunk_size=chunk_size), start=1):
        if isinstance(result, ItemError):
            errors[result.kind].append(result)
        elif not errors:
            add(result)
        if total >= 500 and done * 10 >= next_report * total:
            rate = done / max(time.perf_counter() - started, 1e-9)
            report(f"evaluate: {done}/{total} images ({rate:.0f} images/s)")
            next_report = done * 10 // total + 1
    if errors:
        raise UserError(describe_errors(errors, total))
