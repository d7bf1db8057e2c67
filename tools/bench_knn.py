"""Benchmark: the KNN stage's sharded top-k search next to the reference's single-process chunked torch.topk.

    .venv/bin/python tools/bench_knn.py [--items 50000] [--dim 384] [--k 30] [--files 10] [--actors 2]
                                        [--threads 2] [--chunks 16] [--repeats 1] [--out bench-out]

1. Data: ``--items`` seeded image-level features of ``--dim`` dimensions (384: DINO ViT-S/8, the
   featurizer of STEGO and HP; L2-normalised standard-normal vectors) in ``--files`` feature
   parquet files of the ``lussray knn`` layout (``<out>/knn-data-<items>x<dim>/features``), cached.
2. lussray: the stage's steps 2-3 (:func:`lussray.stages.knn.write_items` and
   :func:`lussray.stages.knn.search`) in a private Ray cluster started before the clock: ``--actors``
   :class:`~lussray.clustering.kmeans.EmbeddingShard` actors of one CPU (one faiss thread) each load
   their files and answer the query blocks; the driver merges and writes the neighbour files.
3. reference: STEGO's ``precompute_knns.py`` way in one process with ``--threads`` torch threads:
   all features in memory, the similarity ``feats @ feats.T`` in ``--chunks`` (16) row chunks,
   ``torch.topk(k)`` per chunk; reading the parquet files is timed too.

Each side runs in its own process; peak memory is the largest process's peak RSS (the driver or
one actor for lussray). The neighbours of both are compared (the share of rows whose top-k lists
are identical). Timings depend on the machine's load: the load average is printed.

Results: a table, ``<out>/bench_knn.json``; the last line printed is one JSON object with the keys
lussray_seconds, reference_seconds, lussray_peak_mb, reference_peak_mb.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEED = 0


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def data_dir(args: argparse.Namespace) -> Path:
    return Path(args.out) / f"knn-data-{args.items}x{args.dim}-{args.files}"


def ensure_data(args: argparse.Namespace) -> list[str]:
    """Seeded unit features as ``features/train-<i>.parquet`` (written once, reused when the spec matches)."""
    import pyarrow as pa

    from lussray.data.partners import write_parquet

    root = data_dir(args)
    paths = [root / "features" / f"train-{i:06d}.parquet" for i in range(args.files)]
    marker, spec = root / "complete.json", {"items": args.items, "dim": args.dim, "files": args.files, "seed": SEED}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return [str(path) for path in paths]
    print(f"data: writing {args.items} x {args.dim} float32 features to {args.files} files in {root}", flush=True)
    bounds = np.linspace(0, args.items, args.files + 1).astype(int)
    for i, path in enumerate(paths):
        count = bounds[i + 1] - bounds[i]
        x = np.random.default_rng([SEED, i]).standard_normal((count, args.dim), np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        write_parquet(str(path), pa.table({
            "key": pa.array([f"train/{row:08d}" for row in range(bounds[i], bounds[i + 1])]),
            "crop": pa.array(np.zeros(count, np.int32)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), args.dim),
            "offset": pa.array(np.zeros(count, np.int64)), "size": pa.array(np.zeros(count, np.int64))}))
    marker.write_text(json.dumps(spec))
    return [str(path) for path in paths]


def run_lussray(args: argparse.Namespace, paths: list[str]) -> dict:
    """The stage's items + search steps over Ray actors; seconds, peaks, the neighbours."""
    import shutil

    from lussray.config import load_config
    from lussray.data.ingest import init_ray
    from lussray.data.partners import KnnFiles, list_matrix, read_parquet
    from lussray.stages import knn

    root = data_dir(args)
    files = KnnFiles(str(root))
    shutil.rmtree(files.neighbours, ignore_errors=True)
    config = load_config("synthetic-scenes", overrides=[
        f"knn.k={args.k}", f"knn.search_actors={args.actors}", "knn.cpus_per_actor=1",
        f"knn.query_block_size={args.block}", "ray.num_cpus=4"])
    init_ray(config.ray)
    names = [Path(path).name.replace(".parquet", ".tar") for path in paths]
    started = time.perf_counter()
    items, counts = knn.write_items(files, paths)
    found = knn.search(config, files, names, paths, items, counts)
    seconds = time.perf_counter() - started
    rows = np.concatenate([list_matrix(read_parquet(files.neighbour_file(name), ["neighbours"]).column("neighbours"))
                           for name in names])
    np.save(Path(args.out) / "knn-lussray.npy", rows)
    return {"seconds": seconds, "driver_peak_mb": peak_rss_mb(), "actor_peak_mb": found["peak_rss_mb_search_actors"],
            "search_seconds": found["search_seconds"]}


