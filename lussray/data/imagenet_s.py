"""The ImageNet-S folder layout, category list and label PNG codec.

Facts from the official ImageNet-S release (shared/reference/pass-imagenet-s.md, section 4):

- folders: ``train/<wnid>/<name>.JPEG``, ``train-semi/`` + ``train-semi-segmentation/``,
  ``validation/`` + ``validation-segmentation/<wnid>/<name>.png``, ``test/`` (generated data also
  has ``test-segmentation/``);
- class id = 1-based index of the wnid in the sorted category list; 0 = other, 1000 = ignore;
- label PNG: RGB with R = id % 256, G = id // 256, B = 0, decoded as R + 256 * G in int32.
  (The official evaluator multiplies a uint8 array by 256, which overflows under NumPy 2.)

This module is pure: no Ray, no torch.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

OTHER_ID = 0
IGNORE_ID = 1000
MAX_ENCODABLE_ID = 256 * 256 - 1

SPLITS = ("train", "train-semi", "validation", "test")
IMAGE_EXTENSIONS = (".JPEG", ".jpeg", ".jpg", ".JPG", ".png", ".PNG")


#: One component of a sample key: letters, digits, '_' and '-' (no '.', which starts a webdataset
#: member suffix, so no '..' either; no '/', '\\' or NUL).
_KEY_COMPONENT = re.compile(r"[A-Za-z0-9_-]{1,200}")


def check_sample_key(key: str) -> str:
    """Return ``key`` if it is a safe sample key, else raise naming what is wrong with it.

    A safe key has the official shape ``<wnid>/<name>`` (or a bare ``<name>``): at most one
    ``/`` and components of :data:`_KEY_COMPONENT`. Keys come from shards, which may be
    untrusted, and become output paths (predictions, pseudo-label PNGs), so this rules out a
    leading ``/``, ``..``, backslashes and NUL bytes by construction.

    Raises:
        ValueError: with the reason, e.g. ``sample key '../x': component '..' ...``.
    """
    if not isinstance(key, str):
        raise ValueError(f"sample key {key!r} is not a string")
    parts = key.split("/")
    if len(parts) > 2:
        raise ValueError(f"sample key {key!r} has more than one '/' (expected '<wnid>/<name>')")
    for part in parts:
        if not _KEY_COMPONENT.fullmatch(part):
            what = "an empty component" if not part else f"component {part!r}"
            raise ValueError(f"sample key {key!r} has {what}: components are 1-200 of A-Z a-z 0-9 _ -")
    return key


def segmentation_dir(split: str) -> str:
    """Folder holding the ground truth of ``split`` (``validation`` -> ``validation-segmentation``)."""
    return f"{split}-segmentation"


def encode_label(label: np.ndarray) -> np.ndarray:
    """Encode an (H, W) integer label map as the official (H, W, 3) uint8 RGB image.

    Raises:
        ValueError: if the map is not 2-D or holds ids outside 0..65535.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > MAX_ENCODABLE_ID):
        raise ValueError(f"label ids must lie in 0..{MAX_ENCODABLE_ID}, got {label.min()}..{label.max()}")
    ids = label.astype(np.int32)
    rgb = np.zeros(label.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = ids % 256
    rgb[..., 1] = ids // 256
    return rgb


def decode_label(rgb: np.ndarray) -> np.ndarray:
    """Decode an (H, W, 3) RGB label image to an int32 (H, W) id map (id = R + 256 * G)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 2:
        raise ValueError(f"label image must be (H, W, 3) RGB, got shape {rgb.shape}")
    return rgb[..., 0].astype(np.int32) + 256 * rgb[..., 1].astype(np.int32)


def label_to_png_bytes(label: np.ndarray) -> bytes:
    """Encode a label map as PNG bytes in the official codec."""
    buffer = io.BytesIO()
    Image.fromarray(encode_label(label), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def label_from_png_bytes(data: bytes) -> np.ndarray:
    """Decode PNG bytes in the official codec to an int32 (H, W) id map."""
    with Image.open(io.BytesIO(data)) as image:
        return decode_label(np.asarray(image.convert("RGB")))


def write_label_png(path: str | os.PathLike, label: np.ndarray) -> None:
    """Write a label map to ``path`` (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(label_to_png_bytes(label))


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG in the official codec as an int32 (H, W) id map."""
    with Image.open(path) as image:
        return decode_label(np.asarray(image.convert("RGB")))


def read_category_file(path: str | os.PathLike) -> list[str]:
    """Read a category file (one wnid per line) and return the wnids in sorted order."""
    wnids = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not wnids:
        raise ValueError(f"category file {path} lists no categories")
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"category file {path} lists a category twice")
    return sorted(wnids)


def discover_categories(root: str | os.PathLike) -> list[str]:
    """Sorted category list from the folder names of ``<root>/validation-segmentation/``.

    Raises:
        FileNotFoundError: if the folder is missing or empty.
    """
    seg_root = Path(root) / segmentation_dir("validation")
    if not seg_root.is_dir():
        raise FileNotFoundError(
            f"{seg_root} not found: pass a category file, or point at an ImageNet-S tree"
        )
    wnids = sorted(entry.name for entry in seg_root.iterdir() if entry.is_dir())
    if not wnids:
        raise FileNotFoundError(f"{seg_root} has no category folders")
    return wnids


@dataclass(frozen=True)
class Categories:
    """The sorted category list and the id of each category (1-based; 0 is other)."""

    wnids: tuple[str, ...]

    @classmethod
    def from_root(cls, root: str | os.PathLike, category_file: str | None = None) -> "Categories":
        """Categories from a category file when given, else from the tree's folders."""
        wnids = read_category_file(category_file) if category_file else discover_categories(root)
        return cls(tuple(wnids))

    @property
    def num_classes(self) -> int:
        """Number of categories N (ids 1..N)."""
        return len(self.wnids)

    def class_id(self, wnid: str) -> int:
        """1-based class id of ``wnid``."""
        return self._index[wnid]

    @cached_property
    def _index(self) -> dict[str, int]:
        return {wnid: i + 1 for i, wnid in enumerate(self.wnids)}


@dataclass(frozen=True)
class Sample:
    """One image of a split with its optional ground-truth PNG."""

    key: str  # "<wnid>/<name>", the webdataset sample key
    wnid: str
    image_path: Path
    label_path: Path | None


@dataclass(frozen=True)
class SplitListing:
    """Every image of a split, as :func:`list_split` lists them, in a few bytes each.

    A split of ImageNet has 1.28M images: as :class:`Sample` objects (a key and two paths each)
    they take about 0.6 KB per image on the driver of ``lussray prepare``. Here a split is one
    fixed-width bytes array of file names (tens of bytes per image), a flag per image for its
    ground truth and the start of each category; :meth:`sample` builds the :class:`Sample` of one
    index when it is needed (:func:`scan` lists the tree).

    Attributes:
        root: the tree's root.
        split: the split folder.
        wnids: the categories present, in listing order.
        starts: (C + 1,) index of each category's first image (and the total).
        names: (N,) file names (``<name>.<ext>``), sorted within each category.
        labelled: (N,) whether ``<split>-segmentation/<wnid>/<name>.png`` exists.
    """

    root: str
    split: str
    wnids: tuple[str, ...]
    starts: np.ndarray
    names: np.ndarray
    labelled: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    def sample(self, index: int) -> Sample:
        """The :class:`Sample` at ``index`` (the order of :func:`list_split`)."""
        return self.samples(np.asarray([index]))[0]

    def samples(self, indices: np.ndarray) -> list[Sample]:
        """The :class:`Sample` of every index of ``indices``."""
        images, labels = Path(self.root) / self.split, Path(self.root) / segmentation_dir(self.split)
        out = []
        for category, name, labelled in zip(self._categories(indices), self.names[indices], self.labelled[indices]):
            wnid, name = self.wnids[category], name.decode()
            stem = os.path.splitext(name)[0]
            out.append(Sample(key=f"{wnid}/{stem}", wnid=wnid, image_path=images / wnid / name,
                              label_path=labels / wnid / f"{stem}.png" if labelled else None))
        return out

    def image_paths(self, indices: np.ndarray) -> list[str]:
        """The image file of every index of ``indices`` (plain strings: no :class:`Sample` built)."""
        folder = os.path.join(self.root, self.split)
        return [os.path.join(folder, self.wnids[category], name.decode())
                for category, name in zip(self._categories(indices), self.names[indices])]

    def _categories(self, indices: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, np.asarray(indices, np.int64), side="right") - 1

    def has_labels(self) -> bool:
        """Whether any image has ground truth."""
        return bool(self.labelled.any())


def scan_split(root: str | os.PathLike, split: str, wnids: tuple[str, ...] | list[str]) -> SplitListing:
    """:func:`list_split` as a compact :class:`SplitListing` (one category's names in memory at a time).

    Raises:
        FileNotFoundError: when the split folder is missing.
    """
    image_root = Path(root) / split
    if not image_root.is_dir():
        raise FileNotFoundError(f"split folder {image_root} not found")
    seg_root = Path(root) / segmentation_dir(split)
    present, starts, names, labelled = [], [0], [], []
    for wnid in wnids:
        class_dir = image_root / wnid
        if not class_dir.is_dir():
            continue
        files = sorted(entry.name for entry in os.scandir(class_dir) if _is_image_name(entry.name))
        seg_dir = seg_root / wnid
        labels = {entry.name for entry in os.scandir(seg_dir)} if seg_dir.is_dir() else set()
        present.append(wnid)
        starts.append(starts[-1] + len(files))
        names.append(np.array([name.encode() for name in files], dtype=bytes) if files else np.zeros(0, "S1"))
        labelled.append(np.array([f"{os.path.splitext(name)[0]}.png" in labels for name in files], dtype=bool))
    width = max((part.dtype.itemsize for part in names), default=1)
    return SplitListing(str(root), split, tuple(present), np.asarray(starts, np.int64),
                        np.concatenate([part.astype(f"S{width}") for part in names]) if names else np.zeros(0, "S1"),
                        np.concatenate(labelled) if labelled else np.zeros(0, bool))


def _is_image_name(name: str) -> bool:
    stem, ext = os.path.splitext(name)
    return ext in IMAGE_EXTENSIONS and "." not in stem


def list_split(root: str | os.PathLike, split: str, wnids: tuple[str, ...] | list[str]) -> list[Sample]:
    """Every image of ``split`` under ``root`` in the given categories, sorted by key.

    Ground truth is paired by name from ``<split>-segmentation/<wnid>/<name>.png`` when present.
    Categories missing from the split are skipped (train-semi lists only some classes on subsets).
    """
    image_root = Path(root) / split
    if not image_root.is_dir():
        raise FileNotFoundError(f"split folder {image_root} not found")
    seg_root = Path(root) / segmentation_dir(split)
    samples = []
    for wnid in wnids:
        class_dir = image_root / wnid
        if not class_dir.is_dir():
            continue
        for entry in sorted(os.scandir(class_dir), key=lambda e: e.name):
            stem, ext = os.path.splitext(entry.name)
            if ext not in IMAGE_EXTENSIONS or "." in stem:
                continue
            label_path = seg_root / wnid / f"{stem}.png"
            samples.append(
                Sample(
                    key=f"{wnid}/{stem}",
                    wnid=wnid,
                    image_path=Path(entry.path),
                    label_path=label_path if label_path.is_file() else None,
                )
            )
    return samples
