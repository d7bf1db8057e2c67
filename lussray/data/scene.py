"""Scene-centric datasets: the class-id convention, label converters and the layout dispatch.

**Class ids of scene-centric data** (COCO-Stuff-27, Cityscapes-27, the generated scenes): classes
are ``0..C-1`` in the lussray label codec (PNG RGB, id = R + 256 * G, decoded in int32), ``1000``
is ignore (unlabelled pixels, boundary bands) and there is no "other" class. Shards (``seg.png``),
the generated scenes and the pixel protocol all use this one convention. It differs from
ImageNet-S (``lussray.data.imagenet_s``), where ids ``1..N`` are categories, ``0`` is "other" and
``1000`` ignore. Per dataset:

- COCO-Stuff-27 (``lussray.data.cocostuff``): fine ids 0..181 -> coarse 0..26 with the PiCIE/STEGO
  table; things 0..11, stuff 12..26; fine 255 (unlabelled) -> 1000.
- Cityscapes-27 (``lussray.data.cityscapes``): ``labelIds - 7``; ids below 0 (and above 26) -> 1000.
- generated scenes (``lussray.data.synthetic_scenes``): things 0..T-1, stuff T..T+S-1 (things first,
  as COCO-Stuff).

Shards of a scene dataset have the format of ImageNet-S shards (``lussray.data.shards``): key
``<group>/<name>`` where the group is the source folder (COCO: ``train2017``/``val2017``;
Cityscapes: the city; generated scenes: the split), members ``jpg`` (the original bytes, PNG for
Cityscapes), ``json`` (``class_id`` is null: a scene has no image-level class) and ``seg.png``
re-encoded in the codec above, in every split whose annotations exist (train included). The shard
splits are ``train`` and ``validation``; ``<out>/classes.txt`` lists the class names (id = line
number - 1) and ``<out>/scene.json`` what was read (list, split scheme, missing images).

A layout reader returns a :class:`SceneDataset`: the samples of each shard split and the
converter of its label bytes, which is all `lussray prepare` needs.

This module is pure: no Ray, no torch.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lussray.data.imagenet_s import IGNORE_ID, Sample, label_from_png_bytes, label_to_png_bytes
from lussray.errors import UserError

SCENE_SPLITS = ("train", "validation")
CLASSES_FILE = "classes.txt"
SCENE_MANIFEST = "scene.json"

#: ``dataset.layout`` values: which reader `lussray prepare` uses.
LAYOUTS = ("imagenet-s", "cocostuff", "cityscapes", "scenes")

LabelConverter = Callable[[bytes], bytes]


def _open_png(data: bytes) -> Image.Image:
    """Open label bytes, refusing decompression bombs (a label is decoded in full)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Image.UnidentifiedImageError:
            raise ValueError("label is not an image file (unknown format)") from None
        except Exception as error:  # truncated, corrupt, bomb
            raise ValueError(f"label: {type(error).__name__}: {error}") from None
    return image


def read_index_png(data: bytes) -> np.ndarray:
    """The (H, W) uint8 ids of a single-channel 8-bit label PNG (mode L, or P read as indices).

    Raises:
        ValueError: for bytes that are no complete image, or an image of another mode (RGB...).
    """
    image = _open_png(data)
    if image.mode not in ("L", "P"):
        raise ValueError(f"label has PIL mode {image.mode}: expected a single-channel 8-bit PNG of ids (L or P)")
    return np.asarray(image, dtype=np.uint8)


@dataclass(frozen=True)
class RemapLabels:
    """Maps the ids of a single-channel 8-bit label PNG through a table and re-encodes them in the codec.

    Picklable (it crosses to `lussray prepare`'s worker processes); ``name`` identifies the table in
    the prepare fingerprint.
    """

    name: str
    table: tuple[int, ...]  # 256 entries: the lussray id of each 8-bit source id

    def __post_init__(self) -> None:
        if len(self.table) != 256:
            raise ValueError(f"label table {self.name} has {len(self.table)} entries, expected 256")

    def __call__(self, data: bytes) -> bytes:
        return label_to_png_bytes(np.asarray(self.table, dtype=np.int32)[read_index_png(data)])


@dataclass(frozen=True)
class CodecLabels:
    """Labels already in the codec (the generated scenes): checked, then kept byte for byte."""

    name: str
    num_classes: int

    def __call__(self, data: bytes) -> bytes:
        _open_png(data)
        ids = label_from_png_bytes(data)
        bad = (ids >= self.num_classes) & (ids != IGNORE_ID)
        if bad.any():
            raise ValueError(f"label holds id {int(ids[bad][0])}: expected 0..{self.num_classes - 1} or {IGNORE_ID}")
        return data


