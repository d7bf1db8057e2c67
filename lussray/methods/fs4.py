"""FS^4's pyramid global guidance (PGG): pyramid views, active selection, the global loss L_w.

The pure blocks of FS^4 [0] that sit around PiCIE's pixel clustering [1]:

- :func:`pyramid_boxes` and :func:`pyramid_view_images`: the six views of an image (Sec. 4.2.1
  "Pyramid views"; supplement A.1): the whole image and five crops, four corners and the centre.
- :func:`nearest_centres`: the image-level pseudo label of a view, its nearest global cluster
  centre by cosine distance, with unit-norm features and centres (Sec. 4.2.1 "Labeling method").
- :func:`selection_cutoff`, :func:`apply_cutoff`, :func:`active_selection`: active selection
  (Sec. 4.2.1 "Active selection"): only the views closest to their centre are used for training.
- :func:`global_guidance_loss` (Eq. 6) and :func:`fs4_loss` (Eq. 5, L = L_w + L_p). L_p is PiCIE's
  within- and cross-view clustering loss (Eqs. 1-4), which lives in ``lussray.methods.picie``;
  this module only takes its value.

The CAM heads that produce the logits q of Eq. 6 are in ``lussray.models.fs4_heads``; the CAE
module (Eqs. 7-9) in ``lussray.models.cae``.

Choices where the paper is silent (each is a keyword argument):

- Crop size of the five crops: not stated. ``crop_fraction=0.5`` of each side (the corners tile
  the image, the centre crop overlaps all four), sides ``max(1, floor(fraction * side))``, the
  centre crop's offset ``floor((side - crop) / 2)``.
- View preprocessing (supplement A.1): each crop is resized to 640 x 640, then, like the whole
  image, resized to 256 x 256 (a square resize, as the supplement writes, not a shorter-side one)
  and centre-cropped to 224 x 224. Resizes are bilinear and antialiased (PIL).
- Active selection ranks all views of the dataset together (the paper ranks "the view images"),
  whole images included, by cosine distance to their own centre. It keeps
  ``max(1, floor(keep_fraction * N))`` of N views (never more than the fraction, at least one);
  equal distances are broken by the smaller global view index, so the selection is a function of
  the distances and the indexing alone.
- L_w is averaged over the views of the batch; views labelled ``ignore_index`` do not count.

References:
    - [0]: FS^4, "Fully Self-Supervised Learning for Semantic Segmentation", 2022, arXiv:2202.11981.
    - [1]: PiCIE, CVPR 2021, arXiv:2103.17070.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from lussray.data.augment import CropBox, center_crop, resized_crop

#: The order of the six pyramid views of an image (index = view id within the image).
VIEW_NAMES: tuple[str, ...] = ("full", "top_left", "top_right", "bottom_left", "bottom_right", "center")
NUM_VIEWS = len(VIEW_NAMES)

#: Supplement A.1: crops are resized to 640 x 640, then every view to 256 x 256 and centre-cropped to 224.
CROP_VIEW_SIZE = 640
GLOBAL_RESIZE = 256
GLOBAL_CROP = 224


def pyramid_boxes(height: int, width: int, crop_fraction: float = 0.5) -> list[CropBox]:
    """The six pyramid boxes of an image, in :data:`VIEW_NAMES` order (Sec. 4.2.1 of [0]).

    Args:
        height: Image height H in pixels.
        width: Image width W in pixels.
        crop_fraction: Side of each of the five crops as a fraction of the image side (the paper
            does not state it; 0.5 makes the four corners tile the image). Crop sides are
            ``max(1, floor(fraction * H))`` by ``max(1, floor(fraction * W))``.

    Returns:
        Six integer-valued boxes (top, left, height, width), unflipped: the whole image, the
        top-left, top-right, bottom-left and bottom-right corners, and the centre crop (offset
        ``floor((H - h) / 2)``, ``floor((W - w) / 2)``).

    Raises:
        ValueError: If the image is empty or ``crop_fraction`` is not in (0, 1].
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image must be non-empty, got {height}x{width}")
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    h = max(1, _floor_fraction(crop_fraction, height))
    w = max(1, _floor_fraction(crop_fraction, width))
    corners = [(0, 0), (0, width - w), (height - h, 0), (height - h, width - w), ((height - h) // 2, (width - w) // 2)]
    boxes = [CropBox(0.0, 0.0, float(height), float(width))]
    boxes += [CropBox(float(top), float(left), float(h), float(w)) for top, left in corners]
    return boxes


def pyramid_view_images(
    image: np.ndarray,
    *,
    crop_fraction: float = 0.5,
    crop_view_size: int = CROP_VIEW_SIZE,
    resize: int = GLOBAL_RESIZE,
    crop: int = GLOBAL_CROP,
    num_views: int = NUM_VIEWS,
) -> list[np.ndarray]:
    """The six views of ``image`` as the initial model sees them for pseudo labelling.

    Supplement A.1 of [0]: the whole image is resized to ``resize`` x ``resize`` and centre-cropped
    to ``crop``; each of the five crops is first resized to ``crop_view_size`` squared and then
    processed the same way.

    Args:
        image: uint8 RGB (H, W, 3).
        crop_fraction: See :func:`pyramid_boxes`.
        crop_view_size: Side the crops are resized to first (640).
        resize: Square resize side of every view (256).
        crop: Centre-crop side (224).
        num_views: Only the first ``num_views`` views (1: the whole image alone).

    Returns:
        ``num_views`` uint8 (crop, crop, 3) arrays in :data:`VIEW_NAMES` order (not yet normalised).
    """
    height, width = image.shape[:2]
    boxes = pyramid_boxes(height, width, crop_fraction)[:num_views]
    views = [resized_crop(image, boxes[0], resize)]
    for box in boxes[1:]:
        enlarged = resized_crop(image, box, crop_view_size)
        views.append(resized_crop(enlarged, CropBox(0.0, 0.0, float(crop_view_size), float(crop_view_size)), resize))
    return [center_crop(view, crop) for view in views]


def nearest_centres(features: np.ndarray, centres: np.ndarray, eps: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo label and cosine distance of every view (Sec. 4.2.1 of [0], "Labeling method").

    Features and centres are L2-normalised; a view's label is its most cosine-similar centre and
    its distance ``1 - cos`` (in [0, 2]). Ties go to the lower centre id.

    Args:
        features: Global view features, (N, D).
        centres: Global cluster centres, (K, D).
        eps: Floor of the norms (a zero row gets distance 1 to every centre).

    Returns:
        ``(labels, distances)``: (N,) int64 centre ids and (N,) float64 cosine distances.

    Raises:
        ValueError: If the shapes do not agree.
    """
    features = np.asarray(features, dtype=np.float64)
    centres = np.asarray(centres, dtype=np.float64)
    if features.ndim != 2 or centres.ndim != 2 or features.shape[1] != centres.shape[1] or len(centres) == 0:
        raise ValueError(f"features (N, D) and centres (K >= 1, D) must agree, got {features.shape}, {centres.shape}")
    unit_f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), eps)
    unit_c = centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), eps)
    cosine = unit_f @ unit_c.T
    labels = np.argmax(cosine, axis=1).astype(np.int64)
    return labels, 1.0 - cosine[np.arange(len(labels)), labels]


@dataclass(frozen=True)
class SelectionCutoff:
    """The last view kept by active selection: a view is kept iff (distance, index) <= this pair.

    Computed once over every view of the dataset (:func:`selection_cutoff`), it lets each shard
    decide its own views (:func:`apply_cutoff`) without a global join.

    Attributes:
        distance: Distance of the last kept view (``-inf`` when nothing is kept).
        index: Global index of the last kept view (-1 when nothing is kept).
        num_kept: Number of views kept.
        num_views: Number of views ranked.
    """

    distance: float
    index: int
    num_kept: int
    num_views: int


def num_selected(num_views: int, keep_fraction: float) -> int:
    """How many of ``num_views`` views active selection keeps: ``max(1, floor(fraction * N))``.

    The fraction is read as the decimal the user wrote (``Fraction(repr(f))``), so 0.29 x 100 is
    29, not float's 28.999...; none are kept of zero views.

    Raises:
        ValueError: If ``num_views`` is negative or ``keep_fraction`` is not in (0, 1].
    """
    if num_views < 0:
        raise ValueError(f"num_views must be >= 0, got {num_views}")
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if num_views == 0:
        return 0
    return max(1, _floor_fraction(keep_fraction, num_views))


def selection_cutoff(
    distances: np.ndarray, keep_fraction: float = 0.4, indices: np.ndarray | None = None
) -> SelectionCutoff:
    """Active selection over all views (Sec. 4.2.1 of [0]): the cutoff of the closest views.

    Views are ranked by distance to their own cluster centre, ascending (smaller = closer; pass
    ``1 - cosine`` or ``-inner_product`` for similarities), ties by ascending index; the first
    :func:`num_selected` are kept (40 % in the paper).

    Args:
        distances: (N,) distance of every view to its centre; finite.
        keep_fraction: Fraction of views kept, in (0, 1].
        indices: (N,) distinct global view indices used to break ties; ``arange(N)`` if omitted.

    Returns:
        The cutoff; :func:`apply_cutoff` turns it into a mask.

    Raises:
        ValueError: On non-finite distances, mismatched or repeated indices, or a bad fraction.
    """
    distances, indices = _check_views(distances, indices)
    if len(np.unique(indices)) != len(indices):
        raise ValueError("view indices must be distinct")
    count = num_selected(len(distances), keep_fraction)
    if count == 0:
        return SelectionCutoff(-math.inf, -1, 0, len(distances))
    order = np.lexsort((indices, distances))  # primary key: distance; ties: index
    last = order[count - 1]
    return SelectionCutoff(float(distances[last]), int(indices[last]), count, len(distances))


def apply_cutoff(distances: np.ndarray, indices: np.ndarray, cutoff: SelectionCutoff) -> np.ndarray:
    """Which views a cutoff keeps: those with (distance, index) <= (cutoff.distance, cutoff.index).

    Args:
        distances: (n,) distances of some views (any subset of those ranked, e.g. one shard).
        indices: (n,) their global view indices.
        cutoff: From :func:`selection_cutoff` over all views.

    Returns:
        (n,) bool mask.

    Raises:
        ValueError: On non-finite distances or mismatched shapes.
    """
    distances, indices = _check_views(distances, indices)
    return (distances < cutoff.distance) | ((distances == cutoff.distance) & (indices <= cutoff.index))


def active_selection(distances: np.ndarray, keep_fraction: float = 0.4) -> np.ndarray:
    """Mask of the views active selection keeps, when all views are in one array.

    Args:
        distances: (N,) distance of every view to its own centre (smaller = closer).
        keep_fraction: Fraction kept (0.4 in [0]).

    Returns:
        (N,) bool mask with exactly :func:`num_selected` ``(N, keep_fraction)`` true entries.
    """
    indices = np.arange(len(np.asarray(distances)))
    return apply_cutoff(distances, indices, selection_cutoff(distances, keep_fraction, indices))


def global_guidance_loss(logits: Tensor, labels: Tensor, ignore_index: int = -1) -> Tensor:
    """Global guidance loss L_w, Eq. (6) of [0]: cross-entropy of the CAM scores q and the label l.

    L_w = -log(exp(q_l) / sum_m exp(q_m)), averaged over the views of the batch.

    Args:
        logits: Scores q of the classification module, (B, M) over the M global clusters.
        labels: Pseudo label l of every view, (B,) int in [0, M), or ``ignore_index``.
        ignore_index: Label of views without a pseudo label (they add nothing).

    Returns:
        Scalar loss; 0 (still attached to ``logits``) when no view has a label.

    Raises:
        ValueError: If the shapes do not agree.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits (B, M) and labels (B,) must agree, got {tuple(logits.shape)}, {tuple(labels.shape)}")
    valid = labels != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index)


@dataclass(frozen=True)
class FS4Losses:
    """The FS^4 objective and its two parts (for logging).

    Attributes:
        total: L = L_w + L_p, Eq. (5) of [0]; the tensor to back-propagate.
        global_: L_w, Eq. (6).
        pixel: L_p, Eq. (1) (PiCIE's loss, as given).
    """

    total: Tensor
    global_: Tensor
    pixel: Tensor


def fs4_loss(logits: Tensor, labels: Tensor, pixel_loss: Tensor, ignore_index: int = -1) -> FS4Losses:
    """Total FS^4 loss, Eq. (5) of [0]: L = L_w + L_p (unweighted, as in the paper).

    Args:
        logits: CAM scores q, (B, M).
        labels: Pseudo labels of the views, (B,).
        pixel_loss: L_p of Eq. (1), a scalar from PiCIE's loss on the same views.
        ignore_index: See :func:`global_guidance_loss`.

    Returns:
        The total and both parts.

    Raises:
        ValueError: If ``pixel_loss`` is not a scalar or the logits and labels do not agree.
    """
    if pixel_loss.dim() != 0:
        raise ValueError(f"pixel_loss must be a scalar, got shape {tuple(pixel_loss.shape)}")
    loss_w = global_guidance_loss(logits, labels, ignore_index)
    return FS4Losses(total=loss_w + pixel_loss, global_=loss_w, pixel=pixel_loss)


def _floor_fraction(fraction: float, count: int) -> int:
    # Exact decimal arithmetic: floor(0.29 * 100) must be 29.
    return math.floor(Fraction(repr(float(fraction))) * count)


def _check_views(distances: np.ndarray, indices: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    distances = np.asarray(distances, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(distances)):
        raise ValueError("view distances must be finite")
    indices = np.arange(len(distances)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.shape != distances.shape:
        raise ValueError(f"distances and indices must have the same length, got {distances.shape} and {indices.shape}")
    return distances, indices
