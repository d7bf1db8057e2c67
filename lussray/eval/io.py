"""Prediction and ground-truth files in the official ImageNet-S layout, and ``match.json``.

Facts from shared/reference/pass-imagenet-s.md, section 3 ("File layout and encoding") and
section 2.4 (``inference.py``):

- ground truth and predictions are ``<dir>/<wnid>/<name>.png`` at the same H x W; the id of a pixel
  is R + 256 * G (decoded without uint8 overflow, unlike the official code under NumPy 2);
- the official image list (``data/names/ImageNetS_im{N}_validation.txt``) has lines
  ``<wnid>/<name>.JPEG <wnid>/<name>.png``; the second column names both files;
- foreground scores for the tau sweep sit next to the predictions as ``<name>.npy`` (float32 H x W,
  the ``inference_pixel_attention.py --test`` layout);
- ``match.json`` maps generated ids to ground-truth ids with string keys, 1-based, plus ``"0": 0``.

This module is pure: no Ray, no torch.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from PIL import Image

from lussray.data.imagenet_s import MAX_ENCODABLE_ID, OTHER_ID, label_to_png_bytes
from lussray.errors import UserError
from lussray.storage import join_under, write_bytes_atomic

PNG_SUFFIX = ".png"
FOREGROUND_SUFFIX = ".npy"
MATCH_FILE = "match.json"


@dataclass(frozen=True)
class EvalItem:
    """One evaluated image: its key ``<wnid>/<name>`` and the files that belong to it."""

    key: str
    gt_path: Path
    pred_path: Path

    @property
    def foreground_path(self) -> Path:
        """The foreground-score map next to the prediction (used by the tau sweep)."""
        return self.pred_path.with_suffix(FOREGROUND_SUFFIX)


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG in the official codec as a uint16 (H, W) id map (id = R + 256 * G).

    Same values as :func:`lussray.data.imagenet_s.read_label_png`, in half the memory (every
    encodable id fits in 16 bits), which keeps the evaluator's filters fast.

    Raises:
        UserError: if the file is missing or is not an image.
    """
    try:
        with Image.open(path) as image:
            if image.mode != "RGB":
                image = image.convert("RGB")
            rgb = np.asarray(image)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read label PNG {path}: {error}") from error
    label = rgb[..., 1].astype(np.uint16)
    label <<= 8
    label |= rgb[..., 0]
    return label


def read_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image, from its header only."""
    with Image.open(path) as image:
        width, height = image.size
    return height, width


def read_foreground(path: str | os.PathLike) -> np.ndarray:
    """Read a float32 (H, W) foreground-score map written by :func:`write_foreground`.

    Raises:
        UserError: if the file is missing, unreadable or not 2-D.
    """
    try:
        scores = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read foreground scores {path}: {error}") from error
    if scores.ndim != 2:
        raise UserError(f"foreground scores {path} must be 2-D (H, W), got shape {scores.shape}")
    return scores.astype(np.float32, copy=False)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that ``path`` never holds a partial file (see :mod:`lussray.storage`)."""
    write_bytes_atomic(str(path), data)


def prediction_path(root: str | os.PathLike, key: str) -> Path:
    """``<root>/<wnid>/<name>.png`` for the sample key ``<wnid>/<name>``.

    Raises:
        ValueError: if ``key`` is not of the shape ``<wnid>/<name>``.
        UserError: if the path would leave ``root`` (a key with ``..``, a leading ``/``, ...).
    """
    wnid, _, name = key.partition("/")
    if not wnid or not name or "/" in name:
        raise ValueError(f"sample key must be '<wnid>/<name>', got {key!r}")
    return Path(join_under(str(root), f"{wnid}/{name}{PNG_SUFFIX}"))


def write_prediction(root: str | os.PathLike, key: str, label: np.ndarray) -> Path:
    """Write one prediction as the official evaluator reads it, atomically; return its path.

    Args:
        root: the prediction folder of a split, e.g. ``<run>/predict/validation``.
        key: the sample key ``<wnid>/<name>``.
        label: (H, W) integer ids at ground-truth resolution; 0 = other, 1..N = categories.
    """
    path = prediction_path(root, key)
    write_atomic(path, label_to_png_bytes(label))
    return path


def write_foreground(root: str | os.PathLike, key: str, scores: np.ndarray) -> Path:
    """Write a (H, W) foreground-score map next to its prediction as float32 ``.npy``."""
    path = prediction_path(root, key).with_suffix(FOREGROUND_SUFFIX)
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    if scores.ndim != 2:
        raise ValueError(f"foreground scores must be 2-D (H, W), got shape {scores.shape}")
    buffer = io.BytesIO()
    np.save(buffer, scores, allow_pickle=False)
    write_atomic(path, buffer.getvalue())
    return path


