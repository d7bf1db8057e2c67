"""The official COCO-Stuff 164k layout, read as COCO-Stuff-27 (PiCIE, STEGO, HP).

Layout under ``--src``::

    images/train2017/<id>.jpg        annotations/train2017/<id>.png
    images/val2017/<id>.jpg          annotations/val2017/<id>.png

Annotations are single-channel 8-bit PNGs of fine ids 0..181 and 255 (unlabelled)
(``stuffthingmaps_trainval2017.zip``). Only the images of an image list are kept: ``curated``
(the default; 49,629 train / 2,175 val ids, the IIC lists of PiCIE and of every method's evaluation)
or ``full`` (97,702 / 4,172 ids, what STEGO and HP train on). Fine ids map to the 27 coarse classes
(things 0..11, stuff 12..26) with the PiCIE/STEGO table; 255 and ids outside the table map to
ignore 1000 (``lussray.data.scene`` documents the convention). The lists and the table are package
data in ``lussray/data/protocol/cocostuff27/`` (facts from shared/reference/data/cocostuff27/).

Listed ids with no image in the tree are counted and reported, not an error, so a partial
download or a small test tree can be prepared. train2017 -> shard split ``train``, val2017 ->
``validation``; sample keys ``train2017/<id>``.

This module is pure: no Ray, no torch.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

from lussray.data.scene import RemapLabels, SceneDataset, files_by_stem, missing_note, pair_labels, remap_table
from lussray.errors import UserError

LISTS = ("curated", "full")
DEFAULT_LIST = "curated"
#: source folder -> shard split
FOLDERS = {"train2017": "train", "val2017": "validation"}
PROTOCOL_DIR = "protocol/cocostuff27"
TABLE_FILE = "fine_to_coarse.json"
NUM_FINE = 182
UNLABELLED = 255
NUM_THINGS = 12

#: Coarse class names in id order (the STEGO order; the test checks it against the table's names).
COARSE_NAMES = (
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle",
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall", "window", "building",
    "ground", "plant", "sky", "solid", "structural", "water",
)


def protocol_file(name: str) -> Path:
    """Path of a packaged COCO-Stuff-27 protocol file."""
    return Path(str(resources.files("lussray.data").joinpath(PROTOCOL_DIR, name)))


@lru_cache(maxsize=1)
def fine_to_coarse() -> dict[int, int]:
    """The 182 fine ids and their coarse id (0..26)."""
    table = json.loads(protocol_file(TABLE_FILE).read_text())["fine_index_to_coarse_index"]
    return {int(fine): int(coarse) for fine, coarse in table.items()}


def label_converter() -> RemapLabels:
    """Fine COCO-Stuff annotation bytes -> coarse ids in the lussray codec (255 -> 1000)."""
    return RemapLabels("cocostuff27-fine-to-coarse-v1", remap_table(fine_to_coarse()))


@lru_cache(maxsize=4)
def image_ids(image_list: str, folder: str) -> tuple[str, ...]:
    """The image ids of list ``image_list`` for ``train2017`` or ``val2017`` (12-digit stems)."""
    if image_list not in LISTS:
        raise UserError(f"image list {image_list!r}: choose one of {', '.join(LISTS)}")
    text = protocol_file(f"{image_list}_{folder}.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def read_layout(src: str | os.PathLike, image_list: str = DEFAULT_LIST) -> SceneDataset:
    """The listed images (and their annotations) of the COCO-Stuff tree ``src``.

    Raises:
        UserError: for an unknown list, or a tree with none of the listed images.
    """
    src = Path(src)
    splits, notes, counts = {}, [], {}
    for folder, split in FOLDERS.items():
        listed = image_ids(image_list, folder)
        images = files_by_stem(src / "images" / folder, (".jpg",))
        present = [(folder, stem, images[stem]) for stem in listed if stem in images]
        absent = len(listed) - len(present)
        if absent:
            notes.append(f"{split}: {absent} of the {len(listed)} {image_list} {folder} ids have no image "
                         f"under {src / 'images' / folder} (kept {len(present)})")
        counts[split] = {"listed": len(listed), "missing_images": absent, "images": len(present)}
        if not present:
            continue
        annotations_dir = src / "annotations" / folder
        labels = ({f"{folder}/{stem}": path for stem, path in files_by_stem(annotations_dir, (".png",)).items()}
                  if annotations_dir.is_dir() else None)
        samples, missing = pair_labels(present, labels)
        if missing:
            notes.append(missing_note(split, missing, len(samples), annotations_dir))
        counts[split]["without_annotation"] = len(missing)
        splits[split] = samples
    if not splits:
        raise UserError(f"{src} holds none of the {image_list} COCO-Stuff images "
                        f"(expected images/{{train2017,val2017}}/<id>.jpg)")
    return SceneDataset("cocostuff", COARSE_NAMES, splits, label_converter(), tuple(notes),
                        {"image_list": image_list, "counts": counts})
