"""The training items of STEGO and HP: five crops per image, their views, and the batch functions.

STEGO [0] and HP [1] train on a "five-crop" copy of the dataset written once by their
``crop_datasets.py`` (seed-methods.md 2.4): the four corner crops and the centre crop of every
image, each ``crop_ratio`` (0.5) of the image's height and width, saved as images of their own.
lussray computes them on the fly instead (no second copy of the dataset on disk):
:func:`five_crop_boxes` gives torchvision's ``five_crop`` rectangles (top-left, top-right,
bottom-left, bottom-right, centre), and every crop is one item (``crop_type: five``; ``none``
keeps whole images). An item is then seen as the references load the cropped images: shorter
side resized to ``res`` and the central ``res`` x ``res`` crop (:func:`item_view`, image bilinear,
label nearest through the same rectangle).

The training stream (:class:`lussray.data.ingest.EpochStream`) gives one row per image, so an
epoch trains on one crop of every image, the five in turn (:func:`epoch_crop`): five lussray epochs
are one epoch of the five-crop dataset, with the same number of steps and every batch made of
crops of different images. The KNN stage sees all five crops of every image.

The batch functions below turn stream rows (``__key__``, ``__epoch__`` and the member bytes ``jpg``
and ``seg.png``) into numpy training batches. They are pure (numpy in, numpy out); every random
choice of a row comes from its generator in ``rngs`` (seed, stage, epoch, key:
:func:`lussray.seeds.sample_rng`), so the same epoch gives the same batch in any process, and a
resumed run sees what an uninterrupted one would.

- :func:`hp_batch`: ``image`` and ``label`` of every item, and ``image_aug``, its photometric
  view (the reference's ``img_aug``: colour jitter, grayscale and blur, no geometry, so the two
  views stay pixel-aligned) for HP's consistency term.
- :func:`stego_batch`: ``image`` and ``label`` of every item and ``image_pos``, a KNN partner
  item drawn among the first ``num_neighbors`` neighbours of ``lussray knn`` (the item itself
  excluded), its image read by key from the shards (:mod:`lussray.data.partners`).

Deviation from the references: the items are resized bilinearly (antialiased); STEGO's
``get_transform`` resizes training images with ``Image.NEAREST``.

References:
    - [0]: STEGO, "Unsupervised Semantic Segmentation by Distilling Feature Correspondences", ICLR 2022.
    - [1]: HP, "Leveraging Hidden Positives for Unsupervised Semantic Segmentation", CVPR 2023.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lussray.data.augment import decode_image, evaluation_view
from lussray.data.imagenet_s import label_from_png_bytes
from lussray.data.picie_views import apply_photometric, sample_photometric

CROP_TYPES = ("five", "none")
IMAGE_MEMBER = "jpg"
LABEL_MEMBER = "seg.png"


def num_crops(crop_type: str) -> int:
    """Items per image: 5 for ``five``, 1 for ``none``.

    Raises:
        ValueError: for another crop type.
    """
    if crop_type not in CROP_TYPES:
        raise ValueError(f"crop type {crop_type!r} is not one of {', '.join(CROP_TYPES)}")
    return 5 if crop_type == "five" else 1


def five_crop_boxes(height: int, width: int, ratio: float) -> list[tuple[int, int, int, int]]:
    """torchvision ``five_crop`` rectangles ``(top, left, h, w)`` of a ``ratio`` crop.

    Order: top-left, top-right, bottom-left, bottom-right, centre; crop size
    ``(int(height * ratio), int(width * ratio))`` (at least 1), centre offset ``round((H - h) / 2)``.
    """
    crop_h, crop_w = max(1, int(height * ratio)), max(1, int(width * ratio))
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return [(0, 0, crop_h, crop_w), (0, width - crop_w, crop_h, crop_w), (height - crop_h, 0, crop_h, crop_w),
            (height - crop_h, width - crop_w, crop_h, crop_w), (top, left, crop_h, crop_w)]


def crop_boxes(height: int, width: int, crop_type: str, ratio: float) -> list[tuple[int, int, int, int]]:
    """The item rectangles of an image: its five crops, or the whole image."""
    if num_crops(crop_type) == 1:
        return [(0, 0, height, width)]
    return five_crop_boxes(height, width, ratio)


def item_view(image: np.ndarray, label: np.ndarray | None, box: tuple[int, int, int, int],
              res: int) -> tuple[np.ndarray, np.ndarray | None]:
    """One item as the model sees it: the box cut out, shorter side ``res``, central ``res`` crop.

    Args:
        image: uint8 (H, W, 3).
        label: (H, W) ground truth or None.
        box: ``(top, left, h, w)``.
        res: output side.

    Returns:
        uint8 (res, res, 3) and int32 (res, res) (or None).
    """
    top, left, h, w = box
    crop = image[top : top + h, left : left + w]
    label_crop = None if label is None else label[top : top + h, left : left + w]
    view, label_view = evaluation_view(crop, label_crop, res, res)
    return view, None if label_view is None else label_view.astype(np.int32)


def item_key(key: str, crop: int) -> str:
    """The random-stream name of one item: ``<key>#<crop>``."""
    return f"{key}#{crop}"


