"""FS^4's pyramid-global-guided (PGG) pseudo labels: six views per image, global k-means, active selection.

    lussray fs4 labels --dataset synthetic-scenes --data demo-out/scene-shards --run demo-out/fs4-run
    lussray fs4 labels --dataset cocostuff27 --data s3://bucket/coco27 --run s3://bucket/runs/fs4 \\
        --checkpoint swav_800ep_pretrain.pth.tar

Sec. 4.2.1 of FS^4 [0] and its supplement A.1. Reads the training shards of ``--data`` and the
initial model (``--checkpoint``: a SwAV, PASS or MoCo-v2 ResNet file, or by default the latest
stage-1 checkpoint under ``<run>/pretrain``, i.e. lussray's own self-supervised start), and writes
under ``<run>/fs4-labels/``:

1. ``embeddings/<shard>.parquet``: the global feature of each image's six pyramid views (the whole
   image, four corners, the centre; :func:`lussray.methods.fs4.pyramid_view_images`: crops resized to
   ``fs4.labels.crop_view_size``, every view to ``resize`` squared, centre crop ``crop_size``), the
   L2-normalised projector output (``fs4.labels.feature``; with ``fs4.labels.pyramid=false`` the
   whole image alone, one label per image: the ablation's "GG"), by an actor pool over the shards
   (:func:`lussray.stages.labelgen.map_shards`; the model is loaded once per actor).
2. ``centroids.npy`` + ``kmeans.json``: spherical k-means (cosine, unit-norm features and centres,
   as the paper) with ``fs4.labels.num_clusters`` global clusters over the sharded k-means actors
   (:func:`lussray.clustering.kmeans.sharded_kmeans`), seeded from the run's ``seed``. It is fitted
   on all views, crops included: the paper treats each view "as an independent image for labeling"
   (it does not say whether its k-means saw the crops).
3. ``assign/<shard>.parquet``: every view's global label (its nearest centre) and cosine distance
   to it, by the same actor pool.
4. ``selection.json``: active selection. All views of the dataset are ranked together (the paper
   ranks "the view images", not the views of each cluster or image), whole images included, by
   distance to their own centre; the closest ``floor(keep_fraction x views)`` are kept, ties broken
   by the global view index (:func:`lussray.methods.fs4.selection_cutoff`). Only the distances
   travel to the driver; the cutoff then lets every shard decide its own views.
5. ``train/<shard>.tar`` (+ ``.done.json``, then ``train/manifest.json``): one sample per kept view
   (:mod:`lussray.data.fs4_views`: key ``<image key>--view<v>``, the image's original ``jpg`` bytes,
   its :class:`~lussray.data.fs4_views.ViewRecord` as ``json``), written with the chunk index the
   seeded epoch streams need, so training streams ``(<run>/fs4-labels, "train")`` with
   :func:`lussray.data.fs4_views.fs4_batch` and no global join.
6. ``summary.json`` (last): images, views, kept views and fraction, the cluster histogram of all and
   of the kept views, kept views per pyramid position, the cutoff distance, times.

Every step skips what an earlier run of the same inputs completed (per shard), so an interrupted
run resumes. ``inputs.json`` records the inputs (the initial checkpoint, the train manifest, the
model shape ``pretrain.arch/hidden_mlp/feat_dim``, ``fs4.labels``, ``seed``), compared before anything
else: a rerun with other inputs is refused naming the key (``--overwrite`` redoes the stage).
The actor pools and k-means actors are sized by ``labelgen``'s resource keys (``actor_pool_min/max``,
``cpus_per_actor``, ``gpus_per_actor``, ``torch_threads``, ``kmeans_actors``).

References:
    - [0]: FS^4, "Fully Self-Supervised Learning for Semantic Segmentation", 2022, arXiv:2202.11981.
"""

from __future__ import annotations

import io
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
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
from lussray.config import LussConfig
from lussray.data.shards import FORMAT_VERSION as SHARDS_FORMAT_VERSION
from lussray.data.shards import MANIFEST, SHARD_ENTRY_KEYS, read_manifest, shard_paths
from lussray.errors import UserError
from lussray.methods.fs4 import NUM_VIEWS, VIEW_NAMES, SelectionCutoff
from lussray.seeds import derived_seed

