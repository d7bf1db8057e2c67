"""Stages 2.2-2.4: embeddings, sharded k-means, the "other" threshold, pixel pseudo labels.

    lussray labelgen --dataset synthetic-demo --data demo-out/shards --run demo-out/run
    lussray labelgen --dataset imagenet-s919 --data s3://bucket/s919-shards --run s3://bucket/runs/s919

Reads the latest ``<run>/attention`` checkpoint (or ``--checkpoint``) and writes under
``<run>/labelgen/``:

1. ``embeddings/<shard>.parquet``: the attention-pooled embedding of every training image
   (Resize + CenterCrop as the reference's clustering), one file per input shard, written by an
   actor pool (``map_batches`` with a callable class: the model is loaded once per actor).
2. ``centroids.npy`` + ``kmeans.json``: k-means with K categories over Ray actors that each hold
   only their part of the embeddings (:func:`lussray.clustering.kmeans.sharded_kmeans`).
3. ``tau.json``: the "other" threshold, swept on ``labelgen.tau_split`` (validation, as the
   reference, or train-semi) against its ground truth with the evaluator's one-pass sweep, or fixed
   by ``labelgen.tau`` / ``--tau`` (data without ground truth).
4. ``pseudo/train/<shard>.tar`` (+ ``.done.json``, then ``manifest.json``): every training image
   paired with its pixel pseudo label (ids 0..K, 0 = other) in the format of ``lussray prepare``,
   so fine-tuning streams them as it streams ground truth; optionally the official PNG tree.
5. ``summary.json`` (last): images, times, label histogram, tau, and the pseudo labels' own
   metrics at that tau on validation and train-semi where they have ground truth (``metrics``).

Every output is written atomically and a rerun skips what is complete (per shard).
``inputs.json`` records what the outputs depend on (checkpoint, data manifests, K, tau, score
scale, ...; :func:`fingerprint`), compared before anything else: a rerun with other inputs is
refused (``--overwrite`` removes the folder and generates the labels again).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import pickle
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lussray import storage
from lussray.completion import (
    FORMAT_VERSION,
    StageRecord,
    checkpoint_fingerprint,
    config_fingerprint,
    data_fingerprint,
    has_files,
)
from lussray.config import LabelgenConfig, LussConfig, flag_type
from lussray.data.shards import FORMAT_VERSION, MANIFEST, SHARD_ENTRY_KEYS, read_manifest, shard_paths
from lussray.errors import UserError
from lussray.seeds import derived_seed

STAGE = "labelgen"
ATTENTION_STAGE = "attention"
DONE = ".done.json"
PREFETCH_BATCHES = 2  # input batches an embedding actor prepares ahead of its forward pass
EVALUATED_SPLITS = ("validation", "train-semi")  # the pseudo labels' own scores, where ground truth exists


@dataclass(frozen=True)
class Outputs:
    """The files of ``<run>/labelgen``."""

    root: str

    @property
    def embeddings(self) -> str:
        return storage.join(self.root, "embeddings")

    def embedding_file(self, shard_name: str) -> str:
        return storage.join(self.embeddings, shard_name.replace(".tar", ".parquet"))

    @property
    def centroids(self) -> str:
        return storage.join(self.root, "centroids.npy")

    @property
    def kmeans(self) -> str:
        return storage.join(self.root, "kmeans.json")

    @property
    def tau(self) -> str:
        return storage.join(self.root, "tau.json")

    @property
    def pseudo(self) -> str:
        """Shards root of the pseudo labels: stream ``(pseudo, "train")`` like prepared data."""
        return storage.join(self.root, "pseudo")

    @property
    def png_tree(self) -> str:
        return storage.join(self.root, "png", "train")

    @property
    def summary(self) -> str:
        return storage.join(self.root, "summary.json")


# -- actors (one model per actor; one call per input shard) ------------------------------------


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _ModelActor:
    """Loads the stage-2 network once; subclasses process whole shards."""

    def __init__(self, checkpoint: str, model_kwargs: dict[str, Any], short_side: int, torch_threads: int) -> None:
        import torch

        from lussray.models.checkpoints import load_pretrained
        from lussray.models.pass_model import PASSModel

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = PASSModel(**model_kwargs, pixel_attention=True)
        report = load_pretrained(model, checkpoint)
        if any(key.startswith("pixel_attention.") for key in report.missing):
            raise UserError(f"{checkpoint} holds no pixel attention: pass a `lussray attention` checkpoint")
        self.model = model.eval().to(self.device)
        self.short_side = short_side
        self.ready_at = time.time()  # the end of this actor's start-up (wall clock, for the pool's figures)

    def _normalize(self, images: np.ndarray):
        import torch

        from lussray.data.augment import IMAGENET_MEAN, IMAGENET_STD
        from lussray.stages.pretrain import normalize_views

        return normalize_views(torch.from_numpy(images).to(self.device), IMAGENET_MEAN, IMAGENET_STD)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [self.process({name: batch[name][i] for name in batch}) for i in range(len(batch["shard"]))]
        for row in rows:
            row["peak_rss_mb"] = peak_rss_mb()
        return {name: [row[name] for row in rows] for name in rows[0]}

    def process(self, job: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class EmbedShards(_ModelActor):
    """Step 1: one parquet of ``(key, embedding)`` per training shard.

    A thread reads the tar, decodes, resizes, crops and stacks the next batches
    (:data:`PREFETCH_BATCHES` ahead) while the model embeds the current one, so the forward pass
    does not wait for the input. Each result row carries where the actor's time went
    (``forward_s``, ``input_wait_s``, ``decode_s`` in the thread, ``write_s``) and the wall-clock
    start and end of the shard and of the actor's start-up (``ready_at``), which the driver turns
    into the pool's start-up and steady-state rate (:class:`PoolStats`).
    """

    def __init__(self, *args, crop_size: int, batch_size: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.crop_size, self.batch_size = crop_size, batch_size

    def _batches(self, shard: str, timing: dict[str, float]) -> Iterator[tuple[list[str], np.ndarray]]:
        """``(keys, crops)`` of up to ``batch_size`` images: Resize + CenterCrop, uint8 (B, S, S, 3)."""
        from lussray.data.augment import center_crop, decode_image, resize_shorter_side
        from lussray.data.shards import iter_tar

        keys, crops = [], []
        started = time.perf_counter()
        for key, members in iter_tar(shard):
            keys.append(key)
            crops.append(center_crop(resize_shorter_side(decode_image(members["jpg"]), self.short_side),
                                     self.crop_size))
            if len(keys) == self.batch_size:
                timing["decode_s"] += time.perf_counter() - started
                yield keys, np.stack(crops)
                keys, crops = [], []
                started = time.perf_counter()
        if keys:
            timing["decode_s"] += time.perf_counter() - started
            yield keys, np.stack(crops)

    def process(self, job: dict[str, Any]) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch

        began, started = time.time(), time.perf_counter()
        timing = {"decode_s": 0.0, "forward_s": 0.0, "input_wait_s": 0.0}
        keys, chunks = [], []
        with contextlib.closing(prefetched(self._batches(str(job["shard"]), timing), PREFETCH_BATCHES)) as batches:
            while True:
                waited = time.perf_counter()
                batch = next(batches, None)
                timing["input_wait_s"] += time.perf_counter() - waited
                if batch is None:
                    break
                computed = time.perf_counter()
                with torch.inference_mode():
                    chunks.append(self.model.cluster_embedding(self._normalize(batch[1])).float().cpu().numpy())
                timing["forward_s"] += time.perf_counter() - computed
                keys.extend(batch[0])
        written = time.perf_counter()
        embeddings = np.concatenate(chunks).astype(np.float32)
        table = pa.table({"key": pa.array(keys, pa.string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel()),
                                                                         embeddings.shape[1])})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        storage.write_bytes_atomic(str(job["out"]), buffer.getvalue())
        return {"shard": str(job["shard"]), "num_images": len(keys), "seconds": time.perf_counter() - started,
                **timing, "write_s": time.perf_counter() - written, "began": began, "ended": time.time(),
                "ready_at": self.ready_at, "pid": os.getpid()}


def prefetched(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """``items`` produced by a background thread up to ``depth`` ahead of the consumer.

    The producer's work (reading, decoding, resizing: PIL and numpy release the GIL) overlaps
    the consumer's (the forward pass). An error of the producer is raised in the consumer; a
    consumer that stops early (an error, ``close()``) stops the producer.
    """
    import queue
    import threading

    slots: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop, end = threading.Event(), object()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(end)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            offer(_Failed(error))
        finally:
            getattr(items, "close", lambda: None)()  # a generator's open tar, in the thread that iterated it

    thread = threading.Thread(target=produce, name="lussray-prefetch", daemon=True)
    thread.start()
    try:
        while (item := slots.get()) is not end:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class LabelShards(_ModelActor):
    """Steps 3-4: pixel labels of whole shards.

    ``mode == "write"``: a pseudo-label shard (image bytes + label PNG) and its ``.done.json``.
    ``mode == "stats"``: the evaluator's per-image statistics against the shard's ground truth at
    the thresholds ``taus`` (pickled, for the driver's :class:`~lussray.eval.sweep.TauSweep`).

    Images are decoded in a prefetch thread and labelled in batches of up to ``batch_size`` images
    and ``max_batch_pixels`` input pixels; images of one input shape share a forward pass.
    """

    def __init__(self, *args, centroids: np.ndarray, tau: float, num_classes: int, score_scale: str = "absolute",
                 taus: list[float] | None = None, png_root: str | None = None, batch_size: int = 1,
                 max_batch_pixels: int | None = None, **kwargs) -> None:
        import torch

        super().__init__(*args, **kwargs)
        self.centroids = torch.tensor(np.asarray(centroids, np.float32), device=self.device)
        self.tau, self.num_classes, self.taus, self.png_root = tau, num_classes, taus, png_root
        self.score_scale = score_scale
        self.batch_size, self.max_batch_pixels = batch_size, max_batch_pixels

    def pixel_maps(self, jpeg: bytes) -> tuple[np.ndarray, np.ndarray]:
        """Cluster ids (1..K) and foreground scores at the image's own resolution."""
        from lussray.data.augment import decode_image

        return self.pixel_maps_batch([decode_image(jpeg)])[0]

    def pixel_maps_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`pixel_maps` of decoded uint8 (H, W, 3) images; one forward pass per input shape."""
        import torch

        from lussray.clustering.pixel_labels import assign_pixels, foreground_scores
        from lussray.data.augment import resize_shorter_side

        inputs = [resize_shorter_side(image, self.short_side) for image in images]
        groups: dict[tuple, list[int]] = {}
        for i, (image, resized) in enumerate(zip(images, inputs)):
            groups.setdefault((resized.shape, image.shape[:2]), []).append(i)
        out: list[tuple[np.ndarray, np.ndarray]] = [None] * len(images)  # type: ignore[list-item]
        for (_, size), members in groups.items():
            with torch.inference_mode():
                features, attention = self.model.attention_maps(self._normalize(np.stack([inputs[i] for i in members])))
                ids = assign_pixels(features, self.centroids, size).cpu().numpy()
                scores = foreground_scores(attention, size, self.score_scale).cpu().numpy()
            for row, i in enumerate(members):
                out[i] = (ids[row], scores[row])
        return out

    def _labelled(self, shard: str, wanted=lambda members: True) -> Iterator[tuple[str, dict, np.ndarray, np.ndarray]]:
        """``(key, members, ids, scores)`` of the shard's samples that are ``wanted``, in shard order."""
        for batch in prefetched(self._decoded(shard, wanted), PREFETCH_BATCHES):
            maps = self.pixel_maps_batch([image for _, _, image in batch])
            for (key, members, _), (ids, scores) in zip(batch, maps):
                yield key, members, ids, scores

    def _decoded(self, shard: str, wanted) -> Iterator[list[tuple[str, dict, np.ndarray]]]:
        """Batches of ``(key, members, image)``, bounded in images and in pixels."""
        from lussray.data.augment import decode_image
        from lussray.data.shards import iter_tar

        batch, pixels = [], 0
        for key, members in iter_tar(shard):
            if not wanted(members):
                continue
            image = decode_image(members["jpg"])
            batch.append((key, members, image))
            pixels += image.shape[0] * image.shape[1]
            if len(batch) >= self.batch_size or (self.max_batch_pixels and pixels >= self.max_batch_pixels):
                yield batch
                batch, pixels = [], 0
        if batch:
            yield batch

    def process(self, job: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        result = self._stats(job) if job["mode"] == "stats" else self._write(job)
        return {"shard": str(job["shard"]), **result, "seconds": time.perf_counter() - started}

    def _stats(self, job: dict[str, Any]) -> dict[str, Any]:
        from lussray.data.imagenet_s import label_from_png_bytes
        from lussray.eval.stats import image_stats

        stats = []
        for key, members, ids, scores in self._labelled(str(job["shard"]), lambda members: "seg.png" in members):
            stats.append(image_stats(ids, label_from_png_bytes(members["seg.png"]), self.num_classes,
                                     scores=scores, taus=np.asarray(self.taus), key=key))
        return {"num_images": len(stats), "stats": pickle.dumps(stats)}

    def _write(self, job: dict[str, Any]) -> dict[str, Any]:
        from lussray.clustering.pixel_labels import apply_threshold, label_histogram
        from lussray.data.imagenet_s import label_to_png_bytes
        from lussray.data.shards import write_tar

        num_clusters = self.centroids.shape[0]
        histogram = np.zeros(num_clusters + 1, np.int64)

        def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
            for key, members, ids, scores in self._labelled(str(job["shard"])):
                labels = apply_threshold(ids, scores, self.tau)
                histogram[:] += label_histogram(labels, num_clusters)
                png = label_to_png_bytes(labels)
                if self.png_root:
                    storage.write_bytes_atomic(storage.join_under(self.png_root, f"{key}.png"), png)
                yield key, {"jpg": members["jpg"], "seg.png": png, **({"json": members["json"]} if "json" in members else {})}

        out = str(job["out"])
        record = {"name": os.path.basename(out), **write_tar(samples(), out), "histogram": histogram.tolist()}
        storage.write_json_atomic(out + DONE, record)
        return {"num_images": record["num_samples"], "stats": b""}


# -- driver -------------------------------------------------------------------------------------


@dataclass
class Timings:
    """Seconds per step, the peak memory seen in the driver and the actors, the pools' figures."""

    seconds: dict[str, float]
    peak_actor_rss_mb: float = 0.0
    pools: dict[str, dict[str, Any]] = field(default_factory=dict)
    driver_rss_mb: dict[str, float] = field(default_factory=dict)  # the driver's peak by the end of each step
    actor_rss_mb: dict[str, float] = field(default_factory=dict)  # the actors' peak per pool pass

    def step(self, name: str, started: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - started, 2)
        self.driver_rss_mb[name] = round(peak_rss_mb(), 1)

    def actor_peak(self, what: str, rss_mb: float) -> None:
        self.peak_actor_rss_mb = max(self.peak_actor_rss_mb, rss_mb)
        self.actor_rss_mb[what] = round(max(self.actor_rss_mb.get(what, 0.0), rss_mb), 1)


TIMINGS = Timings({})


def map_shards(jobs: list[dict[str, Any]], actor: type, actor_kwargs: dict[str, Any], config: LussConfig,
               what: str, *, pool: Any = None, stage: str = STAGE) -> Iterator[dict[str, Any]]:
    """Run ``actor`` over ``jobs`` (one row per shard) on an autoscaling actor pool; yield results.

    Args:
        pool: the config section sizing the pool (``actor_pool_min``/``max``, ``cpus_per_actor``,
            ``gpus_per_actor``); default ``config.labelgen``.
        stage: the log prefix and the pool section's key in messages (``knn`` with ``pool=config.knn``).

    Raises:
        UserError: the cluster cannot hold the pool (``<stage>.actor_pool_min``, ``cpus_per_actor``,
            ``gpus_per_actor``), or an actor failed: one line naming its shard or checkpoint.
    """
    import ray.data

    from lussray.stages import ray_cluster

    if not jobs:
        return
    cfg = pool if pool is not None else config.labelgen
    ray_cluster.require(ray_cluster.pool_demand(stage, cfg, f"{stage} {what} actors"), ray_cluster.current_config())
    guarded = {"factory": actor, "factory_kwargs": actor_kwargs, "unit_column": "shard",
               "label": str(actor_kwargs.get("checkpoint") or actor.__name__)}
    dataset = ray.data.from_items(jobs, override_num_blocks=len(jobs)).map_batches(
        ray_cluster.Guarded,
        fn_constructor_kwargs=guarded,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=cfg.actor_pool_min, max_size=cfg.actor_pool_max),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor,
    )
    started, images = time.perf_counter(), 0
    for done, row in enumerate(ray_cluster.checked(dataset.iter_rows(), f"[{stage}] {what}"), start=1):
        images += int(row["num_images"])
        TIMINGS.actor_peak(what, float(row["peak_rss_mb"]))
        elapsed = time.perf_counter() - started
        print(f"[{stage}] {what}: shard {done}/{len(jobs)} {os.path.basename(str(row['shard']))} "
              f"({images} images, {images / max(elapsed, 1e-9):.1f} img/s, "
              f"ETA {elapsed / done * (len(jobs) - done):.0f} s)", flush=True)
        yield row


class PoolStats:
    """Start-up and steady-state figures of one pass of the embedding pool, from its result rows.

    Kept per actor (a handful of numbers each, whatever the number of shards or images):

    - ``ready_s``: from the start of the pass until the last actor had loaded its model
      (process start, imports, model load); ``startup_s``: until the last actor began its first
      shard (Ray Data's first dispatch too);
    - ``steady_images_per_s``: the sum over actors of images / (end of its last shard - start of
      its first), i.e. the rate once every actor works;
    - ``shares``: where the actors' steady-state time went (forward pass, waiting for input,
      writing parquet, the rest: Ray's hand-over between shards and batch assembly), and
      ``decode_share``, the input preparation that ran in the prefetch thread beside the forward.
    """

    FIELDS = ("num_images", "forward_s", "input_wait_s", "write_s", "decode_s")

    def __init__(self) -> None:
        self.started = time.time()
        self.actors: dict[int, dict[str, float]] = {}

    def add(self, row: dict[str, Any]) -> None:
        """Account one result row of :class:`EmbedShards`."""
        actor = self.actors.setdefault(int(row["pid"]), {"began": math.inf, "ended": 0.0,
                                                          "ready_at": float(row["ready_at"]),
                                                          **{name: 0.0 for name in self.FIELDS}})
        actor["began"] = min(actor["began"], float(row["began"]))
        actor["ended"] = max(actor["ended"], float(row["ended"]))
        for name in self.FIELDS:
            actor[name] += float(row[name])

    def summary(self) -> dict[str, Any]:
        """The figures (see the class doc); empty when no shard was processed."""
        if not self.actors:
            return {}
        actors = list(self.actors.values())
        windows = [max(a["ended"] - a["began"], 1e-9) for a in actors]
        window = sum(windows)
        shares = {name.removesuffix("_s"): sum(a[name] for a in actors) / window
                  for name in ("forward_s", "input_wait_s", "write_s")}
        shares["other"] = 1.0 - sum(shares.values())
        return {"actors": len(actors), "images": int(sum(a["num_images"] for a in actors)),
                "ready_s": round(max(a["ready_at"] for a in actors) - self.started, 2),
                "startup_s": round(max(a["began"] for a in actors) - self.started, 2),
                "seconds": round(max(a["ended"] for a in actors) - self.started, 2),
                "steady_images_per_s": round(sum(a["num_images"] / w for a, w in zip(actors, windows)), 1),
                "shares": {name: round(value, 4) for name, value in shares.items()},
                "decode_share": round(sum(a["decode_s"] for a in actors) / window, 4)}


def model_args(config: LussConfig, checkpoint: str) -> tuple[str, dict[str, Any], int, int]:
    """The positional arguments of the actors' constructor (checkpoint, model shape, input size, threads)."""
    pre = config.pretrain
    model_kwargs = {"arch": pre.arch, "hidden_dim": pre.hidden_mlp, "feat_dim": pre.feat_dim,
                    "num_prototypes": pre.num_prototypes, "shallow_stages": []}
    return checkpoint, model_kwargs, config.ingest.eval_short_side, config.labelgen.torch_threads


def pixel_labeler(config: LussConfig, run: str) -> LabelShards:
    """The finished labelgen run's labeller in this process (model, centroids, tau), e.g. for the report.

    Raises:
        UserError: if ``<run>/labelgen`` is not complete.
    """
    outputs = Outputs(storage.join(run, STAGE))
    if not storage.exists(outputs.summary):
        raise UserError(f"label generation in {outputs.root} is not complete: run `lussray labelgen` first")
    summary = storage.read_json(outputs.summary)
    centroids = np.load(io.BytesIO(storage.read_bytes(outputs.centroids)))
    return LabelShards(*model_args(config, summary["checkpoint"]), centroids=centroids, tau=float(summary["tau"]),
                       num_classes=config.dataset.num_classes,
                       score_scale=summary.get("score_scale", "absolute"))


def attention_checkpoint(run: str, given: str | None) -> str:
    """``--checkpoint`` if given, else the latest ``<run>/attention`` checkpoint."""
    from lussray.stages.loop import given_or_latest

    return given_or_latest(given, "--checkpoint", run, ATTENTION_STAGE, "pixel-attention", "lussray attention")


def fingerprint(config: LussConfig, data: str, run: str, checkpoint: str, tau: float | None) -> dict[str, Any]:
    """What determines ``<run>/labelgen`` (:mod:`lussray.completion`).

    The stage-2 model's shape, the ``labelgen`` settings with the effective K and tau (``--tau``
    or ``labelgen.tau``; the sweep's settings only when tau is swept), ``ingest.eval_short_side``,
    N, the manifests of every split it reads, and the pixel-attention checkpoint.
    """
    cfg = config.labelgen
    model = (f"pretrain.{key}" for key in ("arch", "hidden_mlp", "feat_dim", "num_prototypes"))
    parts = config_fingerprint(config, *model, "labelgen", "ingest.eval_short_side", "dataset.num_classes", "seed")
    parts["labelgen"].update(tau=tau, num_clusters=cfg.num_clusters or config.dataset.num_classes)
    if tau is not None:  # a fixed tau: no sweep
        for key in ("tau_split", "tau_min", "tau_max", "tau_step"):
            parts["labelgen"].pop(key)
    splits = ["train", *EVALUATED_SPLITS, *([cfg.tau_split] if tau is None else [])]
    return {"format": FORMAT_VERSION, **parts, "data": data_fingerprint(data, splits),
            "checkpoint": checkpoint_fingerprint(checkpoint, run)}


def embed(config: LussConfig, data: str, outputs: Outputs, actor_args: tuple) -> list[str]:
    """Step 1; returns the embedding files of all training shards."""
    shards = shard_paths(data, "train")
    files = [outputs.embedding_file(os.path.basename(path)) for path in shards]
    jobs = [{"shard": shard, "out": out} for shard, out in zip(shards, files) if not storage.exists(out)]
    if len(jobs) < len(shards):
        print(f"[{STAGE}] embed: {len(shards) - len(jobs)} of {len(shards)} shards already embedded", flush=True)
    kwargs = dict(zip(("checkpoint", "model_kwargs", "short_side", "torch_threads"), actor_args),
                  crop_size=config.labelgen.crop_size, batch_size=config.labelgen.batch_size)
    pool = PoolStats()
    for row in map_shards(jobs, EmbedShards, kwargs, config, "embed"):
        pool.add(row)
    if pool.actors:
        TIMINGS.pools["embed"] = figures = pool.summary()
        print(f"[{STAGE}] embed: {figures['actors']} actors started in {figures['startup_s']:.1f} s, then "
              f"{figures['steady_images_per_s']:.1f} img/s (forward {100 * figures['shares']['forward']:.0f}% "
              f"of their time)", flush=True)
    return files


def cluster(config: LussConfig, files: list[str], outputs: Outputs, num_clusters: int) -> np.ndarray:
    """Step 2: sharded k-means (skipped when ``centroids.npy`` exists)."""
    if storage.exists(outputs.centroids):
        print(f"[{STAGE}] kmeans: done before, {outputs.centroids}", flush=True)
        return np.load(io.BytesIO(storage.read_bytes(outputs.centroids)))
    from lussray.clustering.kmeans import sharded_kmeans

    cfg = config.labelgen
    result = sharded_kmeans(files, num_clusters, num_actors=cfg.kmeans_actors, niter=cfg.kmeans_iterations,
                            nredo=cfg.kmeans_redo, seed=derived_seed(config.seed, STAGE, "kmeans"),
                            spherical=cfg.spherical, normalize_rows=True, gpus_per_actor=cfg.gpus_per_actor,
                            cpus_per_actor=cfg.kmeans_cpus_per_actor)
    buffer = io.BytesIO()
    np.save(buffer, result.centroids.astype(np.float32))
    storage.write_json_atomic(outputs.kmeans, {
        "num_clusters": num_clusters, "num_points": result.num_points, "dim": result.dim,
        "objective": result.objective, "iteration_objectives": result.iteration_objectives,
        "seconds": result.seconds, "actors": cfg.kmeans_actors, "redo": cfg.kmeans_redo,
        "peak_rss_mb_per_actor": result.peak_rss_mb_per_actor, "rebuilds": result.rebuilds})
    storage.write_bytes_atomic(outputs.centroids, buffer.getvalue())
    print(f"[{STAGE}] kmeans: K={num_clusters} over {result.num_points} images, objective {result.objective:.4g}, "
          f"{result.seconds:.1f} s", flush=True)
    return result.centroids


def sweep_metrics(config: LussConfig, data: str, split: str, label_kwargs: dict[str, Any], taus: list[float]):
    """Evaluator statistics of the pixel labels of ``split`` at ``taus`` (a SweepResult)."""
    from lussray.eval.sweep import TauSweep

    sweep = TauSweep(config.dataset.num_classes, taus)
    jobs = [{"shard": shard, "out": "", "mode": "stats"} for shard in shard_paths(data, split)]
    for row in map_shards(jobs, LabelShards, {**label_kwargs, "taus": taus}, config, f"{split} statistics"):
        for stats in pickle.loads(row["stats"]):
            sweep.add(stats)
    return sweep.result()


def choose_tau(config: LussConfig, data: str, outputs: Outputs, label_kwargs: dict[str, Any],
               fixed: float | None) -> float:
    """Step 3: a fixed tau, or the best of the ``labelgen.tau_split`` sweep (recorded in ``tau.json``)."""
    if fixed is not None:
        if storage.exists(outputs.tau) and storage.read_json(outputs.tau)["tau"] != fixed:
            raise UserError(f"{outputs.tau} records another tau; use a new --run folder to relabel")
        storage.write_json_atomic(outputs.tau, {"tau": fixed, "source": "fixed"})
        return fixed
    if storage.exists(outputs.tau):
        return float(storage.read_json(outputs.tau)["tau"])
    cfg = config.labelgen
    split = cfg.tau_split
    count = int(np.floor((cfg.tau_max - cfg.tau_min) / cfg.tau_step + 1e-6)) + 1  # none beyond tau_max
    taus = [round(cfg.tau_min + i * cfg.tau_step, 4) for i in range(count)]
    result = sweep_metrics(config, data, split, label_kwargs, taus)
    storage.write_json_atomic(outputs.tau, {"tau": result.best_tau, "source": f"{split} sweep", "split": split,
                                            "best": result.best.summary(), "curve": result.curve()})
    print(f"[{STAGE}] tau: {result.best_tau:.2f} ({split} mIoU {result.best.miou:.2f} "
          f"over {len(taus)} thresholds)", flush=True)
    return result.best_tau


def labelled_split_metrics(config: LussConfig, data: str, outputs: Outputs, label_kwargs: dict[str, Any],
                           tau: float) -> dict[str, dict[str, Any]]:
    """The pseudo labels' metrics at ``tau`` on validation and train-semi, where they have ground truth.

    The sweep already scored its own split at the chosen tau, so that split is read from ``tau.json``.
    """
    swept = storage.read_json(outputs.tau)
    metrics = {}
    for split in EVALUATED_SPLITS:
        if swept.get("split") == split:
            metrics[split] = swept["best"]
        elif _has_ground_truth(data, split):
            metrics[split] = sweep_metrics(config, data, split, label_kwargs, [tau]).best.summary()
    return metrics


def write_pseudo_labels(config: LussConfig, data: str, outputs: Outputs, label_kwargs: dict[str, Any],
                        num_clusters: int) -> dict[str, Any]:
    """Step 4: the pseudo-label shards and their manifest (skipping shards already written)."""
    out_dir = storage.join(outputs.pseudo, "train")
    manifest_path = storage.join(out_dir, MANIFEST)
    if storage.exists(manifest_path):
        print(f"[{STAGE}] pseudo labels: complete, {manifest_path}", flush=True)
        return storage.read_json(manifest_path)
    shards = shard_paths(data, "train")
    records: dict[str, dict[str, Any]] = {}
    jobs = []
    for shard in shards:
        out = storage.join(out_dir, os.path.basename(shard))
        if storage.exists(out + DONE) and storage.file_size(out) == storage.read_json(out + DONE)["bytes"]:
            records[out] = storage.read_json(out + DONE)
        else:
            jobs.append({"shard": shard, "out": out, "mode": "write"})
    if records:
        print(f"[{STAGE}] pseudo labels: resuming, {len(records)} of {len(shards)} shards already written", flush=True)
    for row in map_shards(jobs, LabelShards, label_kwargs, config, "pseudo labels"):
        out = storage.join(out_dir, os.path.basename(str(row["shard"])))
        records[out] = storage.read_json(out + DONE)
    ordered = [records[storage.join(out_dir, os.path.basename(shard))] for shard in shards]
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": "lussray labelgen",
        "source": data,
        "split": "train",
        "num_classes": num_clusters,
        "num_samples": sum(record["num_samples"] for record in ordered),
        "num_shards": len(ordered),
        "has_segmentation": True,
        "shards": [{key: record[key] for key in SHARD_ENTRY_KEYS if key in record} for record in ordered],
        "histogram": np.sum([record["histogram"] for record in ordered], axis=0).tolist(),
        "skipped": [],
    }
    storage.write_json_atomic(manifest_path, manifest)
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lussray labelgen``."""
    parser.add_argument("--checkpoint", help="pixel-attention checkpoint (default: the latest under <run>/attention)")
    parser.add_argument("--tau", type=flag_type(LabelgenConfig, "tau"),
                        help="fixed 'other' threshold in [0, 1] (default: labelgen.tau, else a sweep)")


def generate(config: LussConfig, data: str, run: str, *, checkpoint: str | None = None, tau: float | None = None,
             overwrite: bool = False) -> dict[str, Any]:
    """Generate the pseudo labels of ``data`` into ``<run>/labelgen`` (skipping what a run of the same inputs did).

    Args:
        config: the resolved config (``labelgen``, ``ingest``, ``dataset``, ``pretrain`` for the model, ``ray``).
        data: shards folder (absolute path or URI).
        run: run folder (absolute path or URI).
        checkpoint: the pixel-attention checkpoint (default: the latest under ``<run>/attention``).
        tau: a fixed "other" threshold (default ``labelgen.tau``, else a sweep on ``labelgen.tau_split``).
        overwrite: redo the stage when its folder holds outputs of other inputs.

    Returns:
        The stage summary (``<run>/labelgen/summary.json``).
    """
    from lussray.clustering.pixel_labels import SCORE_SCALES
    from lussray.data.ingest import init_ray

    outputs = Outputs(storage.join(run, STAGE))
    checkpoint = attention_checkpoint(run, checkpoint)
    cfg = config.labelgen
    num_clusters = cfg.num_clusters or config.dataset.num_classes
    tau = tau if tau is not None else cfg.tau
    if tau is None and num_clusters != config.dataset.num_classes:
        raise UserError(f"the tau sweep needs K = num_classes ({num_clusters} != {config.dataset.num_classes}): "
                        f"set labelgen.tau")
    if cfg.score_scale not in SCORE_SCALES:
        raise UserError(f"labelgen.score_scale: {cfg.score_scale!r} is not one of {', '.join(SCORE_SCALES)}")
    record = StageRecord(outputs.root, fingerprint(config, data, run, checkpoint, tau), STAGE)
    record.check(overwrite)  # before summary.json: a complete folder of other inputs is not complete
    if storage.exists(outputs.summary):
        print(f"[{STAGE}] complete: {outputs.summary}", flush=True)
        return storage.read_json(outputs.summary)
    if tau is None and not _has_ground_truth(data, cfg.tau_split):
        raise UserError(f"labelgen.tau_split: the {cfg.tau_split!r} split of {data} has no ground truth to sweep "
                        f"tau on: choose a split with ground truth (validation, train-semi) or set labelgen.tau")
    storage.makedirs(outputs.root)
    init_ray(config.ray)
    with record.recording(produced=lambda: has_files(outputs.embeddings, ".parquet")):
        _generate(config, data, outputs, checkpoint, num_clusters, tau)
    return storage.read_json(outputs.summary)


def run(args: argparse.Namespace, config: LussConfig) -> int:
    """``lussray labelgen``: :func:`generate` for ``--data`` into ``--run``."""
    if not args.data or not args.run:
        raise UserError("--data DIR (shards of `lussray prepare`) and --run DIR are required")
    generate(config, storage.absolute(args.data), storage.absolute(args.run),
             checkpoint=storage.absolute(args.checkpoint) if args.checkpoint else None, tau=args.tau,
             overwrite=args.overwrite)
    return 0


def _generate(config: LussConfig, data: str, outputs: Outputs, checkpoint: str, num_clusters: int,
              tau: float | None) -> None:
    """Steps 1-5 (each skipping what an earlier run of the same inputs completed)."""
    cfg = config.labelgen
    started = time.perf_counter()
    actor_args = model_args(config, checkpoint)
    step_started = time.perf_counter()
    files = embed(config, data, outputs, actor_args)
    TIMINGS.step("embed", step_started)
    step_started = time.perf_counter()
    centroids = cluster(config, files, outputs, num_clusters)
    TIMINGS.step("kmeans", step_started)
    label_kwargs = {**dict(zip(("checkpoint", "model_kwargs", "short_side", "torch_threads"), actor_args)),
                    "centroids": centroids, "tau": 0.0, "num_classes": config.dataset.num_classes,
                    "score_scale": cfg.score_scale, "batch_size": cfg.batch_size,
                    "max_batch_pixels": cfg.batch_size * cfg.crop_size ** 2}  # an embedding batch's input pixels
    step_started = time.perf_counter()
    tau = choose_tau(config, data, outputs, label_kwargs, tau)
    TIMINGS.step("tau", step_started)
    label_kwargs["tau"] = tau
    if cfg.write_png_tree:
        label_kwargs["png_root"] = outputs.png_tree
    step_started = time.perf_counter()
    manifest = write_pseudo_labels(config, data, outputs, label_kwargs, num_clusters)
    TIMINGS.step("pseudo_labels", step_started)
    summary = {"images": manifest["num_samples"], "num_clusters": num_clusters, "tau": tau,
               "score_scale": cfg.score_scale,
               "histogram": manifest["histogram"], "checkpoint": checkpoint}
    step_started = time.perf_counter()
    summary["metrics"] = labelled_split_metrics(config, data, outputs, label_kwargs, tau)
    TIMINGS.step("metrics", step_started)
    summary.update({"seconds": round(time.perf_counter() - started, 1), "step_seconds": TIMINGS.seconds,
                    "peak_rss_mb": {"driver": round(peak_rss_mb(), 1),
                                    "actor": round(TIMINGS.peak_actor_rss_mb, 1),
                                    "driver_by_step": TIMINGS.driver_rss_mb, "actor_by_pass": TIMINGS.actor_rss_mb},
                    "pools": TIMINGS.pools})
    storage.write_json_atomic(outputs.summary, summary)
    _print_summary(summary, outputs)


def _has_ground_truth(data: str, split: str) -> bool:
    try:
        return bool(read_manifest(data, split).get("has_segmentation"))
    except UserError:
        return False


def _print_summary(summary: dict[str, Any], outputs: Outputs) -> None:
    histogram = np.asarray(summary["histogram"], np.float64)
    shares = ", ".join(f"{i}: {100 * v / max(histogram.sum(), 1):.1f}%" for i, v in enumerate(histogram))
    print(f"[{STAGE}] done: {summary['images']} images, K={summary['num_clusters']}, tau={summary['tau']:.2f}, "
          f"{summary['seconds']:.0f} s", flush=True)
    print(f"[{STAGE}] pixel share per id (0 = other): {shares}", flush=True)
    for split, metrics in summary["metrics"].items():
        print(f"[{STAGE}] pseudo labels on {split} at tau={summary['tau']:.2f}: {json.dumps(metrics)}", flush=True)
    print(f"[{STAGE}] pseudo-label shards: {outputs.pseudo} (stream with split 'train')", flush=True)
