"""Benchmark: one epoch of PiCIE's clustering + label assignment, lussray's distributed way vs the reference's.

    .venv/bin/python tools/bench_picie.py        # the measured configuration (the defaults)
    .venv/bin/python tools/bench_picie.py --images 5000 20000 --side 16 --dim 128 --workers 2 --out bench-out

The work of one epoch between two trainings, over the pixel features of both views of every image
(the bench measures clustering, not the network: the features are synthetic, of the reference's
shape scaled to this machine, ``--side`` x ``--side`` maps of ``--dim`` channels instead of 80 x 80 x
128, every image's features a pure function of its index, L2-normalised):

- **lussray**: ``--workers`` processes in a gloo group, each generating its own part of the epoch
  batch by batch (as its network would) and running :func:`lussray.methods.picie.cluster_epoch`,
  the code of the training workers' epoch hook: a pass over its first batches keeping
  ``--pixels-per-image`` random pixels of each of ``--kmeans-images`` images (all workers together)
  per view, ``--iterations`` Lloyd iterations with all-reduced statistics, then a pass over all its
  batches labelling every pixel of both views, the labels kept in memory by key.
- **reference** (``janghyuncho/PiCIE`` ``commons.run_mini_batch_kmeans`` + ``compute_labels``,
  seed-methods.md 1.4): one process holding every feature in memory; per view, faiss
  ``Clustering`` (``--iterations``, no subsampling) on all pixels of the first ``--init-batches``
  batches of ``--batch`` images, one running-mean update of the centroids per later batch (faiss
  flat search), then the label of every pixel (faiss search). Its threads: ``--workers``.

Seconds exclude making the features on both sides: the reference's are made before its clock
starts; lussray's workers time their generator and the figure is the slowest worker's wall time
less its generation time (the wall time with generation is also recorded). Peak memory is the
largest process's peak RSS (every side runs in processes of its own; ``torch`` is imported on both
sides). Quality: the mean cosine of the pixels of the first ``--eval-images`` images of
view 1 to their most similar centroid, for both sides' view-1 centroids (1 is a perfect fit).

Output: a table, ``<out>/bench_picie.json``; the last line printed is one JSON object with, for the
largest size, ``lussray_seconds``, ``reference_seconds``, ``lussray_peak_mb``, ``reference_peak_mb``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VIEWS = 2
K_SEED = 77
KMEANS_SEED = 1234


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def image_features(index: int, spec: dict):
    """(views, D, side, side) L2-normalised features of image ``index``: K directions in blobs, plus noise."""
    import torch
    import torch.nn.functional as F

    centres = torch.nn.functional.normalize(
        torch.randn(spec["k"], spec["dim"], generator=torch.Generator().manual_seed(K_SEED)), dim=1)
    gen = torch.Generator().manual_seed(1_000_003 * index + 17)
    owners = torch.randint(0, spec["k"], (VIEWS, 1, 4, 4), generator=gen).float()
    owners = F.interpolate(owners, size=(spec["side"], spec["side"]), mode="nearest").long()[:, 0]
    noise = spec["noise"] / math.sqrt(spec["dim"])  # per channel: the noise vector's norm is about spec["noise"]
    maps = centres[owners].permute(0, 3, 1, 2) + noise * torch.randn(
        VIEWS, spec["dim"], spec["side"], spec["side"], generator=gen)
    return F.normalize(maps, dim=1)


def batch_features(indices, spec: dict):
    """(B, views, D, side, side) features of a batch of images."""
    import torch

    return torch.stack([image_features(int(i), spec) for i in indices])


# -- lussray: cluster_epoch in a gloo group ------------------------------------------------------------


def _lussray_worker(rank: int, world: int, init_file: str, spec: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    from lussray.methods import picie

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    per_worker = spec["batch"] // world
    num_batches = spec["images"] // spec["batch"]
    generation = [0.0]

    def batches():
        for step in range(num_batches):
            start = step * spec["batch"] + rank * per_worker
            began = time.perf_counter()
            features = batch_features(range(start, start + per_worker), spec)
            generation[0] += time.perf_counter() - began
            yield [f"img{i}" for i in range(start, start + per_worker)], [features[:, v] for v in range(VIEWS)]

    dist.barrier()
    started = time.perf_counter()
    clusters = picie.cluster_epoch(batches, [spec["k"]], epoch=0, seed=0, iterations=spec["iterations"],
                                   pixels_per_image=spec["pixels_per_image"],
                                   sample_batches=math.ceil(spec["kmeans_images"] / spec["batch"]), spherical=True)
    wall = time.perf_counter() - started
    dist.barrier()
    result = {"rank": rank, "wall": wall, "generation": generation[0], "peak_mb": peak_rss_mb(),
              "labels_mb": clusters.labels.numel() * clusters.labels.element_size() / 2**20,
              "images": len(clusters.keys), "kmeans_s": clusters.seconds["kmeans"],
              "labels_s": clusters.seconds["labels"]}
    if rank == 0:
        np.save(f"{out}/lussray_centroids.npy", clusters.centroids[0][0].numpy())
    Path(f"{out}/lussray_{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def run_lussray(spec: dict, out: str) -> dict:
    """cluster_epoch in ``spec["workers"]`` spawned processes; the slowest worker's times, the largest peak."""
    import torch.multiprocessing as tmp

    with tempfile.TemporaryDirectory() as folder:
        tmp.start_processes(_lussray_worker, args=(spec["workers"], f"{folder}/init", spec, out),
                            nprocs=spec["workers"], start_method="spawn")
    results = [json.loads(Path(f"{out}/lussray_{r}.json").read_text()) for r in range(spec["workers"])]
    slowest = max(results, key=lambda r: r["wall"])
    return {"seconds": round(max(r["wall"] - r["generation"] for r in results), 2),
            "seconds_with_generation": round(slowest["wall"], 2),
            "kmeans_seconds": round(max(r["kmeans_s"] for r in results), 2),
            "labels_seconds": round(max(r["labels_s"] for r in results), 2),
            "peak_mb": round(max(r["peak_mb"] for r in results), 1),
            "labels_mb_per_worker": round(max(r["labels_mb"] for r in results), 1),
            "sampled_pixels_per_view": spec["kmeans_images"] * spec["pixels_per_image"],
            "centroids": np.load(f"{out}/lussray_centroids.npy")}


