"""Image decoding, crop geometry and the PASS augmentations (numpy in, numpy out).

What PASS does (shared/reference/pass-imagenet-s.md, sections 1, 2.0 and 2.4) and where it lives:

- :class:`MultiCropTransform`: the multi-crop views of SwAV/PASS ``MultiCropDatasetGrid``.
  Each view is a RandomResizedCrop (bilinear), a horizontal flip and the SwAV colour
  distortion: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) applied with p = 0.8, RandomGrayscale
  p = 0.2, Gaussian blur p = 0.5 with radius uniform in [0.1, 2.0]. It returns the crop boxes
  and flips, so the P2P grids come from exact geometry.
- :func:`correspondence_grids`: PASS ``get_grid``, the pixel-to-pixel grids of two views.
- :class:`PairTransform`: the joint RandomResizedCrop + flip of (image, pseudo label) pairs
  used by segmentation fine-tuning (no colour augmentation, as in PASS).
- :func:`resize_shorter_side` and :func:`center_crop`: torchvision ``Resize(int)`` and
  ``CenterCrop`` for clustering, label generation and inference.

Views leave this module as uint8 (H, W, 3) arrays; normalisation (:data:`IMAGENET_MEAN`,
:data:`IMAGENET_STD`, :data:`MULTICROP_STD`) happens in torch on the training worker, which keeps
object-store traffic four times smaller than float32.

Geometry convention: a crop box is a rectangle in continuous original-image pixel
coordinates, where pixel (r, c) covers [r, r + 1) x [c, c + 1). PIL's ``resize(..., box=...)``
uses the same convention: output pixel u of an S-pixel view samples the original at
``left + (u + 0.5) * width / S``.

Deliberate deviations from the torchvision pipeline of PASS:

- crop and resize are one PIL ``resize(..., box=...)`` call instead of ``crop`` then
  ``resize``. The sampling positions are identical; only the boundary pixels differ slightly,
  because the resampling filter may read image pixels just outside the box instead of
  clamping at the crop edge. (That is the more faithful resampling of the original image.)
- the colour jitter and grayscale run in vectorised float32 numpy. Brightness, contrast,
  saturation and grayscale are bit-exact with torchvision's PIL path. The hue rotation is the
  same quantised shift done in float HSV, a few levels off PIL's 8-bit HSV (see
  :func:`adjust_hue`).
- labels of :class:`PairTransform` are resampled nearest straight from their own
  resolution, with the crop box mapped proportionally. PASS first nearest-resizes the label
  to the image size; the two differ by at most one label pixel at nearest-rounding ties.

References:
    - [0]: SwAV, 2020, arXiv:2006.09882 (multi-crop, colour distortion, blur).
    - [1]: PASS / LUSS, 2021, arXiv:2106.03149 (P2P correspondence grids, fine-tuning pairs).

This module is pure: numpy and PIL only, no Ray, no torch.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

# The one definition of the normalisation constants (applied on the training worker).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# PASS's multi-crop datasets (src/multicropdataset.py) use std[0] = 0.228, inherited from
# SwAV. lussray uses it for the multi-crop views (pretraining, pixel attention) to match PASS,
# and IMAGENET_STD everywhere else (clustering, label generation, fine-tuning, inference).
MULTICROP_STD: tuple[float, float, float] = (0.228, 0.224, 0.225)

# Grid value of P2P grids whose crops do not overlap: outside [-1, 1], so grid_sample with
# padding_mode="zeros" returns zeros there. Loss code can also mask with `grid < -1.5`.
NO_OVERLAP = -2.0

_RATIO = (3.0 / 4.0, 4.0 / 3.0)

#: The most pixels a resize here may produce (8192 x 8192). Crops are bounded by their configured
#: size; a shorter-side resize is bounded by this, because its longer side grows with the aspect
#: ratio: a 1 x 65535 image resized to a shorter side of 256 would be 256 x 16.7M (12 GiB).
MAX_RESIZE_PIXELS = 8192 * 8192


# -- decoding ---------------------------------------------------------------------------------


def decode_image(jpeg_bytes: bytes, *, draft_size: int | None = None) -> np.ndarray:
    """Decode encoded image bytes (JPEG, or any format PIL reads) to uint8 RGB (H, W, 3).

    Grayscale and CMYK JPEGs are converted to RGB. EXIF orientation is ignored, as with
    torchvision's ``ImageFolder`` loader.

    Args:
        jpeg_bytes: the encoded file.
        draft_size: if given, let libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT-domain
            reduction) while both sides stay >= ``draft_size``. Only useful when the output is
            known to be small, such as a shorter-side resize. The result is then smaller than the
            original image, so any geometry measured on it (crop boxes, sizes) is in *decoded*
            pixels. Use :func:`decode_image_with_scale` when original-image coordinates are
            needed. Non-JPEG inputs ignore it.

    Returns:
        uint8 array (H, W, 3), writeable.
    """
    return decode_image_with_scale(jpeg_bytes, draft_size=draft_size)[0]


def decode_image_with_scale(jpeg_bytes: bytes, *, draft_size: int | None = None) -> tuple[np.ndarray, float]:
    """Like :func:`decode_image`, also returning the original pixels per decoded pixel.

    The scale is exactly 1, 2, 4 or 8: multiply a box measured on the decoded image by it
    to get original-image pixel coordinates. (libjpeg rounds the decoded size up,
    ``ceil(W / scale)``, so the decoded image may extend less than one original pixel beyond
    the original border.)
    """
    with Image.open(io.BytesIO(jpeg_bytes)) as pil:
        scale = 1.0
        if draft_size is not None and pil.format == "JPEG":
            original_width = pil.size[0]
            pil.draft("RGB", (draft_size, draft_size))
            scale = float(2 ** round(math.log2(original_width / pil.size[0])))
        return _to_numpy(pil.convert("RGB")), scale


# -- crop geometry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CropBox:
    """A crop rectangle in original-image pixel coordinates, plus its horizontal flip.

    The crop covers rows [top, top + height) and columns [left, left + width) in continuous
    coordinates (pixel (r, c) covers [r, r + 1) x [c, c + 1)). ``flipped`` means the view
    was mirrored left-right after the crop.
    """

    top: float
    left: float
    height: float
    width: float
    flipped: bool = False

    def as_array(self) -> np.ndarray:
        """The row (top, left, height, width, flipped) as float64 (5,)."""
        return np.array([self.top, self.left, self.height, self.width, float(self.flipped)], dtype=np.float64)

    @classmethod
    def from_array(cls, row: Sequence[float] | np.ndarray) -> CropBox:
        """Inverse of :meth:`as_array`; ``flipped`` is true where the fifth value is > 0.5."""
        top, left, height, width, flipped = (float(v) for v in np.asarray(row, dtype=np.float64).reshape(5))
        return cls(top, left, height, width, flipped > 0.5)

    def scaled(self, scale_y: float, scale_x: float) -> CropBox:
        """The same box in a frame whose pixels are 1/scale as large (multiply coordinates)."""
        return CropBox(self.top * scale_y, self.left * scale_x, self.height * scale_y, self.width * scale_x, self.flipped)


def sample_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = _RATIO,
    flip_p: float = 0.5,
) -> CropBox:
    """Draw a RandomResizedCrop box and a horizontal flip.

    The semantics are exactly torchvision's ``RandomResizedCrop.get_params``. It makes up to
    10 tries: area fraction ~ U(scale), log aspect ratio ~ U(log ratio), then
    w = round(sqrt(A * r)) and h = round(sqrt(A / r)). The first box that fits is placed
    uniformly at integer offsets. If none fits, it falls back to a centre crop clamped to the
    ratio bounds. The flip is drawn afterwards with probability ``flip_p``.

    Args:
        rng: source of randomness.
        height: image height in pixels.
        width: image width in pixels.
        scale: bounds of the crop area as a fraction of the image area.
        ratio: bounds of the crop aspect ratio width / height.
        flip_p: probability of a horizontal flip.

    Returns:
        A box with integer-valued coordinates inside the image.

    Raises:
        ValueError: if the image is empty or the bounds are not ordered.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image must be non-empty, got {height}x{width}")
    if scale[0] > scale[1] or ratio[0] > ratio[1]:
        raise ValueError(f"scale and ratio must be (min, max), got {scale} and {ratio}")
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            box = (top, left, h, w)
            break
    if box is None:
        box = _central_fallback(height, width, ratio)
    flipped = bool(rng.random() < flip_p)
    top, left, h, w = box
    return CropBox(float(top), float(left), float(h), float(w), flipped)


