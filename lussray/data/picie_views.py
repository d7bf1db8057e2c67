"""PiCIE's two views: photometric invariance and geometric equivariance with exact geometry.

PiCIE [0] (Sec. 3, "invariance and equivariance") computes two embeddings of every image x with
two photometric transforms P1, P2 and one geometric transform G (a crop and a flip):

    z1 = f(G(P1(x)))      (the image branch: G is applied to the image)
    z2 = G(f(P2(x)))      (the feature branch: G is applied to the feature map)

so that z1 and z2 describe the same pixels. What the reference does (``janghyuncho/PiCIE``
``data/coco_train_dataset.py`` and ``data/custom_transforms.py``, seed-methods.md section 1.5), and
what lussray does:

- base image: shorter side resized to ``res2`` (640), centre crop (:func:`base_image`, reusing
  :func:`~lussray.data.augment.resize_shorter_side` and :func:`~lussray.data.augment.center_crop`);
- photometric, one independent draw per view: brightness, contrast, saturation (factors
  U(0.7, 1.3)) and hue (U(-0.1, 0.1)), each applied independently with p = 0.8, in that fixed
  order; grayscale with p = 0.2; Gaussian blur with p = 0.5 (:class:`PhotometricParams`);
- geometric: a square crop whose side is U(0.5, 1) times the base side (``int`` of it), at an offset
  ``round((S - side) * U(0, 1))`` per axis, then a horizontal flip with p = 0.5
  (:func:`sample_crop`, an :class:`~lussray.data.augment.CropBox`);
- view 1 = P1 on the base image, then the crop resized to ``res1`` (320) and the flip
  (:func:`make_views`); view 2 = P2 on the base image resized to ``res1``; the worker embeds both
  and applies the crop and flip to view 2's feature map with :func:`apply_crop`.

All random parameters of an image come from the generator the training stream gives every sample
(:func:`lussray.seeds.sample_rng` of seed, stage, epoch and sample key; :func:`views_batch` is the
stream's batch function), so the clustering passes and the training pass of an epoch see the same
views without storing them (the reference pre-draws them per index every epoch, ``reshuffle``).

Deliberate deviations from the reference:

- grayscale is applied. The reference appends ``"grey"`` to its transform list but tests for
  ``"gray"``, so its grayscale never runs.
- blur is applied with sigma ~ U(0.1, 2.0), PIL ``GaussianBlur(radius=sigma)`` (the reference's
  intent, as in MoCo v2 and SwAV). The reference computes ``radius = 3.8 (u - 0.5) + 0.1`` for
  u < 0.5, which lies in [-1.8, 0.1): its blur is effectively a no-op.
- view 1 keeps its photometric transform in the training pass. The reference's training mode
  computes P1(x) and then discards it (it converts ``image`` instead of ``image1`` to a tensor), so
  its view 1 is photometrically augmented only while clustering.
- one continuous crop box serves both branches. The reference crops the 640 image at integer
  offsets and, separately, the 80x80 feature map at offsets rounded again at 1/8 of the resolution
  (``int(scale * 80)``, ``round((80 - side) * u)``), so the two branches can disagree by up to
  about one feature cell. Here the feature map is sampled at the box's exact relative position
  (:func:`crop_grid`): output cell j of both branches stands for the same base-image point.
- the image-branch crop is PIL's antialiased bilinear ``resize(box=...)``
  (:func:`~lussray.data.augment.resized_crop`) on the data side (a 320 crop travels instead of the
  640 image); the reference uses ``F.interpolate`` (bilinear, no antialiasing) on the GPU. The
  sampling positions are the same; :func:`apply_crop` also does the reference's GPU variant.
- hue is :func:`~lussray.data.augment.adjust_hue` (float HSV, a few levels off PIL's 8-bit HSV);
  brightness, contrast, saturation and grayscale are bit-exact with torchvision's PIL path.

References:
    - [0]: PiCIE, Cho et al., CVPR 2021, arXiv:2103.17070.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import Tensor

from lussray.data.augment import (
    CropBox,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    center_crop,
    decode_image,
    resize_shorter_side,
    resized_crop,
)

#: The reference's photometric ranges (MoCo v2 style): brightness, contrast, saturation, hue.
JITTER = (0.3, 0.3, 0.3, 0.1)


@dataclass(frozen=True)
class PhotometricParams:
    """The drawn photometric transform of one view; None means "not applied".

    Attributes:
        brightness: Brightness factor, or None.
        contrast: Contrast factor, or None.
        saturation: Saturation factor, or None.
        hue: Hue shift in turns, or None.
        grayscale: Convert to grayscale (three equal channels).
        blur_sigma: Gaussian blur sigma in pixels (PIL radius), or None.
    """

    brightness: float | None = None
    contrast: float | None = None
    saturation: float | None = None
    hue: float | None = None
    grayscale: bool = False
    blur_sigma: float | None = None


@dataclass(frozen=True)
class ViewParams:
    """Everything random about the two views of one image.

    Attributes:
        photometric: (P1, P2).
        crop: G, in base-image pixel coordinates.
        base_size: (height, width) of the base image the crop refers to.
    """

    photometric: tuple[PhotometricParams, PhotometricParams]
    crop: CropBox
    base_size: tuple[int, int]


def sample_photometric(
    rng: np.random.Generator,
    jitter: Sequence[float] = JITTER,
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
) -> PhotometricParams:
    """Draw one view's photometric transform (reference ranges and probabilities by default).

    Args:
        rng: Source of randomness.
        jitter: (brightness, contrast, saturation, hue) strengths: factors U(max(0, 1 - s), 1 + s),
            hue U(-s, s).
        jitter_p: Probability of each of the four jitter operations, drawn independently.
        grayscale_p: Probability of grayscale.
        blur_p: Probability of blur.
        blur_sigma: Bounds of the blur sigma.

    Returns:
        The drawn :class:`PhotometricParams`.
    """
    b, c, s, h = (float(v) for v in jitter)
    factors = []
    for strength in (b, c, s):
        apply, value = rng.random() < jitter_p, rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength)
        factors.append(float(value) if apply else None)
    apply_hue, hue = rng.random() < jitter_p, float(rng.uniform(-h, h))
    grayscale = bool(rng.random() < grayscale_p)
    apply_blur, sigma = rng.random() < blur_p, float(rng.uniform(*blur_sigma))
    return PhotometricParams(factors[0], factors[1], factors[2], hue if apply_hue else None, grayscale,
                             sigma if apply_blur else None)


def apply_photometric(image: np.ndarray, params: PhotometricParams) -> np.ndarray:
    """Apply a photometric transform: jitter (fixed order), grayscale, blur.

    Args:
        image: uint8 RGB (H, W, 3).
        params: The transform.

    Returns:
        uint8 (H, W, 3), a new array.

    Raises:
        ValueError: If ``image`` is not uint8 RGB.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    out = image
    if any(v is not None for v in (params.brightness, params.contrast, params.saturation, params.hue)):
        planar = image.reshape(-1, 3).T.astype(np.float32)  # (3, H*W)
        if params.brightness is not None:
            planar = adjust_brightness(planar, params.brightness)
        if params.contrast is not None:
            planar = adjust_contrast(planar, params.contrast)
        if params.saturation is not None:
            planar = adjust_saturation(planar, params.saturation)
        if params.hue is not None:
            planar = adjust_hue(planar, params.hue)
        out = planar.T.reshape(height, width, 3).astype(np.uint8)
    if params.grayscale or params.blur_sigma is not None:
        pil = Image.fromarray(out)
        if params.grayscale:
            pil = pil.convert("L").convert("RGB")  # torchvision's Grayscale(3) on PIL
        if params.blur_sigma is not None:
            pil = pil.filter(ImageFilter.GaussianBlur(radius=params.blur_sigma))
        out = np.array(pil)
    return out if out is not image else image.copy()


