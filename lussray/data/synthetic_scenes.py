"""A generated scene-centric dataset: textured "stuff" regions with "thing" objects on them.

Run it through the CLI::

    lussray synth --kind scenes --out data/synth-scenes --size 128 --seed 0
    lussray synth --dataset synthetic-scenes --out data/synth-scenes      # the preset's sizes

Every image is split into 2-4 horizontal bands with irregular borders (a few random sinusoids plus
fine value noise per border); one non-top band may also be split by an irregular vertical border.
Each region is one stuff class, painted with that class's texture over the whole region. Stuff
classes have a role that sets their texture family and where they appear: a sky-like top band,
ground and water at the bottom, walls and water in between (roles cycle sky, ground, wall, water,
ground, wall). 1-4 thing objects (of the object-centric generator's shapes, textures and palettes,
``lussray.data.synthetic.class_appearance``) stand on the lower part of the image, each of a
random thing class; later ones occlude earlier ones, and the mask shows what stays visible.

Ground truth follows the scene convention of ``lussray.data.scene``: things 0..T-1, stuff
T..T+S-1 (things first, as COCO-Stuff-27), 1000 = ignore on a 2-px band straddling every region and
object boundary (``synthetic.ignore_band``), no "other" class.

Layout (read by ``lussray prepare --dataset synthetic-scenes`` through ``lussray.data.scene``)::

    images/{train,validation}/<index:06d>.jpg
    labels/{train,validation}/<index:06d>.png     (lussray codec; train is labelled too)
    classes.txt                                   (class names, id = line number - 1)
    synth.json                                    (arguments, counts; written last)

Determinism: an image's pixels come from a generator seeded by (seed, split, index) and the class
appearance from (seed, class), so the same arguments give byte-identical files whatever the number
of worker processes (same caveats as the object-centric generator).

This module is pure: no Ray, no torch.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from lussray.data import synthetic as syn
from lussray.data.imagenet_s import IGNORE_ID, label_to_png_bytes
from lussray.data.scene import CLASSES_FILE, SCENE_IMAGES, SCENE_LABELS, SCENE_SPLITS
from lussray.errors import UserError

GENERATOR = "lussray.data.synthetic_scenes"
GENERATOR_VERSION = 1  # bump when the pixels change
MAX_CLASSES = IGNORE_ID  # ids 0..C-1 stay below the ignore id

ROLES = ("sky", "ground", "wall", "water", "ground", "wall")
ROLE_TEXTURES = {
    "sky": ("gradient", "noise"),
    "ground": ("noise", "dots", "checker"),
    "wall": ("stripes", "checker", "rings"),
    "water": ("waves", "stripes"),
}
#: roles a band prefers, by position: top, middle, bottom
BAND_ROLES = {"top": ("sky",), "middle": ("wall", "water", "ground"), "bottom": ("ground", "water")}
ROLE_PREFERENCE = 0.8  # probability that a band takes a class of its preferred roles
THING_AREA = (0.01, 0.12)  # log-uniform area fraction of each thing
MAX_THINGS = 4
SPLIT_BAND_PROBABILITY = 0.5

_STUFF_TAG = 404
_SCENE_TAG = 505
SPLIT_CODES = {"train": 0, "validation": 1}


@dataclass(frozen=True)
class StuffAppearance:
    """What makes a stuff class recognisable: role, texture and palette (fixed per seed and class)."""

    role: str  # one of ROLES
    texture: str
    frequency: float  # cycles per image side
    orientation: float  # texture angle (radians)
    texture_param: float
    colors: tuple[tuple[float, float, float], tuple[float, float, float]]


@lru_cache(maxsize=1024)
def stuff_appearance(seed: int, stuff_index: int) -> StuffAppearance:
    """The appearance of stuff class ``stuff_index`` (0-based among the stuff), from (seed, class) only."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _STUFF_TAG, stuff_index]))
    hue_offset = float(np.random.default_rng(np.random.SeedSequence([seed, _STUFF_TAG])).random())
    role = ROLES[stuff_index % len(ROLES)]
    family = ROLE_TEXTURES[role]
    texture = family[(stuff_index // len(ROLES)) % len(family)]
    hue = hue_offset + stuff_index * 0.6180339887498949
    if role == "sky":
        saturation, value = rng.uniform(0.25, 0.6), rng.uniform(0.8, 0.98)
        orientation = float(np.pi / 2 + rng.normal(0, 0.1))  # gradients run top to bottom
    else:
        saturation, value = rng.uniform(0.35, 0.85), rng.uniform(0.35, 0.8)
        orientation = float(rng.uniform(0, np.pi))
    first = syn._hsv(hue, saturation, value)
    second = syn._hsv(hue + rng.uniform(-0.06, 0.06), saturation * rng.uniform(0.5, 1.0), value * rng.uniform(0.45, 0.75))
    frequency = float(rng.uniform(1.0, 2.0) if texture == "gradient" else rng.uniform(4.0, 12.0))
    texture_param = float(rng.uniform(0.2, 0.38)) if texture == "dots" else float(rng.uniform(0.15, 0.5))
    return StuffAppearance(role, texture, frequency, orientation, texture_param, (first, second))


def class_names(seed: int, thing_classes: int, stuff_classes: int) -> list[str]:
    """Readable class names in id order: things, then stuff."""
    things = [f"thing{t}-{syn.class_appearance(seed, t).family}" for t in range(thing_classes)]
    stuff = [f"stuff{k}-{stuff_appearance(seed, k).role}" for k in range(stuff_classes)]
    return things + stuff


# ----------------------------------------------------------------------------- layout


def _border(rng: np.random.Generator, length: int, base: float, span: int, amplitude: float) -> np.ndarray:
    """An irregular border: ``base`` plus low-frequency sinusoids and fine value noise, in pixels."""
    x = (np.arange(length, dtype=np.float32) + np.float32(0.5)) / np.float32(length)
    curve = np.full(length, base, dtype=np.float32)
    for _ in range(3):
        curve += np.float32(amplitude * span * rng.uniform(0.2, 1.0)) * np.sin(
            np.float32(2 * np.pi * rng.integers(1, 5)) * x + np.float32(rng.uniform(0, 2 * np.pi)))
    knots = rng.uniform(-1, 1, 18).astype(np.float32)
    curve += np.float32(0.012 * span) * np.interp(x * 16, np.arange(18, dtype=np.float32), knots).astype(np.float32)
    return curve


def _pick(rng: np.random.Generator, stuff: int, seed: int, roles: tuple[str, ...], avoid: set[int]) -> int:
    """A stuff class (0-based) of one of ``roles`` with probability ROLE_PREFERENCE, never one in ``avoid``."""
    preferred = [k for k in range(stuff) if stuff_appearance(seed, k).role in roles and k not in avoid]
    anything = [k for k in range(stuff) if k not in avoid] or list(range(stuff))
    pool = preferred if preferred and rng.random() < ROLE_PREFERENCE else anything
    return pool[int(rng.integers(len(pool)))]


def stuff_layout(rng: np.random.Generator, seed: int, stuff: int, height: int, width: int) -> np.ndarray:
    """The (H, W) int32 map of stuff classes (0-based among the stuff) of one image."""
    bands = int(rng.integers(2, 5)) if stuff > 1 else 1
    cuts = np.sort(rng.uniform(0.15, 0.85, bands - 1)) if bands > 1 else np.zeros(0)
    ys = np.arange(height, dtype=np.float32)[:, None] + np.float32(0.5)
    band = np.zeros((height, width), dtype=np.int32)
    for cut in cuts:
        band += ys > _border(rng, width, float(cut * height), height, rng.uniform(0.02, 0.07))[None, :]
    classes: list[int] = []
    for position in range(bands):
        where = "top" if position == 0 else "bottom" if position == bands - 1 else "middle"
        classes.append(_pick(rng, stuff, seed, BAND_ROLES[where], {classes[-1]} if classes else set()))
    layout = np.asarray(classes, dtype=np.int32)[band]
    if bands > 1 and stuff > 2 and rng.random() < SPLIT_BAND_PROBABILITY:
        position = int(rng.integers(1, bands))
        xs = np.arange(width, dtype=np.float32)[None, :] + np.float32(0.5)
        border = _border(rng, height, float(rng.uniform(0.3, 0.7) * width), width, rng.uniform(0.02, 0.06))
        neighbours = {classes[position], classes[position - 1]} | ({classes[position + 1]} if position + 1 < bands else set())
        other = _pick(rng, stuff, seed, BAND_ROLES["middle"], neighbours)
        layout[(band == position) & (xs > border[:, None])] = other
    return layout


def _paint_stuff(image: np.ndarray, mask: np.ndarray, app: StuffAppearance, rng: np.random.Generator) -> None:
    """Paint the pixels of ``mask`` with the stuff texture, at a random phase and scale per image."""
    height, width = mask.shape
    side = np.float32(min(height, width))
    ys = ((np.arange(height, dtype=np.float32) + np.float32(0.5 - height / 2)) / side)[:, None]
    xs = ((np.arange(width, dtype=np.float32) + np.float32(0.5 - width / 2)) / side)[None, :]
    angle = app.orientation + rng.normal(0, 0.15)
    ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    scale = np.float32(app.frequency * rng.uniform(0.85, 1.2) if app.texture != "gradient" else 1.0)
    s = (xs * ca + ys * sa) * scale + np.float32(rng.random() if app.texture != "gradient" else rng.uniform(-0.2, 0.2))
    t = (ys * ca - xs * sa) * scale + np.float32(rng.random())
    weight = syn._texture(app.texture, s, t, app.texture_param, rng).astype(np.float32)
    colors = syn._jittered(app.colors, rng, (0.85, 1.15), 0.04)
    image[mask] = syn._mix(colors, weight)[mask]


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image, seeded by (seed, split, index)."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
    return np.random.default_rng(np.random.SeedSequence([seed, _SCENE_TAG, SPLIT_CODES[split], index]))


def render_scene(seed: int, split: str, index: int, *, thing_classes: int = 6, stuff_classes: int = 6,
                 size: syn.Size = 128, ignore: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene and its ground truth.

    Args:
        seed: dataset seed.
        split: ``train`` or ``validation``.
        index: image number within the split.
        thing_classes: T (ids 0..T-1); 0 gives stuff-only scenes.
        stuff_classes: S (ids T..T+S-1), at least 1.
        size: PX for a square image, or (height, width).
        ignore: when False, return the label without the ignore band (for tests).

    Returns:
        ``(image, label)``: uint8 (H, W, 3) RGB, and int32 (H, W) ids in {0..T+S-1, 1000}.
    """
    height, width = syn._image_shape(size)
    rng = scene_rng(seed, split, index)
    stuff = stuff_layout(rng, seed, stuff_classes, height, width)
    image = np.zeros((height, width, 3), dtype=np.float32)
    for k in np.unique(stuff).tolist():
        _paint_stuff(image, stuff == k, stuff_appearance(seed, k), rng)
    label = stuff + np.int32(thing_classes)
    if thing_classes:
        for _ in range(int(rng.integers(1, MAX_THINGS + 1))):
            thing = int(rng.integers(thing_classes))
            app = syn.class_appearance(seed, thing)
            place = syn._place(rng, app, thing, height, width, syn._log_uniform(rng, *THING_AREA), margin=0.6)
            place = dataclasses.replace(place, cy=0.35 * height + 0.65 * place.cy)  # standing on the lower part
            mask, _ = syn._paint_object(image, place, app, rng)
            label[mask] = thing
    pixels = syn.sensor_noise(image, rng)
    if ignore:
        label = np.where(syn.ignore_band(label), np.int32(IGNORE_ID), label)
    return pixels, label


# ----------------------------------------------------------------------------- folder tree


@dataclass(frozen=True)
class SceneArguments:
    """Everything that determines the generated scenes (not the number of workers)."""

    thing_classes: int
    stuff_classes: int
    train_images: int
    val_images: int
    size: syn.Size
    seed: int

    def validate(self) -> None:
        """Check that every argument lies in range.

        Raises:
            UserError: naming the first argument out of range.
        """
        if self.thing_classes < 0 or self.stuff_classes < 1:
            raise UserError(f"thing_classes must be >= 0 and stuff_classes >= 1, got {self.thing_classes} "
                            f"and {self.stuff_classes}")
        if self.thing_classes + self.stuff_classes > MAX_CLASSES:
            raise UserError(f"thing_classes + stuff_classes must be at most {MAX_CLASSES} "
                            f"(id {IGNORE_ID} is the ignore id), got {self.thing_classes + self.stuff_classes}")
        for name in ("train_images", "val_images"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if min(syn._image_shape(self.size)) < syn.MIN_SIZE:
            raise UserError(f"size must be at least {syn.MIN_SIZE} px, got {self.size}")
        if self.seed < 0:
            raise UserError(f"seed must be >= 0, got {self.seed}")

    def to_json(self) -> dict:
        """The arguments as recorded in synth.json."""
        size = self.size if isinstance(self.size, (int, np.integer)) else list(syn._image_shape(self.size))
        return {"kind": "scenes", "thing_classes": self.thing_classes, "stuff_classes": self.stuff_classes,
                "train_images": self.train_images, "val_images": self.val_images,
                "size": size if isinstance(size, list) else int(size), "seed": self.seed}

    def counts(self) -> dict[str, int]:
        """Number of images per split."""
        return {"train": self.train_images, "validation": self.val_images}


@dataclass(frozen=True)
class _Chunk:
    out: str
    arguments: SceneArguments
    split: str
    start: int
    stop: int


def sample_name(index: int) -> str:
    """File stem of image ``index`` of a split."""
    return f"{index:06d}"


def _generate_chunk(chunk: _Chunk) -> int:
    args, out = chunk.arguments, Path(chunk.out)
    for index in range(chunk.start, chunk.stop):
        image, label = render_scene(args.seed, chunk.split, index, thing_classes=args.thing_classes,
                                    stuff_classes=args.stuff_classes, size=args.size)
        name = sample_name(index)
        syn._write_atomic(out / SCENE_IMAGES / chunk.split / f"{name}.jpg", syn.encode_jpeg(image))
        syn._write_atomic(out / SCENE_LABELS / chunk.split / f"{name}.png", label_to_png_bytes(label))
    return chunk.stop - chunk.start


def _chunks(out: Path, args: SceneArguments, chunk_size: int) -> list[_Chunk]:
    return [_Chunk(str(out), args, split, start, min(start + chunk_size, count))
            for split, count in args.counts().items() for start in range(0, count, chunk_size)]


def generate_scenes(out: str | os.PathLike, *, thing_classes: int, stuff_classes: int, train_images: int,
                    val_images: int, size: syn.Size, seed: int, workers: int = 1,
                    log: Callable[[str], None] | None = None) -> dict:
    """Write the generated scene layout under ``out`` and return its manifest.

    The files depend only on the arguments, never on ``workers``. A folder that already holds a
    complete run with the same arguments is left as it is.

    Raises:
        UserError: for arguments out of range, or an ``out`` that is neither new, empty nor the
            same complete run.
    """
    arguments = SceneArguments(thing_classes, stuff_classes, train_images, val_images, size, seed)
    arguments.validate()
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    existing = syn.existing_manifest(out, arguments, GENERATOR, GENERATOR_VERSION)
    if existing is not None:
        if log:
            log(f"synth: {out} is already complete ({syn.MANIFEST_NAME} has the same arguments)")
        return existing
    for split in SCENE_SPLITS:
        for folder in (SCENE_IMAGES, SCENE_LABELS):
            (out / folder / split).mkdir(parents=True, exist_ok=True)
    names = class_names(seed, thing_classes, stuff_classes)
    syn._write_atomic(out / CLASSES_FILE, ("\n".join(names) + "\n").encode())
    syn.run_chunks(_generate_chunk, lambda chunk_size: _chunks(out, arguments, chunk_size),
                   train_images + val_images, workers, log)
    manifest = {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "arguments": arguments.to_json(),
        "counts": arguments.counts(),
        "classes": CLASSES_FILE,
        "num_classes": len(names),
        "thing_classes": thing_classes,
        "complete": True,
    }
    syn.write_manifest(out, manifest)
    return manifest
