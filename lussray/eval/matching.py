"""Image-level Hungarian matching between generated and ground-truth categories.

Implements the matching of the official ImageNet-S evaluator (``evaluation/match.py`` and
``hungarian.py``; shared/reference/pass-imagenet-s.md, section 3, "Matching"):

1. per image, the set of ground-truth categories present and the set of generated categories
   present, both without "other" (0) and over the non-ignored pixels only;
2. co-occurrence C[i, j] = number of images in which generated category i and ground-truth
   category j are both present (image-level presence, not pixel overlap);
3. an assignment maximising the total co-occurrence; the official code minimises
   1 - C / num_images with the pure-Python ``munkres`` package (PASS minimises -C), which has the
   same optima. Deviation: ``scipy.optimize.linear_sum_assignment`` is used (seconds instead of
   hours for 919 categories); when several assignments reach the optimum, the one chosen may
   differ from munkres's.
4. the result is the lookup ``mapping[i] = j`` for ids 1..N, plus 0 -> 0.

This module is pure: no Ray, no torch.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment


def cooccurrence(
    pred_images: np.ndarray,
    pred_labels: np.ndarray,
    gt_images: np.ndarray,
    gt_labels: np.ndarray,
    num_images: int,
    num_classes: int,
) -> np.ndarray:
    """Image-level co-occurrence of generated and ground-truth categories.

    Args:
        pred_images, pred_labels: one entry per (image, generated id in 1..N present in it).
        gt_images, gt_labels: one entry per (image, ground-truth id in 1..N present in it).
        num_images: number of images.
        num_classes: N.

    Returns:
        (N, N) int64 array; entry [i - 1, j - 1] counts the images holding generated i and GT j.
    """
    shape = (num_images, num_classes)
    pred = sparse.csr_matrix(
        (np.ones(len(pred_labels), np.int64), (pred_images, np.asarray(pred_labels) - 1)), shape=shape
    )
    gt = sparse.csr_matrix((np.ones(len(gt_labels), np.int64), (gt_images, np.asarray(gt_labels) - 1)), shape=shape)
    return np.asarray((pred.T @ gt).toarray(), dtype=np.int64)


def hungarian_mapping(cooc: np.ndarray) -> np.ndarray:
    """The matching that maximises the total co-occurrence, as a lookup array.

    Args:
        cooc: (N, N) co-occurrence counts (generated x ground truth).

    Returns:
        (N + 1,) int64 array with ``mapping[0] = 0`` and ``mapping[i]`` the ground-truth id of
        generated id i, a permutation of 1..N.
    """
    num_classes = cooc.shape[0]
    if cooc.shape != (num_classes, num_classes):
        raise ValueError(f"co-occurrence must be square, got shape {cooc.shape}")
    rows, cols = linear_sum_assignment(cooc, maximize=True)
    mapping = np.zeros(num_classes + 1, dtype=np.int64)
    mapping[rows + 1] = cols + 1
    return mapping


def match_presence(
    pred_sets: list[np.ndarray] | list[set[int]], gt_sets: list[np.ndarray] | list[set[int]], num_classes: int
) -> np.ndarray:
    """The Hungarian mapping from per-image presence sets (ids in 1..N; 0 may be present).

    Convenience for callers holding lists of sets; :func:`cooccurrence` takes flat arrays.
    """
    if len(pred_sets) != len(gt_sets):
        raise ValueError("one prediction set and one ground-truth set per image")

    def flatten(sets: list) -> tuple[np.ndarray, np.ndarray]:
        ids = [np.asarray(sorted(set(int(v) for v in s) - {0}), dtype=np.int64) for s in sets]
        images = np.repeat(np.arange(len(ids)), [len(a) for a in ids])
        return images, np.concatenate(ids) if ids else np.zeros(0, np.int64)

    pred_images, pred_labels = flatten(pred_sets)
    gt_images, gt_labels = flatten(gt_sets)
    if len(pred_labels) and (pred_labels.max() > num_classes or len(gt_labels) and gt_labels.max() > num_classes):
        raise ValueError(f"presence sets hold ids above N = {num_classes}")
    return hungarian_mapping(cooccurrence(pred_images, pred_labels, gt_images, gt_labels, len(pred_sets), num_classes))
