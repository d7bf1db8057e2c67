"""``lussray knn``: STEGO's KNN pairs as a stage of its own (image-level features, sharded top-k search).

    lussray knn --dataset synthetic-scenes --data scenes/shards --run runs/stego
    lussray knn --dataset cocostuff27 --data s3://b/coco-shards --run s3://b/runs/stego --featurizer dino_vitbase8_pretrain.pth

STEGO trains its head on pairs of an image and one of its nearest neighbours by a global feature
(seed-methods.md 2.3; the reference's ``precompute_knns.py``). This stage writes them under
``<run>/knn`` (layout: :class:`lussray.data.partners.KnnFiles`):

1. ``features/<shard>.parquet``: the image-level feature of every training item, i.e. of every
   image or, with ``knn.crop_type: five`` (the default, as STEGO's five-crop training data), of each
   of its five crops: the L2-normalised spatial mean of the frozen featurizer's patch features of
   the item at Resize(``knn.res``) + CenterCrop(``knn.res``) (the reference's 224), one file per
   input shard, by an actor pool over the shards (``labelgen.map_shards``, the featurizer loaded
   once per actor; sized by ``knn.actor_pool_*``, ``cpus_per_actor``, ``gpus_per_actor``). The
   file also records where each image's JPEG lies in its tar, so a partner can be read by offset.
2. ``items.parquet``: every item in the global order with its shard, offset and size.
3. ``neighbours/<shard>.parquet`` beside each shard: the top-``knn.k`` neighbours (k = 30 with
   the item itself, cosine of the features) of every item, best first; found by
   ``knn.search_actors`` faiss actors that each hold only their part of the features
   (:func:`lussray.clustering.knn_search.sharded_top_k`): the driver sends blocks of
   ``knn.query_block_size`` queries to all of them and merges their top-k lists, so no process
   holds the feature matrix.
4. ``summary.json`` (written last): counts, crop settings, the featurizer, seconds, peak memory.

The featurizer is ``--featurizer FILE`` (a DINO ViT-S/8 or ViT-B/8 checkpoint) or, without one,
the run's PASS stage-1 ResNet (:mod:`lussray.stages.featurizer`). ``inputs.json`` records the
inputs (featurizer checkpoint, data manifest, the ``knn`` settings that change the result): a
rerun with the same inputs returns at once or continues (finished feature and neighbour files are
kept), one with other inputs is refused (``--overwrite`` redoes the stage).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from typing import Any

import numpy as np

from lussray import storage
from lussray.completion import FORMAT_VERSION, StageRecord, config_fingerprint, data_fingerprint, has_files
from lussray.config import LussConfig
from lussray.data.partners import KnnFiles, list_matrix, write_parquet
from lussray.data.shards import shard_paths
from lussray.errors import UserError
from lussray.stages.featurizer import FeaturizerSpec

STAGE = "knn"
SPLIT = "train"
#: ``knn`` keys that only choose how the search runs, not its result.
SEARCH_KEYS = ("search_actors", "query_block_size", "blocks_in_flight", "search_gpus_per_actor")


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class FeaturizeShards:
    """The actor of step 1: one features parquet per training shard (the featurizer loaded once).

    Args:
        spec: the frozen featurizer.
        crop_type: ``five`` or ``none``.
        crop_ratio: five-crop size over the image size.
        res: item side.
        batch_size: items per forward pass.
        torch_threads: intra-op threads (0: torch's default).
    """

    def __init__(self, spec: FeaturizerSpec, crop_type: str, crop_ratio: float, res: int, batch_size: int,
                 torch_threads: int = 0) -> None:
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.featurizer = spec.build()[0].to(self.device)
        self.crop_type, self.crop_ratio, self.res, self.batch_size = crop_type, crop_ratio, res, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [self.process({name: batch[name][i] for name in batch}) for i in range(len(batch["shard"]))]
        return {name: [row[name] for row in rows] for name in rows[0]}

    def embed(self, views: list[np.ndarray]) -> np.ndarray:
        """L2-normalised spatial means of the featurizer's features of uint8 views: (n, C) float32."""
        import torch
        import torch.nn.functional as F

        from lussray.stages.featurizer import to_input

        with torch.inference_mode():
            features = self.featurizer(to_input(np.stack(views), self.device), attention=False).features
            return F.normalize(features.float().mean(dim=(2, 3)), dim=1).cpu().numpy()

    def process(self, job: dict[str, Any]) -> dict[str, Any]:
        import pyarrow as pa

        from lussray.data.partners import jpg_member_offsets
        from lussray.data.scene_views import image_items
        from lussray.data.shards import iter_tar

        started = time.perf_counter()
        shard = str(job["shard"])
        offsets = jpg_member_offsets(shard)
        keys, crops, chunks, pending, images = [], [], [], [], 0
        for key, members in iter_tar(shard):
            images += 1
            for crop, view in enumerate(image_items(members["jpg"], self.crop_type, self.crop_ratio, self.res)):
                keys.append(key)
                crops.append(crop)
                pending.append(view)
            if len(pending) >= self.batch_size:
                chunks.append(self.embed(pending))
                pending = []
        if pending:
            chunks.append(self.embed(pending))
        embeddings = np.concatenate(chunks).astype(np.float32)
        table = pa.table({
            "key": pa.array(keys, pa.string()), "crop": pa.array(crops, pa.int32()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel()), embeddings.shape[1]),
            "offset": pa.array([offsets[key][0] for key in keys], pa.int64()),
            "size": pa.array([offsets[key][1] for key in keys], pa.int64())})
        write_parquet(str(job["out"]), table)
        return {"shard": shard, "num_images": images, "num_items": len(keys),
                "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


def fingerprint(config: LussConfig, data: str, run: str, spec: FeaturizerSpec) -> dict[str, Any]:
    """What determines ``<run>/knn``: the ``knn`` settings of the result, the featurizer, the train manifest."""
    parts = config_fingerprint(config, STAGE)
    for key in SEARCH_KEYS:
        parts[STAGE].pop(key, None)
    return {"format": FORMAT_VERSION, **parts, "featurizer": spec.fingerprint(run),
            "data": data_fingerprint(data, [SPLIT])}


def featurize(config: LussConfig, data: str, files: KnnFiles, spec: FeaturizerSpec) -> tuple[list[str], list[str], float]:
    """Step 1: the features of every shard not done before; returns shard names, their files, the actors' peak MB."""
    from lussray.stages.labelgen import map_shards

    cfg = config.knn
    shards = shard_paths(data, SPLIT)
    names = [os.path.basename(path) for path in shards]
    outs = [files.feature_file(name) for name in names]
    jobs = [{"shard": shard, "out": out} for shard, out in zip(shards, outs) if not storage.exists(out)]
    if len(jobs) < len(shards):
        print(f"[{STAGE}] features: {len(shards) - len(jobs)} of {len(shards)} shards done before", flush=True)
    kwargs = {"spec": spec, "crop_type": cfg.crop_type, "crop_ratio": cfg.crop_ratio, "res": cfg.res,
              "batch_size": cfg.batch_size, "torch_threads": cfg.torch_threads}
    peak = 0.0
    for row in map_shards(jobs, FeaturizeShards, kwargs, config, "features", pool=cfg, stage=STAGE):
        peak = max(peak, float(row["peak_rss_mb"]))
    return names, outs, peak


def write_items(files: KnnFiles, feature_files: list[str]) -> tuple[Any, list[int]]:
    """Step 2: ``items.parquet`` (every item's key, crop, shard, offset, size); returns it and the items per shard."""
    import pyarrow as pa

    from lussray.data.partners import read_parquet

    tables, counts = [], []
    for shard, path in enumerate(feature_files):
        table = read_parquet(path, ["key", "crop", "offset", "size"])
        counts.append(table.num_rows)
        tables.append(table.append_column("shard", pa.array(np.full(table.num_rows, shard, np.int32))))
    items = pa.concat_tables(tables).select(["key", "crop", "shard", "offset", "size"])
    write_parquet(files.items, items)
    return items, counts


def search(config: LussConfig, files: KnnFiles, names: list[str], feature_files: list[str], items: Any,
           counts: list[int]) -> dict[str, Any]:
    """Step 3: the neighbours of every shard not written before; returns the search's counts and memory."""
    import pyarrow as pa

    from lussray.clustering.knn_search import SearchStats, sharded_top_k

    cfg = config.knn
    todo = {i for i, name in enumerate(names) if not storage.exists(files.neighbour_file(name))}
    stats = SearchStats()
    k = min(cfg.k, int(sum(counts)))
    starts = np.concatenate([[0], np.cumsum(counts)])
    keys, crops = items.column("key").combine_chunks(), items.column("crop").to_numpy()
    started, done = time.perf_counter(), 0
    if todo:
        for result in sharded_top_k(feature_files, k, num_actors=cfg.search_actors, block_size=cfg.query_block_size,
                                    blocks_in_flight=cfg.blocks_in_flight, cpus_per_actor=cfg.cpus_per_actor,
                                    gpus_per_actor=cfg.search_gpus_per_actor, query_files=todo, stats=stats):
            rows = result.rows
            first, last = starts[result.file_index], starts[result.file_index + 1]
            table = pa.table({
                "key": keys.slice(first, last - first), "crop": pa.array(crops[first:last], pa.int32()),
                "item": pa.array(np.arange(first, last), pa.int64()),
                "neighbours": pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel(), pa.int64()), k),
                "neighbour_keys": pa.FixedSizeListArray.from_arrays(keys.take(pa.array(rows.ravel())), k),
                "neighbour_crops": pa.FixedSizeListArray.from_arrays(pa.array(crops[rows.ravel()], pa.int32()), k),
                "scores": pa.FixedSizeListArray.from_arrays(pa.array(result.scores.ravel(), pa.float32()), k)})
            write_parquet(files.neighbour_file(names[result.file_index]), table)
            done += 1
            elapsed = time.perf_counter() - started
            print(f"[{STAGE}] neighbours: shard {done}/{len(todo)} {names[result.file_index]} "
                  f"({last - first} items, {elapsed:.1f} s)", flush=True)
    else:
        print(f"[{STAGE}] neighbours: every shard done before", flush=True)
    return {"k": k, "dim": stats.dim, "search_actors": stats.actors, "search_seconds": round(stats.seconds, 2),
            "peak_rss_mb_search_actors": [round(v, 1) for v in stats.peak_rss_mb_per_actor or []]}


