"""FS^4's training samples: one selected pyramid view per row, its global label, its two PiCIE views.

``lussray fs4 labels`` (:mod:`lussray.stages.fs4_labels`) writes one shard sample per pyramid view
that active selection kept (FS^4 [0], Sec. 4.2.1: "the subimages selected by active selection are
treated as independent images for training"):

- key ``<image key>--view<v>`` (:func:`view_key`; ``v`` in 0..5, the order of
  :data:`lussray.methods.fs4.VIEW_NAMES`), so that every row of the training stream is one view, as
  the epoch plan counts rows (:mod:`lussray.data.epoch_plan`);
- member ``jpg``: the image's original bytes (never re-encoded; an image with k kept views is
  stored k times);
- member ``json``: the :class:`ViewRecord` (image key, view, box, global label, distance to its
  centre, image size).

:func:`fs4_batch` is the ingest batch function of FS^4 training (``batch_fn(batch, *, rngs,
**kwargs)``, numpy in, numpy out): it cuts each row's view out of its image and draws PiCIE's two
views of it (:mod:`lussray.data.picie_views`, the supplement A.1 values, which are PiCIE's).

References:
    - [0]: FS^4, "Fully Self-Supervised Learning for Semantic Segmentation", 2022, arXiv:2202.11981.
    - [1]: PiCIE, CVPR 2021, arXiv:2103.17070.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lussray.data.augment import CropBox, decode_image
from lussray.data.picie_views import base_image, make_views, sample_view_params
from lussray.methods.fs4 import NUM_VIEWS, VIEW_NAMES

#: Joins an image key and a view index into the view's sample key (a view index is one digit).
VIEW_SEPARATOR = "--view"
IMAGE_MEMBER = "jpg"
RECORD_MEMBER = "json"
#: The members FS^4 training streams.
MEMBERS = (IMAGE_MEMBER, RECORD_MEMBER)


def view_key(image_key: str, view: int) -> str:
    """The sample key of view ``view`` of an image: ``<image key>--view<v>``.

    Distinct images give distinct view keys: the key ends in the single digit ``v``, so the image
    key is the rest minus the separator.

    Raises:
        ValueError: If ``view`` is not in 0..5.
    """
    if not 0 <= int(view) < NUM_VIEWS:
        raise ValueError(f"view must be in 0..{NUM_VIEWS - 1}, got {view}")
    return f"{image_key}{VIEW_SEPARATOR}{int(view)}"


@dataclass(frozen=True)
class ViewRecord:
    """What the labels shards store about one kept pyramid view (member ``json``).

    Attributes:
        image: The image's sample key in the source shards.
        view: Index in :data:`lussray.methods.fs4.VIEW_NAMES` (0 = the whole image).
        box: (top, left, height, width) of the view in image pixels (integer-valued).
        label: Its global pseudo label, 0..K-1.
        distance: Cosine distance to its centre (1 - cos, the active-selection rank key).
        size: (height, width) of the image.
    """

    image: str
    view: int
    box: tuple[float, float, float, float]
    label: int
    distance: float
    size: tuple[int, int]

    @property
    def key(self) -> str:
        """The view's sample key (:func:`view_key`)."""
        return view_key(self.image, self.view)

    def to_json(self) -> bytes:
        """The member bytes."""
        return json.dumps({"image": self.image, "view": self.view, "view_name": VIEW_NAMES[self.view],
                           "box": [float(v) for v in self.box], "label": self.label,
                           "distance": self.distance, "size": [int(v) for v in self.size]}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ViewRecord:
        """Parse and check a ``json`` member.

        Raises:
            ValueError: On a malformed record (missing keys, a view outside 0..5, a negative label,
                a box outside the image).
        """
        try:
            raw = json.loads(data)
            top, left, height, width = (float(v) for v in raw["box"])
            rows, cols = (int(v) for v in raw["size"])
            record = cls(str(raw["image"]), int(raw["view"]), (top, left, height, width), int(raw["label"]),
                         float(raw["distance"]), (rows, cols))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"not an FS^4 view record ({type(error).__name__}: {error})") from None
        if (not 0 <= record.view < NUM_VIEWS or record.label < 0 or height < 1 or width < 1
                or top < 0 or left < 0 or top + height > rows or left + width > cols):
            raise ValueError(f"FS^4 view record out of range: {raw}")
        return record