def sample_crop(
    rng: np.random.Generator, height: int, width: int, min_side: float = 0.5, flip_p: float = 0.5
) -> CropBox:
    """Draw the geometric transform G: a square crop and a horizontal flip, as the reference.

    The side is ``int(U(min_side, 1) * min(height, width))`` (a side fraction, not an area
    fraction as torchvision's RandomResizedCrop scale), the offset along each axis is
    ``round((size - side) * U(0, 1))``.

    Args:
        rng: Source of randomness.
        height: Base image height.
        width: Base image width.
        min_side: Smallest side fraction (the reference's ``min_scale``, 0.5).
        flip_p: Flip probability.

    Returns:
        An integer-valued :class:`~lussray.data.augment.CropBox` inside the image.

    Raises:
        ValueError: On an empty image or ``min_side`` outside (0, 1].
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image must be non-empty, got {height}x{width}")
    if not 0.0 < min_side <= 1.0:
        raise ValueError(f"min_side must be in (0, 1], got {min_side}")
    side = max(1, int(rng.uniform(min_side, 1.0) * min(height, width)))
    top = int(round((height - side) * rng.uniform(0.0, 1.0)))
    left = int(round((width - side) * rng.uniform(0.0, 1.0)))
    flipped = bool(rng.random() < flip_p)
    return CropBox(float(top), float(left), float(side), float(side), flipped)


def sample_view_params(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    min_side: float = 0.5,
    flip_p: float = 0.5,
    jitter: Sequence[float] = JITTER,
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
) -> ViewParams:
    """Draw P1, P2 and G for one base image of ``height`` x ``width`` (in that order).

    Args:
        rng: Source of randomness: the sample's generator (:func:`lussray.seeds.sample_rng`).
        height: Base image height.
        width: Base image width.
        min_side: See :func:`sample_crop`.
        flip_p: See :func:`sample_crop`.
        jitter: See :func:`sample_photometric`.
        jitter_p: See :func:`sample_photometric`.
        grayscale_p: See :func:`sample_photometric`.
        blur_p: See :func:`sample_photometric`.
        blur_sigma: See :func:`sample_photometric`.

    Returns:
        The :class:`ViewParams`.
    """
    photometric = tuple(
        sample_photometric(rng, jitter, jitter_p, grayscale_p, blur_p, blur_sigma) for _ in range(2)
    )
    crop = sample_crop(rng, height, width, min_side, flip_p)
    return ViewParams((photometric[0], photometric[1]), crop, (int(height), int(width)))


def base_image(image: np.ndarray, size: int) -> np.ndarray:
    """The reference's base transform: shorter side resized to ``size`` (bilinear), centre crop."""
    return center_crop(resize_shorter_side(image, size), size)