# -- the reference: faiss mini-batch k-means with every feature in memory --------------------------


def _reference_process(spec: dict, out: str) -> None:
    import faiss
    import torch

    torch.set_num_threads(spec["workers"])
    faiss.omp_set_num_threads(spec["workers"])
    n, hw, dim, k, batch = spec["images"], spec["side"] ** 2, spec["dim"], spec["k"], spec["batch"]
    features = np.empty((n, VIEWS, hw, dim), np.float32)  # the reference's in-memory buffer, every image
    for start in range(0, n, batch):
        chunk = batch_features(range(start, min(start + batch, n)), spec)  # (B, V, D, s, s)
        features[start : start + len(chunk)] = chunk.flatten(3).permute(0, 1, 3, 2).numpy()
    started = time.perf_counter()
    labels = np.empty((n, VIEWS, hw), np.int16)
    centroids_view0 = None
    for view in range(VIEWS):
        init = np.ascontiguousarray(features[: spec["init_batches"] * batch, view].reshape(-1, dim))
        clustering = faiss.Clustering(dim, k)
        clustering.seed, clustering.niter, clustering.max_points_per_centroid = KMEANS_SEED, spec["iterations"], 10**7
        index = faiss.IndexFlatL2(dim)
        clustering.train(init, index)
        centroids = faiss.vector_float_to_array(clustering.centroids).reshape(k, dim).copy()
        _, assigned = index.search(init, 1)
        counts = np.bincount(assigned[:, 0], minlength=k).astype(np.int64)
        for start in range(spec["init_batches"] * batch, n, batch):  # one running-mean update per batch
            rows = np.ascontiguousarray(features[start : start + batch, view].reshape(-1, dim))
            index.reset()
            index.add(centroids)
            _, assigned = index.search(rows, 1)
            ids = torch.from_numpy(assigned[:, 0])
            sums = torch.zeros(k, dim, dtype=torch.float64).index_add_(0, ids, torch.from_numpy(rows).double())
            present = np.bincount(assigned[:, 0], minlength=k)
            counts += present
            step = (sums.numpy() - present[:, None] * centroids) / np.maximum(counts, 1)[:, None]
            centroids = np.where(present[:, None] > 0, centroids + step, centroids).astype(np.float32)
        index.reset()
        index.add(centroids)
        for start in range(0, n, batch):  # compute_labels: every pixel's nearest centroid
            rows = np.ascontiguousarray(features[start : start + batch, view].reshape(-1, dim))
            _, assigned = index.search(rows, 1)
            labels[start : start + batch, view] = assigned[:, 0].reshape(-1, hw)
        if view == 0:
            centroids_view0 = centroids
    seconds = time.perf_counter() - started
    np.save(f"{out}/reference_centroids.npy", centroids_view0)
    Path(f"{out}/reference.json").write_text(json.dumps({"seconds": seconds, "peak_mb": peak_rss_mb(),
                                                         "features_mb": features.nbytes / 2**20}))


