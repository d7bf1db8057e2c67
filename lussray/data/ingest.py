"""Ray Data pipelines from webdataset shards to training and inference workers.

    lussray peek --data shards/ --pipeline multicrop --batches 3 --run runs/peek

Three pipelines read the shards written by ``lussray prepare`` (``read_webdataset`` with raw
bytes) and decode + augment in ``map_batches`` CPU tasks (numpy in, numpy out):

- :func:`multicrop_views`: the self-supervised views of PASS (N global + M local crops with the
  photometric augmentations) plus the exact pixel-to-pixel grids of the two global views;
- :func:`segmentation_pairs`: (image, label) pairs with a joint geometric augmentation;
- :func:`evaluation_images`: the image resized on its shorter side, with its original size and
  ground truth.

Training workers take their part with ``ray.train.get_dataset_shard`` (Train splits the dataset
with ``streaming_split``) and iterate ``iter_torch_batches``; views stay uint8 until the worker
normalises them, which keeps the object store traffic four times smaller than float32.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

import numpy as np

from lussray import storage
from lussray.data import augment
from lussray.data.imagenet_s import check_sample_key, label_from_png_bytes
from lussray.data.shards import shard_paths
from lussray.errors import UserError
from lussray.stages.ray_cluster import init_ray  # noqa: F401 - re-exported: the stages import it from here

log = logging.getLogger(__name__)

IMAGE_MEMBER = "jpg"
LABEL_MEMBER = "seg.png"


def _entropy_rng() -> np.random.Generator:
    # Fresh OS entropy per batch: every epoch and every task draws new augmentations.
    return np.random.default_rng()


# -- batch functions (numpy in, numpy out; run inside Ray Data tasks) --------------------------


def multicrop_batch(batch: dict[str, np.ndarray], *, crops: dict[str, Any], grid_size: int) -> dict[str, np.ndarray]:
    """Decode and augment a batch into multi-crop views plus the P2P grids of views 0 and 1.

    Returns columns ``crop_<v>`` (B, S_v, S_v, 3) uint8 for every view v, ``boxes`` (B, V, 5)
    float32 rows (top, left, height, width, flipped) in original-image pixels, and
    ``p2p_grid_0``/``p2p_grid_1`` (B, G, G, 2) float32 in grid_sample coordinates.
    """
    transform = augment.MultiCropTransform(**crops)
    rng = _entropy_rng()
    views_per_image, boxes_per_image = [], []
    for data in batch[IMAGE_MEMBER]:
        views, boxes = transform(augment.decode_image(data), rng)
        views_per_image.append(views)
        boxes_per_image.append(np.stack([box.as_array() for box in boxes]))
    boxes = np.stack(boxes_per_image).astype(np.float32)
    out = {f"crop_{v}": np.stack([views[v] for views in views_per_image]) for v in range(len(views_per_image[0]))}
    out["boxes"] = boxes
    out["p2p_grid_0"], out["p2p_grid_1"] = augment.correspondence_grids_batch(boxes[:, 0], boxes[:, 1], grid_size)
    return out


def pair_batch(batch: dict[str, np.ndarray], *, crop_size: int, min_scale: float) -> dict[str, np.ndarray]:
    """Decode (image, label) pairs and crop/flip them jointly: ``image`` uint8, ``label`` int32."""
    transform = augment.PairTransform(crop_size=crop_size, scale=(min_scale, 1.0))
    rng = _entropy_rng()
    images, labels = [], []
    for data, label_data in zip(batch[IMAGE_MEMBER], batch[LABEL_MEMBER]):
        image, label = transform(augment.decode_image(data), label_from_png_bytes(label_data), rng)
        images.append(image)
        labels.append(label)
    return {"image": np.stack(images), "label": np.stack(labels).astype(np.int32), "key": batch["__key__"]}


def evaluation_batch(batch: dict[str, np.ndarray], *, short_side: int, crop_size: int | None = None) -> dict[str, Any]:
    """Decode images, resize their shorter side; keep the key, original size and ground truth.

    With ``crop_size`` (the scene protocols), image and ground truth are also centre-cropped
    (:func:`lussray.data.augment.evaluation_view`) and the crop is the size predictions are scored at.
    """
    images, sizes, labels = [], [], []
    has_labels = LABEL_MEMBER in batch
    for i, data in enumerate(batch[IMAGE_MEMBER]):
        image = augment.decode_image(data)
        label = label_from_png_bytes(batch[LABEL_MEMBER][i]) if has_labels else None
        if crop_size:
            image, label = augment.evaluation_view(image, label, short_side, crop_size)
            sizes.append(image.shape[:2])
            images.append(image)
        else:
            sizes.append(image.shape[:2])
            images.append(augment.resize_shorter_side(image, short_side))
        if has_labels:
            labels.append(label)
    out: dict[str, Any] = {
        "key": batch["__key__"],
        "image": _ragged(images),
        "original_size": np.asarray(sizes, dtype=np.int32),
    }
    if has_labels:
        out["label"] = _ragged(labels)
    return out


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack equal shapes; otherwise an object array (Ray stores it as a variable-shape tensor)."""
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    ragged = np.empty(len(arrays), dtype=object)
    ragged[:] = arrays
    return ragged


