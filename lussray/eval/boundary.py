"""Boundary regions of a label map, as the official ImageNet-S evaluator draws them.

The official code (shared/reference/pass-imagenet-s.md, section 3, "Boundary mIoU"; ImageNet-S
``data/data.py: get_boundary_mask`` with the Boundary IoU ``mask_to_boundary``) does, for every
value v of the map: take the binary mask of v, pad it with one row/column of zeros, erode it
``d`` times with a 3x3 square, crop, and keep ``mask - eroded`` as v's boundary, with
``d = max(1, round(0.03 * sqrt(H^2 + W^2)))``.

Equivalent closed form used here (checked in tests/unit/test_eval_boundary.py against that
per-label erosion): ``d`` erosions with a 3x3 square remove every pixel whose (2d+1)x(2d+1)
window holds a pixel outside the mask, and the zero padding (with OpenCV's "border does not
erode" rule) makes the outside of the image count as outside the mask. Masks of different values
partition the image, so a pixel is on the boundary of its own value iff its window leaves the
image or holds another value. That costs one separable filter per map instead of one erosion
per label (see :func:`boundary_mask`).

This module is pure: no Ray, no torch.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

DILATION_RATIO = 0.03  # the evaluator passes 0.03; mask_to_boundary's own default is 0.02


def boundary_width(height: int, width: int, ratio: float = DILATION_RATIO) -> int:
    """Erosion iterations d = max(1, round(ratio * diagonal)); Python's round (half to even)."""
    return max(1, int(round(ratio * math.sqrt(height**2 + width**2))))


def frame_mask(shape: tuple[int, int], d: int) -> np.ndarray:
    """(H, W) bool: pixels within ``d`` of the image border, whose window leaves the image."""
    height, width = shape
    frame = np.ones(shape, dtype=bool)
    if height > 2 * d and width > 2 * d:
        frame[d : height - d, d : width - d] = False
    return frame


def window_extrema(values: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Max and min of ``values`` over the (2d+1)x(2d+1) window of every pixel.

    Only meaningful where the window lies inside the image (see :func:`frame_mask`); the filters
    are separable, so the cost does not grow with ``d``.
    """
    size = 2 * d + 1
    return (
        ndimage.maximum_filter(values, size=size, mode="nearest"),
        ndimage.minimum_filter(values, size=size, mode="nearest"),
    )


def boundary_mask(label: np.ndarray, d: int | None = None) -> np.ndarray:
    """(H, W) bool: pixels on the official boundary of their own value.

    A pixel is on the boundary iff its (2d+1)x(2d+1) window leaves the image (the frame of width
    d, see :func:`frame_mask`) or holds another value. A square window is constant iff no two
    4-neighbours inside it differ. Mark each differing pair at its left / top pixel: the marks of
    the pairs inside the window of (r, c) lie in the 2d x 2d block [r-d, r+d-1] x [c-d, c+d-1],
    except those of pairs touching the corner (r+d, c+d). If that block holds no mark, every pixel
    of the window but the corner holds one value, so the window is mixed iff the corner differs
    from the pixel above it. Hence one 2d x 2d box test over the marks per map, done with running
    counts (about three times faster than a max and a min filter of the labels).

    Args:
        label: (H, W) integer label map (any values, ignore ids included).
        d: erosion iterations; default :func:`boundary_width` of the map.
    """
    if label.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {label.shape}")
    d = boundary_width(*label.shape) if d is None else d
    height, width = label.shape
    boundary = np.ones((height, width), dtype=bool)
    if height <= 2 * d or width <= 2 * d:
        return boundary
    down = label[:-1] != label[1:]
    marks = np.zeros((height, width), dtype=bool)
    marks[:, :-1] = label[:, :-1] != label[:, 1:]
    marks[:-1] |= down
    # Any mark in [c - d, c + d - 1] (then in [r - d, r + d - 1]) for the inner pixels: differences
    # of running counts; rows without marks are skipped.
    rows = np.flatnonzero(marks.any(axis=1))
    across = np.zeros((height, width - 2 * d), dtype=bool)
    if rows.size:
        count = np.zeros((rows.size, width + 1), dtype=np.int32)
        np.cumsum(marks[rows], axis=1, dtype=np.int32, out=count[:, 1:])
        across[rows] = count[:, 2 * d : width] != count[:, : width - 2 * d]
    count = np.zeros((height + 1, width - 2 * d), dtype=np.int32)
    np.cumsum(across, axis=0, dtype=np.int32, out=count[1:])
    inner = count[2 * d : height] != count[: height - 2 * d]
    inner |= down[2 * d - 1 : height - 1, 2 * d : width]
    boundary[d : height - d, d : width - d] = inner
    return boundary


def boundary_label_map(label: np.ndarray, d: int | None = None) -> np.ndarray:
    """The official boundary label map: ``label + 1`` on boundary pixels, 0 elsewhere."""
    return np.where(boundary_mask(label, d), label.astype(np.int64) + 1, 0)