def read_name_list(path: str | os.PathLike) -> list[str]:
    """Sample keys from an image list: the official two-column format or one path per line.

    A line ``<wnid>/<name>.JPEG <wnid>/<name>.png`` gives ``<wnid>/<name>`` (last column, as the
    official evaluator uses it); so does ``<wnid>/<name>.png`` or ``<wnid>/<name>``.

    Raises:
        UserError: if the file is missing, empty, or a line is not ``<wnid>/<name>``.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise UserError(f"cannot read image list {path}: {error}") from error
    keys = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        key = fields[-1]
        stem, ext = os.path.splitext(key)
        if ext.lower() in (".png", ".jpeg", ".jpg"):
            key = stem
        if key.count("/") != 1 or key.startswith("/") or key.endswith("/"):
            raise UserError(f"image list {path}, line {number}: expected '<wnid>/<name>', got {line!r}")
        keys.append(key)
    if not keys:
        raise UserError(f"image list {path} names no images")
    return keys


def discover_keys(gt_dir: str | os.PathLike) -> list[str]:
    """Every ``<wnid>/<name>`` with a ground-truth PNG under ``gt_dir``, sorted (ImageFolder order).

    Raises:
        UserError: if the folder is missing or holds no ``<wnid>/<name>.png``.
    """
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise UserError(f"ground-truth folder {gt_dir} not found")
    keys = []
    for wnid_entry in sorted(os.scandir(gt_dir), key=lambda e: e.name):
        if not wnid_entry.is_dir():
            continue
        for entry in sorted(os.scandir(wnid_entry.path), key=lambda e: e.name):
            if entry.name.endswith(PNG_SUFFIX) and not entry.name.startswith("."):
                keys.append(f"{wnid_entry.name}/{entry.name[: -len(PNG_SUFFIX)]}")
    if not keys:
        raise UserError(
            f"no ground-truth PNGs under {gt_dir}: expected {gt_dir}/<wnid>/<name>.png "
            "(the <split>-segmentation folder of an ImageNet-S tree)"
        )
    return keys


def _describe(paths: list[str], limit: int = 3) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" (and {len(paths) - limit} more)" if len(paths) > limit else "")


def list_items(
    gt_dir: str | os.PathLike, pred_dir: str | os.PathLike, keys: Iterable[str] | None = None
) -> list[EvalItem]:
    """Pair every ground-truth PNG with its prediction; refuse missing files.

    Args:
        gt_dir: the ground-truth folder (``<root>/validation-segmentation``).
        pred_dir: the prediction folder with the same ``<wnid>/<name>.png`` tree.
        keys: the images to evaluate (an image list); default: every PNG under ``gt_dir``.

    Raises:
        UserError: naming how many ground-truth or prediction files are missing, and which first.
    """
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    if not pred_dir.is_dir():
        raise UserError(f"prediction folder {pred_dir} not found")
    keys = discover_keys(gt_dir) if keys is None else list(keys)
    items = [EvalItem(key, prediction_path(gt_dir, key), prediction_path(pred_dir, key)) for key in keys]
    for role, attribute in (("ground-truth", "gt_path"), ("prediction", "pred_path")):
        missing = [str(getattr(item, attribute)) for item in items if not getattr(item, attribute).is_file()]
        if missing:
            raise UserError(f"{len(missing)} of {len(items)} {role} files are missing: {_describe(missing)}")
    return items


def write_match(path: str | os.PathLike, mapping: np.ndarray) -> Path:
    """Write ``match.json`` ({generated id: ground-truth id}, string keys, ``"0": 0`` first).

    Args:
        path: the file to write (usually ``<predictions>/match.json``).
        mapping: (N + 1,) integer array; ``mapping[i]`` is the ground-truth id of generated id i.
    """
    mapping = np.asarray(mapping)
    if mapping.ndim != 1 or mapping.size == 0 or int(mapping[0]) != OTHER_ID:
        raise ValueError("mapping must be a 1-D array with mapping[0] == 0 (other stays other)")
    content = {str(i): int(v) for i, v in enumerate(mapping.tolist())}
    path = Path(path)
    write_atomic(path, (json.dumps(content) + "\n").encode())
    return path


def read_match(path: str | os.PathLike) -> dict[int, int]:
    """Read ``match.json`` as {generated id: ground-truth id} with integer keys.

    A file without ``"0"`` gets ``0 -> 0`` (the official files always carry it; the official
    evaluator would fail on a prediction holding 0 otherwise).

    Raises:
        UserError: if the file is missing or not a JSON object of integer ids.
    """
    try:
        raw = json.loads(Path(path).read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        match = {int(k): int(v) for k, v in raw.items()}
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"cannot read match file {path}: {error}") from error
    bad = [k for k in match if not 0 <= k <= MAX_ENCODABLE_ID]
    if bad:
        raise UserError(f"match file {path}: generated id {bad[0]} is outside 0..{MAX_ENCODABLE_ID}")
    match.setdefault(OTHER_ID, OTHER_ID)
    return match


def match_to_lookup(match: Mapping[int, int], num_classes: int, source: str = "match") -> np.ndarray:
    """A lookup array ``lut[generated id] = ground-truth id``; -1 where the match has no entry.

    Raises:
        UserError: if a ground-truth id is outside 0..N.
    """
    bad = {k: v for k, v in match.items() if not 0 <= v <= num_classes}
    if bad:
        k, v = next(iter(bad.items()))
        raise UserError(f"{source}: generated id {k} maps to {v}, outside the ground-truth ids 0..{num_classes}")
    lut = np.full(max(match) + 1, -1, dtype=np.int64)
    for k, v in match.items():
        lut[k] = v
    return lut