# -- Ray Data pipelines ------------------------------------------------------------------------


def checked_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """The webdataset ``decoder`` of :func:`read_split`: refuses a sample whose key is unsafe.

    Runs in the read tasks, before any key reaches a stage, as :func:`lussray.data.shards.iter_tar`
    does on the driver; the error names the shard (``__url__``) and the key.

    Raises:
        UserError: naming the shard and the key.
    """
    try:
        check_sample_key(sample["__key__"])
    except ValueError as error:
        raise UserError(f"shard {sample.get('__url__', '?')}: {error}; refusing the shard (not written by lussray)") from None
    return sample


def read_split(data: str, split: str, *, shuffle_files: bool = False, members: tuple[str, ...] | None = None):
    """The raw samples of one split (``__key__`` plus one bytes column per member), keys checked."""
    import ray.data

    paths = shard_paths(data, split)
    filesystem = None
    if storage.is_uri(data):
        filesystem, _ = storage.filesystem(data)
        paths = [storage.filesystem(path)[1] for path in paths]
    return ray.data.read_webdataset(
        paths,
        filesystem=filesystem,
        decoder=checked_sample,
        suffixes=list(members) if members else None,
        file_extensions=["tar"],
        shuffle="files" if shuffle_files else None,
    )


def multicrop_views(data: str, split: str, crops: Any, grid_size: int, ingest: Any):
    """The PASS multi-crop pipeline (see :func:`multicrop_batch`) over ``split``'s shards."""
    crop_kwargs = {
        "num_crops": list(crops.num_crops), "crop_sizes": list(crops.crop_sizes),
        "min_scales": list(crops.min_scales), "max_scales": list(crops.max_scales),
        "flip_p": crops.flip_p, "color_jitter_strength": crops.color_jitter_strength,
        "grayscale_p": crops.grayscale_p, "blur_p": crops.blur_p,
    }
    return read_split(data, split, shuffle_files=ingest.shuffle_files, members=(IMAGE_MEMBER,)).map_batches(
        multicrop_batch,
        fn_kwargs={"crops": crop_kwargs, "grid_size": grid_size},
        batch_size=ingest.map_batch_size,
        batch_format="numpy",
        num_cpus=ingest.cpus_per_map_task,
    )


def segmentation_pairs(data: str, split: str, ingest: Any):
    """(image, label) pairs with joint RandomResizedCrop + flip (see :func:`pair_batch`)."""
    return read_split(data, split, shuffle_files=ingest.shuffle_files, members=(IMAGE_MEMBER, LABEL_MEMBER)).map_batches(
        pair_batch,
        fn_kwargs={"crop_size": ingest.finetune_crop_size, "min_scale": ingest.finetune_min_scale},
        batch_size=ingest.map_batch_size,
        batch_format="numpy",
        num_cpus=ingest.cpus_per_map_task,
    )