def _central_fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: np.ndarray, box: CropBox, size: int, *, nearest: bool = False) -> np.ndarray:
    """Crop ``box`` from ``image``, resize it to ``size`` x ``size`` and apply its flip.

    Args:
        image: uint8 (H, W, 3) or (H, W), or float32 (H, W).
        box: the crop, in this image's pixel coordinates.
        size: output side S.
        nearest: nearest-neighbour instead of bilinear (antialiased when shrinking, as PIL and
            torchvision do for PIL images).

    Returns:
        An array of the input dtype, shape (S, S, 3) or (S, S).
    """
    pil = _to_pil(image)
    return _to_numpy(_resized_crop_pil(pil, box, size, Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR))


def _resized_crop_pil(pil: Image.Image, box: CropBox, size: int, resample: Image.Resampling) -> Image.Image:
    view = pil.resize((size, size), resample, box=(box.left, box.top, box.left + box.width, box.top + box.height))
    if box.flipped:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return view


# -- P2P correspondence grids -----------------------------------------------------------------


def correspondence_grids(box_a: CropBox, box_b: CropBox, grid_size: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """The P2P sampling grids of two views over their overlap (PASS ``get_grid``, [1]).

    The two crop rectangles are intersected in original-image coordinates. For each view,
    a ``grid_size`` x ``grid_size`` lattice covers the overlap from edge to edge, in
    coordinates relative to that view's crop: x_i = overlap_left_rel + i * overlap_w_rel /
    (G - 1), and likewise for y. A flipped view uses x -> 1 - x. Both are mapped to
    [-1, 1] as 2 * rel - 1. ``grid_a[j, i]`` and ``grid_b[j, i]`` then name the same
    original-image point.

    Use ``torch.nn.functional.grid_sample(features, grid, align_corners=False)``, the
    default and the one PASS uses. It is the exact choice. With align_corners=False, -1 and +1
    are the outer *edges* of the feature map, so a relative position r lands on continuous
    feature position r * W_f. That is original point left + r * width, for any feature
    resolution, under the usual convention that cell k of a stride-s map stands for view
    pixels [k s, (k + 1) s). It is the same convention as upsampling logits with
    ``interpolate(align_corners=False)``. align_corners=True would land on
    0.5 + r * (W_f - 1) instead: up to half a cell off, by an amount that depends on r, so
    the two views would disagree.

    The lattice reaches the overlap's edges, and there one view samples at its own border,
    half a cell outside the outermost cell centre. With ``padding_mode="zeros"`` (PASS) those
    samples are blended with zero padding: the feature is scaled by 1/2, or 1/4 at a corner,
    which a cosine loss ignores. ``padding_mode="border"`` gives the unscaled outer cell.
    Non-overlapping pairs are filled with :data:`NO_OVERLAP` (-2). That value samples zeros
    only under ``padding_mode="zeros"``, so with "border" the loss must mask those pairs.

    Args:
        box_a: crop of view a (original-image coordinates).
        box_b: crop of view b, in the same frame.
        grid_size: G, the lattice side (7 for a 7x7 layer4 map of 224 crops).

    Returns:
        (grid_a, grid_b), float32 (G, G, 2) with last dim (x, y), as grid_sample expects.
    """
    grid_a, grid_b = correspondence_grids_batch(box_a.as_array()[None], box_b.as_array()[None], grid_size)
    return grid_a[0], grid_b[0]


def correspondence_grids_batch(
    boxes_a: np.ndarray, boxes_b: np.ndarray, grid_size: int = 7
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`correspondence_grids` over a batch.

    Args:
        boxes_a: (B, 5) rows (top, left, height, width, flipped), as :meth:`CropBox.as_array`.
        boxes_b: (B, 5), the other view of each pair.
        grid_size: G >= 2.

    Returns:
        (grids_a, grids_b), float32 (B, G, G, 2) with last dim (x, y).

    Raises:
        ValueError: on shape mismatch or ``grid_size < 2``.
    """
    boxes_a = np.asarray(boxes_a, dtype=np.float64)
    boxes_b = np.asarray(boxes_b, dtype=np.float64)
    if boxes_a.ndim != 2 or boxes_a.shape[1] != 5 or boxes_a.shape != boxes_b.shape:
        raise ValueError(f"boxes must both be (B, 5), got {boxes_a.shape} and {boxes_b.shape}")
    if grid_size < 2:
        raise ValueError(f"grid_size must be >= 2, got {grid_size}")
    top = np.maximum(boxes_a[:, 0], boxes_b[:, 0])
    left = np.maximum(boxes_a[:, 1], boxes_b[:, 1])
    bottom = np.minimum(boxes_a[:, 0] + boxes_a[:, 2], boxes_b[:, 0] + boxes_b[:, 2])
    right = np.minimum(boxes_a[:, 1] + boxes_a[:, 3], boxes_b[:, 1] + boxes_b[:, 3])
    overlaps = (bottom > top) & (right > left)  # (B,)
    steps = np.linspace(0.0, 1.0, grid_size)  # (G,) = i / (G - 1)
    xs = left[:, None] + (right - left)[:, None] * steps  # (B, G) original-image columns
    ys = top[:, None] + (bottom - top)[:, None] * steps  # (B, G) original-image rows
    grids = []
    for boxes in (boxes_a, boxes_b):
        x_rel = (xs - boxes[:, 1:2]) / boxes[:, 3:4]  # (B, G) relative to this crop
        y_rel = (ys - boxes[:, 0:1]) / boxes[:, 2:3]
        flipped = boxes[:, 4:5] > 0.5
        x_rel = np.where(flipped, 1.0 - x_rel, x_rel)
        grid = np.empty((len(boxes), grid_size, grid_size, 2), dtype=np.float32)
        grid[..., 0] = (2.0 * x_rel - 1.0)[:, None, :]  # varies along the last (column) axis
        grid[..., 1] = (2.0 * y_rel - 1.0)[:, :, None]  # varies along the row axis
        grid[~overlaps] = NO_OVERLAP
        grids.append(grid)
    return grids[0], grids[1]


# -- photometric augmentation -----------------------------------------------------------------


# PIL's RGB -> L conversion in 16-bit fixed point: L = (19595 R + 38470 G + 7471 B + 2^15) >> 16.
# On integer-valued float32 this is exact (every partial sum stays below 2^24).
_LUMA_WEIGHTS = (19595.0, 38470.0, 7471.0)


def _luma(x: np.ndarray) -> np.ndarray:
    """PIL's ``convert("L")`` of integer-valued planar float32 (3, N) -> (N,)."""
    return np.floor((x[0] * _LUMA_WEIGHTS[0] + x[1] * _LUMA_WEIGHTS[1] + x[2] * _LUMA_WEIGHTS[2] + 32768.0) * (1.0 / 65536.0))


def _quantise(x: np.ndarray) -> np.ndarray:
    """Clip to [0, 255] and truncate, in place, as PIL's ``Image.blend`` stores uint8."""
    np.clip(x, 0.0, 255.0, out=x)
    return np.floor(x, out=x)


def _blend_with(x: np.ndarray, degenerate: np.ndarray | float, factor: float) -> np.ndarray:
    """PIL ``ImageEnhance``: degenerate + factor * (x - degenerate), clipped and truncated."""
    x -= degenerate
    x *= np.float32(factor)
    x += degenerate
    return _quantise(x)


def adjust_brightness(x: np.ndarray, factor: float) -> np.ndarray:
    """``ImageEnhance.Brightness`` (torchvision ``adjust_brightness`` on PIL) on planar (3, N) float32."""
    x *= np.float32(factor)
    return _quantise(x)


def adjust_contrast(x: np.ndarray, factor: float) -> np.ndarray:
    """``ImageEnhance.Contrast``: blend with the rounded mean luma (planar (3, N) float32)."""
    return _blend_with(x, float(int(_luma(x).mean() + 0.5)), factor)


def adjust_saturation(x: np.ndarray, factor: float) -> np.ndarray:
    """``ImageEnhance.Color``: blend with the per-pixel luma (planar (3, N) float32)."""
    return _blend_with(x, _luma(x), factor)


def adjust_hue(x: np.ndarray, hue: float) -> np.ndarray:
    """Rotate the HSV hue by ``hue`` turns (|hue| <= 0.5), keeping HSV saturation and value.

    torchvision's PIL path converts to 8-bit HSV, adds ``int(hue * 255)`` to the uint8 hue
    with wrap-around, and converts back. This uses the same quantised rotation,
    ``int(hue * 255) / 256`` turns, but does the HSV round trip in float, so it skips PIL's
    8-bit HSV rounding. The two differ by a few levels on saturated pixels (mean < 1 level).

    Args:
        x: planar float32 (3, N) with values in [0, 255]; modified and returned.
        hue: the rotation in turns.
    """
    shift = (int(hue * 255) % 256) / 256.0  # int() truncates toward zero, as torchvision's cast
    if shift == 0.0:
        return x
    r, g, b = x[0], x[1], x[2]
    value = np.maximum(np.maximum(r, g), b)
    chroma = value - np.minimum(np.minimum(r, g), b)
    is_r = r == value
    is_g = (g == value) & ~is_r
    is_b = ~(is_r | is_g)
    # hue in sextants: (g - b)/C (red max), 2 + (b - r)/C (green), 4 + (r - g)/C (blue); + 6 keeps it > 0
    numerator = is_r * (g - b) + is_g * (b - r + 2.0 * chroma) + is_b * (r - g + 4.0 * chroma)
    sextant = numerator / np.maximum(chroma, 1.0) + np.float32(6.0 * shift + 6.0)
    for channel, offset in enumerate((5.0, 3.0, 1.0)):  # HSV -> RGB: V - C * clip(min(k, 4 - k), 0, 1)
        k = sextant + np.float32(offset)
        k -= 6.0 * np.floor(k * (1.0 / 6.0))
        x[channel] = value - chroma * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return np.floor(x + 0.5, out=x)


class ColorDistortion:
    """SwAV's colour distortion and blur [0] on one RGB view.

    The steps, in order:

    1. With p = ``jitter_p``, ColorJitter(0.8s, 0.8s, 0.8s, 0.2s). Brightness, contrast and
       saturation factors come from U(max(0, 1 - 0.8s), 1 + 0.8s) and hue from
       U(-0.2s, 0.2s). The four are applied in a random order, each clipped to [0, 255].
    2. RandomGrayscale with p = ``grayscale_p`` (PIL luma, three equal channels).
    3. Gaussian blur with p = ``blur_p`` and radius ~ U(``blur_radius``): PIL
       ``GaussianBlur``, as in SwAV's ``PILRandomGaussianBlur``.

    Brightness, contrast, saturation and grayscale run in vectorised float32 and are
    bit-exact with torchvision's PIL path (PIL ``ImageEnhance``, with uint8 truncation after
    each op). Hue differs by a few levels; see :func:`adjust_hue`. The float hue is about
    three times faster than PIL's HSV round trip.
    """

    def __init__(
        self,
        strength: float = 1.0,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        jitter_p: float = 0.8,
        blur_radius: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        """Store the probabilities; ``strength`` is SwAV's s (0 disables the jitter)."""
        self.strength = strength
        self.grayscale_p = grayscale_p
        self.blur_p = blur_p
        self.jitter_p = jitter_p
        self.blur_radius = blur_radius

    def __call__(self, view: Image.Image, rng: np.random.Generator) -> np.ndarray:
        """Distort one PIL RGB view; returns uint8 (H, W, 3)."""
        width, height = view.size
        array = None  # set when the view went through the numpy jitter
        if rng.random() < self.jitter_p and self.strength > 0:
            planar = self._jitter(np.asarray(view).reshape(-1, 3).T.astype(np.float32), rng)  # (3, H*W)
            if rng.random() < self.grayscale_p:
                planar[:] = _luma(planar)
            array = planar.T.reshape(height, width, 3).astype(np.uint8)
        elif rng.random() < self.grayscale_p:
            view = view.convert("L").convert("RGB")
        if rng.random() < self.blur_p:
            if array is not None:
                view, array = Image.fromarray(array), None
            view = view.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*self.blur_radius)))
        return array if array is not None else _to_numpy(view)

    def _jitter(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        spread = 0.8 * self.strength
        low = max(0.0, 1.0 - spread)
        order = rng.permutation(4)
        brightness, contrast, saturation = rng.uniform(low, 1.0 + spread, size=3)
        hue = rng.uniform(-0.2 * self.strength, 0.2 * self.strength)
        for op in order:
            if op == 0:
                x = adjust_brightness(x, brightness)
            elif op == 1:
                x = adjust_contrast(x, contrast)
            elif op == 2:
                x = adjust_saturation(x, saturation)
            else:
                x = adjust_hue(x, hue)
        return x


# -- transforms -------------------------------------------------------------------------------


class MultiCropTransform:
    """The multi-crop views of SwAV/PASS [0, 1], with their crop geometry.

    Group g yields ``num_crops[g]`` views of ``crop_sizes[g]`` pixels. Each view is a
    RandomResizedCrop with area fraction in [``min_scales[g]``, ``max_scales[g]``],
    bilinear, then a horizontal flip with p = ``flip_p``, then :class:`ColorDistortion`.
    Views 0 and 1 (the first group) are the global views used by P2P. The PASS S50 config
    is ``num_crops=[2, 6], crop_sizes=[224, 96], min_scales=[0.14, 0.05],
    max_scales=[1.0, 0.14]``.
    """

    def __init__(
        self,
        num_crops: Sequence[int],
        crop_sizes: Sequence[int],
        min_scales: Sequence[float],
        max_scales: Sequence[float],
        flip_p: float = 0.5,
        color_jitter_strength: float = 1.0,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        *,
        color_jitter_p: float = 0.8,
        blur_radius: tuple[float, float] = (0.1, 2.0),
        ratio: tuple[float, float] = _RATIO,
    ) -> None:
        """Validate and store the groups.

        Raises:
            ValueError: if the group lists differ in length or hold invalid values.
        """
        groups = (list(num_crops), list(crop_sizes), list(min_scales), list(max_scales))
        if len({len(g) for g in groups}) != 1 or not groups[0]:
            raise ValueError(f"num_crops, crop_sizes, min_scales, max_scales must be non-empty and equally long, got {groups}")
        for n, size, lo, hi in zip(*groups):
            if n < 0 or size <= 0 or not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"invalid crop group: num_crops={n}, crop_size={size}, scales=({lo}, {hi})")
        self.views = [(int(size), (float(lo), float(hi))) for n, size, lo, hi in zip(*groups) for _ in range(int(n))]
        self.flip_p = flip_p
        self.ratio = ratio
        self.distort = ColorDistortion(color_jitter_strength, grayscale_p, blur_p, color_jitter_p, blur_radius)

    @property
    def num_views(self) -> int:
        """Total number of views per image."""
        return len(self.views)

    def __call__(self, image: np.ndarray | Image.Image, rng: np.random.Generator) -> tuple[list[np.ndarray], list[CropBox]]:
        """Make all views of one image.

        Args:
            image: uint8 RGB (H, W, 3) (or a PIL RGB image, which skips one copy).
            rng: source of randomness (fully determines the output).

        Returns:
            (views, boxes): uint8 (S_v, S_v, 3) per view, and each view's crop box in the
            input image's pixel coordinates.
        """
        if isinstance(image, Image.Image):
            pil = image if image.mode == "RGB" else image.convert("RGB")
        else:
            pil = _to_pil(_check_rgb(image))
        width, height = pil.size
        views, boxes = [], []
        for size, scale in self.views:
            box = sample_crop_box(rng, height, width, scale, self.ratio, self.flip_p)
            views.append(self.distort(_resized_crop_pil(pil, box, size, Image.Resampling.BILINEAR), rng))
            boxes.append(box)
        return views, boxes