def neighbours_of(files: KnnFiles, shard_name: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Keys, (n, k) global neighbour indices and (n, k) scores of one shard's items (for tests and inspection)."""
    from lussray.data.partners import read_parquet

    table = read_parquet(files.neighbour_file(shard_name), ["key", "neighbours", "scores"])
    return (table.column("key").to_pylist(), list_matrix(table.column("neighbours")),
            list_matrix(table.column("scores")))


def knn(config: LussConfig, data: str, run: str, *, featurizer: str | None = None,
        overwrite: bool = False) -> dict[str, Any]:
    """Write the KNN neighbours of ``data``'s training items into ``<run>/knn`` (skipping what is done).

    Args:
        config: the resolved config (``knn``, ``featurizer``, ``pretrain.arch``, ``ray``).
        data: shards folder (absolute path or URI).
        run: run folder (absolute path or URI).
        featurizer: a DINO checkpoint file (default ``featurizer.file``, else the run's stage-1 ResNet).
        overwrite: redo the stage when its folder holds outputs of other inputs.

    Returns:
        The summary (also ``<run>/knn/summary.json``).
    """
    from lussray.data.ingest import init_ray
    from lussray.stages import featurizer as featurizers

    files = KnnFiles(storage.join(run, STAGE))
    spec = featurizers.resolve(config, run, featurizer)
    record = StageRecord(files.root, fingerprint(config, data, run, spec), STAGE)
    record.check(overwrite)
    if storage.exists(files.summary):
        print(f"[{STAGE}] complete: {files.summary}", flush=True)
        return storage.read_json(files.summary)
    featurizers.check(spec, STAGE)
    storage.makedirs(files.root)
    init_ray(config.ray)
    with record.recording(produced=lambda: has_files(files.features, ".parquet")):
        started = time.perf_counter()
        names, feature_files, featurize_peak = featurize(config, data, files, spec)
        featurized = time.perf_counter()
        items, counts = write_items(files, feature_files)
        found = search(config, files, names, feature_files, items, counts)
        cfg = config.knn
        summary = {"items": int(sum(counts)), "images": len(set(items.column("key").to_pylist())), **found,
                   "shards": names, "items_per_shard": counts, "crop_type": cfg.crop_type,
                   "crop_ratio": cfg.crop_ratio, "res": cfg.res, "featurizer": spec.describe(),
                   "seconds": {"features": round(featurized - started, 1),
                               "total": round(time.perf_counter() - started, 1)},
                   "peak_rss_mb": {"driver": round(peak_rss_mb(), 1), "featurize_actor": round(featurize_peak, 1)}}
        storage.write_json_atomic(files.summary, summary)
    print(f"[{STAGE}] done: {summary['items']} items of {summary['images']} images, k={summary['k']}, "
          f"{summary['seconds']['total']:.0f} s -> {files.neighbours}", flush=True)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lussray knn``."""
    parser.add_argument("--featurizer", metavar="FILE",
                        help="a DINO ViT-S/8 or ViT-B/8 checkpoint (default: featurizer.file, else the run's "
                        "PASS stage-1 ResNet under <run>/pretrain)")


def run(args: argparse.Namespace, config: LussConfig) -> int:
    """``lussray knn``: :func:`knn` of ``--data`` into ``--run``."""
    if not args.data or not args.run:
        raise UserError("--data DIR (shards of `lussray prepare`) and --run DIR are required")
    knn(config, storage.absolute(args.data), storage.absolute(args.run),
        featurizer=storage.absolute(args.featurizer) if args.featurizer else None, overwrite=args.overwrite)
    return 0