def remap_table(mapping: Mapping[int, int]) -> tuple[int, ...]:
    """A 256-entry table: ``mapping[i]`` where given, else ignore."""
    return tuple(int(mapping.get(i, IGNORE_ID)) for i in range(256))


@dataclass(frozen=True)
class SceneDataset:
    """What a layout reader found: the samples of each shard split and how to convert their labels."""

    layout: str
    class_names: tuple[str, ...]
    splits: dict[str, list[Sample]]  # shard split -> samples, sorted by key
    convert_label: LabelConverter
    notes: tuple[str, ...] = ()  # one readable line each (missing listed images, missing annotations)
    record: dict[str, Any] = field(default_factory=dict)  # written to scene.json (counts, options)

    @property
    def num_classes(self) -> int:
        """C: class ids are 0..C-1."""
        return len(self.class_names)


def pair_labels(images: list[tuple[str, str, Path]], labels: Mapping[str, Path] | None
                ) -> tuple[list[Sample], list[str]]:
    """Samples of ``(group, name, image path)``, each with the label ``labels[key]`` where there is one.

    Args:
        images: the images of one split.
        labels: label paths by sample key ``<group>/<name>``; None when the split has no annotations.

    Returns:
        The samples sorted by key, and the keys without a label (empty when ``labels`` is None).

    Raises:
        UserError: when two images get the same key (two sources merged into one split).
    """
    samples, missing, seen = [], [], {}
    for group, name, path in images:
        key = f"{group}/{name}"
        if key in seen:
            raise UserError(f"{path} and {seen[key]} give the same sample key {key!r}")
        seen[key] = path
        label = None if labels is None else labels.get(key)
        if labels is not None and label is None:
            missing.append(key)
        samples.append(Sample(key=key, wnid=group, image_path=path, label_path=label))
    return sorted(samples, key=lambda s: s.key), sorted(missing)


def missing_note(split: str, missing: list[str], total: int, where: Path) -> str:
    """The report line of the images of ``split`` that have no annotation."""
    examples = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    return f"{split}: {len(missing)} of {total} images have no annotation under {where} ({examples}); kept without seg.png"


def files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """``{stem: path}`` of the files of ``folder`` ending in one of ``suffixes`` (none if it is missing)."""
    if not folder.is_dir():
        return {}
    found = {}
    for entry in os.scandir(folder):
        for suffix in suffixes:
            if entry.name.endswith(suffix) and entry.is_file():
                found[entry.name[: -len(suffix)]] = Path(entry.path)
    return found


# ----------------------------------------------------------------------------- generated layout

#: The generated scene layout (``lussray synth --kind scenes``): ``images/<split>/<name>.jpg``,
#: ``labels/<split>/<name>.png`` (codec, class ids), ``classes.txt``.
SCENE_IMAGES, SCENE_LABELS = "images", "labels"


def read_class_names(path: Path) -> tuple[str, ...]:
    """Class names, one a line (id = line number - 1).

    Raises:
        UserError: when the file is missing, empty or lists a name twice.
    """
    try:
        names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    except OSError as error:
        raise UserError(f"cannot read the class list {path}: {error.strerror}") from None
    if not names or len(set(names)) != len(names):
        raise UserError(f"class list {path} is empty or lists a class twice")
    return names


def read_scene_tree(root: str | os.PathLike) -> SceneDataset:
    """The generated scene layout under ``root`` (see :data:`SCENE_IMAGES`).

    Raises:
        UserError: when ``root`` has no ``classes.txt`` or no split folder.
    """
    root = Path(root)
    names = read_class_names(root / CLASSES_FILE)
    splits, notes, counts = {}, [], {}
    for split in SCENE_SPLITS:
        images = files_by_stem(root / SCENE_IMAGES / split, (".jpg",))
        if not images:
            continue
        labels_dir = root / SCENE_LABELS / split
        labels = ({f"{split}/{stem}": path for stem, path in files_by_stem(labels_dir, (".png",)).items()}
                  if labels_dir.is_dir() else None)
        samples, missing = pair_labels([(split, stem, path) for stem, path in images.items()], labels)
        splits[split] = samples
        counts[split] = {"images": len(samples), "without_annotation": len(missing)}
        if missing:
            notes.append(missing_note(split, missing, len(samples), labels_dir))
    if not splits:
        raise UserError(f"{root} holds no images under {SCENE_IMAGES}/{{{','.join(SCENE_SPLITS)}}}/")
    return SceneDataset("scenes", names, splits, CodecLabels("scenes-codec-v1", len(names)), tuple(notes),
                        {"counts": counts})


