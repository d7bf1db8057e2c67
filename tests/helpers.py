"""Small hand-made ImageNet-S trees for tests that must not depend on the generator."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from lussray.data.imagenet_s import write_label_png


def make_tree(root: Path, wnids=("n001", "n002"), per_class: int = 4, size=(40, 52), seed: int = 0) -> Path:
    """A tree with train/ (no GT) and validation/ + validation-segmentation/ (GT id = class or 0)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "validation"):
        for class_id, wnid in enumerate(wnids, start=1):
            os.makedirs(root / split / wnid, exist_ok=True)
            for i in range(per_class):
                name = f"{wnid}_{i}"
                image = rng.integers(0, 255, size + (3,), dtype=np.uint8)
                Image.fromarray(image).save(root / split / wnid / f"{name}.JPEG", quality=90)
                if split == "validation":
                    label = np.zeros(size, np.int32)
                    label[5:30, 5:40] = class_id
                    label[5, 5:40] = 1000
                    write_label_png(root / "validation-segmentation" / wnid / f"{name}.png", label)
    return root


def corrupt(path: Path, mode: str) -> None:
    """Replace an image with garbage ("garbage") or cut it in half ("truncate")."""
    data = path.read_bytes()
    path.write_bytes(b"not a jpeg at all" if mode == "garbage" else data[: len(data) // 2])