def make_views(image: np.ndarray, params: ViewParams, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The two network inputs of one image: G(P1(x)) and P2(x), both ``size`` x ``size``.

    Args:
        image: The base image, uint8 (H, W, 3) with (H, W) = ``params.base_size``.
        params: The drawn transforms.
        size: The network input side (``res1``, 320 in the reference).

    Returns:
        (view1, view2), uint8 (size, size, 3). view2's feature map is to be transformed with
        :func:`apply_crop` and ``params.crop``.

    Raises:
        ValueError: If the image size differs from ``params.base_size``.
    """
    if tuple(image.shape[:2]) != params.base_size:
        raise ValueError(f"image is {image.shape[:2]}, the view parameters were drawn for {params.base_size}")
    height, width = params.base_size
    view1 = resized_crop(apply_photometric(image, params.photometric[0]), params.crop, size)
    full = CropBox(0.0, 0.0, float(height), float(width))
    view2 = resized_crop(apply_photometric(image, params.photometric[1]), full, size)
    return view1, view2


def views_batch(
    batch: dict[str, np.ndarray],
    *,
    rngs: Sequence[np.random.Generator],
    base_size: int,
    crop_size: int,
    min_side: float = 0.5,
    flip_p: float = 0.5,
    jitter: Sequence[float] = JITTER,
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float = 0.5,
) -> dict[str, np.ndarray]:
    """The batch function of PiCIE's training stream: both views of every image and its crop box.

    Runs in Ray Data tasks (numpy in, numpy out): every JPEG is decoded, made the base image
    (:func:`base_image`), and its P1, P2 and G are drawn from its own generator
    (:func:`sample_view_params`), so any pass over an epoch gets the same views.

    Args:
        batch: ``jpg`` bytes per row (plus ``__key__`` and ``__epoch__``, unused here).
        rngs: One generator per row.
        base_size: Side of the base image (``res2``).
        crop_size: Side of both network inputs (``res1``).
        min_side: See :func:`sample_crop`.
        flip_p: See :func:`sample_crop`.
        jitter: See :func:`sample_photometric`.
        jitter_p: See :func:`sample_photometric`.
        grayscale_p: See :func:`sample_photometric`.
        blur_p: See :func:`sample_photometric`.

    Returns:
        ``view1`` and ``view2`` uint8 (B, S, S, 3) and ``boxes`` float32 (B, 5): G in base-image
        pixels (:meth:`~lussray.data.augment.CropBox.as_array`), for :func:`apply_crop` on
        view 2's feature map.
    """
    view1, view2, boxes = [], [], []
    for data, rng in zip(batch["jpg"], rngs):
        image = base_image(decode_image(data, draft_size=base_size), base_size)  # a shorter-side resize follows
        params = sample_view_params(rng, base_size, base_size, min_side=min_side, flip_p=flip_p, jitter=jitter,
                                    jitter_p=jitter_p, grayscale_p=grayscale_p, blur_p=blur_p)
        first, second = make_views(image, params, crop_size)
        view1.append(first)
        view2.append(second)
        boxes.append(params.crop.as_array())
    return {"view1": np.stack(view1), "view2": np.stack(view2), "boxes": np.stack(boxes).astype(np.float32)}


def crop_grid(boxes: Tensor | np.ndarray, base_size: tuple[int, int], out_size: int) -> Tensor:
    """``grid_sample`` grids that crop, resize and flip any map covering the base image.

    The boxes are in base-image pixel coordinates; the grid is in relative coordinates, so it
    crops the base image and its stride-s feature maps alike. Output cell u of an S-cell crop
    samples relative position ``(left + (u + 0.5) * width / S) / W`` (flipped: ``u -> S - 1 - u``),
    the convention of PIL's ``resize(box=...)`` and of
    :func:`~lussray.data.augment.correspondence_grids`: with ``align_corners=False`` a relative
    position r lands on continuous position ``r * W_map`` of any map, i.e. on the same base-image
    point whatever the map's resolution.

    Args:
        boxes: (B, 5) rows (top, left, height, width, flipped), as
            :meth:`~lussray.data.augment.CropBox.as_array`.
        base_size: (H, W) of the base image.
        out_size: S, the output side.

    Returns:
        float32 (B, S, S, 2) grid, last dim (x, y), on the boxes' device (CPU for numpy).

    Raises:
        ValueError: If ``boxes`` is not (B, 5).
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 5:
        raise ValueError(f"boxes must be (B, 5), got {tuple(boxes.shape)}")
    height, width = base_size
    centres = (torch.arange(out_size, dtype=torch.float64, device=boxes.device) + 0.5) / out_size  # (S,)
    flipped = boxes[:, 4:5] > 0.5
    x_centres = torch.where(flipped, 1.0 - centres, centres)  # (B, S)
    x_rel = (boxes[:, 1:2] + x_centres * boxes[:, 3:4]) / width
    y_rel = (boxes[:, 0:1] + centres * boxes[:, 2:3]) / height
    grid = torch.empty(len(boxes), out_size, out_size, 2, dtype=torch.float64, device=boxes.device)
    grid[..., 0] = (2.0 * x_rel - 1.0)[:, None, :]  # varies along columns
    grid[..., 1] = (2.0 * y_rel - 1.0)[:, :, None]  # varies along rows
    return grid.float()


def apply_crop(maps: Tensor, boxes: Tensor | np.ndarray, base_size: tuple[int, int], out_size: int) -> Tensor:
    """Apply G to a batch of feature maps (or images) covering the base images: G(f(P2(x))).

    Bilinear ``grid_sample`` with ``align_corners=False`` and border padding (a box inside the
    image never reads beyond half a cell past the map's edge; border padding keeps those values
    unscaled).

    Args:
        maps: (B, C, h, w) float maps of the base images (any resolution).
        boxes: (B, 5) crop rows in base-image pixels (see :func:`crop_grid`).
        base_size: (H, W) of the base image.
        out_size: Output side (res1 / 4 = 80 for features in the reference).

    Returns:
        (B, C, out_size, out_size), differentiable with respect to ``maps``.
    """
    grid = crop_grid(boxes, base_size, out_size).to(device=maps.device, dtype=maps.dtype)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)


__all__ = [
    "JITTER",
    "PhotometricParams",
    "ViewParams",
    "apply_crop",
    "apply_photometric",
    "base_image",
    "crop_grid",
    "make_views",
    "sample_crop",
    "sample_photometric",
    "sample_view_params",
    "views_batch",
]
