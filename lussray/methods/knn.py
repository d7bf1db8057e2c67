"""Distance matching: instance embeddings of labelled images and a weighted kNN vote per pixel.

Implements the distance-matching protocol of [0] (PASS ``distance_matching/``;
shared/reference/pass-imagenet-s.md, section 5):

1. :func:`dense_features`: the backbone's last-stage features of a ``Resize(256)`` image,
   bilinearly upsampled x4 (stride 8).
2. :func:`instance_embeddings`: for every ground-truth label v present in a train-semi image,
   "other" (0) included and ignore (1000) excluded, the mean over all h x w positions of
   feature * mask_v, the ground truth being nearest-resized to the feature size (``get_instance.py``;
   the 1 / (h w) scale disappears in the L2 normalisation that follows).
3. :func:`knn_vote`: every L2-normalised pixel feature of a validation/test image votes among its
   k nearest L2-normalised instance embeddings (cosine similarity) with weight exp(sim / T), DINO
   style [1], over the N + 1 classes; the class with the largest total wins (k = 10, T = 0.07).

Deviation: a label present in the full-resolution ground truth but gone after the nearest resize
to the feature grid yields no embedding here (the reference would store an all-zero vector, which
normalises to zero and never wins a vote).

This module is pure torch: no Ray.

References:
    - [0]: PASS / ImageNet-S, "Large-scale Unsupervised Semantic Segmentation", TPAMI 2022,
      arXiv:2106.03149.
    - [1]: DINO, "Emerging Properties in Self-Supervised Vision Transformers", 2021,
      arXiv:2104.14294 (the weighted kNN classifier).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lussray.data.imagenet_s import IGNORE_ID
from lussray.models.segmenter import resize_nearest

#: Upsampling of the stride-32 features (the reference's x4 -> stride 8).
FEATURE_UPSAMPLE = 4
#: Similarities computed at once by :func:`knn_vote` (pixels x instances).
CHUNK_ELEMENTS = 1 << 24


def dense_features(c4: Tensor, factor: int = FEATURE_UPSAMPLE) -> Tensor:
    """Bilinear x``factor`` upsampling of (B, C, h, w) features (``align_corners=False``)."""
    return F.interpolate(c4, scale_factor=factor, mode="bilinear", align_corners=False)


def instance_embeddings(features: Tensor, label: Tensor, ignore_id: int = IGNORE_ID) -> tuple[Tensor, Tensor]:
    """One embedding per label present in an image (eq.: e_v = sum_p f_p [y_p = v] / (h w)).

    Args:
        features: (C, h, w) features of one image.
        label: (H, W) integer ground truth at any resolution (nearest-resized to h x w here).
        ignore_id: Label that gets no embedding.

    Returns:
        ``(embeddings, labels)``: (M, C) float32 (not normalised) and (M,) int64 ids, ascending.
    """
    _, h, w = features.shape
    small = resize_nearest(label.to(features.device).long(), (h, w))
    ids = torch.unique(small)
    ids = ids[ids != ignore_id]
    masks = (small[None] == ids[:, None, None]).to(features.dtype)  # (M, h, w)
    embeddings = torch.einsum("mhw,chw->mc", masks, features) / float(h * w)
    return embeddings.float(), ids


def knn_vote(
    pixels: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_labels: int,
    *,
    k: int = 10,
    temperature: float = 0.07,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Tensor:
    """Weighted kNN labels of pixel features against labelled instance embeddings.

    Args:
        pixels: (P, C) pixel features (L2-normalised here).
        bank: (M, C) instance embeddings (L2-normalised here).
        bank_labels: (M,) integer labels in 0..num_labels - 1.
        num_labels: N + 1 (0 = other).
        k: Neighbours per pixel (all M when fewer).
        temperature: T of the weights exp(sim / T).
        chunk_elements: Pixel x instance similarities held at once.

    Returns:
        (P,) int64 labels; ties go to the smallest label.

    Raises:
        ValueError: If the bank is empty or the shapes do not fit.
    """
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise ValueError(f"the instance bank must be a non-empty (M, C) matrix, got {tuple(bank.shape)}")
    if pixels.ndim != 2 or pixels.shape[1] != bank.shape[1]:
        raise ValueError(f"pixel features {tuple(pixels.shape)} do not match the bank {tuple(bank.shape)}")
    bank = F.normalize(bank.float(), dim=1)
    pixels = F.normalize(pixels.float(), dim=1)
    bank_labels = bank_labels.to(pixels.device).long()
    k = min(k, bank.shape[0])
    out = torch.empty(pixels.shape[0], dtype=torch.long, device=pixels.device)
    step = max(1, chunk_elements // bank.shape[0])
    for start in range(0, pixels.shape[0], step):
        similarity = pixels[start:start + step] @ bank.T  # (p, M) cosine similarities
        top, index = similarity.topk(k, dim=1)
        votes = torch.zeros(similarity.shape[0], num_labels, device=pixels.device)
        votes.scatter_add_(1, bank_labels[index], torch.exp(top / temperature))
        out[start:start + step] = votes.argmax(1)
    return out


__all__ = ["FEATURE_UPSAMPLE", "dense_features", "instance_embeddings", "knn_vote"]