STAGE = "fs4-labels"
PRETRAIN_STAGE = "pretrain"
DONE = ".done.json"
SPLIT = "train"
#: Columns of an assignment file besides the view key: what a :class:`ViewRecord` needs, plus the
#: global view index (tie-breaker of active selection), the label and the distance.
RECORD_COLUMNS = ("image", "view", "top", "left", "height", "width", "image_height", "image_width")


@dataclass(frozen=True)
class Outputs:
    """The files of ``<run>/fs4-labels``."""

    root: str

    @property
    def embeddings(self) -> str:
        return storage.join(self.root, "embeddings")

    def embedding_file(self, shard: str) -> str:
        return storage.join(self.embeddings, os.path.basename(shard).replace(".tar", ".parquet"))

    def assign_file(self, shard: str) -> str:
        return storage.join(self.root, "assign", os.path.basename(shard).replace(".tar", ".parquet"))

    def label_shard(self, shard: str) -> str:
        return storage.join(self.root, SPLIT, os.path.basename(shard))

    @property
    def manifest(self) -> str:
        """``train/manifest.json``: stream ``(root, "train")`` like prepared shards."""
        return storage.join(self.root, SPLIT, MANIFEST)

    @property
    def centroids(self) -> str:
        return storage.join(self.root, "centroids.npy")

    @property
    def kmeans(self) -> str:
        return storage.join(self.root, "kmeans.json")

    @property
    def selection(self) -> str:
        return storage.join(self.root, "selection.json")

    @property
    def summary(self) -> str:
        return storage.join(self.root, "summary.json")


# -- actors (one call per input shard, through labelgen.map_shards) -------------------------------


class _ShardActor:
    """Processes whole shards; the rows carry what ``map_shards`` reports (shard, images, memory)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from lussray.stages.labelgen import peak_rss_mb

        rows = [self.process({name: batch[name][i] for name in batch}) for i in range(len(batch["shard"]))]
        for row in rows:
            row["peak_rss_mb"] = peak_rss_mb()
        return {name: [row[name] for row in rows] for name in rows[0]}

    def process(self, job: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


def load_initial_model(checkpoint: str, model_kwargs: dict[str, Any], feature: str):
    """The initial (instance-level self-supervised) model: a PASSModel with the checkpoint's backbone and projector.

    Raises:
        UserError: if the file holds no backbone of this shape, or no projection head while
            ``fs4.labels.feature`` is ``projector``.
    """
    from lussray.models.checkpoints import load_pretrained
    from lussray.models.pass_model import PASSModel

    model = PASSModel(**model_kwargs, shallow_stages=(), pixel_attention=False)
    report = load_pretrained(model, checkpoint)
    missing_backbone = [key for key in report.missing if key.startswith("backbone.")]
    if missing_backbone:
        raise UserError(f"{checkpoint}: no {model_kwargs['arch']} backbone in it ({len(missing_backbone)} backbone "
                        f"keys missing, e.g. {missing_backbone[0]}; shape mismatches: {report.mismatched[:2]}): check "
                        f"pretrain.arch")
    # A SwAV file lacks only the final BN's running statistics (lussray.models.checkpoints).
    missing_head = [key for key in report.missing if key.startswith("projection_head.") and "running_" not in key]
    if feature == "projector" and missing_head:
        raise UserError(f"{checkpoint}: no projection head of pretrain.hidden_mlp/feat_dim in it (missing "
                        f"{missing_head[0]}; shape mismatches: {report.mismatched[:2]}): set "
                        f"fs4.labels.feature=backbone to cluster pooled backbone features (MoCo-v2 files)")
    return model.eval()


class EmbedViews(_ShardActor):
    """Step 1: one parquet of the six views' global features per training shard."""

    def __init__(self, checkpoint: str, model_kwargs: dict[str, Any], feature: str, view_kwargs: dict[str, Any],
                 batch_size: int, torch_threads: int, num_views: int = NUM_VIEWS) -> None:
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_initial_model(checkpoint, model_kwargs, feature).to(self.device)
        self.feature, self.view_kwargs, self.batch_size = feature, view_kwargs, batch_size
        self.num_views = num_views  # 6, or 1: the whole image only (one label per image, the ablation's GG)

    def embed(self, views: np.ndarray) -> np.ndarray:
        """L2-normalised global features of uint8 views (V, S, S, 3): (V, D) float32."""
        import torch
        import torch.nn.functional as F

        from lussray.data.augment import IMAGENET_MEAN, IMAGENET_STD
        from lussray.stages.pretrain import normalize_views

        with torch.inference_mode():
            images = normalize_views(torch.from_numpy(views).to(self.device), IMAGENET_MEAN, IMAGENET_STD)
            pooled = self.model.backbone(images)["c4"].mean(dim=(2, 3))
            features = self.model.projection_head(pooled) if self.feature == "projector" else pooled
            return F.normalize(features.float(), dim=1).cpu().numpy()

    def process(self, job: dict[str, Any]) -> dict[str, Any]:
        from lussray.data.augment import decode_image
        from lussray.data.fs4_views import box_tuple, view_key
        from lussray.data.shards import iter_tar
        from lussray.methods.fs4 import pyramid_boxes, pyramid_view_images

        started = time.perf_counter()
        columns: dict[str, list] = {name: [] for name in ("key", *RECORD_COLUMNS)}
        chunks, pending = [], []
        for image_key, members in iter_tar(str(job["shard"])):
            image = decode_image(members["jpg"])
            height, width = image.shape[:2]
            pending += pyramid_view_images(image, **self.view_kwargs, num_views=self.num_views)
            boxes = pyramid_boxes(height, width, self.view_kwargs["crop_fraction"])[:self.num_views]
            for view, box in enumerate(boxes):
                top, left, box_height, box_width = box_tuple(box)
                for name, value in zip(("key", *RECORD_COLUMNS), (view_key(image_key, view), image_key, view, top,
                                                                   left, box_height, box_width, height, width)):
                    columns[name].append(value)
            if len(pending) >= self.batch_size * self.num_views:
                chunks.append(self.embed(np.stack(pending)))
                pending = []
        if pending:
            chunks.append(self.embed(np.stack(pending)))
        embeddings = np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32)
        _write_table(str(job["out"]), columns, embeddings=embeddings)
        return {"shard": str(job["shard"]), "num_images": len(columns["key"]) // self.num_views,
                "seconds": time.perf_counter() - started}


