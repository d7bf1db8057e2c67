"""Benchmark: the CPU a backpressured Ray Data stream takes from the process that consumes it.

    .venv/bin/python tools/bench_stream_idle.py [--images 2000] [--idle-s 5] [--pauses 0,10]

A Train worker consumes its epoch stream in its own process, where Ray Data's scheduling loop
runs. While the worker computes a step the read-ahead fills up and the loop, with no task to
wait on, polls. This measures, for each ``ingest.scheduler_pause_ms`` (0 = Ray's own loop, the
baseline), in one run over the same shards:

1. drain: seconds to read the whole epoch as fast as possible (from the first batch), and images/s;
2. idle CPU: process CPU-seconds of the consumer of a fresh stream over ``--idle-s`` seconds in
   which it takes no batch (the read-ahead full), as a Train worker computing a long step.

Shards are generated once under bench-out/stream-idle-<images>. Prints a table, writes
bench-out/bench_stream_idle.json; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_ingest import BATCH, CROPS, make_data  # noqa: E402


def _stream(shards: Path, pause_ms: float, max_ahead_mb: int):
    from lussray.config import IngestConfig
    from lussray.data.ingest import multicrop_stream
    from lussray.data.shards import read_manifest

    ingest = IngestConfig(map_batch_size=BATCH, cpus_per_map_task=1.0, max_ahead_mb=max_ahead_mb,
                          scheduler_pause_ms=pause_ms)
    stream = multicrop_stream(str(shards), "train", "pretrain", CROPS, 7, ingest, seed=0)
    rows = read_manifest(str(shards), "train")["num_samples"]
    return stream.batches(stream.plan(1, rows).windows(0, 0), BATCH)


def measure(shards: Path, pause_ms: float, idle_s: float, max_ahead_mb: int) -> dict[str, float]:
    """Drain rate and idle CPU of one worker's epoch stream paced by ``pause_ms``."""
    batches = _stream(shards, pause_ms, max_ahead_mb)
    next(batches)  # the clock starts at the first batch: start-up is not throughput
    started, images = time.perf_counter(), 0
    for batch in batches:
        images += len(batch["crop_0"])
    drain = time.perf_counter() - started
    batches = _stream(shards, pause_ms, max_ahead_mb)
    next(batches)
    time.sleep(idle_s)  # let the read-ahead fill, so the measured window below is all backpressure
    cpu, wall = time.process_time(), time.perf_counter()
    time.sleep(idle_s)
    idle_cpu, idle_wall = time.process_time() - cpu, time.perf_counter() - wall
    batches.close()
    return {"pause_ms": pause_ms, "idle_cpu_s": round(idle_cpu, 2), "idle_cpu_share": round(idle_cpu / idle_wall, 3),
            "drain_s": round(drain, 2), "drain_images_per_s": round(images / drain, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--pauses", default="0,10", help="scheduler pauses to compare, in ms; 0 = Ray's own loop")
    parser.add_argument("--max-ahead-mb", type=int, default=64, help="read-ahead bound (small so it fills quickly)")
    parser.add_argument("--cpus", type=int, default=3, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--out", default=str(ROOT / "bench-out"))
    args = parser.parse_args()
    import ray

    out = Path(args.out)
    _, shards = make_data(out / f"stream-idle-{args.images}-{args.size}", args.images, args.size)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    rows = []
    for pause in [float(p) for p in args.pauses.split(",")]:
        print(f"bench_stream_idle: scheduler_pause_ms={pause:g} ...", flush=True)
        rows.append(measure(shards, pause, args.idle_s, args.max_ahead_mb))
    ray.shutdown()
    print(f"\n{args.images} images of {args.size} px, one worker's epoch (decode + 2x224 crops), read-ahead "
          f"{args.max_ahead_mb} MB; {os.cpu_count()} cores, Ray with {args.cpus} logical CPUs; "
          f"idle window {args.idle_s:g} s")
    print("| scheduler_pause_ms | idle CPU-s | idle core share | drain s | drain images/s |\n|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['pause_ms']:g}{' (Ray alone)' if row['pause_ms'] == 0 else ''} | {row['idle_cpu_s']:.2f} | "
              f"{row['idle_cpu_share']:.2f} | {row['drain_s']:.2f} | {row['drain_images_per_s']:.1f} |")
    result = {"images": args.images, "size": args.size, "idle_s": args.idle_s, "max_ahead_mb": args.max_ahead_mb,
              "cpus": args.cpus, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_stream_idle.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