def run_reference(args: argparse.Namespace, paths: list[str]) -> dict:
    """All features in one process, ``--chunks`` chunks of the full similarity, torch.topk per chunk."""
    import torch

    from lussray.data.partners import list_matrix, read_parquet

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    features = torch.from_numpy(np.concatenate(
        [list_matrix(read_parquet(path, ["embedding"]).column("embedding")) for path in paths]).astype(np.float32))
    features = torch.nn.functional.normalize(features, dim=1)
    neighbours = []
    for chunk in torch.chunk(features, args.chunks):
        neighbours.append(torch.topk(chunk @ features.T, args.k, dim=1).indices)
    rows = torch.cat(neighbours).numpy()
    seconds = time.perf_counter() - started
    np.save(Path(args.out) / "knn-reference.npy", rows)
    return {"seconds": seconds, "peak_mb": peak_rss_mb()}


def _in_subprocess(part: str, args: argparse.Namespace, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    cmd = [sys.executable, __file__, "--part", part, *[f"--{key}={value}" for key, value in vars(args).items()
                                                        if key not in ("part", "repeats") and value is not None]]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"bench_knn: part {part} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=384, help="feature width (384: DINO ViT-S/8)")
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--files", type=int, default=10, help="feature files (one per shard)")
    parser.add_argument("--actors", type=int, default=2, help="search actors, one CPU / faiss thread each")
    parser.add_argument("--block", type=int, default=4096, help="knn.query_block_size")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the reference")
    parser.add_argument("--chunks", type=int, default=16, help="the reference's similarity chunks")
    parser.add_argument("--repeats", type=int, default=1, help="alternated runs of each; the fastest is reported")
    parser.add_argument("--part", choices=["lussray", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench-out"))
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.part:
        paths = ensure_data(args)
        print(json.dumps(run_lussray(args, paths) if args.part == "lussray" else run_reference(args, paths)))
        return
    ensure_data(args)
    loads = [os.getloadavg()[0]]
    ours, theirs = [], []
    for repeat in range(args.repeats):
        print(f"bench_knn: [{repeat + 1}/{args.repeats}] reference (1 process, {args.threads} threads) ...", flush=True)
        theirs.append(_in_subprocess("reference", args, args.threads))
        print(f"bench_knn: [{repeat + 1}/{args.repeats}] lussray ({args.actors} actors) ...", flush=True)
        ours.append(_in_subprocess("lussray", args, 1))
        loads.append(os.getloadavg()[0])
    mine, ref = min(ours, key=lambda r: r["seconds"]), min(theirs, key=lambda r: r["seconds"])
    a, b = np.load(Path(args.out) / "knn-lussray.npy"), np.load(Path(args.out) / "knn-reference.npy")
    same_rows = float((a == b).all(axis=1).mean())
    same_sets = float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a.tolist(), b.tolist())]))
    lussray_peak = max([mine["driver_peak_mb"], *mine["actor_peak_mb"]])
    print(f"\nKNN top-{args.k} of {args.items} x {args.dim} features, CPU ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores), load average {min(loads):.2f}..{max(loads):.2f}")
    print("| measurement | seconds | vs reference | peak RSS of the largest process (MB) |\n|---|---:|---:|---:|")
    actors = ", ".join(f"{v:.0f}" for v in mine["actor_peak_mb"])
    print(f"| lussray knn search, {args.actors} Ray actors x 1 faiss thread | {mine['seconds']:.1f} | "
          f"{mine['seconds'] / ref['seconds']:.2f}x | {lussray_peak:.0f} (driver {mine['driver_peak_mb']:.0f}; "
          f"actors {actors}) |")
    print(f"| reference: 1 process, {args.chunks} chunks + torch.topk, {args.threads} threads | {ref['seconds']:.1f} | "
          f"1.00x | {ref['peak_mb']:.0f} |")
    print(f"identical top-{args.k} lists: {100 * same_rows:.2f} % of rows; mean overlap {100 * same_sets:.3f} %")
    result = {"lussray_seconds": round(mine["seconds"], 2), "reference_seconds": round(ref["seconds"], 2),
              "lussray_peak_mb": round(lussray_peak, 1), "reference_peak_mb": round(ref["peak_mb"], 1),
              "lussray_driver_peak_mb": round(mine["driver_peak_mb"], 1), "lussray_actor_peak_mb": mine["actor_peak_mb"],
              "identical_rows": same_rows, "mean_overlap": same_sets, "items": args.items, "dim": args.dim,
              "k": args.k, "actors": args.actors, "threads": args.threads, "load_average": [min(loads), max(loads)]}
    (Path(args.out) / "bench_knn.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