class AssignViews(_ShardActor):
    """Step 3: each view's nearest global centre and its cosine distance (no model)."""

    def __init__(self, centroids: np.ndarray) -> None:
        self.centroids = np.asarray(centroids, np.float64)

    def process(self, job: dict[str, Any]) -> dict[str, Any]:
        import pyarrow.parquet as pq

        from lussray.clustering.kmeans import embedding_matrix
        from lussray.methods.fs4 import nearest_centres

        fs, inner = storage.filesystem(str(job["embeddings"]))
        table = pq.read_table(inner, filesystem=fs)
        features = embedding_matrix(table.column("embedding"), str(job["embeddings"]))
        labels, distances = nearest_centres(features, self.centroids) if len(features) else (np.zeros(0, np.int64),
                                                                                             np.zeros(0))
        columns = {name: table.column(name).to_pylist() for name in ("key", *RECORD_COLUMNS)}
        columns["index"] = (int(job["first_index"]) + np.arange(table.num_rows)).tolist()
        columns["label"], columns["distance"] = labels.tolist(), distances.tolist()
        _write_table(str(job["out"]), columns)
        return {"shard": str(job["shard"]), "num_images": len(set(columns["image"]))}


class WriteViews(_ShardActor):
    """Step 5: the labels shard of one training shard, one sample per kept view, and its ``.done.json``."""

    def __init__(self, cutoff: dict[str, Any], num_clusters: int) -> None:
        self.cutoff = SelectionCutoff(**cutoff)
        self.num_clusters = num_clusters

    def kept_records(self, assign_file: str) -> dict[str, list]:
        """The kept views of a shard as :class:`ViewRecord` lists by image key (tar order within an image)."""
        import pyarrow.parquet as pq

        from lussray.data.fs4_views import ViewRecord
        from lussray.methods.fs4 import apply_cutoff

        fs, inner = storage.filesystem(assign_file)
        table = pq.read_table(inner, filesystem=fs).to_pydict()
        kept = apply_cutoff(np.asarray(table["distance"], np.float64), np.asarray(table["index"], np.int64),
                            self.cutoff)
        records: dict[str, list] = {}
        for row in range(len(table["key"])):
            records.setdefault(table["image"][row], [])
            if kept[row]:
                top, left, height, width = (float(table[name][row]) for name in ("top", "left", "height", "width"))
                records[table["image"][row]].append(ViewRecord(
                    table["image"][row], int(table["view"][row]), (top, left, height, width),
                    int(table["label"][row]), float(table["distance"][row]),
                    (int(table["image_height"][row]), int(table["image_width"][row]))))
        return records

    def process(self, job: dict[str, Any]) -> dict[str, Any]:
        from lussray.data.fs4_views import IMAGE_MEMBER, RECORD_MEMBER
        from lussray.data.shards import iter_tar, write_tar

        shard, out = str(job["shard"]), str(job["out"])
        records = self.kept_records(str(job["assign"]))
        histogram, per_view, seen = np.zeros(self.num_clusters, np.int64), Counter(), []

        def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
            for image_key, members in iter_tar(shard):
                seen.append(image_key)
                if image_key not in records:
                    raise UserError(f"shard {shard}: image {image_key!r} has no views in {job['assign']}: the "
                                    f"shard changed since its views were embedded; rerun with --overwrite")
                for record in records[image_key]:
                    histogram[record.label] += 1
                    per_view[VIEW_NAMES[record.view]] += 1
                    yield record.key, {IMAGE_MEMBER: members["jpg"], RECORD_MEMBER: record.to_json()}

        written = write_tar(samples(), out)
        if len(seen) != len(records):
            raise UserError(f"shard {shard} holds {len(seen)} images, {job['assign']} {len(records)}: the shard "
                            f"changed since its views were embedded; rerun with --overwrite")
        record = {"name": os.path.basename(out), **written, "num_images": len(seen),
                  "images_without_views": sum(1 for key in seen if not records[key]),
                  "histogram": histogram.tolist(), "per_view": {name: per_view[name] for name in VIEW_NAMES}}
        storage.write_json_atomic(out + DONE, record)
        return {"shard": shard, "num_images": len(seen)}


