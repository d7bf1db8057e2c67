"""Ray Data pipelines from webdataset shards to training and inference workers.

    lussray peek --data shards/ --pipeline multicrop --batches 3 --run runs/peek

Training data is an :class:`EpochStream`: a split's shards read in the seeded per-epoch order of
:mod:`lussray.data.epoch_plan` (chunks of the shards permuted every epoch, each Train worker its
own slice, rows mixed within windows), decoded and augmented by a batch function in
``map_batches`` CPU tasks (numpy in, numpy out), every sample's randomness drawn from
(seed, stage, epoch, key) (:func:`lussray.seeds.sample_rng`). Each Train worker builds
its own Ray Data pipeline over its slice (``EpochStream.batches``), so the same seed, data and
worker count give the same batches on every rank in every run, and a resumed run continues with
exactly the batches an unbroken one would have seen. The batch functions:

- :func:`multicrop_batch`: the self-supervised views of PASS (N global + M local crops with the
  photometric augmentations) plus the exact pixel-to-pixel grids of the two global views;
- :func:`pair_batch`: (image, label) pairs with a joint geometric augmentation.

Inference reads a split in shard order (:func:`read_split`): :func:`evaluation_images` gives the
image resized on its shorter side, with its original size and ground truth.

Views stay uint8 until the worker normalises them, which keeps the object store traffic four
times smaller than float32.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lussray import storage
from lussray.data import augment
from lussray.data.epoch_plan import Chunk, EpochPlan, Piece, Window, chunks_of_shard, window_order
from lussray.data.imagenet_s import check_sample_key, label_from_png_bytes
from lussray.data.shards import read_chunk, read_manifest, shard_paths
from lussray.errors import UserError
from lussray.seeds import sample_rng, stage_salt
from lussray.stages.ray_cluster import init_ray  # noqa: F401 - re-exported: the stages import it from here

log = logging.getLogger(__name__)

IMAGE_MEMBER = "jpg"
LABEL_MEMBER = "seg.png"


# -- batch functions (numpy in, numpy out; run inside Ray Data tasks) --------------------------


def multicrop_batch(batch: dict[str, np.ndarray], *, rngs: list[np.random.Generator], crops: dict[str, Any],
                    grid_size: int) -> dict[str, np.ndarray]:
    """Decode and augment a batch into multi-crop views plus the P2P grids of views 0 and 1.

    ``rngs`` holds one generator per sample (the sample's draws depend on nothing else).

    Returns columns ``crop_<v>`` (B, S_v, S_v, 3) uint8 for every view v, ``boxes`` (B, V, 5)
    float32 rows (top, left, height, width, flipped) in original-image pixels, and
    ``p2p_grid_0``/``p2p_grid_1`` (B, G, G, 2) float32 in grid_sample coordinates.
    """
    transform = augment.MultiCropTransform(**crops)
    views_per_image, boxes_per_image = [], []
    for data, rng in zip(batch[IMAGE_MEMBER], rngs):
        views, boxes = transform(augment.decode_image(data), rng)
        views_per_image.append(views)
        boxes_per_image.append(np.stack([box.as_array() for box in boxes]))
    boxes = np.stack(boxes_per_image).astype(np.float32)
    out = {f"crop_{v}": np.stack([views[v] for views in views_per_image]) for v in range(len(views_per_image[0]))}
    out["boxes"] = boxes
    out["p2p_grid_0"], out["p2p_grid_1"] = augment.correspondence_grids_batch(boxes[:, 0], boxes[:, 1], grid_size)
    return out


def pair_batch(batch: dict[str, np.ndarray], *, rngs: list[np.random.Generator], crop_size: int,
               min_scale: float) -> dict[str, np.ndarray]:
    """Decode (image, label) pairs and crop/flip them jointly: ``image`` uint8, ``label`` int32."""
    transform = augment.PairTransform(crop_size=crop_size, scale=(min_scale, 1.0))
    images, labels = [], []
    for data, label_data, rng in zip(batch[IMAGE_MEMBER], batch[LABEL_MEMBER], rngs):
        image, label = transform(augment.decode_image(data), label_from_png_bytes(label_data), rng)
        images.append(image)
        labels.append(label)
    return {"image": np.stack(images), "label": np.stack(labels).astype(np.int32)}


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


def read_split(data: str, split: str, *, members: tuple[str, ...] | None = None):
    """The raw samples of one split in shard order (``__key__`` plus one bytes column per member), keys checked."""
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
    )


# -- training streams ----------------------------------------------------------------------------

EPOCH_COLUMN = "__epoch__"  # the epoch of each row, added by the window reader
KEY_COLUMN = "__key__"


def window_to_json(window: Window) -> str:
    """A window as the one-row spec a read task receives."""
    pieces = [[p.chunk.path, p.chunk.offset, p.chunk.nbytes, p.chunk.rows, p.start, p.stop] for p in window.pieces]
    return json.dumps({"epoch": window.epoch, "entropy": list(window.entropy), "skip": window.skip, "pieces": pieces})


def window_from_json(text: str) -> Window:
    """The inverse of :func:`window_to_json`."""
    spec = json.loads(text)
    pieces = tuple(Piece(Chunk(path, offset, nbytes, rows), start, stop)
                   for path, offset, nbytes, rows, start, stop in spec["pieces"])
    return Window(pieces, int(spec["epoch"]), tuple(spec["entropy"]), int(spec["skip"]))


def read_window(batch: dict[str, np.ndarray], *, members: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Read the windows of a batch of specs: their rows in permuted order, with key, members and epoch.

    Raises:
        UserError: naming the shard when a sample lacks one of ``members`` (or see :func:`read_chunk`).
    """
    keys, columns, epochs = [], {member: [] for member in members}, []
    for text in batch["spec"]:
        window = window_from_json(str(text))
        samples = []
        for piece in window.pieces:
            rows = read_chunk(piece.chunk.path, piece.chunk.offset, piece.chunk.nbytes)
            if len(rows) != piece.chunk.rows:
                raise UserError(f"shard {piece.chunk.path}: {len(rows)} samples at byte {piece.chunk.offset}, its "
                                f"manifest says {piece.chunk.rows}: restore it or run `lussray prepare` again")
            samples += [(piece.chunk.path, row) for row in rows[piece.start:piece.stop]]
        for index in window_order(window):
            path, (key, sample) = samples[index]
            missing = [member for member in members if member not in sample]
            if missing:
                raise UserError(f"shard {path}: sample {key!r} has no {', '.join(missing)} member")
            keys.append(key)
            for member in members:
                columns[member].append(sample[member])
            epochs.append(window.epoch)
    out = {KEY_COLUMN: np.asarray(keys, dtype=object), EPOCH_COLUMN: np.asarray(epochs, dtype=np.int64)}
    out.update({member: _object_array(values) for member, values in columns.items()})
    return out


def _object_array(values: list[bytes]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def seeded_batch(batch: dict[str, np.ndarray], *, batch_fn: Callable[..., dict[str, np.ndarray]], seed: int,
                 salt: int, fn_kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
    """``batch_fn`` with one generator per row from (seed, salt, epoch, key); key and epoch are passed on."""
    keys, epochs = batch[KEY_COLUMN], batch[EPOCH_COLUMN]
    rngs = [sample_rng(seed, salt, int(epoch), str(key)) for key, epoch in zip(keys, epochs)]
    out = batch_fn(batch, rngs=rngs, **fn_kwargs)
    return {**out, KEY_COLUMN: keys, EPOCH_COLUMN: epochs}


@dataclass(frozen=True)
class EpochStream:
    """The training data of one stage: a split's shards in the seeded epoch order, through a batch function.

    Plain and picklable: built on the driver, it travels to the Train workers in the
    :class:`lussray.stages.loop.LoopSpec`, where each builds its own Ray Data pipeline over its
    slice of every epoch (:meth:`batches`).

    Attributes:
        data: the shards folder.
        split: the split to stream.
        stage: the stage's name (salts the order and the augmentation draws).
        members: the tar members the batch function reads (``jpg``, ``seg.png``).
        batch_fn: ``batch_fn(batch, rngs=[one generator per row], **fn_kwargs)`` -> numpy columns;
            ``batch`` has ``__key__``, ``__epoch__`` and one bytes column per member.
        fn_kwargs: its keyword arguments.
        seed: the run's seed.
        window_rows: rows permuted together by one read task (:mod:`lussray.data.epoch_plan`).
        map_batch_size: rows per ``batch_fn`` call.
        cpus_per_map_task: CPUs each read/augment task reserves.
        max_ahead_mb: object-store memory the pipeline may fill ahead of the worker.
        scheduler_pause_s: pause of Ray Data's scheduling loop after each step (:func:`pace_scheduler`).
    """

    data: str
    split: str
    stage: str
    members: tuple[str, ...]
    batch_fn: Callable[..., dict[str, np.ndarray]]
    fn_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    window_rows: int = 512
    map_batch_size: int = 32
    cpus_per_map_task: float = 1.0
    max_ahead_mb: int = 512
    scheduler_pause_s: float = 0.01

    @property
    def salt(self) -> int:
        return stage_salt(self.stage)

    def plan(self, world: int, rows_per_worker: int) -> EpochPlan:
        """The epoch plan of ``world`` workers reading ``rows_per_worker`` rows each per epoch."""
        manifest = read_manifest(self.data, self.split)
        paths = shard_paths(self.data, self.split)
        chunks = tuple(chunk for path, record in zip(paths, manifest["shards"]) for chunk in chunks_of_shard(path, record))
        return EpochPlan(chunks, self.seed, self.salt, world, rows_per_worker, self.window_rows)

    def dataset(self, windows: Iterable[Window]):
        """The Ray Dataset of ``windows``' rows after the batch function, in window order."""
        import ray.data

        specs = [{"spec": window_to_json(window)} for window in windows]
        if not specs:
            raise ValueError(f"{self.stage}: no rows to stream")
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # the plan's order, whatever task finishes first
        context.execution_options.resource_limits = context.execution_options.resource_limits.copy(
            object_store_memory=self.max_ahead_mb * 2**20)
        context.enable_progress_bars = False
        pace_scheduler(context, self.scheduler_pause_s)
        return (ray.data.from_items(specs, override_num_blocks=len(specs))
                .map_batches(read_window, fn_kwargs={"members": self.members}, batch_size=1, batch_format="numpy",
                             num_cpus=self.cpus_per_map_task)
                .map_batches(seeded_batch, fn_kwargs={"batch_fn": self.batch_fn, "seed": self.seed, "salt": self.salt,
                                                      "fn_kwargs": self.fn_kwargs},
                             batch_size=self.map_batch_size, batch_format="numpy", num_cpus=self.cpus_per_map_task))

    def batches(self, windows: Iterable[Window], batch_size: int, device: Any = None,
                prefetch_batches: int = 2) -> Iterator[dict[str, Any]]:
        """Batches of ``batch_size`` rows of ``windows``: numeric columns as tensors on ``device``, keys as numpy."""

        for batch in self.dataset(windows).iter_batches(batch_size=batch_size, batch_format="numpy",
                                                        prefetch_batches=prefetch_batches, drop_last=True):
            yield {name: _tensor(value, device) if value.dtype.kind in "biuf" else value for name, value in batch.items()}


def _tensor(array: np.ndarray, device: Any):
    """A tensor of a numpy column (copied when Ray hands out a read-only view of its object store)."""
    import torch

    array = np.ascontiguousarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy()).to(device)


def stream_settings(ingest: Any) -> dict[str, Any]:
    """The :class:`EpochStream` keyword arguments of an ``ingest`` config section."""
    return {"window_rows": ingest.shuffle_window_rows, "map_batch_size": ingest.map_batch_size,
            "cpus_per_map_task": ingest.cpus_per_map_task, "max_ahead_mb": ingest.max_ahead_mb,
            "scheduler_pause_s": ingest.scheduler_pause_ms / 1000}


def pace_scheduler(context: Any, pause_s: float) -> None:
    """Make the Ray Data executions started under ``context`` pause ``pause_s`` after each scheduling step.

    Ray Data's scheduling loop blocks in ``ray.wait`` only while tasks run; once the read-ahead
    is full it loops without blocking and takes a core from the Train worker that consumes it
    (measured in tools/bench_stream_idle.py). A pause per step bounds that polling; 10 ms does not
    slow a drain whose tasks take tens of milliseconds. The hook is Ray Data's execution-callback
    registry (``DataContext.custom_execution_callback_classes``); on a Ray without it this does nothing.
    """
    try:
        from ray.data._internal.execution.execution_callback import ExecutionCallback
    except ImportError:
        return
    classes = [cls for cls in getattr(context, "custom_execution_callback_classes", None) or []
               if not getattr(cls, "lussray_pause", False)]
    if pause_s > 0:
        classes.append(type("SchedulerPause", (ExecutionCallback,), {
            "lussray_pause": True, "on_execution_step": lambda self, executor: _pause_step(pause_s)}))
    context.custom_execution_callback_classes = classes


def _pause_step(seconds: float) -> None:
    time.sleep(seconds)


def multicrop_stream(data: str, split: str, stage: str, crops: Any, grid_size: int, ingest: Any, seed: int) -> EpochStream:
    """The PASS multi-crop stream (see :func:`multicrop_batch`) over ``split``'s shards."""
    crop_kwargs = {
        "num_crops": list(crops.num_crops), "crop_sizes": list(crops.crop_sizes),
        "min_scales": list(crops.min_scales), "max_scales": list(crops.max_scales),
        "flip_p": crops.flip_p, "color_jitter_strength": crops.color_jitter_strength,
        "grayscale_p": crops.grayscale_p, "blur_p": crops.blur_p,
    }
    return EpochStream(data, split, stage, (IMAGE_MEMBER,), multicrop_batch,
                       {"crops": crop_kwargs, "grid_size": grid_size}, seed, **stream_settings(ingest))


def pair_stream(data: str, split: str, stage: str, ingest: Any, seed: int, *, crop_size: int | None = None,
                min_scale: float | None = None) -> EpochStream:
    """(image, label) pairs with joint RandomResizedCrop + flip (see :func:`pair_batch`)."""
    kwargs = {"crop_size": crop_size or ingest.finetune_crop_size, "min_scale": min_scale or ingest.finetune_min_scale}
    return EpochStream(data, split, stage, (IMAGE_MEMBER, LABEL_MEMBER), pair_batch, kwargs, seed,
                       **stream_settings(ingest))


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
    if args.pipeline == "eval":
        dataset = evaluation_images(args.data, args.split, config.ingest)
    else:
        # epoch 0 of one worker reading the whole split, as a training stage would stream it
        if args.pipeline == "multicrop":
            stream = multicrop_stream(args.data, args.split, "pretrain", config.pretrain.crops,
                                      config.pretrain.p2p_grid_size, config.ingest, config.seed)
        else:
            stream = pair_stream(args.data, args.split, "finetune", config.ingest, config.seed)
        num_samples = read_manifest(args.data, args.split)["num_samples"]
        dataset = stream.dataset(stream.plan(1, num_samples).windows(0, 0))
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
