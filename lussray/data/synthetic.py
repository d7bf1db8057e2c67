"""A synthetic ImageNet-S: parametric objects on textured backgrounds, with exact ground truth.

Run it through the CLI::

    lussray synth --out data/synth-demo --classes 5 --size 128 --seed 0

Each category is an object with its own shape family and parameters (ellipse, superellipse,
regular polygon, star or Fourier blob), its own texture (stripes, checker, dots, waves, rings or
smooth noise, at a class frequency and orientation) and its own two-colour palette. Every image
varies them (scale, rotation, aspect, colour jitter, shading, position, a slight random
perturbation of the outline) and draws them on a background picked from a pool of textures shared
by all categories (``background_pool_size``; 0 draws a new style for every image). The main object covers ~2% (``min_area``) to ~70% of the image; about 10% of the images carry
a second object of another category, drawn on top (the mask shows the occlusion). The ground truth
follows the official codec (``lussray.data.imagenet_s``): ids 1..N for the category of each
object, 0 for the background, and a 2-px ignore band (1000) straddling every object boundary,
one pixel on each side, covering the anti-aliased edge pixels. ``background_contrast`` < 1 pulls
the two colours of every background texture toward their midpoint (0: flat colour plus noise).

Determinism: the pixels of an image come from a generator seeded by (seed, split, class, index)
through ``numpy.random.SeedSequence`` and the class appearance from (seed, class), so the same
arguments give byte-identical files whatever the number of worker processes (on one machine:
NumPy's SIMD transcendental functions and libjpeg may differ between CPUs and builds).

This module is pure: no Ray, no torch.
"""

from __future__ import annotations

import colorsys
import io
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from lussray.data.imagenet_s import (
    IGNORE_ID,
    OTHER_ID,
    label_to_png_bytes,
    segmentation_dir,
)
from lussray.errors import UserError
from lussray.storage import write_bytes_atomic

GENERATOR_VERSION = 1  # bump when the pixels change, so old folders no longer count as complete
MANIFEST_NAME = "synth.json"
CATEGORY_FILE = "categories.txt"
JPEG_QUALITY = 90
MAX_CLASSES = IGNORE_ID - 1  # ids 1..N must stay below the ignore id
MIN_SIZE = 16

SHAPE_FAMILIES = ("ellipse", "superellipse", "polygon", "star", "blob")
TEXTURES = ("stripes", "checker", "dots", "waves", "rings", "noise")
BACKGROUND_TEXTURES = TEXTURES + ("gradient", "plain")
BACKGROUND_POOL_SIZE = 32

MIN_AREA_FRACTION = 0.02  # default smallest main object area; log-uniform up to MAX_AREA_FRACTION
MAX_AREA_FRACTION = 0.70
SECOND_AREA_FRACTION = (0.02, 0.30)
SECOND_OBJECT_PROBABILITY = 0.10
MIN_OBJECT_PIXELS = 64  # so a tiny object keeps pixels inside its ignore band on small images
MIN_VISIBLE_FRACTION = 0.4  # a second object may hide at most 60% of the main one
MIN_TEXTURE_PERIOD_PX = 3.0

# SeedSequence entropy tags, so class, background and image streams never coincide.
_CLASS_TAG = 101
_BACKGROUND_TAG = 202
_IMAGE_TAG = 303
SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
GENERATED_SPLITS = ("train", "train-semi", "validation", "test")

Size = int | tuple[int, int]


# ----------------------------------------------------------------------------- appearance


@dataclass(frozen=True)
class ClassAppearance:
    """What makes a category recognisable: shape, texture and palette (fixed per seed and class)."""

    family: str  # one of SHAPE_FAMILIES
    shape_params: tuple[float, ...]  # superellipse: (p,); polygon: (n,); star: (n, inner); blob: 8 Fourier terms
    aspect: float  # minor/major axis ratio of the outline, in (0, 1]
    texture: str  # one of TEXTURES
    frequency: float  # texture cycles per object radius
    orientation: float  # texture angle (radians) relative to the object
    texture_param: float  # dots: radius (cycles); waves: amplitude; others unused
    colors: tuple[tuple[float, float, float], tuple[float, float, float]]  # RGB in [0, 1]
    area_coefficient: float  # area of the outline at radius 1 and aspect 1
    extent: float  # largest radius of the outline at radius 1 (for bounding boxes)