def _write_table(path: str, columns: dict[str, list], embeddings: np.ndarray | None = None) -> None:
    """A parquet of ``columns`` (+ a fixed-size-list ``embedding`` column), written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"key": pa.string(), "image": pa.string(), "index": pa.int64(), "label": pa.int32(),
             "distance": pa.float64()}
    arrays = {name: pa.array(values, types.get(name, pa.int32())) for name, values in columns.items()}
    if embeddings is not None:
        arrays["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.astype(np.float32).ravel()),
                                                                embeddings.shape[1])
    buffer = io.BytesIO()
    pq.write_table(pa.table(arrays), buffer)
    storage.write_bytes_atomic(path, buffer.getvalue())


# -- driver -------------------------------------------------------------------------------------


def model_kwargs(config: LussConfig) -> dict[str, Any]:
    """The PASSModel shape of the initial model (``pretrain.arch``, ``hidden_mlp``, ``feat_dim``)."""
    pre = config.pretrain
    return {"arch": pre.arch, "hidden_dim": pre.hidden_mlp, "feat_dim": pre.feat_dim,
            "num_prototypes": pre.num_prototypes}


def views_per_image(config: LussConfig) -> int:
    """6 pyramid views per image, or 1 (the whole image) with ``fs4.labels.pyramid=false``."""
    return NUM_VIEWS if config.fs4.labels.pyramid else 1


def initial_checkpoint(run: str, given: str | None) -> str:
    """``--checkpoint`` if given, else the latest stage-1 checkpoint under ``<run>/pretrain``."""
    from lussray.stages.loop import given_or_latest

    return given_or_latest(given, "--checkpoint", run, PRETRAIN_STAGE, "stage-1", "lussray train")


def fingerprint(config: LussConfig, data: str, run: str, checkpoint: str) -> dict[str, Any]:
    """What determines ``<run>/fs4-labels`` (:mod:`lussray.completion`)."""
    model = (f"pretrain.{key}" for key in ("arch", "hidden_mlp", "feat_dim"))
    return {"format": FORMAT_VERSION, **config_fingerprint(config, *model, "fs4.labels", "seed"),
            "data": data_fingerprint(data, [SPLIT]), "checkpoint": checkpoint_fingerprint(checkpoint, run)}


def _pending(shards: list[str], outputs: list[str], what: str) -> list[int]:
    """Indices of the shards whose output is missing (printing how many were done before)."""
    todo = [i for i, out in enumerate(outputs) if not storage.exists(out)]
    if len(todo) < len(shards):
        print(f"[{STAGE}] {what}: {len(shards) - len(todo)} of {len(shards)} shards done before", flush=True)
    return todo


def embed(config: LussConfig, shards: list[str], outputs: Outputs, checkpoint: str) -> list[str]:
    """Step 1; returns the embedding files of all training shards."""
    from lussray.stages.labelgen import map_shards

    cfg = config.fs4.labels
    files = [outputs.embedding_file(shard) for shard in shards]
    jobs = [{"shard": shards[i], "out": files[i]} for i in _pending(shards, files, "embed")]
    view_kwargs = {"crop_fraction": cfg.crop_fraction, "crop_view_size": cfg.crop_view_size, "resize": cfg.resize,
                   "crop": cfg.crop_size}
    kwargs = {"checkpoint": checkpoint, "model_kwargs": model_kwargs(config), "feature": cfg.feature,
              "view_kwargs": view_kwargs, "batch_size": cfg.batch_size, "torch_threads": config.labelgen.torch_threads,
              "num_views": views_per_image(config)}
    for _ in map_shards(jobs, EmbedViews, kwargs, config, f"{STAGE} embed"):
        pass
    return files


def cluster(config: LussConfig, files: list[str], outputs: Outputs) -> np.ndarray:
    """Step 2: spherical k-means of all view features (skipped when ``centroids.npy`` exists)."""
    if storage.exists(outputs.centroids):
        print(f"[{STAGE}] kmeans: done before, {outputs.centroids}", flush=True)
        return np.load(io.BytesIO(storage.read_bytes(outputs.centroids)))
    from lussray.clustering.kmeans import sharded_kmeans

    cfg, pool = config.fs4.labels, config.labelgen
    result = sharded_kmeans(files, cfg.num_clusters, num_actors=pool.kmeans_actors, niter=cfg.kmeans_iterations,
                            nredo=cfg.kmeans_redo, seed=derived_seed(config.seed, STAGE, "kmeans"), spherical=True,
                            normalize_rows=True, gpus_per_actor=pool.gpus_per_actor,
                            log_every=max(1, cfg.kmeans_iterations // 4))
    buffer = io.BytesIO()
    np.save(buffer, result.centroids.astype(np.float32))
    storage.write_json_atomic(outputs.kmeans, {
        "num_clusters": cfg.num_clusters, "num_points": result.num_points, "dim": result.dim,
        "objective": result.objective, "iteration_objectives": result.iteration_objectives,
        "seconds": result.seconds, "redo": cfg.kmeans_redo})
    storage.write_bytes_atomic(outputs.centroids, buffer.getvalue())
    print(f"[{STAGE}] kmeans: K={cfg.num_clusters} over {result.num_points} views, objective {result.objective:.4g}, "
          f"{result.seconds:.1f} s", flush=True)
    return result.centroids


def assign(config: LussConfig, shards: list[str], files: list[str], counts: list[int], outputs: Outputs,
           centroids: np.ndarray) -> list[str]:
    """Step 3: every view's label and distance, one file per shard; returns the files."""
    from lussray.stages.labelgen import map_shards

    out = [outputs.assign_file(shard) for shard in shards]
    # the global index of each shard's first view (its rows follow in order)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]) * views_per_image(config)
    jobs = [{"shard": shards[i], "embeddings": files[i], "out": out[i], "first_index": int(first[i])}
            for i in _pending(shards, out, "assign")]
    for _ in map_shards(jobs, AssignViews, {"centroids": centroids}, config, f"{STAGE} assign"):
        pass
    return out