def view_region(image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """The pixels of an integer-valued (top, left, height, width) box (a view of the array, not resampled)."""
    top, left, height, width = (int(round(v)) for v in box)
    return image[top:top + height, left:left + width]


def fs4_batch(batch: dict[str, np.ndarray], *, rngs: list[np.random.Generator], base_size: int, view_size: int,
              min_side: float = 0.5, flip_p: float = 0.5, **photometric: Any) -> dict[str, np.ndarray]:
    """Decode the selected views of a batch and draw PiCIE's two views of each (pure numpy).

    Per row: the image is decoded, its pyramid view cut out exactly (integer box, no resampling),
    resized on its shorter side to ``base_size`` and centre-cropped (:func:`picie_views.base_image`:
    for the whole-image view this is PiCIE's own base image), then P1, P2 and G are drawn from the
    row's generator (:func:`picie_views.sample_view_params`, crop side U(min_side, 1); P1 and P2 as
    ``photometric`` says, by default the supplement's jitter 0.3/0.3/0.3/0.1 p 0.8, grayscale p 0.2,
    blur p 0.5) and the two network inputs made
    (:func:`picie_views.make_views`).

    Args:
        batch: ``jpg`` and ``json`` (a :class:`ViewRecord`) bytes columns, ``__key__`` (view keys).
        rngs: One generator per row (the sample's own, from (seed, stage, epoch, view key)).
        base_size: Side of the base image (the supplement's 320).
        view_size: Side of the network inputs (PiCIE's res1, 320).
        min_side: Smallest crop side fraction of G.
        flip_p: Flip probability of G.
        photometric: ``jitter``, ``jitter_p``, ``grayscale_p``, ``blur_p`` of
            :func:`picie_views.sample_view_params` (the ``picie.*`` keys in a run).

    Returns:
        ``image1`` (B, S, S, 3) uint8, G(P1(x)); ``image2`` (B, S, S, 3) uint8, P2(x), whose feature
        map the worker crops with ``picie_views.apply_crop(maps, crop, (base_size, base_size), s)``;
        ``crop`` (B, 5) float32 rows of G in base-image pixels (:meth:`CropBox.as_array`);
        ``global_label`` (B,) int64, the view's pseudo label for L_w; ``pyramid_view`` (B,) int64.

    Raises:
        ValueError: If a row's record does not belong to its key or its image has another size.
    """
    images1, images2, crops, labels, views = [], [], [], [], []
    keys = batch.get("__key__")
    for row, (data, record_bytes, rng) in enumerate(zip(batch[IMAGE_MEMBER], batch[RECORD_MEMBER], rngs)):
        record = ViewRecord.from_json(record_bytes)
        if keys is not None and str(keys[row]) != record.key:
            raise ValueError(f"sample {keys[row]!r} holds the record of {record.key!r}")
        image = decode_image(data)
        if tuple(image.shape[:2]) != tuple(record.size):
            raise ValueError(f"sample {record.key!r}: image is {image.shape[:2]}, its record says {record.size}")
        base = base_image(view_region(image, record.box), base_size)
        params = sample_view_params(rng, base_size, base_size, min_side=min_side, flip_p=flip_p, **photometric)
        image1, image2 = make_views(base, params, view_size)
        images1.append(image1)
        images2.append(image2)
        crops.append(params.crop.as_array())
        labels.append(record.label)
        views.append(record.view)
    return {"image1": np.stack(images1), "image2": np.stack(images2),
            "crop": np.stack(crops).astype(np.float32), "global_label": np.asarray(labels, np.int64),
            "pyramid_view": np.asarray(views, np.int64)}


def box_tuple(box: CropBox) -> tuple[float, float, float, float]:
    """(top, left, height, width) of an unflipped pyramid box (:func:`lussray.methods.fs4.pyramid_boxes`)."""
    values = (box.top, box.left, box.height, box.width)
    if box.flipped or not all(math.isfinite(v) and float(v).is_integer() for v in values):
        raise ValueError(f"pyramid boxes are unflipped and integer-valued, got {box}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]