@dataclass(frozen=True)
class BackgroundStyle:
    """One entry of the background pool shared by all categories."""

    texture: str  # one of BACKGROUND_TEXTURES
    frequency: float  # cycles per image side
    texture_param: float
    colors: tuple[tuple[float, float, float], tuple[float, float, float]]


def wnid(class_index: int) -> str:
    """Synthetic WordNet id of class ``class_index`` (0-based); sorting wnids keeps class order."""
    return f"n{9000000 + class_index:08d}"


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (r, g, b)


@lru_cache(maxsize=4096)
def class_appearance(seed: int, class_index: int) -> ClassAppearance:
    """The appearance of class ``class_index``, derived from (seed, class) only.

    Shape family and texture cycle with the class index (so the first 30 classes all differ in
    the pair) and hues follow the golden-ratio sequence (so few classes get well-spread colours);
    their parameters are random.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, _CLASS_TAG, class_index]))
    hue_offset = float(np.random.default_rng(np.random.SeedSequence([seed, _CLASS_TAG])).random())
    family = SHAPE_FAMILIES[class_index % len(SHAPE_FAMILIES)]
    texture = TEXTURES[(class_index + class_index // len(SHAPE_FAMILIES)) % len(TEXTURES)]
    if family == "superellipse":
        params: tuple[float, ...] = (float(rng.choice([rng.uniform(0.6, 0.9), rng.uniform(2.5, 5.0)])),)
    elif family == "polygon":
        params = (float(rng.integers(3, 9)),)
    elif family == "star":
        params = (float(rng.integers(4, 9)), float(rng.uniform(0.4, 0.65)))
    elif family == "blob":
        amplitudes = rng.uniform(0.0, 1.0, 4)
        amplitudes *= rng.uniform(0.25, 0.45) / amplitudes.sum()
        params = tuple(float(x) for x in amplitudes) + tuple(float(x) for x in rng.uniform(0, 2 * np.pi, 4))
    else:
        params = ()
    aspect = float(rng.uniform(0.5, 0.8)) if family == "ellipse" else float(rng.uniform(0.65, 1.0))
    frequency = float(rng.uniform(1.5, 5.0))
    orientation = float(rng.uniform(0, np.pi))
    texture_param = float(rng.uniform(0.2, 0.38)) if texture == "dots" else float(rng.uniform(0.15, 0.5))
    hue = hue_offset + class_index * 0.6180339887498949
    saturation, value = rng.uniform(0.55, 0.95), rng.uniform(0.65, 0.95)
    first = _hsv(hue, saturation, value)
    second = _hsv(hue + rng.uniform(-0.08, 0.08), saturation * rng.uniform(0.4, 1.0), value * rng.uniform(0.3, 0.6))
    area, extent = _outline_area_and_extent(family, params)
    return ClassAppearance(
        family=family, shape_params=params, aspect=aspect, texture=texture, frequency=frequency,
        orientation=orientation, texture_param=texture_param, colors=(first, second),
        area_coefficient=area, extent=extent,
    )


@lru_cache(maxsize=64)
def background_pool(seed: int, size: int = BACKGROUND_POOL_SIZE) -> tuple[BackgroundStyle, ...]:
    """The background textures every image picks from, independent of the categories."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _BACKGROUND_TAG]))
    return tuple(_background_style(rng) for _ in range(size))


def _background_style(rng: np.random.Generator) -> BackgroundStyle:
    texture = BACKGROUND_TEXTURES[int(rng.integers(len(BACKGROUND_TEXTURES)))]
    hue, saturation, value = rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.25, 0.9)
    first = _hsv(hue, saturation, value)
    second = _hsv(hue + rng.uniform(-0.3, 0.3), saturation * rng.uniform(0.3, 1.2), value * rng.uniform(0.5, 1.3))
    return BackgroundStyle(
        texture=texture, frequency=float(rng.uniform(1.5, 10.0)),
        texture_param=float(rng.uniform(0.2, 0.38)) if texture == "dots" else float(rng.uniform(0.15, 0.5)),
        colors=(first, second),
    )


# ----------------------------------------------------------------------------- geometry


