"""Benchmark: sharded k-means over Ray actors next to single-process faiss.Kmeans and the GEMM bound.

    .venv/bin/python tools/bench_kmeans.py [--points 200000] [--dim 512] [--k 919] [--niter 5]
                                           [--actors 2] [--threads 2] [--files 8] [--repeats 2]
                                           [--out bench-out]

1. Data: ``--points`` seeded standard-normal float32 vectors of ``--dim`` dimensions in ``--files``
   embedding parquet files (the label-generation contract), cached under ``--out`` and reused.
2. Sharded: :func:`lussray.clustering.kmeans.sharded_kmeans` with ``--actors`` actors of one CPU and
   one faiss thread each (rows L2-normalised on load, as label generation does).
3. faiss: ``faiss.Kmeans`` in one process on the same normalised rows, ``--threads`` threads,
   ``max_points_per_centroid`` out of reach (no subsampling). Both sample the same initial rows
   (same seed, ``nredo=1``); the tests show they agree to 1e-4. The baseline uses the OpenBLAS
   kernels the actors choose (:func:`lussray.clustering.kmeans.openblas_env`: SkylakeX on AVX-512
   CPUs, where faiss-cpu's bundled OpenBLAS 0.3.15 falls back to SSE3); one more run shows
   faiss as installed.
4. GEMM bound: ``2 N K D`` flops per iteration at the float32 matmul rate numpy reaches here with
   ``--threads`` threads (the search is one GEMM plus an argmin; the sums are O(N D)).

Seconds per iteration are means over iterations 2..niter (the first one builds indexes and warms
up), best of ``--repeats`` alternated runs; they depend on what else runs on the machine: the load
average is printed. Every measurement
runs in its own process, so each peak RSS is its own. Then a projection for ImageNet-S919 (1.2M x
2048, K=919) on 8 GPUs from stated assumptions and the costs measured here, for the design that keeps
each actor's rows on its GPU (only centroids, sums and counts travel).

Results: a table, bench-out/bench_kmeans.json; the last line printed is one JSON object with the
keys sharded_s_per_iter, faiss_s_per_iter, gemm_bound_s_per_iter, objective_rel_diff.
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

from lussray.clustering.kmeans import openblas_env

SEED = 0
KMEANS_SEED = 1234
#: What Ray prints when its raylet did not register within its fixed 30 s (a machine loaded by other jobs).
RAY_START_TIMEOUT = "The current node timed out during startup"
RAY_START_ATTEMPTS = 10
# Projection assumptions (estimates, not measurements).
TARGET = {"points": 1_200_000, "dim": 2048, "k": 919, "gpus": 8, "niter": 20, "nredo": 30}
ASSUMED_H100_FP32_GEMM_FLOPS = 40e12  # cuBLAS SGEMM reaches ~40 of H100 SXM's 67 TFLOP/s fp32 (no TF32)
ASSUMED_H2D_BYTES_PER_S = 25e9  # PCIe Gen5 x16 host-to-device, pageable numpy memory
ASSUMED_NETWORK_BYTES_PER_S = 2.5e9  # 25 Gbit/s into the driver's node: every actor's K x D float64 sums
ASSUMED_HBM_BYTES_PER_S = 2.0e12  # of H100 SXM's 3.35 TB/s, for streaming kernels (index_add_, casts)
DEVICE_SUM_BYTES_PER_ELEMENT = 20  # float32 read + float64 written and read back + its atomic add


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def ensure_data(cache: Path, points: int, dim: int, files: int) -> list[str]:
    """Seeded random embeddings as parquet files (written once, reused when the spec matches)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = [cache / f"train-{i:06d}.parquet" for i in range(files)]
    marker, spec = cache / "complete.json", {"points": points, "dim": dim, "files": files, "seed": SEED}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        print(f"data: reusing {cache}", flush=True)
        return [str(path) for path in paths]
    print(f"data: writing {points} x {dim} float32 to {files} parquet files in {cache}", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, points, files + 1).astype(int)
    for i, path in enumerate(paths):
        x = np.random.default_rng([SEED, i]).standard_normal((bounds[i + 1] - bounds[i], dim), np.float32)
        keys = pa.array([f"img_{row:08d}" for row in range(bounds[i], bounds[i + 1])])
        embeddings = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)
        pq.write_table(pa.table({"key": keys, "embedding": embeddings}), path)
    marker.write_text(json.dumps(spec))
    return [str(path) for path in paths]