# ----------------------------------------------------------------------------- dispatch


def open_scene_dataset(layout: str, src: str | os.PathLike, *, image_list: str | None = None,
                       cityscapes_split: str | None = None) -> SceneDataset:
    """Read the scene layout ``layout`` (one of :data:`LAYOUTS` but ``imagenet-s``) under ``src``.

    Args:
        layout: ``cocostuff``, ``cityscapes`` or ``scenes``.
        src: the dataset root.
        image_list: COCO-Stuff only: ``curated`` or ``full``.
        cityscapes_split: Cityscapes only: ``picie`` or ``stego`` (see ``lussray.data.cityscapes``).

    Raises:
        UserError: for an unknown layout, a missing option or a tree the layout cannot read.
    """
    if not Path(src).is_dir():
        raise UserError(f"--src {src} is not a folder")
    if layout == "cocostuff":
        from lussray.data import cocostuff

        return cocostuff.read_layout(src, image_list or cocostuff.DEFAULT_LIST)
    if layout == "cityscapes":
        from lussray.data import cityscapes

        return cityscapes.read_layout(src, cityscapes_split)
    if layout == "scenes":
        return read_scene_tree(src)
    raise UserError(f"dataset.layout {layout!r} is not a scene layout; choose one of {', '.join(LAYOUTS[1:])}")


# ----------------------------------------------------------------------------- lussray prepare


def prepare(args: Any, config: Any) -> int:
    """``lussray prepare`` for a scene layout (``dataset.layout``); called by ``lussray.data.shards.run``.

    Packs each split the layout found into the ImageNet-S shard format (``lussray.data.shards``),
    with ``seg.png`` converted to the scene convention, and writes ``classes.txt`` and
    ``scene.json`` beside the splits. Listed images missing from the tree and images without
    annotation are reported, not fatal.

    Raises:
        UserError: for a tree the layout cannot read, a class count other than ``dataset.num_classes``,
            or a requested split the tree does not have.
    """
    from lussray import storage
    from lussray.data import shards
    from lussray.data.imagenet_s import Categories

    dataset = open_scene_dataset(
        config.dataset.layout, args.src,
        image_list=getattr(args, "image_list", None) or config.dataset.image_list,
        cityscapes_split=getattr(args, "cityscapes_split", None) or config.dataset.cityscapes_split)
    if dataset.num_classes != config.dataset.num_classes:
        raise UserError(f"{args.src} has {dataset.num_classes} classes but dataset {config.dataset.name!r} expects "
                        f"{config.dataset.num_classes}; pass dataset.num_classes={dataset.num_classes}")
    for note in dataset.notes:
        print(f"prepare {note}", flush=True)
    absent = [split for split in args.splits or () if split not in dataset.splits]
    if absent:
        raise UserError(f"{args.src} has no {config.dataset.layout} images for split {absent[0]!r} "
                        f"(it has {', '.join(dataset.splits)})")
    samples_per_shard = args.samples_per_shard or config.dataset.samples_per_shard
    if samples_per_shard < 1:
        raise UserError("--samples-per-shard must be at least 1")
    limits = shards.ImageLimits(config.dataset.max_aspect, config.dataset.max_pixels)
    storage.makedirs(args.out)
    storage.write_bytes_atomic(storage.join(args.out, CLASSES_FILE), ("\n".join(dataset.class_names) + "\n").encode())
    record = {"layout": dataset.layout, "num_classes": dataset.num_classes, "ignore_id": IGNORE_ID,
              "labels": getattr(dataset.convert_label, "name", None), **dataset.record, "notes": list(dataset.notes)}
    storage.write_json_atomic(storage.join(args.out, SCENE_MANIFEST), record)
    total_skipped = 0
    for split in [split for split in SCENE_SPLITS if split in dataset.splits and split in (args.splits or SCENE_SPLITS)]:
        manifest = shards.prepare_split(
            args.src, args.out, split, Categories(dataset.class_names), samples_per_shard=samples_per_shard,
            max_shard_bytes=config.dataset.max_shard_bytes, workers=args.workers, limits=limits,
            overwrite=getattr(args, "overwrite", False), samples=dataset.splits[split],
            convert_label=dataset.convert_label)
        total_skipped += shards.report_split(manifest, args.out, split)
    print(f"prepare: done -> {args.out} ({total_skipped} images skipped)", flush=True)
    return 0