def _outline_distance(family: str, params: tuple[float, ...], u: np.ndarray, v: np.ndarray,
                      theta: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """Normalised distance of points (u, v) to the outline at radius 1: inside iff < 1."""
    if family == "ellipse":
        return rho
    if family == "superellipse":
        p = params[0]
        return (np.abs(u) ** p + np.abs(v) ** p) ** (1.0 / p)
    if family == "polygon":
        segment = 2 * np.pi / params[0]
        offset = np.mod(theta, segment) - segment / 2
        return rho * np.cos(offset) / np.cos(segment / 2)
    if family == "star":
        segment = 2 * np.pi / params[0]
        tip = np.abs(np.mod(theta, segment) / segment - 0.5) * 2  # 1 at the tips, 0 between them
        return rho / (params[1] + (1 - params[1]) * tip)
    if family == "blob":
        radius = np.ones_like(rho)
        for k in range(4):
            radius += params[k] * np.cos((k + 2) * theta + params[4 + k])
        return rho / radius
    raise ValueError(f"unknown shape family {family!r}")


def _polar(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.arctan2(v, u), np.sqrt(u * u + v * v)


def _outline_area_and_extent(family: str, params: tuple[float, ...]) -> tuple[float, float]:
    """Area and largest radius of the unit outline, measured on a fine grid."""
    grid = np.linspace(-1.8, 1.8, 361, dtype=np.float64)
    u, v = np.meshgrid(grid, grid)
    theta, rho = _polar(u, v)
    inside = _outline_distance(family, params, u, v, theta, rho) < 1
    cell = (grid[1] - grid[0]) ** 2
    return float(inside.sum() * cell), float(rho[inside].max())


def _texture(kind: str, s: np.ndarray, t: np.ndarray, param: float, rng: np.random.Generator) -> np.ndarray:
    """A texture in [0, 1] at coordinates (s, t) measured in texture cycles."""
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * s)
    if kind == "checker":
        return ((np.floor(s) + np.floor(t)) % 2).astype(np.float32)
    if kind == "dots":
        fs = s - np.floor(s) - 0.5
        ft = t - np.floor(t) - 0.5
        return (fs * fs + ft * ft < param * param).astype(np.float32)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(2 * np.pi * (s + param * np.sin(2 * np.pi * t)))
    if kind == "rings":
        return 0.5 + 0.5 * np.sin(2 * np.pi * np.sqrt(s * s + t * t))
    if kind == "noise":
        # Value noise: one random value per cycle, interpolated bilinearly.
        s0, t0 = np.floor(s.min()), np.floor(t.min())
        grid = rng.random((int(np.ceil(t.max() - t0)) + 2, int(np.ceil(s.max() - s0)) + 2), dtype=np.float32)
        values = ndimage.map_coordinates(grid, [t - t0, s - s0], order=1, mode="nearest")
        return np.clip((values - 0.5) * 2.2 + 0.5, 0.0, 1.0)
    if kind == "gradient":
        return np.clip(0.5 + s, 0.0, 1.0)
    if kind == "plain":
        return np.zeros_like(s)
    raise ValueError(f"unknown texture {kind!r}")


def _mix(colors: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Blend two (3,) colours by a weight map: (H, W) -> (H, W, 3) float32."""
    out = np.empty(weight.shape + (3,), dtype=np.float32)
    np.multiply(weight[..., None], colors[1] - colors[0], out=out)
    out += colors[0]
    return out


def _jittered(colors: tuple[tuple[float, float, float], ...], rng: np.random.Generator,
              brightness: tuple[float, float], offset: float) -> np.ndarray:
    """The palette with one random brightness scale and one per-channel shift per image."""
    base = np.asarray(colors, dtype=np.float32)
    scale = np.float32(rng.uniform(*brightness))
    shift = rng.normal(0.0, offset, 3).astype(np.float32)
    return np.clip(base * scale + shift, 0.0, 1.0)


@dataclass(frozen=True)
class _Placement:
    class_index: int
    cx: float
    cy: float
    radius: float  # pixels
    angle: float
    aspect: float
    texture_angle: float
    phases: tuple[float, float]
    perturbation: tuple[float, ...]  # 3 amplitudes + 3 phases of the outline wobble
    shading: tuple[float, float]  # strength, direction


def _place(rng: np.random.Generator, app: ClassAppearance, class_index: int, height: int, width: int,
           area_fraction: float, margin: float) -> _Placement:
    """Draw the pose of one object of area ~``area_fraction`` of the image."""
    aspect = float(min(app.aspect * rng.uniform(0.9, 1.1), 1.0))
    area = max(area_fraction * height * width, MIN_OBJECT_PIXELS)
    radius = float(np.sqrt(area / (app.area_coefficient * aspect)))
    reach = margin * radius * app.extent
    cx = float(rng.uniform(min(reach, width / 2), max(width - reach, width / 2)))
    cy = float(rng.uniform(min(reach, height / 2), max(height - reach, height / 2)))
    return _Placement(
        class_index=class_index, cx=cx, cy=cy, radius=radius, angle=float(rng.uniform(0, 2 * np.pi)),
        aspect=aspect, texture_angle=float(app.orientation + rng.normal(0, 0.2)),
        phases=(float(rng.random()), float(rng.random())),
        perturbation=tuple(float(x) for x in rng.uniform(0, 0.04, 3)) + tuple(float(x) for x in rng.uniform(0, 2 * np.pi, 3)),
        shading=(float(rng.uniform(0.0, 0.25)), float(rng.uniform(0, 2 * np.pi))),
    )


def _object_layer(place: _Placement, app: ClassAppearance, height: int, width: int
                  ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, np.ndarray] | None:
    """Bounding box, local coordinates (u, v in radii) and outline distance of one object."""
    half = place.radius * app.extent * 1.15 + 2  # 1.15 covers the outline wobble
    y0, y1 = max(int(np.floor(place.cy - half)), 0), min(int(np.ceil(place.cy + half)), height)
    x0, x1 = max(int(np.floor(place.cx - half)), 0), min(int(np.ceil(place.cx + half)), width)
    if y1 <= y0 or x1 <= x0:
        return None
    ys = (np.arange(y0, y1, dtype=np.float32) + np.float32(0.5 - place.cy))[:, None]
    xs = (np.arange(x0, x1, dtype=np.float32) + np.float32(0.5 - place.cx))[None, :]
    ca, sa = np.float32(np.cos(place.angle) / place.radius), np.float32(np.sin(place.angle) / place.radius)
    u = xs * ca + ys * sa
    v = ys * ca - xs * sa  # metric, in radii
    squashed = v / np.float32(place.aspect)
    theta, rho = _polar(u, squashed)
    distance = _outline_distance(app.family, app.shape_params, u, squashed, theta, rho)
    wobble = np.float32(1.0)
    for k in range(3):
        wobble = wobble + np.float32(place.perturbation[k]) * np.cos((k + 2) * theta + np.float32(place.perturbation[3 + k]))
    distance = distance / wobble
    return (slice(y0, y1), slice(x0, x1)), u, v, distance


def _paint_object(image: np.ndarray, place: _Placement, app: ClassAppearance, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Composite one object onto ``image`` in place; return its full-size mask and distance map.

    The edge is anti-aliased over about one pixel: the ignore band hides exactly these pixels.
    """
    height, width = image.shape[:2]
    mask = np.zeros((height, width), dtype=bool)
    layer = _object_layer(place, app, height, width)
    if layer is None:
        return mask, None
    box, u, v, distance = layer
    frequency = min(app.frequency, place.radius / MIN_TEXTURE_PERIOD_PX)  # keep periods >= 3 px
    ct, st = np.float32(np.cos(place.texture_angle) * frequency), np.float32(np.sin(place.texture_angle) * frequency)
    s = u * ct + v * st + np.float32(place.phases[0])
    t = v * ct - u * st + np.float32(place.phases[1])
    weight = _texture(app.texture, s, t, app.texture_param, rng)
    colors = _jittered(app.colors, rng, (0.85, 1.15), 0.04)
    strength, direction = place.shading
    shade = np.float32(1.0) + np.float32(strength) * (u * np.float32(np.cos(direction)) + v * np.float32(np.sin(direction)))
    paint = _mix(colors, weight)
    paint *= shade[..., None]
    alpha = np.clip((np.float32(1.0) - distance) * np.float32(place.radius) + np.float32(0.5), 0.0, 1.0)
    region = image[box]
    paint -= region
    paint *= alpha[..., None]
    region += paint
    mask[box] = distance < 1
    full_distance = np.full((height, width), np.inf, dtype=np.float32)
    full_distance[box] = distance
    return mask, full_distance


def _background(rng: np.random.Generator, seed: int, height: int, width: int, contrast: float,
                pool_size: int, saturation: float = 1.0) -> np.ndarray:
    """A background with a random pose and colour jitter per image.

    Its style comes from the shared pool of ``pool_size`` styles, or is drawn for this image alone
    when ``pool_size`` is 0. ``contrast`` scales the difference between the texture's two colours
    (1: as drawn); ``saturation`` pulls each colour toward its own grey (channel mean; 1: as drawn,
    0: grey, so that only the objects carry hue).
    """
    if pool_size:
        pool = background_pool(seed, pool_size)
        style = pool[int(rng.integers(len(pool)))]
    else:
        style = _background_style(rng)
    side = np.float32(min(height, width))
    angle = rng.uniform(0, 2 * np.pi)
    frequency = style.frequency * rng.uniform(0.8, 1.25)
    ys = ((np.arange(height, dtype=np.float32) + np.float32(0.5 - height / 2)) / side)[:, None]
    xs = ((np.arange(width, dtype=np.float32) + np.float32(0.5 - width / 2)) / side)[None, :]
    ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    scale = np.float32(1.0 if style.texture == "gradient" else frequency)
    s = (xs * ca + ys * sa) * scale + np.float32(rng.random())
    t = (ys * ca - xs * sa) * scale + np.float32(rng.random())
    if style.texture == "gradient":
        s = s - np.float32(0.5) + np.float32(rng.uniform(-0.2, 0.2))
    weight = _texture(style.texture, s, t, style.texture_param, rng)
    colors = _jittered(style.colors, rng, (0.8, 1.2), 0.05)
    if contrast != 1.0:
        middle = colors.mean(axis=0, keepdims=True)
        colors = middle + np.float32(contrast) * (colors - middle)
    if saturation != 1.0:
        grey = colors.mean(axis=1, keepdims=True)
        colors = grey + np.float32(saturation) * (colors - grey)
    return np.ascontiguousarray(_mix(colors, weight.astype(np.float32)), dtype=np.float32)


def ignore_band(label: np.ndarray) -> np.ndarray:
    """Pixels whose label differs from a 4-neighbour: a 2-px band on every region boundary."""
    band = np.zeros(label.shape, dtype=bool)
    horizontal = label[:, 1:] != label[:, :-1]
    vertical = label[1:, :] != label[:-1, :]
    band[:, 1:] |= horizontal
    band[:, :-1] |= horizontal
    band[1:, :] |= vertical
    band[:-1, :] |= vertical
    return band


def sensor_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The float (H, W, 3) image in [0, 1] as uint8 with sensor-like noise (``image`` is overwritten).

    The noise is shared by the three channels (one draw per pixel is cheaper).
    """
    height, width = image.shape[:2]
    noise = rng.standard_normal((height, width), dtype=np.float32)
    noise *= np.float32(255.0 * rng.uniform(0.005, 0.025))
    noise += np.float32(0.5)
    image *= np.float32(255.0)
    image += noise[..., None]
    return np.clip(image, 0, 255, out=image).astype(np.uint8)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _image_shape(size: Size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    height, width = size
    return int(height), int(width)


def image_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    """The generator of one image, seeded by (seed, split, class, index)."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
    return np.random.default_rng(np.random.SeedSequence([seed, _IMAGE_TAG, SPLIT_CODES[split], class_index, index]))


def render_sample(seed: int, split: str, class_index: int, index: int, *, classes: int,
                  size: Size = 128, ignore: bool = True, min_area: float = MIN_AREA_FRACTION,
                  background_contrast: float = 1.0, background_pool_size: int = BACKGROUND_POOL_SIZE,
                  background_saturation: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Render one image and its ground truth.

    Args:
        seed: dataset seed.
        split: ``train``, ``validation`` or ``test`` (train-semi images are train images).
        class_index: 0-based category of the main object (its id in the ground truth is +1).
        index: image number within (split, class).
        classes: number of categories N (the second object's category is drawn among them).
        size: PX for a square image, or (height, width).
        ignore: when False, return the label without the ignore band (for tests).
        min_area: smallest area fraction of the main object (log-uniform up to ``MAX_AREA_FRACTION``).
        background_contrast: contrast of the background texture, in [0, 1].
        background_pool_size: number of background styles shared by all images; 0 draws a new
            style for every image, so that backgrounds form no groups of their own.
        background_saturation: saturation of the background colours, in [0, 1] (0: grey, so that
            no background hue is shared by all crops of an image; 1: as drawn).

    Returns:
        ``(image, label)``: uint8 (H, W, 3) RGB, and int32 (H, W) ids in {0, 1..N, 1000}.
    """
    height, width = _image_shape(size)
    rng = image_rng(seed, split, class_index, index)
    image = _background(rng, seed, height, width, background_contrast, background_pool_size, background_saturation)
    label = np.full((height, width), OTHER_ID, dtype=np.int32)

    main_app = class_appearance(seed, class_index)
    main_place = _place(rng, main_app, class_index, height, width,
                        _log_uniform(rng, min_area, MAX_AREA_FRACTION), margin=0.6)
    main_mask, main_distance = _paint_object(image, main_place, main_app, rng)
    label[main_mask] = class_index + 1

    if classes > 1 and rng.random() < SECOND_OBJECT_PROBABILITY:
        other = int(rng.integers(classes - 1))
        other += other >= class_index
        other_app = class_appearance(seed, other)
        main_area = int(main_mask.sum())
        for _ in range(4):  # re-place it if it hides too much of the main object
            place = _place(rng, other_app, other, height, width, _log_uniform(rng, *SECOND_AREA_FRACTION), margin=0.0)
            layer = _object_layer(place, other_app, height, width)
            if layer is None:
                continue
            box, _, _, distance = layer
            covered = np.zeros((height, width), dtype=bool)
            covered[box] = distance < 1
            visible = int((main_mask & ~covered).sum())
            if visible >= max(MIN_VISIBLE_FRACTION * main_area, MIN_OBJECT_PIXELS / 2):
                mask, _ = _paint_object(image, place, other_app, rng)
                label[mask] = other + 1
                break

    pixels = sensor_noise(image, rng)

    if ignore:
        raw = label
        label = np.where(ignore_band(raw), np.int32(IGNORE_ID), raw)
        if main_distance is not None and not (label == class_index + 1).any():
            # Safety net for a tiny, thin object: keep its deepest visible pixel labelled.
            depth = np.where(raw == class_index + 1, main_distance, np.inf)
            label.flat[int(np.argmin(depth))] = class_index + 1
    return pixels, label


def encode_jpeg(image: np.ndarray) -> bytes:
    """JPEG bytes of an RGB uint8 image at the fixed quality of the generator."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- folder tree


def sample_name(split: str, class_index: int, index: int, *, classes: int, val_per_class: int,
                test_per_class: int) -> str:
    """File stem of an image: ``<wnid>_<i>`` in train, ``ILSVRC2012_val_%08d`` in validation/test.

    Validation and test share one numbering (validation first, class by class), so no name
    appears twice.
    """
    if split in ("train", "train-semi"):
        return f"{wnid(class_index)}_{index}"
    if split == "validation":
        number = class_index * val_per_class + index + 1
    elif split == "test":
        number = classes * val_per_class + class_index * test_per_class + index + 1
    else:
        raise ValueError(f"unknown split {split!r}")
    return f"ILSVRC2012_val_{number:08d}"


@dataclass(frozen=True)
class SynthArguments:
    """Everything that determines the generated files (not the number of workers)."""

    classes: int
    train_per_class: int
    val_per_class: int
    test_per_class: int
    semi_per_class: int
    size: Size
    seed: int
    min_area: float = MIN_AREA_FRACTION
    background_contrast: float = 1.0
    background_pool_size: int = BACKGROUND_POOL_SIZE
    background_saturation: float = 1.0

    def validate(self) -> None:
        """Check that every argument lies in range.

        Raises:
            UserError: naming the first argument out of range.
        """
        if not 1 <= self.classes <= MAX_CLASSES:
            raise UserError(f"classes must lie in 1..{MAX_CLASSES} (id {IGNORE_ID} is the ignore id), got {self.classes}")
        for name in ("train_per_class", "val_per_class", "test_per_class", "semi_per_class"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.semi_per_class > self.train_per_class:
            raise UserError(
                f"semi_per_class ({self.semi_per_class}) cannot exceed train_per_class ({self.train_per_class}): "
                "train-semi images are copies of train images"
            )
        height, width = _image_shape(self.size)
        if min(height, width) < MIN_SIZE:
            raise UserError(f"size must be at least {MIN_SIZE} px, got {self.size}")
        if self.seed < 0:
            raise UserError(f"seed must be >= 0, got {self.seed}")
        if not 0 < self.min_area <= MAX_AREA_FRACTION:
            raise UserError(f"min_area must lie in (0, {MAX_AREA_FRACTION}], got {self.min_area}")
        if not 0 <= self.background_contrast <= 1:
            raise UserError(f"background_contrast must lie in [0, 1], got {self.background_contrast}")
        if self.background_pool_size < 0:
            raise UserError(f"background_pool_size must be >= 0, got {self.background_pool_size}")
        if not 0 <= self.background_saturation <= 1:
            raise UserError(f"background_saturation must lie in [0, 1], got {self.background_saturation}")

    def to_json(self) -> dict:
        """The arguments as recorded in synth.json (size as an int, or [height, width])."""
        size = self.size if isinstance(self.size, (int, np.integer)) else list(_image_shape(self.size))
        return {
            "classes": self.classes, "train_per_class": self.train_per_class, "val_per_class": self.val_per_class,
            "test_per_class": self.test_per_class, "semi_per_class": self.semi_per_class,
            "size": size if isinstance(size, list) else int(size), "seed": self.seed,
            "min_area": float(self.min_area), "background_contrast": float(self.background_contrast),
            "background_pool_size": int(self.background_pool_size),
            "background_saturation": float(self.background_saturation),
        }

    def counts(self) -> dict[str, int]:
        """Number of images per split folder."""
        per_class = {"train": self.train_per_class, "train-semi": self.semi_per_class,
                     "validation": self.val_per_class, "test": self.test_per_class}
        return {split: self.classes * per_class[split] for split in GENERATED_SPLITS}


@dataclass(frozen=True)
class _Chunk:
    """A run of consecutive images of one (split, class): the unit of work of a process."""

    out: str
    arguments: SynthArguments
    split: str
    class_index: int
    start: int
    stop: int


def _write_atomic(path: Path, data: bytes) -> None:
    write_bytes_atomic(str(path), data)  # a killed run never leaves half a file


def _generate_chunk(chunk: _Chunk) -> int:
    """Render and write the images of one chunk; return how many were rendered."""
    args, out, split, class_index = chunk.arguments, Path(chunk.out), chunk.split, chunk.class_index
    folder = wnid(class_index)
    for index in range(chunk.start, chunk.stop):
        image, label = render_sample(args.seed, split, class_index, index, classes=args.classes, size=args.size,
                                     min_area=args.min_area, background_contrast=args.background_contrast,
                                     background_pool_size=args.background_pool_size,
                                     background_saturation=args.background_saturation)
        jpeg = encode_jpeg(image)
        name = sample_name(split, class_index, index, classes=args.classes, val_per_class=args.val_per_class,
                           test_per_class=args.test_per_class)
        _write_atomic(out / split / folder / f"{name}.JPEG", jpeg)
        if split != "train":
            _write_atomic(out / segmentation_dir(split) / folder / f"{name}.png", label_to_png_bytes(label))
        elif index < args.semi_per_class:
            _write_atomic(out / "train-semi" / folder / f"{name}.JPEG", jpeg)
            _write_atomic(out / segmentation_dir("train-semi") / folder / f"{name}.png", label_to_png_bytes(label))
    return chunk.stop - chunk.start


def _chunks(out: Path, args: SynthArguments, chunk_size: int) -> list[_Chunk]:
    per_class = {"train": args.train_per_class, "validation": args.val_per_class, "test": args.test_per_class}
    return [
        _Chunk(str(out), args, split, class_index, start, min(start + chunk_size, count))
        for split, count in per_class.items()
        for class_index in range(args.classes)
        for start in range(0, count, chunk_size)
    ]


def read_manifest(out: str | os.PathLike) -> dict | None:
    """The synth.json of ``out``, or None when there is none or it is unreadable."""
    path = Path(out) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def existing_manifest(out: str | os.PathLike, arguments: "SynthArguments | Any",
                      generator: str = "lussray.data.synthetic", version: int = GENERATOR_VERSION) -> dict | None:
    """The manifest of a complete earlier run with the same arguments, or None if ``out`` is new.

    ``arguments`` has a ``to_json()``; ``generator`` and ``version`` name the generator that
    wrote the folder (the scene generator passes its own).

    Raises:
        UserError: if ``out`` is a file, or a non-empty folder that is not such a run.
    """
    out = Path(out)
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if not any(out.iterdir()):
        return None
    manifest = read_manifest(out)
    if manifest is None or not manifest.get("complete"):
        raise UserError(
            f"{out} is not empty and holds no complete {MANIFEST_NAME} (an interrupted run or other files); "
            "choose a new folder for --out, or delete this one"
        )
    if (manifest.get("generator", generator) != generator or manifest.get("generator_version") != version
            or manifest.get("arguments") != arguments.to_json()):
        raise UserError(
            f"{out} holds a synthetic dataset generated with other arguments ({manifest.get('arguments')}, "
            f"generator {manifest.get('generator')} version {manifest.get('generator_version')}); "
            "choose a new folder for --out"
        )
    return manifest


def run_chunks(render: Callable[[Any], int], make_chunks: Callable[[int], list], total: int, workers: int,
               log: Callable[[str], None] | None) -> None:
    """Render ``total`` images cut into chunks, in ``workers`` processes, logging progress every 10 %.

    Args:
        render: a module-level function (it is pickled) that writes one chunk and returns its image count.
        make_chunks: the chunks for a chunk size (the size only balances the work; files never depend on it).
        total: the number of images.
        workers: processes; 1 renders in this process.
        log: receives the progress lines.
    """
    chunk_size = int(max(4, min(256, -(-total // (workers * 20)))))
    chunks = make_chunks(chunk_size)
    started, done, next_report = time.perf_counter(), 0, 1

    def report(count: int) -> None:
        nonlocal done, next_report
        done += count
        if log and total and (done * 10 >= next_report * total):
            rate = done / max(time.perf_counter() - started, 1e-9)
            log(f"synth: {done}/{total} images ({rate:.0f} img/s)")
            next_report = done * 10 // total + 1

    if workers == 1 or len(chunks) <= 1:
        for chunk in chunks:
            report(render(chunk))
    else:
        # spawn: safe with threads in the parent and identical on every platform.
        context = multiprocessing.get_context("spawn")
        with context.Pool(processes=min(workers, len(chunks))) as pool:
            for count in pool.imap_unordered(render, chunks, chunksize=1):
                report(count)


def write_manifest(out: Path, manifest: dict) -> None:
    """Write ``synth.json`` (last: its ``complete`` marks the folder as done)."""
    _write_atomic(out / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def default_workers() -> int:
    """Worker processes used when none are given: one per core, at most 8."""
    return max(1, min(os.cpu_count() or 1, 8))


def generate_dataset(
    out: str | os.PathLike,
    *,
    classes: int,
    train_per_class: int,
    val_per_class: int,
    test_per_class: int,
    semi_per_class: int,
    size: Size,
    seed: int,
    min_area: float = MIN_AREA_FRACTION,
    background_contrast: float = 1.0,
    background_pool_size: int = BACKGROUND_POOL_SIZE,
    background_saturation: float = 1.0,
    workers: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Write a synthetic ImageNet-S tree under ``out`` and return its manifest.

    The files depend only on the arguments, never on ``workers``. A folder that already holds a
    complete run with the same arguments is left as it is. ``log`` receives progress lines.

    Raises:
        UserError: for arguments out of range, or an ``out`` that is neither new, empty nor the
            same complete run.
    """
    arguments = SynthArguments(classes, train_per_class, val_per_class, test_per_class, semi_per_class, size, seed,
                               min_area, background_contrast, background_pool_size, background_saturation)
    arguments.validate()
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    existing = existing_manifest(out, arguments)
    if existing is not None:
        if log:
            log(f"synth: {out} is already complete ({MANIFEST_NAME} has the same arguments)")
        return existing

    wnids = [wnid(c) for c in range(classes)]
    for split in GENERATED_SPLITS:
        for folder in (split, segmentation_dir(split)) if split != "train" else (split,):
            for name in wnids:
                (out / folder / name).mkdir(parents=True, exist_ok=True)
    _write_atomic(out / CATEGORY_FILE, "\n".join(sorted(wnids)).encode())

    total = classes * (train_per_class + val_per_class + test_per_class)
    run_chunks(_generate_chunk, lambda size: _chunks(out, arguments, size), total, workers, log)

    manifest = {
        "generator": "lussray.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "arguments": arguments.to_json(),
        "counts": arguments.counts(),
        "categories": CATEGORY_FILE,
        "complete": True,
    }
    write_manifest(out, manifest)
    return manifest