def select(config: LussConfig, files: list[str], outputs: Outputs) -> dict[str, Any]:
    """Step 4: the active-selection cutoff over all views (only distances, indices and labels are read)."""
    if storage.exists(outputs.selection):
        return storage.read_json(outputs.selection)
    import pyarrow.parquet as pq

    from lussray.methods.fs4 import apply_cutoff, selection_cutoff

    cfg = config.fs4.labels
    parts = {"distance": [], "index": [], "label": [], "view": []}
    for path in files:
        fs, inner = storage.filesystem(path)
        table = pq.read_table(inner, filesystem=fs, columns=list(parts))
        for name in parts:
            parts[name].append(table.column(name).to_numpy())
    distance, index, label, view = (np.concatenate(parts[name]) for name in ("distance", "index", "label", "view"))
    cutoff = selection_cutoff(distance, cfg.keep_fraction, index)
    kept = apply_cutoff(distance, index, cutoff)
    selection = {"cutoff": {"distance": cutoff.distance, "index": cutoff.index, "num_kept": cutoff.num_kept,
                            "num_views": cutoff.num_views},
                 "keep_fraction": cfg.keep_fraction, "kept_fraction": cutoff.num_kept / max(cutoff.num_views, 1),
                 "histogram": np.bincount(label, minlength=cfg.num_clusters).tolist(),
                 "kept_histogram": np.bincount(label[kept], minlength=cfg.num_clusters).tolist(),
                 "kept_per_view": dict(zip(VIEW_NAMES, np.bincount(view[kept], minlength=NUM_VIEWS).tolist())),
                 "mean_distance": float(distance.mean()) if len(distance) else 0.0}
    storage.write_json_atomic(outputs.selection, selection)
    print(f"[{STAGE}] active selection: {cutoff.num_kept} of {cutoff.num_views} views kept "
          f"(cosine distance <= {cutoff.distance:.4f})", flush=True)
    return selection