def run_reference(spec: dict, out: str) -> dict:
    """The reference in a spawned process (its own peak RSS), with the OpenBLAS kernels lussray's actors use."""
    from lussray.clustering.kmeans import openblas_env

    os.environ.update(openblas_env())  # read when the child imports faiss
    # OpenMP's default busy-waiting made faiss 10x slower with 2 threads on the shared 2-core machine
    # (load ~40): passive waiting gives the reference its best configuration here
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    process = mp.get_context("spawn").Process(target=_reference_process, args=(spec, out))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"the reference process failed (exit code {process.exitcode}; out of memory?)")
    result = json.loads(Path(f"{out}/reference.json").read_text())
    return {"seconds": round(result["seconds"], 2), "peak_mb": round(result["peak_mb"], 1),
            "features_mb": round(result["features_mb"], 1), "centroids": np.load(f"{out}/reference_centroids.npy")}


def objective(centroids: np.ndarray, spec: dict) -> float:
    """Mean cosine of view 1's pixels of the first ``eval_images`` images to their most similar centroid.

    The cosine, not the squared distance: the reference's centroids are raw means (norm < 1) and
    lussray's unit vectors, and PiCIE's logits and labels compare directions.
    """
    rows = batch_features(range(spec["eval_images"]), spec)[:, 0].flatten(2).permute(0, 2, 1).reshape(-1, spec["dim"])
    x = rows.numpy().astype(np.float64)
    c = centroids.astype(np.float64)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return float((x @ c.T).max(1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[5000, 20000], help="dataset sizes (images)")
    parser.add_argument("--side", type=int, default=16, help="feature map side (the reference: 80)")
    parser.add_argument("--dim", type=int, default=128, help="feature channels (the reference: 128)")
    parser.add_argument("--k", type=int, default=27, help="clusters (COCO-Stuff-27)")
    parser.add_argument("--noise", type=float, default=0.8, help="norm of the noise around the K directions")
    parser.add_argument("--batch", type=int, default=128, help="images per (global) batch (the reference's logs: 128)")
    parser.add_argument("--init-batches", type=int, default=20, help="reference: batches of its initial k-means")
    parser.add_argument("--iterations", type=int, default=20, help="Lloyd / faiss iterations (the reference: 20)")
    parser.add_argument("--kmeans-images", type=int, default=2560,
                        help="lussray: images of the k-means sample (default: the reference's 20 x 128)")
    parser.add_argument("--pixels-per-image", type=int, default=64, help="lussray: pixels per sampled image and view")
    parser.add_argument("--workers", type=int, default=2, help="lussray processes; the reference's threads")
    parser.add_argument("--eval-images", type=int, default=200, help="images of the quality measure")
    parser.add_argument("--out", default="bench-out", help="output folder")
    args = parser.parse_args()
    if args.batch % args.workers:
        parser.error("--batch must be a multiple of --workers")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    rows = []
    for images in args.images:
        spec = {"images": images - images % args.batch, "side": args.side, "dim": args.dim, "k": args.k,
                "noise": args.noise, "batch": args.batch, "init_batches": args.init_batches,
                "iterations": args.iterations, "kmeans_images": args.kmeans_images,
                "pixels_per_image": args.pixels_per_image, "workers": args.workers, "eval_images": args.eval_images}
        with tempfile.TemporaryDirectory(dir=out) as folder:
            print(f"{spec['images']} images: lussray ...", flush=True)
            ours = run_lussray(spec, folder)
            print(f"{spec['images']} images: reference ...", flush=True)
            reference = run_reference(spec, folder)
        ours["objective"] = objective(ours.pop("centroids"), spec)
        reference["objective"] = objective(reference.pop("centroids"), spec)
        rows.append({"images": spec["images"], "lussray": ours, "reference": reference})
        print(f"  lussray {ours['seconds']} s, {ours['peak_mb']} MB; reference {reference['seconds']} s, "
              f"{reference['peak_mb']} MB", flush=True)
    header = (f"{'images':>8} {'side':>12} {'seconds':>9} {'(with gen.)':>11} {'peak MB':>9} "
              f"{'cosine':>10}")
    print(header)
    for row in rows:
        for side in ("lussray", "reference"):
            value = row[side]
            print(f"{row['images']:>8} {side:>12} {value['seconds']:>9.2f} "
                  f"{value.get('seconds_with_generation', value['seconds']):>11.2f} {value['peak_mb']:>9.1f} "
                  f"{value['objective']:>10.5f}")
    largest = rows[-1]
    summary = {"images": largest["images"], "lussray_seconds": largest["lussray"]["seconds"],
               "reference_seconds": largest["reference"]["seconds"],
               "lussray_peak_mb": largest["lussray"]["peak_mb"], "reference_peak_mb": largest["reference"]["peak_mb"],
               "time_ratio": round(largest["lussray"]["seconds"] / max(largest["reference"]["seconds"], 1e-9), 3)}
    record = {"args": vars(args), "rows": rows, "summary": summary, "load_average_end": os.getloadavg(),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    (out / "bench_picie.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
