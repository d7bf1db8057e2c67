"""Benchmark: label generation through the Ray actor pool vs the bare model, and its memory.

    .venv/bin/python tools/bench_labelgen.py [--sizes 2000 20000] [--actors 2]

For each size N: generate N images (64 px, 10 classes), pack them into 500-image shards, write
a random stage-2 checkpoint (ResNet-18 with pixel attention) and run ``lussray labelgen`` (fixed
tau, so no sweep) on a fresh local cluster. Reported:

- the embedding pass through the actor pool (``--actors`` actors, one torch thread each): its
  start-up (until every actor began its first shard) in seconds, its steady-state images/s
  (``pool_images_per_s``: per actor, images over the span of its shards, summed), the wall-clock
  rate with start-up included, and where the actors' steady-state time went (forward pass,
  waiting for input, writing parquet, the rest; decoding runs in a prefetch thread beside the
  forward and is shown as its own share);
- the bare forward pass (``bare_images_per_s``): the same model's ``cluster_embedding`` on
  in-memory normalised crops with the same batch and the same CPUs, in two layouts: one process
  with ``--actors`` threads, and ``--actors`` processes with one thread each started together
  (the pool's layout). Both are measured before and after the pool runs and the fastest of the
  four is the reference, so a slow moment of a shared machine never flatters the ratio. (On a
  loaded machine the multi-threaded layout collapses: OpenMP threads wait for each other on
  oversubscribed cores.)
- the peak RSS of the driver and of the largest actor (it must not grow with N: every actor holds
  one shard at a time and k-means actors hold only their part of the embeddings).

Results: a table, bench-out/bench_labelgen.json; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLASSES, SIZE, CROP, BATCH = 10, 64, 56, 64
MODEL = {"arch": "resnet18", "hidden_dim": 64, "feat_dim": 32, "num_prototypes": 20, "shallow_stages": ()}
OVERRIDES = ["dataset.num_classes=10", "pretrain.arch=resnet18", "pretrain.hidden_mlp=64", "pretrain.feat_dim=32",
             "pretrain.num_prototypes=20", f"labelgen.crop_size={CROP}", f"ingest.eval_short_side={SIZE}",
             f"labelgen.batch_size={BATCH}", "labelgen.kmeans_redo=1", "labelgen.kmeans_iterations=10",
             "labelgen.torch_threads=1", "ray.address=local"]


def _lussray(*args: str) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run([sys.executable, "-m", "lussray.cli", *args], check=True, env=env, stdout=subprocess.DEVNULL)


def make_data(folder: Path, images: int) -> None:
    """Generated tree, shards and a random stage-2 checkpoint under ``folder``."""
    import torch

    from lussray.models.pass_model import PixelAttentionModel

    if not (folder / "shards" / "train" / "manifest.json").exists():
        _lussray("synth", "--out", str(folder / "tree"), "--classes", str(CLASSES), "--train-per-class",
                 str(images // CLASSES), "--val-per-class", "2", "--test-per-class", "1", "--semi-per-class", "2",
                 "--size", str(SIZE), "--workers", "2")
        _lussray("prepare", "--src", str(folder / "tree"), "--out", str(folder / "shards"), "--workers", "2",
                 "--samples-per-shard", "500", "dataset.num_classes=10")
    checkpoint = folder / "checkpoint.pt"
    if not checkpoint.exists():
        torch.manual_seed(0)
        torch.save({"model": PixelAttentionModel(**MODEL).state_dict()}, checkpoint)


def pool_run(folder: Path, actors: int) -> dict:
    """One labelgen run on a fresh run folder; its summary."""
    run = folder / f"run-{time.time_ns()}"
    _lussray("labelgen", "--data", str(folder / "shards"), "--run", str(run), "--checkpoint",
             str(folder / "checkpoint.pt"), "--tau", "0.3", f"ray.num_cpus={actors + 2}",
             f"labelgen.actor_pool_min={actors}", f"labelgen.actor_pool_max={actors}",
             f"labelgen.kmeans_actors={actors}", *OVERRIDES)
    return json.loads((run / "labelgen" / "summary.json").read_text())


def bare(threads: int, images: int = 4096, barrier=None) -> float:
    """images/s of cluster_embedding on in-memory normalised crops, one process with ``threads`` threads."""
    import torch

    from lussray.models.pass_model import PASSModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = PASSModel(**MODEL, pixel_attention=True).eval()
    batch = torch.randn(BATCH, 3, CROP, CROP)
    with torch.inference_mode():
        model.cluster_embedding(batch)  # warm-up
        if barrier is not None:
            barrier.wait()
        started = time.perf_counter()
        for _ in range(images // BATCH):
            model.cluster_embedding(batch)
    return images // BATCH * BATCH / (time.perf_counter() - started)


def _bare_one_thread(barrier) -> float:
    return bare(1, barrier=barrier)


def bare_per_process(processes: int) -> float:
    """Summed images/s of ``processes`` processes with one thread each, started together (the pool's layout)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        barrier = manager.Barrier(processes)
        with context.Pool(processes) as pool:
            return float(sum(pool.map(_bare_one_thread, [barrier] * processes)))


def row_of(summary: dict) -> dict:
    """The figures of one labelgen run."""
    embed = summary["pools"]["embed"]
    return {"images": summary["images"], "embed_s": summary["step_seconds"]["embed"],
            "ready_s": embed["ready_s"], "startup_s": embed["startup_s"],
            "pool_images_per_s": embed["steady_images_per_s"],
            "wall_images_per_s": summary["images"] / summary["step_seconds"]["embed"],
            "shares": embed["shares"], "decode_share": embed["decode_share"],
            "kmeans_s": summary["step_seconds"]["kmeans"], "pseudo_labels_s": summary["step_seconds"]["pseudo_labels"],
            "peak_rss_mb_driver": summary["peak_rss_mb"]["driver"], "peak_rss_mb_actor": summary["peak_rss_mb"]["actor"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[2000, 20000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench-out"))
    args = parser.parse_args()
    out = Path(args.out)
    print(f"bench_labelgen: load average {os.getloadavg()}", flush=True)
    for images in args.sizes:
        make_data(out / "labelgen" / f"n{images}", images)
    bare_rates = {"threads_before": bare(args.actors), "processes_before": bare_per_process(args.actors)}
    runs = {images: row_of(pool_run(out / "labelgen" / f"n{images}", args.actors)) for images in args.sizes}
    bare_rates.update(threads_after=bare(args.actors), processes_after=bare_per_process(args.actors))
    bare_rate = max(bare_rates.values())
    small, large = runs[args.sizes[0]], runs[args.sizes[1]]
    print(f"\nload average {os.getloadavg()}")
    print(f"{'images':>8} {'embed s':>8} {'start-up s':>10} {'pool img/s':>10} {'wall img/s':>10} {'kmeans s':>8} "
          f"{'labels s':>8} {'driver MB':>9} {'actor MB':>9}")
    for images, row in runs.items():
        print(f"{images:>8} {row['embed_s']:>8.1f} {row['startup_s']:>10.1f} {row['pool_images_per_s']:>10.1f} "
              f"{row['wall_images_per_s']:>10.1f} {row['kmeans_s']:>8.1f} {row['pseudo_labels_s']:>8.1f} "
              f"{row['peak_rss_mb_driver']:>9.0f} {row['peak_rss_mb_actor']:>9.0f}")
    shares = ", ".join(f"{name} {100 * value:.1f}%" for name, value in large["shares"].items())
    print(f"actors' steady-state time at N={args.sizes[1]}: {shares}; decoding beside it (prefetch thread) "
          f"{100 * large['decode_share']:.1f}%")
    print(f"bare cluster_embedding, batch {BATCH}, img/s: 1 process x {args.actors} threads "
          f"{bare_rates['threads_before']:.1f} (before) / {bare_rates['threads_after']:.1f} (after); {args.actors} "
          f"processes x 1 thread {bare_rates['processes_before']:.1f} / {bare_rates['processes_after']:.1f}")
    print(f"pool (steady state) / bare (the fastest of the four) at N={args.sizes[1]}: "
          f"{large['pool_images_per_s'] / bare_rate:.2f}")
    result = {
        "pool_images_per_s": round(large["pool_images_per_s"], 1),
        "bare_images_per_s": round(bare_rate, 1),
        "pool_over_bare": round(large["pool_images_per_s"] / bare_rate, 3),
        "startup_s": large["startup_s"],
        "ready_s": large["ready_s"],
        "wall_images_per_s": round(large["wall_images_per_s"], 1),
        "bare_runs_images_per_s": {name: round(value, 1) for name, value in bare_rates.items()},
        "peak_rss_mb_small": round(max(small["peak_rss_mb_driver"], small["peak_rss_mb_actor"]), 1),
        "peak_rss_mb_large": round(max(large["peak_rss_mb_driver"], large["peak_rss_mb_actor"]), 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_labelgen.json").write_text(json.dumps({"runs": runs, "load_average_end": os.getloadavg(),
                                                        **result}, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