def steady(seconds: list[float]) -> float:
    """Mean seconds per iteration, the first (warm-up) iteration left out when there are others."""
    return float(np.mean(seconds[1:] if len(seconds) > 1 else seconds))


def run_sharded(paths: list[str], k: int, niter: int, actors: int, out: Path) -> dict:
    """Sharded k-means in a fresh Ray cluster of ``actors`` CPUs."""
    import ray

    from lussray.clustering.kmeans import sharded_kmeans

    ray.init(num_cpus=actors, include_dashboard=False, log_to_driver=False)
    result = sharded_kmeans(paths, k, num_actors=actors, niter=niter, seed=KMEANS_SEED, cpus_per_actor=1.0)
    ray.shutdown()
    np.save(out / "kmeans-centroids-sharded.npy", result.centroids)
    return {"s_per_iter": steady(result.iteration_seconds), "iteration_seconds": result.iteration_seconds,
            "objective": result.objective, "total_seconds": result.seconds,
            "peak_rss_mb_per_actor": result.peak_rss_mb_per_actor, "driver_peak_rss_mb": peak_rss_mb()}


def run_overhead(k: int, dim: int, niter: int, actors: int, out: Path) -> dict:
    """Seconds per iteration of the sharded k-means on 4 K rows: its fixed cost (calls, transfers, update)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from lussray.clustering.kmeans import sharded_kmeans

    folder = out / f"kmeans-overhead-{k}x{dim}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, x in enumerate(np.split(np.random.default_rng(SEED).standard_normal((4 * k, dim), np.float32), actors)):
        paths.append(str(folder / f"train-{i:06d}.parquet"))
        pq.write_table(pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)}), paths[-1])
    ray.init(num_cpus=actors, include_dashboard=False, log_to_driver=False)
    result = sharded_kmeans(paths, k, num_actors=actors, niter=max(niter, 5), seed=KMEANS_SEED, cpus_per_actor=1.0,
                            log_every=0)
    ray.shutdown()
    return {"s_per_iter": steady(result.iteration_seconds)}


def run_faiss(paths: list[str], k: int, niter: int, threads: int, out: Path) -> dict:
    """faiss.Kmeans in this process on all rows (normalised as the actors do)."""
    import faiss

    from lussray.clustering.kmeans import ROW_NORM_EPS, read_embeddings_parquet
    from lussray.clustering.lloyd import normalize_rows

    faiss.omp_set_num_threads(threads)
    x = np.concatenate([normalize_rows(read_embeddings_parquet(path)[1], ROW_NORM_EPS) for path in paths])
    kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=1, seed=KMEANS_SEED, max_points_per_centroid=10**7)
    started = time.perf_counter()
    kmeans.train(x)
    total = time.perf_counter() - started
    cumulative = [stats["time"] for stats in kmeans.iteration_stats]
    seconds = np.diff([0.0, *cumulative]).tolist()
    np.save(out / "kmeans-centroids-faiss.npy", kmeans.centroids)
    return {"s_per_iter": steady(seconds), "iteration_seconds": seconds, "objective": float(kmeans.obj[-1]),
            "train_seconds": total, "peak_rss_mb": peak_rss_mb()}


def run_rates(dim: int, k: int) -> dict:
    """float32 GEMM rate, per-row cost of the per-cluster sums, and the driver update at 2048 x 919."""
    from lussray.clustering import lloyd

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((16384, dim), np.float32), rng.standard_normal((dim, k), np.float32)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(5))
    ids = rng.integers(0, k, len(a))
    stats_s = min(_timed(lambda: lloyd.block_stats(a, ids, np.zeros(len(a), np.float32), k)) for _ in range(3))
    parts = [lloyd.PartialStats(rng.standard_normal((TARGET["k"], TARGET["dim"])),
                                rng.integers(1, 200, TARGET["k"]), 1.0) for _ in range(TARGET["gpus"])]
    update_s = min(_timed(lambda: lloyd.update_centroids(lloyd.merge_stats(parts), False)) for _ in range(3))
    return {"gemm_flops": 2 * a.shape[0] * k * dim / best, "sums_s_per_element": stats_s / a.size,
            "driver_update_s_target": update_s}


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def projection(rates: dict, overhead_s: float) -> dict:
    """Estimated seconds per iteration for ImageNet-S919 on 8 GPUs (one actor per GPU), as lussray runs it.

    Each actor keeps its rows on its GPU (the torch engine of ``EmbeddingShard``): one host-to-device
    copy when it loads, then per iteration the centroids go in, the search GEMM and the float64
    per-cluster sums run on the device, and only the (K, D) float64 sums and K counts come back.
    """
    n, d, k, gpus = TARGET["points"], TARGET["dim"], TARGET["k"], TARGET["gpus"]
    per_gpu_rows = n / gpus
    parts = {
        "gemm_s": 2 * per_gpu_rows * k * d / ASSUMED_H100_FP32_GEMM_FLOPS,
        # x.double() written and read, the rows read, float64 atomic adds into K x D: ~20 bytes per element
        "device_sums_s": per_gpu_rows * d * DEVICE_SUM_BYTES_PER_ELEMENT / ASSUMED_HBM_BYTES_PER_S,
        "results_to_host_s": (k * d * 8 + k * 8) / ASSUMED_H2D_BYTES_PER_S,
        "results_to_driver_s": gpus * (k * d * 8 + k * 8) / ASSUMED_NETWORK_BYTES_PER_S,
        "centroids_to_device_s": k * d * 4 / ASSUMED_H2D_BYTES_PER_S,
        "driver_update_s": rates["driver_update_s_target"],
        "ray_overhead_s": overhead_s,
    }
    per_iter = sum(parts.values())
    iterations = TARGET["niter"] * TARGET["nredo"]
    return {**parts, "s_per_iter": per_iter, "iterations": iterations, "total_minutes": per_iter * iterations / 60,
            "load_to_device_s_once": per_gpu_rows * d * 4 / ASSUMED_H2D_BYTES_PER_S,
            "device_mb_per_actor": per_gpu_rows * d * 4 / 2**20,
            "previous_design_cpu_sums_s": per_gpu_rows * d * rates["sums_s_per_element"],
            "previous_design_resend_s": per_gpu_rows * d * 4 / ASSUMED_H2D_BYTES_PER_S}


def _in_subprocess(part: str, args: argparse.Namespace, threads: int, blas: dict[str, str] | None = None) -> dict:
    """Run one part in a fresh process; ``blas`` replaces any OPENBLAS_CORETYPE of this environment."""
    env = {key: value for key, value in os.environ.items() if key != "OPENBLAS_CORETYPE"}
    env.update({"OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
                "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), **(blas or {})})
    cmd = [sys.executable, __file__, "--part", part, "--points", str(args.points), "--dim", str(args.dim),
           "--k", str(args.k), "--niter", str(args.niter), "--actors", str(args.actors),
           "--threads", str(args.threads), "--files", str(args.files), "--out", args.out]
    for _ in range(RAY_START_ATTEMPTS):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            return json.loads(result.stdout.strip().splitlines()[-1])
        if RAY_START_TIMEOUT not in result.stderr:
            break
        print(f"bench_kmeans: part {part}: Ray did not start within its 30 s (load {os.getloadavg()[0]:.0f}); "
              f"again", flush=True)
    sys.exit(f"bench_kmeans: part {part} failed:\n{result.stderr[-3000:]}")


def run_part(args: argparse.Namespace, out: Path) -> dict:
    """One measurement, in this (child) process."""
    paths = ensure_data(out / f"kmeans-data-{args.points}x{args.dim}", args.points, args.dim, args.files)
    if args.part == "sharded":
        return run_sharded(paths, args.k, args.niter, args.actors, out)
    if args.part == "faiss":
        return run_faiss(paths, args.k, args.niter, args.threads, out)
    if args.part == "overhead":
        return run_overhead(args.k, args.dim, args.niter, args.actors, out)
    return run_rates(args.dim, args.k)


def print_table(args: argparse.Namespace, sharded: dict, single: dict, as_installed: dict, blas: dict,
                gemm_bound: float, rel_diff: float, max_centroid_diff: float) -> None:
    """The markdown table of the measurements."""
    print(f"\nk-means, {args.points} x {args.dim} float32, K={args.k}, niter={args.niter}, nredo=1, CPU "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), load {os.getloadavg()[0]:.2f}")
    print("| measurement | s/iteration | vs faiss | peak RSS (MB) |\n|---|---:|---:|---:|")
    actors = ", ".join(f"{value:.0f}" for value in sharded["peak_rss_mb_per_actor"])
    print(f"| sharded, {args.actors} Ray actors x 1 faiss thread | {sharded['s_per_iter']:.3f} | "
          f"{sharded['s_per_iter'] / single['s_per_iter']:.2f}x | actors {actors}; driver "
          f"{sharded['driver_peak_rss_mb']:.0f} |")
    print(f"| faiss.Kmeans, 1 process x {args.threads} threads, {blas or 'default kernels'} | "
          f"{single['s_per_iter']:.3f} | 1.00x | {single['peak_rss_mb']:.0f} |")
    print(f"| faiss.Kmeans as installed (OpenBLAS picks its kernels), {args.threads} threads | "
          f"{as_installed['s_per_iter']:.3f} | {as_installed['s_per_iter'] / single['s_per_iter']:.2f}x | "
          f"{as_installed['peak_rss_mb']:.0f} |")
    print(f"| GEMM bound (2NKD / numpy sgemm rate, {args.threads} threads) | {gemm_bound:.3f} | "
          f"{gemm_bound / single['s_per_iter']:.2f}x | - |")
    print(f"objective: sharded {sharded['objective']:.6g}, faiss {single['objective']:.6g}, relative difference "
          f"{rel_diff:.2e}; max |centroid difference| {max_centroid_diff:.2e}")


def print_projection(estimate: dict) -> None:
    t = TARGET
    print(f"\nPROJECTION (an estimate, not a measurement): {t['points']} x {t['dim']}, K={t['k']}, one actor per "
          f"GPU on {t['gpus']} H100s, niter={t['niter']} x nredo={t['nredo']}, rows kept on each GPU. Assumed: "
          f"cuBLAS fp32 GEMM {ASSUMED_H100_FP32_GEMM_FLOPS / 1e12:.0f} TFLOP/s, streaming kernels at "
          f"{ASSUMED_HBM_BYTES_PER_S / 1e12:.1f} TB/s, host <-> device {ASSUMED_H2D_BYTES_PER_S / 1e9:.0f} GB/s, "
          f"actors -> driver {ASSUMED_NETWORK_BYTES_PER_S / 1e9:.1f} GB/s; "
          "measured here: the driver merge + update at K x 2048, the fixed cost of a sharded iteration. tools/gpu_check.py times the "
          "device step at one actor's shape when a GPU is lent.")
    print("  " + ", ".join(f"{key} {value:.4f}" for key, value in estimate.items()
                           if key.endswith("_s") and not key.startswith("previous")))
    print(f"  -> {estimate['s_per_iter']:.3f} s/iteration, {estimate['iterations']} iterations "
          f"~ {estimate['total_minutes']:.1f} min, plus {estimate['load_to_device_s_once']:.2f} s to load each "
          f"GPU once; {estimate['device_mb_per_actor']:.0f} MB of embeddings per GPU. The previous design "
          f"re-sent them every iteration ({estimate['previous_design_resend_s']:.3f} s) and summed on the CPU "
          f"({estimate['previous_design_cpu_sums_s']:.3f} s).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=919)
    parser.add_argument("--niter", type=int, default=5)
    parser.add_argument("--actors", type=int, default=2, help="Ray actors, one CPU and one faiss thread each")
    parser.add_argument("--threads", type=int, default=2, help="threads of single-process faiss and of the GEMM")
    parser.add_argument("--files", type=int, default=8, help="parquet files the embeddings are split into")
    parser.add_argument("--repeats", type=int, default=2, help="alternated runs of each; the fastest is reported")
    parser.add_argument("--part", choices=["sharded", "faiss", "rates", "overhead"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench-out"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part:
        print(json.dumps(run_part(args, out)))
        return

    print(f"bench_kmeans: load average {os.getloadavg()}", flush=True)
    ensure_data(out / f"kmeans-data-{args.points}x{args.dim}", args.points, args.dim, args.files)
    print("bench_kmeans: rates (GEMM, sums, driver update) ...", flush=True)
    rates = _in_subprocess("rates", args, args.threads)
    # The actors pick OpenBLAS kernels with openblas_env(); the faiss baseline gets the same ones.
    blas = openblas_env()
    print("bench_kmeans: faiss.Kmeans with the OpenBLAS kernels faiss-cpu picks itself ...", flush=True)
    as_installed = _in_subprocess("faiss", args, args.threads)
    singles, shardeds = [], []
    for repeat in range(args.repeats):  # alternated, best of each: the machine is shared
        print(f"bench_kmeans: [{repeat + 1}/{args.repeats}] single-process faiss.Kmeans {blas} ...", flush=True)
        singles.append(_in_subprocess("faiss", args, args.threads, blas))
        print(f"bench_kmeans: [{repeat + 1}/{args.repeats}] sharded k-means over Ray actors ...", flush=True)
        shardeds.append(_in_subprocess("sharded", args, 1))
    single = min(singles, key=lambda run: run["s_per_iter"])
    sharded = min(shardeds, key=lambda run: run["s_per_iter"])
    gemm_bound = 2 * args.points * args.k * args.dim / rates["gemm_flops"]
    rel_diff = abs(sharded["objective"] - single["objective"]) / abs(single["objective"])
    centroid_diff = float(np.abs(np.load(out / "kmeans-centroids-sharded.npy")
                                 - np.load(out / "kmeans-centroids-faiss.npy")).max())
    print_table(args, sharded, single, as_installed, blas, gemm_bound, rel_diff, centroid_diff)
    print("bench_kmeans: fixed cost per iteration (sharded k-means on 4 K rows) ...", flush=True)
    overhead = _in_subprocess("overhead", args, 1)
    print(f"fixed cost of a sharded iteration (calls, K x D transfers, driver update at K={args.k}, "
          f"D={args.dim}): {overhead['s_per_iter']:.3f} s")
    estimate = projection(rates, overhead["s_per_iter"])
    print_projection(estimate)
    summary = {"sharded_s_per_iter": sharded["s_per_iter"], "faiss_s_per_iter": single["s_per_iter"],
               "gemm_bound_s_per_iter": gemm_bound, "objective_rel_diff": rel_diff}
    result = {**summary, "config": vars(args) | {"part": None}, "load_average_end": os.getloadavg(),
              "sharded": sharded, "faiss": single, "faiss_as_installed": as_installed, "blas_env": blas,
              "rates": rates, "overhead": overhead,
              "all_s_per_iter": {"sharded": [run["s_per_iter"] for run in shardeds],
                                 "faiss": [run["s_per_iter"] for run in singles]}, "max_centroid_abs_diff": centroid_diff,
              "projection_s919_8gpu": estimate, "projection_assumptions": {
                  "h100_fp32_gemm_flops": ASSUMED_H100_FP32_GEMM_FLOPS, "h2d_bytes_per_s": ASSUMED_H2D_BYTES_PER_S,
                  "hbm_bytes_per_s": ASSUMED_HBM_BYTES_PER_S, "network_bytes_per_s": ASSUMED_NETWORK_BYTES_PER_S,
                  "device_sum_bytes_per_element": DEVICE_SUM_BYTES_PER_ELEMENT, **TARGET}}
    (out / "bench_kmeans.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
