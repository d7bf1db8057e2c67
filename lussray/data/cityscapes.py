"""The official Cityscapes layout, read as Cityscapes-27 (PiCIE, STEGO, HP).

Layout under ``--src`` (``leftImg8bit_trainvaltest.zip``, ``leftImg8bit_trainextra.zip``,
``gtFine_trainvaltest.zip``)::

    leftImg8bit/<folder>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/<folder>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Classes: ``labelIds - 7`` (road 0 ... bicycle 26); ids below 0 (unlabelled, ego vehicle, rectification
border, out of roi, static, dynamic, ground) and above 26 map to ignore 1000
(``lussray.data.scene`` documents the convention).

The methods split Cityscapes differently, so the split is an explicit option
(``--cityscapes-split`` / ``dataset.cityscapes_split``, no default):

- ``stego`` (STEGO and HP; torchvision's ``Cityscapes(split=...)``): shard ``train`` = leftImg8bit
  ``train`` (2,975 images, gtFine labels), ``validation`` = ``val`` (500, gtFine).
- ``picie`` (PiCIE's released code): ``train`` = leftImg8bit ``train_extra`` + ``test`` (19,998 +
  1,525 images, no fine labels: train_extra has coarse labels only, test's are withheld), and
  ``validation`` = ``train`` + ``val`` (3,475 images with gtFine). Training on the official train
  split and scoring on val gives much lower numbers than PiCIE reports (PiCIE issues #15-#17).

Sample keys are ``<city>/<city>_<seq>_<frame>``; the image member holds the original PNG bytes.

This module is pure: no Ray, no torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from lussray.data.scene import RemapLabels, SceneDataset, files_by_stem, missing_note, pair_labels, remap_table
from lussray.errors import UserError

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
FIRST_LABEL_ID = 7  # labelIds 7..33 are the 27 classes
CLASS_NAMES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel",
    "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)

#: split scheme -> shard split -> (leftImg8bit folders, whether their gtFine labels are read)
SPLIT_SCHEMES: dict[str, dict[str, tuple[tuple[str, ...], bool]]] = {
    "stego": {"train": (("train",), True), "validation": (("val",), True)},
    "picie": {"train": (("train_extra", "test"), False), "validation": (("train", "val"), True)},
}


def label_converter() -> RemapLabels:
    """gtFine labelIds bytes -> 27 classes in the lussray codec (labelIds - 7; others -> 1000)."""
    return RemapLabels("cityscapes27-labelids-v1",
                       remap_table({i: i - FIRST_LABEL_ID for i in range(FIRST_LABEL_ID, FIRST_LABEL_ID + len(CLASS_NAMES))}))


def _city_files(root: Path, suffix: str) -> dict[str, Path]:
    """``{"<city>/<stem>": path}`` of the files ``<root>/<city>/<stem><suffix>``."""
    if not root.is_dir():
        return {}
    found = {}
    for city in sorted(entry.name for entry in os.scandir(root) if entry.is_dir()):
        for stem, path in files_by_stem(root / city, (suffix,)).items():
            found[f"{city}/{stem}"] = path
    return found


def read_layout(src: str | os.PathLike, split_scheme: str | None) -> SceneDataset:
    """The images (and gtFine labels) of the Cityscapes tree ``src`` under ``split_scheme``.

    Raises:
        UserError: when no split scheme is given or it is unknown, or the tree has no images.
    """
    if split_scheme not in SPLIT_SCHEMES:
        raise UserError(
            f"Cityscapes needs an explicit split: --cityscapes-split picie (train = train_extra + test, "
            f"validation = train + val) or stego (train = train, validation = val; STEGO and HP), "
            f"got {split_scheme!r}")
    src = Path(src)
    splits, notes, counts = {}, [], {}
    for split, (folders, labelled) in SPLIT_SCHEMES[split_scheme].items():
        images, labels = [], {} if labelled else None
        for folder in folders:
            found = _city_files(src / "leftImg8bit" / folder, IMAGE_SUFFIX)
            if not found:
                notes.append(f"{split}: no images under {src / 'leftImg8bit' / folder}")
            images += [(*key.split("/"), path) for key, path in found.items()]
            if labelled:
                labels.update(_city_files(src / "gtFine" / folder, LABEL_SUFFIX))
        if not images:
            continue
        samples, missing = pair_labels(images, labels)
        if missing:
            notes.append(missing_note(split, missing, len(samples), src / "gtFine"))
        splits[split] = samples
        counts[split] = {"folders": list(folders), "images": len(samples), "without_annotation": len(missing)}
    if not splits:
        raise UserError(f"{src} holds no Cityscapes images (expected leftImg8bit/<folder>/<city>/*{IMAGE_SUFFIX})")
    return SceneDataset("cityscapes", CLASS_NAMES, splits, label_converter(), tuple(notes),
                        {"cityscapes_split": split_scheme, "counts": counts})