def write_views(config: LussConfig, shards: list[str], assign_files: list[str], outputs: Outputs,
                selection: dict[str, Any]) -> dict[str, Any]:
    """Step 5: the labels shards and their manifest (skipping shards already written)."""
    from lussray.stages.labelgen import map_shards

    if storage.exists(outputs.manifest):
        print(f"[{STAGE}] view shards: complete, {outputs.manifest}", flush=True)
        return storage.read_json(outputs.manifest)
    out = [outputs.label_shard(shard) for shard in shards]
    records: dict[str, dict[str, Any]] = {}
    jobs = []
    for i, shard in enumerate(shards):
        done = out[i] + DONE
        if storage.exists(done) and storage.file_size(out[i]) == storage.read_json(done)["bytes"]:
            records[out[i]] = storage.read_json(done)
        else:
            jobs.append({"shard": shard, "assign": assign_files[i], "out": out[i]})
    if records:
        print(f"[{STAGE}] view shards: resuming, {len(records)} of {len(shards)} shards already written", flush=True)
    kwargs = {"cutoff": selection["cutoff"], "num_clusters": config.fs4.labels.num_clusters}
    for row in map_shards(jobs, WriteViews, kwargs, config, f"{STAGE} write"):
        path = outputs.label_shard(str(row["shard"]))
        records[path] = storage.read_json(path + DONE)
    ordered = [records[path] for path in out]
    manifest = {
        "format_version": SHARDS_FORMAT_VERSION,
        "created_by": "lussray fs4 labels",
        "split": SPLIT,
        "num_classes": config.fs4.labels.num_clusters,
        "num_samples": sum(record["num_samples"] for record in ordered),
        "num_shards": len(ordered),
        "has_segmentation": False,
        "shards": [{key: record[key] for key in SHARD_ENTRY_KEYS if key in record} for record in ordered],
        "num_images": sum(record["num_images"] for record in ordered),
        "histogram": np.sum([record["histogram"] for record in ordered], axis=0).tolist(),
        "skipped": [],
    }
    if manifest["num_samples"] != selection["cutoff"]["num_kept"]:
        raise UserError(f"{outputs.root}: the view shards hold {manifest['num_samples']} views, active selection "
                        f"kept {selection['cutoff']['num_kept']}: rerun with --overwrite")
    storage.write_json_atomic(outputs.manifest, manifest)
    return manifest


