"""The baselines of STEGO and HP: what the frozen features give without training a head.

- ``frozen_kmeans`` (:func:`frozen_kmeans`): k-means of the frozen featurizer's pixel features, no
  training. ``frozen_kmeans.pixels_per_image`` random stride-8 feature vectors of every training
  item (the same items as the method's: five crops, ``<method>.res``) are written per shard by an
  actor pool over the shards (``labelgen.map_shards``, sized by the ``knn`` pool keys) and clustered
  into K = ``dataset.num_classes`` + ``<method>.extra_clusters`` spherical centroids by the sharded
  k-means (:func:`lussray.clustering.kmeans.sharded_kmeans`, ``frozen_kmeans.*`` settings). Every
  validation pixel takes its nearest centroid by cosine (through the predict pool, with the
  method's flip TTA), and the split is scored with one Hungarian matching, as the probes.
- ``random_head``: the untrained head with its cluster probe, i.e. the method's head frozen at its
  random initialisation while the probes train on its codes for the method's steps
  (:class:`lussray.stages.stego.ProbeOnlyAdapter`, trained by :func:`lussray.stages.scene_training.train`).

Outputs under ``<run>/baselines/frozen-kmeans`` (``features/``, ``centroids.npy``, ``kmeans.json``,
``validation/`` predictions with ``summary.json``; shared by STEGO and HP runs in one folder) and
``<run>/baselines/<method>/random-head``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from typing import Any

import numpy as np

from lussray import storage
from lussray.completion import FORMAT_VERSION, StageRecord, config_fingerprint, data_fingerprint, has_files
from lussray.config import LussConfig
from lussray.data.shards import shard_paths
from lussray.stages.featurizer import FeaturizerSpec
from lussray.stages.probe_predict import ScenePredictor, predict_scene

STAGE = "baselines"
FROZEN_KMEANS = "frozen-kmeans"


class PixelFeatureShards:
    """Actor of the ``frozen_kmeans`` baseline: random pixel features of every item of a shard, one parquet."""

    def __init__(self, spec: FeaturizerSpec, crop_type: str, crop_ratio: float, res: int, pixels_per_image: int,
                 seed: int, batch_size: int, torch_threads: int = 0) -> None:
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.featurizer = spec.build()[0].to(self.device)
        self.crop_type, self.crop_ratio, self.res = crop_type, crop_ratio, res
        self.pixels, self.seed, self.batch_size = pixels_per_image, seed, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [self.process({name: batch[name][i] for name in batch}) for i in range(len(batch["shard"]))]
        return {name: [row[name] for row in rows] for name in rows[0]}

    def _sample(self, views: list[np.ndarray], names: list[str]) -> list[np.ndarray]:
        """Per item: ``pixels_per_image`` of its unit feature vectors, at positions drawn from (seed, item)."""
        import torch
        import torch.nn.functional as F

        from lussray.seeds import sample_rng, stage_salt
        from lussray.stages.featurizer import to_input

        with torch.inference_mode():
            features = self.featurizer(to_input(np.stack(views), self.device), attention=False).features
            flat = F.normalize(features.float().flatten(2), dim=1).cpu().numpy()  # (n, C, h*w)
        count = min(self.pixels, flat.shape[2])
        salt = stage_salt("frozen_kmeans")
        return [flat[i][:, sample_rng(self.seed, salt, 0, name).choice(flat.shape[2], count, replace=False)].T
                for i, name in enumerate(names)]

    def process(self, job: dict[str, Any]) -> dict[str, Any]:
        import pyarrow as pa

        from lussray.data.partners import write_parquet
        from lussray.data.scene_views import image_items, item_key
        from lussray.data.shards import iter_tar
        from lussray.stages.knn import peak_rss_mb

        started = time.perf_counter()
        rows, keys, pending, names, images = [], [], [], [], 0

        def flush() -> None:
            for name, picked in zip(names, self._sample(pending, names)):
                rows.append(picked)
                keys.extend([name] * len(picked))
            pending.clear()
            names.clear()

        for key, members in iter_tar(str(job["shard"])):
            images += 1
            for crop, view in enumerate(image_items(members["jpg"], self.crop_type, self.crop_ratio, self.res)):
                pending.append(view)
                names.append(item_key(key, crop))
            if len(pending) >= self.batch_size:
                flush()
        if pending:
            flush()
        matrix = np.concatenate(rows).astype(np.float32)
        write_parquet(str(job["out"]), pa.table({
            "key": pa.array(keys, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])}))
        return {"shard": str(job["shard"]), "num_images": images, "seconds": time.perf_counter() - started,
                "peak_rss_mb": peak_rss_mb()}


class CentroidPredictor(ScenePredictor):
    """Every pixel's nearest centroid by cosine (scores ``log_softmax(alpha cos)``, as the cluster probe)."""

    def __init__(self, featurizer: dict[str, Any], centroids: str, alpha: float = 2.0, **kwargs: Any) -> None:
        import torch
        import torch.nn.functional as F

        super().__init__(featurizer, **kwargs)
        loaded = np.load(io.BytesIO(storage.read_bytes(centroids)))
        self.centroids = F.normalize(torch.from_numpy(loaded).float(), dim=1).to(self.device)
        self.alpha = alpha

    def scores(self, codes):
        import torch
        import torch.nn.functional as F

        cosines = torch.einsum("bchw,kc->bkhw", F.normalize(codes, dim=1), self.centroids)
        return F.log_softmax(self.alpha * cosines, dim=1)


