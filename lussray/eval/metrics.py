"""The official ImageNet-S metrics, reduced from summed per-image statistics.

Definitions (shared/reference/pass-imagenet-s.md, section 3, "Metrics"; PASS ``evaluator.py`` and
``src/metric.py``), all on the non-ignored pixels (ground truth != 1000), N + 1 classes with 0:

- **mIoU**: IoU_c = TP_c / (P_c + G_c - TP_c + 1e-10) from dataset-level histograms of the
  (matched) prediction, the ground truth and their agreement; the mean over all N + 1 classes,
  so a class absent from both counts 0.
- **b-mIoU** (mBIoU): the same on boundary label maps (see :mod:`lussray.eval.boundary`): a
  pixel's boundary label is its own label + 1 when it is on that label's boundary, else 0 (which
  is dropped); mean over all N + 1 classes.
- **Img-Acc**: per image, the matched id >= 1 with the largest predicted area (first on ties) must
  be present in both the prediction and the ground truth; an all-"other" prediction is a miss.
- **F-measure**: per image, F = 1.3 P R / (0.3 P + R) of binary foreground (id > 0); averaged.
- **S / MS / ML / L** and **BS / BMS / BML / BL**: mIoU and b-mIoU restricted, per image, to the
  "other" pixels plus the pixels of the categories of one size bucket (size = ceil(100 |c| /
  |valid|): <= 5, <= 25, <= 50, more); the mean skips classes without ground-truth pixels in the
  bucket (NaN when a bucket is empty).

Deviation: the official code sums histograms and per-image F in float32 on the GPU; here counts are
exact int64 and sums float64. The difference is far below the 0.01 printed.

This module is pure: no Ray, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lussray.eval.stats import BUCKET_NAMES, NUM_VIEWS, StatsAccumulator, decode_pairs, in_view

IOU_EPS = 1e-10


@dataclass
class Metrics:
    """Final numbers, in percent like the official evaluator's output.

    Attributes:
        miou, boundary_miou, img_acc, fmeasure: the headline metrics.
        size_miou, size_boundary_miou: {"S", "MS", "ML", "L"} -> mean over present classes (NaN
            if the bucket is empty).
        iou, boundary_iou: per class 0..N.
        num_images, num_classes: what was evaluated.
        tau: the "other" threshold these numbers belong to (sweeps only).
    """

    miou: float
    boundary_miou: float
    img_acc: float
    fmeasure: float
    size_miou: dict[str, float]
    size_boundary_miou: dict[str, float]
    iou: np.ndarray
    boundary_iou: np.ndarray
    num_images: int
    num_classes: int
    tau: float | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def summary(self) -> dict[str, float | None]:
        """The official summary keys (Acc, mIoU, mBIoU, FMeasure, S..L, BS..BL); NaN -> None."""
        values: dict[str, float] = {
            "mIoU": self.miou,
            "mBIoU": self.boundary_miou,
            "Acc": self.img_acc,
            "FMeasure": self.fmeasure,
        }
        values.update(self.size_miou)
        values.update({f"B{name}": value for name, value in self.size_boundary_miou.items()})
        return {k: (None if math.isnan(v) else float(v)) for k, v in values.items()}

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: the summary, per-class IoUs (percent), counts and the threshold."""
        out: dict[str, object] = dict(self.summary())
        out["IoUs"] = [float(v) for v in self.iou]
        out["BIoUs"] = [float(v) for v in self.boundary_iou]
        out["num_images"] = self.num_images
        out["num_classes"] = self.num_classes
        if self.tau is not None:
            out["tau"] = self.tau
        out.update(self.extra)
        return out


def _mapped_histograms(
    totals: np.ndarray, mapping: np.ndarray, num_bins: int
) -> np.ndarray:
    """Sum per-prediction-id totals (views, ids, 2) into matched classes (views, num_bins, 2)."""
    ids = min(len(mapping), totals.shape[1])
    target = np.maximum(mapping[:ids], 0)  # unmapped ids have no pixels (checked per image)
    out = np.zeros((totals.shape[0], num_bins, 2), dtype=np.float64)
    for view in range(totals.shape[0]):
        for column in range(2):
            out[view, :, column] = np.bincount(target, weights=totals[view, :ids, column], minlength=num_bins)
    return out


def compute_metrics(acc: StatsAccumulator, mapping: np.ndarray | None = None, k: int = 0) -> Metrics:
    """Reduce the summed statistics to the official numbers under a matching.

    Args:
        acc: statistics of every image.
        mapping: lookup generated id -> ground-truth id (``mapping[0]`` = 0); None = identity.
        k: threshold index (0 without a sweep).

    Returns:
        the :class:`Metrics` at threshold index k.
    """
    num_bins = acc.num_classes + 1
    if mapping is None:
        mapping = np.arange(acc.max_pred_id + 1, dtype=np.int64)
    mapping = np.asarray(mapping, dtype=np.int64)

    pred = _mapped_histograms(acc.pred_totals[k], mapping, num_bins)  # (views, classes, [n, boundary])
    gt = acc.gt_totals.astype(np.float64)
    codes, counts = acc.pair_codes, acc.pair_counts(k)
    p, g, tag = decode_pairs(codes, acc.num_classes)
    agree = np.zeros(len(codes), dtype=bool)
    inside = p < len(mapping)
    agree[inside] = mapping[p[inside]] == g[inside]

    iou = np.zeros((NUM_VIEWS, num_bins))
    biou = np.zeros((NUM_VIEWS, num_bins))
    for view in range(NUM_VIEWS):
        chosen = agree & in_view(g, tag, view)
        tp = np.bincount(g[chosen], weights=counts[chosen, 0], minlength=num_bins)
        btp = np.bincount(g[chosen], weights=counts[chosen, 1], minlength=num_bins)
        iou[view] = tp / (pred[view, :, 0] + gt[view, :, 0] - tp + IOU_EPS)
        biou[view] = btp / (pred[view, :, 1] + gt[view, :, 1] - btp + IOU_EPS)

    def present_mean(values: np.ndarray, present: np.ndarray) -> float:
        return float(values[present].mean() * 100) if present.any() else float("nan")

    num_images = max(acc.num_images, 1)
    return Metrics(
        miou=float(iou[0].mean() * 100),
        boundary_miou=float(biou[0].mean() * 100),
        img_acc=acc.img_acc_correct(mapping, k) / num_images * 100,
        fmeasure=float(acc.fmeasure_sum[k]) / num_images * 100,
        size_miou={name: present_mean(iou[b + 1], gt[b + 1, :, 0] > 0) for b, name in enumerate(BUCKET_NAMES)},
        size_boundary_miou={
            name: present_mean(biou[b + 1], gt[b + 1, :, 1] > 0) for b, name in enumerate(BUCKET_NAMES)
        },
        iou=iou[0] * 100,
        boundary_iou=biou[0] * 100,
        num_images=acc.num_images,
        num_classes=acc.num_classes,
    )
