"""Pixel-level pseudo labels from centroids and pixel attention (stage 2.3 of the reference).

Per image, at stride 8: cosine similarity of every L2-normalised pixel feature to the
L2-normalised centroids gives ids 1..K (argmax + 1), nearest-upsampled to the image size; the
foreground score is the channel mean of the pixel attention, bilinearly upsampled; pixels whose
score is below tau become 0 ("other"). Pure torch, no Ray.

The reference thresholds the absolute score; ``scale="image"`` first rescales every image's scores
to [0, 1] (min-max): an attention trained briefly offsets whole images by category, so that one
global tau keeps most pixels of some categories and almost none of others.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def assign_pixels(features: Tensor, centroids: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest centroid (cosine) of every pixel, upsampled (nearest) to ``size``.

    Args:
        features: Pixel features, (B, C, h, w) (raw; normalised here).
        centroids: (K, C) centroids (normalised here).
        size: Output (H, W).

    Returns:
        int64 ids in 1..K, (B, H, W).
    """
    similarity = torch.einsum("bchw,kc->bkhw", F.normalize(features.float(), dim=1),
                              F.normalize(centroids.float(), dim=1))
    ids = similarity.argmax(dim=1, keepdim=True).float() + 1
    return F.interpolate(ids, size=size, mode="nearest").squeeze(1).long()


SCORE_SCALES = ("absolute", "image")


def foreground_scores(attention: Tensor, size: tuple[int, int], scale: str = "absolute") -> Tensor:
    """Channel mean of the pixel attention, bilinearly upsampled to ``size``: (B, H, W) float32.

    Args:
        attention: (B, C, h, w) attention in (0, 1).
        size: Output (H, W).
        scale: "absolute" (the reference) or "image": each image's scores min-max rescaled to [0, 1]
            (a constant map becomes 0).
    """
    if scale not in SCORE_SCALES:
        raise ValueError(f"score scale {scale!r} is not one of {SCORE_SCALES}")
    scores = attention.float().mean(dim=1, keepdim=True)
    scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False).squeeze(1)
    if scale == "image":
        low = scores.amin(dim=(1, 2), keepdim=True)
        spread = scores.amax(dim=(1, 2), keepdim=True) - low
        scores = (scores - low) / spread.clamp_min(1e-12)
    return scores


def apply_threshold(ids: np.ndarray, scores: np.ndarray, tau: float) -> np.ndarray:
    """Set pixels whose foreground score is below ``tau`` to 0 ("other"); returns int32 labels."""
    labels = ids.astype(np.int32, copy=True)
    labels[scores < tau] = 0
    return labels


def label_histogram(labels: np.ndarray, num_clusters: int) -> np.ndarray:
    """Pixel counts of ids 0..K (int64, length K + 1)."""
    return np.bincount(labels.ravel(), minlength=num_clusters + 1)[: num_clusters + 1].astype(np.int64)