def evaluation_images(data: str, split: str, ingest: Any, crop_size: int | None = None):
    """Images resized on their shorter side (and centre-cropped to ``crop_size``), with size and ground truth."""
    return read_split(data, split, members=(IMAGE_MEMBER, LABEL_MEMBER)).map_batches(
        evaluation_batch,
        fn_kwargs={"short_side": ingest.eval_short_side, "crop_size": crop_size},
        batch_size=ingest.map_batch_size,
        batch_format="numpy",
        num_cpus=ingest.cpus_per_map_task,
    )


# -- `lussray peek` ----------------------------------------------------------------------------

PIPELINES = ("multicrop", "pairs", "eval")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lussray peek``."""
    parser.add_argument("--split", default="train", help="split to stream (default: train)")
    parser.add_argument("--pipeline", choices=PIPELINES, default="multicrop", help="which ingest pipeline")
    parser.add_argument("--batches", type=int, default=3, help="number of batches to stream")
    parser.add_argument("--batch-size", type=int, default=None, help="default: pretrain.loop.batch_size_per_worker")


def _describe(batch: dict[str, Any]) -> str:
    parts = []
    for name, value in batch.items():
        if isinstance(value, np.ndarray) and value.dtype != object and value.dtype.kind in "uifb":
            parts.append(f"{name} {value.dtype}{list(value.shape)} [{value.min():.3g}..{value.max():.3g}]")
        else:
            parts.append(f"{name} ({len(value)} items)")
    return ", ".join(parts)


def run(args: argparse.Namespace, config: Any) -> int:
    """Stream a few batches of one pipeline and print what arrived."""
    if not args.data:
        raise UserError("--data DIR (the shards folder of `lussray prepare`) is required")
    shard_paths(args.data, args.split)  # a missing or damaged manifest is named before Ray starts
    init_ray(config.ray)
    if args.pipeline == "multicrop":
        dataset = multicrop_views(args.data, args.split, config.pretrain.crops, config.pretrain.p2p_grid_size, config.ingest)
    elif args.pipeline == "pairs":
        dataset = segmentation_pairs(args.data, args.split, config.ingest)
    else:
        dataset = evaluation_images(args.data, args.split, config.ingest)
    batch_size = args.batch_size or config.pretrain.loop.batch_size_per_worker
    if args.pipeline == "eval":
        batch_size = 1  # variable image sizes
    started = time.perf_counter()
    seen = 0
    first = None
    for index, batch in enumerate(dataset.iter_batches(batch_size=batch_size, batch_format="numpy")):
        if index >= args.batches:
            break
        first = first or batch
        seen += len(next(iter(batch.values())))
        print(f"peek {args.pipeline} batch {index}: {_describe(batch)}", flush=True)
    elapsed = time.perf_counter() - started
    print(f"peek: {seen} samples in {elapsed:.1f} s ({seen / max(elapsed, 1e-9):.1f} samples/s incl. start-up)")
    if args.run and first is not None:
        path = storage.join(args.run, "peek", f"{args.pipeline}.png")
        storage.write_bytes_atomic(path, _contact_sheet(first))
        print(f"peek: wrote {path}")
    return 0


def _contact_sheet(batch: dict[str, np.ndarray], max_rows: int = 6) -> bytes:
    """A PNG with one row per sample showing its views (or image and label)."""
    from lussray.viz import colorize, png_bytes

    tiles = [name for name in batch if name.startswith("crop_")] or [n for n in ("image", "label") if n in batch]
    rows = []
    for i in range(min(max_rows, len(batch[tiles[0]]))):
        cells = [np.asarray(batch[name][i]) for name in tiles]
        cells = [cell.astype(np.uint8) if cell.ndim == 3 else colorize(cell) for cell in cells]
        height = max(cell.shape[0] for cell in cells)
        cells = [np.pad(cell, ((0, height - cell.shape[0]), (0, 4), (0, 0))) for cell in cells]
        rows.append(np.concatenate(cells, axis=1))
    width = max(row.shape[1] for row in rows)
    sheet = np.concatenate([np.pad(row, ((0, 4), (0, width - row.shape[1]), (0, 0))) for row in rows])
    return png_bytes(sheet)