def image_items(jpeg: bytes, crop_type: str, ratio: float, res: int) -> list[np.ndarray]:
    """The ``res`` x ``res`` views of all items of one image (the KNN stage's inputs)."""
    image = decode_image(jpeg)
    return [item_view(image, None, box, res)[0] for box in crop_boxes(*image.shape[:2], crop_type, ratio)]


def epoch_crop(key: str, epoch: int, crop_type: str) -> int:
    """The crop of image ``key`` an epoch trains on: the five in turn, starting at a crop fixed by the key.

    Every five consecutive epochs show each crop of every image once, in an order that differs
    between images, so five lussray epochs are one epoch of the references' five-crop dataset.
    """
    from lussray.seeds import key_entropy

    crops = num_crops(crop_type)
    return (key_entropy(key) + int(epoch)) % crops


def _items(batch: dict[str, np.ndarray], crop_type: str, ratio: float, res: int):
    """(key, crop, image view, label view or None) of every row of a stream batch: its crop of this epoch."""
    has_labels = LABEL_MEMBER in batch
    for i, key in enumerate(batch["__key__"]):
        image = decode_image(batch[IMAGE_MEMBER][i])
        label = label_from_png_bytes(batch[LABEL_MEMBER][i]) if has_labels else None
        crop = epoch_crop(str(key), int(batch["__epoch__"][i]), crop_type)
        view, label_view = item_view(image, label, crop_boxes(*image.shape[:2], crop_type, ratio)[crop], res)
        yield str(key), crop, view, label_view


def _labels(labels: list[np.ndarray | None], res: int, ignore_id: int) -> np.ndarray:
    """Stacked label views; items without ground truth are all ``ignore_id``."""
    return np.stack([np.full((res, res), ignore_id, np.int32) if label is None else label for label in labels])


def hp_batch(batch: dict[str, np.ndarray], *, rngs: Sequence[np.random.Generator], res: int,
             crop_type: str = "five", crop_ratio: float = 0.5, jitter: Sequence[float] = (0.3, 0.3, 0.3, 0.1),
             jitter_p: float = 0.8, grayscale_p: float = 0.2, blur_p: float = 0.5,
             ignore_id: int = 1000) -> dict[str, np.ndarray]:
    """HP's training items: ``image`` and its photometric view ``image_aug``, (B, res, res, 3) uint8, ``label`` int32.

    Args:
        batch: stream rows: ``__key__``, ``__epoch__``, ``jpg`` and (optionally) ``seg.png``.
        rngs: one generator per row (:func:`lussray.seeds.sample_rng` of seed, stage, epoch, key).
        res: item side.
        crop_type: ``five`` (each row's crop of this epoch, :func:`epoch_crop`) or ``none``.
        crop_ratio: five-crop size over the image size.
        jitter: (brightness, contrast, saturation, hue) strengths of the colour jitter.
        jitter_p: probability of each jitter operation.
        grayscale_p: probability of grayscale.
        blur_p: probability of a Gaussian blur (sigma U(0.1, 2)).
        ignore_id: label of items without ground truth.
    """
    images, augmented, labels = [], [], []
    for (key, crop, view, label), rng in zip(_items(batch, crop_type, crop_ratio, res), rngs):
        images.append(view)
        augmented.append(apply_photometric(view, sample_photometric(rng, jitter, jitter_p, grayscale_p, blur_p)))
        labels.append(label)
    return {"image": np.stack(images), "image_aug": np.stack(augmented), "label": _labels(labels, res, ignore_id)}


def stego_batch(batch: dict[str, np.ndarray], *, rngs: Sequence[np.random.Generator], res: int,
                partners: dict[str, Any], crop_type: str = "five", crop_ratio: float = 0.5, num_neighbors: int = 7,
                ignore_id: int = 1000) -> dict[str, np.ndarray]:
    """STEGO's training items: ``image``, ``label`` and ``image_pos``, the view of a KNN partner item.

    Args:
        batch: stream rows: ``__key__``, ``__epoch__``, ``jpg`` and (optionally) ``seg.png``.
        rngs: one generator per row (the partner draw).
        res: item side.
        partners: the arguments of :class:`lussray.data.partners.PartnerReader` (``knn``, ``data``, ``split``).
        crop_type: ``five`` or ``none`` (as the KNN stage's).
        crop_ratio: five-crop size over the image size.
        num_neighbors: the partner is drawn uniformly among this many first neighbours, the item
            itself excluded (the reference's ``num_neighbors`` 7 of its top-30).
        ignore_id: label of items without ground truth.
    """
    from lussray.data.partners import partner_reader

    reader = partner_reader(**partners)
    images, positives, labels = [], [], []
    for (key, crop, view, label), rng in zip(_items(batch, crop_type, crop_ratio, res), rngs):
        partner_key, partner_crop, jpeg = reader.draw(key, crop, num_neighbors, rng)
        partner_image = decode_image(jpeg)
        box = crop_boxes(*partner_image.shape[:2], crop_type, crop_ratio)[partner_crop]
        images.append(view)
        positives.append(item_view(partner_image, None, box, res)[0])
        labels.append(label)
    return {"image": np.stack(images), "image_pos": np.stack(positives), "label": _labels(labels, res, ignore_id)}


__all__ = [
    "CROP_TYPES",
    "crop_boxes",
    "epoch_crop",
    "five_crop_boxes",
    "hp_batch",
    "image_items",
    "item_key",
    "item_view",
    "num_crops",
    "stego_batch",
]