def frozen_kmeans(config: LussConfig, data: str, run: str, spec: FeaturizerSpec, section: Any, *,
                  section_key: str, overwrite: bool = False) -> dict[str, Any]:
    """The ``frozen_kmeans`` baseline: features, sharded k-means, validation predictions; returns their summary."""
    from lussray.clustering.kmeans import sharded_kmeans
    from lussray.seeds import derived_seed
    from lussray.stages.labelgen import map_shards

    cfg = config.frozen_kmeans
    root = storage.join(run, STAGE, FROZEN_KMEANS)
    num_clusters = config.dataset.num_classes + section.extra_clusters
    record = StageRecord(root, {"format": FORMAT_VERSION, **config_fingerprint(config, "frozen_kmeans", "seed"),
                                "items": {k: getattr(section, k) for k in ("res", "crop_type", "crop_ratio")},
                                "num_clusters": num_clusters, "featurizer": spec.fingerprint(run),
                                "data": data_fingerprint(data, ["train"])}, STAGE)
    record.check(overwrite)
    centroids_path = storage.join(root, "centroids.npy")
    if not storage.exists(centroids_path):
        storage.makedirs(root)
        with record.recording(produced=lambda: has_files(storage.join(root, "features"), ".parquet")):
            shards = shard_paths(data, "train")
            files = [storage.join(root, "features", os.path.basename(s).replace(".tar", ".parquet")) for s in shards]
            jobs = [{"shard": s, "out": f} for s, f in zip(shards, files) if not storage.exists(f)]
            kwargs = {"spec": spec, "crop_type": section.crop_type, "crop_ratio": section.crop_ratio,
                      "res": section.res, "pixels_per_image": cfg.pixels_per_image, "seed": config.seed,
                      "batch_size": config.knn.batch_size, "torch_threads": config.knn.torch_threads}
            for _ in map_shards(jobs, PixelFeatureShards, kwargs, config, "frozen-kmeans features", pool=config.knn,
                                stage="knn"):
                pass
            result = sharded_kmeans(files, num_clusters, num_actors=cfg.kmeans_actors, niter=cfg.iterations,
                                    nredo=cfg.redo, seed=derived_seed(config.seed, "frozen_kmeans", "kmeans"), spherical=True, normalize_rows=True,
                                    log_every=0)
            storage.write_json_atomic(storage.join(root, "kmeans.json"), {
                "num_clusters": num_clusters, "num_points": result.num_points, "objective": result.objective,
                "seconds": round(result.seconds, 1)})
            buffer = io.BytesIO()
            np.save(buffer, result.centroids.astype(np.float32))
            storage.write_bytes_atomic(centroids_path, buffer.getvalue())
            print(f"[{STAGE}] frozen_kmeans: K={num_clusters} over {result.num_points} pixel features", flush=True)
    kwargs = {"featurizer": dataclasses.asdict(spec), "centroids": centroids_path, "alpha": section.cluster_alpha,
              "flip": section.flip_tta, "torch_threads": config.predict.torch_threads}
    return predict_scene(config, data, run, storage.join(root, "validation"), CentroidPredictor, kwargs,
                         checkpoint=centroids_path, num_clusters=num_clusters, match="hungarian",
                         inputs={"flip_tta": section.flip_tta, "alpha": section.cluster_alpha}, overwrite=overwrite,
                         stage=STAGE)


__all__ = ["CentroidPredictor", "PixelFeatureShards", "frozen_kmeans"]