class PairTransform:
    """Joint RandomResizedCrop + horizontal flip of an image and its label (PASS fine-tuning).

    The image is resampled bilinearly, the label nearest. There is no colour augmentation,
    as in PASS (section 2.4 of the reference). A label of another size than the image (such
    as a low-resolution pseudo label) is cropped at the proportionally mapped box, the same
    as nearest-resizing it to the image size first, up to rounding ties.
    """

    def __init__(self, crop_size: int = 224, scale: tuple[float, float] = (0.08, 1.0), flip_p: float = 0.5) -> None:
        """Store the crop parameters (ratio is torchvision's default (3/4, 4/3))."""
        self.crop_size = crop_size
        self.scale = scale
        self.flip_p = flip_p

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Crop, resize and flip the pair.

        Args:
            image: uint8 (H, W, 3).
            label: integer (h, w) label map; any size, covering the same field of view.
            rng: source of randomness.

        Returns:
            (image uint8 (S, S, 3), label int32 (S, S)).

        Raises:
            ValueError: if the image is not RGB or the label not 2-D.
        """
        image = _check_rgb(image)
        label = np.asarray(label)
        if label.ndim != 2:
            raise ValueError(f"label must be 2-D (h, w), got shape {label.shape}")
        height, width = image.shape[:2]
        box = sample_crop_box(rng, height, width, self.scale, _RATIO, self.flip_p)
        view = resized_crop(image, box, self.crop_size)
        label_box = box.scaled(label.shape[0] / height, label.shape[1] / width)
        return view, _nearest_crop(label, label_box, self.crop_size).astype(np.int32, copy=False)


def _nearest_crop(array: np.ndarray, box: CropBox, size: int) -> np.ndarray:
    """Nearest-neighbour resized crop by index arithmetic (exact for any integer dtype)."""
    centres = (np.arange(size) + 0.5) / size  # (S,) relative output pixel centres
    rows = np.clip(np.floor(box.top + centres * box.height).astype(np.int64), 0, array.shape[0] - 1)
    cols = np.clip(np.floor(box.left + centres * box.width).astype(np.int64), 0, array.shape[1] - 1)
    if box.flipped:
        cols = cols[::-1]
    return array[rows[:, None], cols[None, :]]


def resize_shorter_side(image: np.ndarray, size: int, *, max_pixels: int = MAX_RESIZE_PIXELS) -> np.ndarray:
    """Bilinear resize so the shorter side is ``size``, keeping the aspect ratio.

    Same output size as torchvision ``Resize(size)``: the longer side becomes
    ``int(size * long / short)`` (truncated).

    Args:
        image: uint8 (H, W, 3) or (H, W), or float32 (H, W).
        size: target shorter side.
        max_pixels: the largest output allowed (H x W).

    Raises:
        ValueError: if the output would have more than ``max_pixels`` pixels (an extreme aspect
            ratio; ``lussray prepare`` skips such images, see ``dataset.max_aspect``).
    """
    height, width = image.shape[:2]
    if height <= width:
        new_height, new_width = size, int(size * width / height)
    else:
        new_height, new_width = int(size * height / width), size
    if new_height * new_width > max_pixels:
        raise ValueError(f"resizing a {height}x{width} image to a shorter side of {size} gives {new_height}x{new_width}"
                         f" = {new_height * new_width} pixels, more than {max_pixels}")
    if (new_height, new_width) == (height, width):
        return image.copy()
    return _to_numpy(_to_pil(image).resize((new_width, new_height), Image.Resampling.BILINEAR))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` crop, as torchvision ``CenterCrop(size)``.

    The offset is ``round((H - size) / 2)``. An image smaller than ``size`` is first
    zero-padded as torchvision pads it: the extra row or column, if odd, goes at the bottom or
    right.
    """
    height, width = image.shape[:2]
    if height < size or width < size:
        pad_h, pad_w = max(size - height, 0), max(size - width, 0)
        pads = [(pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)] + [(0, 0)] * (image.ndim - 2)
        image = np.pad(image, pads)
        height, width = image.shape[:2]
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image[top : top + size, left : left + size].copy()