def generate(config: LussConfig, data: str, run: str, *, checkpoint: str | None = None,
             overwrite: bool = False) -> dict[str, Any]:
    """FS^4's pyramid pseudo labels of ``data``'s training split into ``<run>/fs4-labels``.

    Args:
        config: the resolved config (``fs4.labels``; ``pretrain`` for the model shape; ``labelgen``'s
            resource keys for the actor pools; ``ray``; ``seed``).
        data: shards folder of ``lussray prepare`` (absolute path or URI).
        run: run folder (absolute path or URI).
        checkpoint: the initial model (default: the latest ``<run>/pretrain`` checkpoint).
        overwrite: redo the stage when its folder holds outputs of other inputs.

    Returns:
        The stage summary (``<run>/fs4-labels/summary.json``).

    Raises:
        UserError: no checkpoint, an empty training split, more global clusters than views, other
            inputs than the recorded ones (without ``overwrite``), or an error in an actor.
    """
    from lussray.data.ingest import init_ray

    outputs = Outputs(storage.join(run, STAGE))
    checkpoint = initial_checkpoint(run, checkpoint)
    num_images = int(read_manifest(data, SPLIT)["num_samples"])
    cfg = config.fs4.labels
    num_views = num_images * views_per_image(config)
    if num_views < cfg.num_clusters:
        raise UserError(f"fs4.labels.num_clusters={cfg.num_clusters} exceeds the {num_views} views of "
                        f"the {num_images} training images of {data}")
    record = StageRecord(outputs.root, fingerprint(config, data, run, checkpoint), STAGE)
    record.check(overwrite)  # before summary.json: a complete folder of other inputs is not complete
    if storage.exists(outputs.summary):
        print(f"[{STAGE}] complete: {outputs.summary}", flush=True)
        return storage.read_json(outputs.summary)
    storage.makedirs(outputs.root)
    init_ray(config.ray)
    with record.recording(produced=lambda: has_files(outputs.embeddings, ".parquet")):
        _generate(config, data, outputs, checkpoint)
    return storage.read_json(outputs.summary)


def _generate(config: LussConfig, data: str, outputs: Outputs, checkpoint: str) -> None:
    """Steps 1-6 (each skipping what an earlier run of the same inputs completed)."""
    started, seconds = time.perf_counter(), {}

    def timed(name: str, fn, *args):
        step = time.perf_counter()
        result = fn(*args)
        seconds[name] = round(time.perf_counter() - step, 2)
        return result

    shards = shard_paths(data, SPLIT)
    counts = [int(entry["num_samples"]) for entry in read_manifest(data, SPLIT)["shards"]]
    files = timed("embed", embed, config, shards, outputs, checkpoint)
    centroids = timed("kmeans", cluster, config, files, outputs)
    assign_files = timed("assign", assign, config, shards, files, counts, outputs, centroids)
    selection = timed("select", select, config, assign_files, outputs)
    manifest = timed("write", write_views, config, shards, assign_files, outputs, selection)
    cutoff = selection["cutoff"]
    summary = {"images": manifest["num_images"], "views": cutoff["num_views"], "kept": cutoff["num_kept"],
               "kept_fraction": selection["kept_fraction"], "keep_fraction": selection["keep_fraction"],
               "cutoff_distance": cutoff["distance"], "mean_distance": selection["mean_distance"],
               "num_clusters": config.fs4.labels.num_clusters, "feature": config.fs4.labels.feature,
               "histogram": selection["histogram"], "kept_histogram": selection["kept_histogram"],
               "kept_per_view": selection["kept_per_view"],
               "images_without_views": sum(storage.read_json(outputs.label_shard(s) + DONE)["images_without_views"]
                                           for s in shards),
               "checkpoint": checkpoint, "seconds": round(time.perf_counter() - started, 1), "step_seconds": seconds}
    storage.write_json_atomic(outputs.summary, summary)
    _print_summary(summary, outputs)


def _print_summary(summary: dict[str, Any], outputs: Outputs) -> None:
    histogram = np.asarray(summary["histogram"], np.float64)
    used = int((histogram > 0).sum())
    print(f"[{STAGE}] done: {summary['images']} images, {summary['views']} views, {summary['kept']} kept "
          f"({100 * summary['kept_fraction']:.1f} %), K={summary['num_clusters']} ({used} clusters used), "
          f"{summary['seconds']:.0f} s", flush=True)
    print(f"[{STAGE}] kept views per position: "
          + ", ".join(f"{name} {count}" for name, count in summary["kept_per_view"].items()), flush=True)
    largest = np.argsort(-histogram)[:5]
    print(f"[{STAGE}] largest clusters (share of all views): "
          + ", ".join(f"{i}: {100 * histogram[i] / max(histogram.sum(), 1):.1f}%" for i in largest), flush=True)
    print(f"[{STAGE}] view shards: {storage.join(outputs.root, SPLIT)} (stream ({outputs.root}, 'train') with "
          f"lussray.data.fs4_views.fs4_batch)", flush=True)