def evaluation_view(image: np.ndarray, label: np.ndarray | None, short_side: int,
                    crop_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The scene protocols' evaluation transform: shorter side to ``short_side``, then the central crop.

    As the references' ``Resize(320)`` + ``CenterCrop(320)`` (PiCIE, STEGO, HP): the image bilinear,
    the label nearest-neighbour through the same crop rectangle in original coordinates, so both stay
    aligned pixel for pixel; predictions are then scored at ``crop_size`` x ``crop_size``.

    Args:
        image: uint8 (H, W, 3).
        label: int (H, W) ground truth at the image's size, or None.
        short_side: the shorter side after resizing; at least ``crop_size``.
        crop_size: the side of the central crop.

    Raises:
        ValueError: if ``short_side < crop_size`` (the crop would need padding).
    """
    if short_side < crop_size:
        raise ValueError(f"evaluation crop {crop_size} is larger than the resized shorter side {short_side}")
    resized = resize_shorter_side(image, short_side)
    cropped = center_crop(resized, crop_size)
    if label is None:
        return cropped, None
    scale = resized.shape[0] / image.shape[0], resized.shape[1] / image.shape[1]
    top = int(round((resized.shape[0] - crop_size) / 2.0))
    left = int(round((resized.shape[1] - crop_size) / 2.0))
    box = CropBox(top / scale[0], left / scale[1], crop_size / scale[0], crop_size / scale[1])
    rows = np.clip(np.floor(box.top + (np.arange(crop_size) + 0.5) * box.height / crop_size).astype(np.int64),
                   0, label.shape[0] - 1)
    cols = np.clip(np.floor(box.left + (np.arange(crop_size) + 0.5) * box.width / crop_size).astype(np.int64),
                   0, label.shape[1] - 1)
    return cropped, label[rows[:, None], cols[None, :]]


# -- numpy <-> PIL ----------------------------------------------------------------------------


def _check_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
    return image


def _to_pil(image: np.ndarray) -> Image.Image:
    image = np.asarray(image)
    if image.dtype == np.uint8 and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        return Image.fromarray(image)
    if image.dtype == np.float32 and image.ndim == 2:
        return Image.fromarray(image)
    raise ValueError(f"expected uint8 (H, W[, 3]) or float32 (H, W), got {image.dtype} {image.shape}")


def _to_numpy(pil: Image.Image) -> np.ndarray:
    # np.array (not asarray): PIL's buffer is read-only, torch.from_numpy warns on those.
    return np.array(pil)
