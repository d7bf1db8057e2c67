"""Benchmark: the PASS training step inside Ray Train with streaming ingest vs a bare loop.

    .venv/bin/python tools/bench_train.py [--preset s50] [--steps 8] [--threads 2]

Pipeline efficiency: images/s of ``python -m lussray.train`` (1 Ray Train worker, views decoded and
augmented by Ray Data from shards, on the same cores) next to the same model, batch, loss and
optimiser in a bare single-process loop on uint8 views already in memory, and the Ray run again with
Ray Data's scheduling loop not paced (``ingest.scheduler_pause_ms=0``, see lussray.data.ingest.pace_scheduler). Both use ``--threads``
torch threads. On a CPU machine the decoding and augmentation of a batch cannot overlap with the
step when both need the same cores, so the bench also times the decode + augment of one batch
alone (``multicrop_batch`` on 32 JPEGs of the shards, one process) and prints the limit of this
machine, ``batch / (bare step + decode and augment)``, beside the two figures. Then step time and
peak memory (RSS on CPU, allocated GPU memory on CUDA) of the S50 (R18, 2x224 + 6x96) and S919
(R50, 2x224) configurations at batch 32, bare.

Every measurement runs in its own process (clean peak memory). Results: a table, and
bench-out/bench_train.json; the last line printed is one JSON object.
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

PRESETS = {  # dataset preset and overrides: the published crops and model, batch 32, one worker
    "s50": ("imagenet-s50", []),
    "s919": ("imagenet-s919", []),
}
COMMON = ["pretrain.loop.num_workers=1", "pretrain.loop.use_gpu=false", "pretrain.loop.batch_size_per_worker=32",
          "pretrain.loop.cpus_per_worker=1", "pretrain.loop.checkpoint_every_steps=100000",
          "pretrain.loop.log_every_steps=1", "ray.num_cpus=3", "ingest.cpus_per_map_task=0.5",
          "ingest.map_batch_size=16", "ingest.max_ahead_mb=64"]


def bare(preset: str, steps: int, threads: int) -> dict:
    """Timed PASS steps on in-memory views (first step is warm-up)."""
    import numpy as np
    import torch

    from lussray.config import load_config
    from lussray.data import augment
    from lussray.stages.loop import StepState, peak_memory_mb
    from lussray.stages.pretrain import PretrainMethod, queue_length_per_worker

    torch.set_num_threads(threads)
    dataset, overrides = PRESETS[preset]
    config = load_config(dataset, overrides=overrides + COMMON)
    cfg, loop = config.pretrain, config.pretrain.loop
    batch_size = loop.batch_size_per_worker
    method = PretrainMethod(cfg, sum(cfg.crops.num_crops),
                            queue_length_per_worker(cfg.queue_length, batch_size, 1))
    model = method.build_model()
    from lussray.optim.lars import LARS

    optimizer = LARS([p for p in model.parameters() if p.requires_grad], lr=loop.base_lr,
                     weight_decay=loop.weight_decay, trust_coefficient=loop.lars_trust_coefficient)
    rng = np.random.default_rng(0)
    transform = augment.MultiCropTransform(cfg.crops.num_crops, cfg.crops.crop_sizes, cfg.crops.min_scales,
                                           cfg.crops.max_scales)
    image = rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)
    samples = [transform(image, rng) for _ in range(batch_size)]
    batch = {f"crop_{v}": torch.from_numpy(np.stack([views[v] for views, _ in samples]))
             for v in range(len(samples[0][0]))}
    boxes = np.stack([np.stack([b.as_array() for b in boxes]) for _, boxes in samples]).astype(np.float32)
    grid0, grid1 = augment.correspondence_grids_batch(boxes[:, 0], boxes[:, 1], cfg.p2p_grid_size)
    batch["p2p_grid_0"], batch["p2p_grid_1"] = torch.from_numpy(grid0), torch.from_numpy(grid1)
    state = StepState(step=0, epoch=0, steps_per_epoch=1000, total_steps=1000)
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        method.before_step(model, state)
        loss, _ = method.training_step(model, batch, state)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward(model, state)
        optimizer.step()
        state.step += 1
        times.append(time.perf_counter() - started)
    step_seconds = sum(times[1:]) / steps
    return {"images_per_s": batch_size / step_seconds, "step_seconds": step_seconds,
            "peak_memory_mb": peak_memory_mb(torch.device("cpu"))}


def augment_alone(preset: str, batches: int, shards: Path) -> dict:
    """Seconds to decode and augment one batch of 32 JPEGs of the shards (first batch is warm-up)."""
    from lussray.config import load_config
    from lussray.data.ingest import IMAGE_MEMBER, multicrop_batch, multicrop_stream
    from lussray.data.shards import iter_tar, shard_paths
    from lussray.seeds import sample_rng

    dataset, overrides = PRESETS[preset]
    config = load_config(dataset, overrides=overrides + COMMON)
    stream = multicrop_stream(str(shards), "train", "pretrain", config.pretrain.crops, config.pretrain.p2p_grid_size,
                              config.ingest, seed=0)
    samples = []
    for path in shard_paths(str(shards), "train"):
        samples += [(key, members[IMAGE_MEMBER]) for key, members in iter_tar(path)]
        if len(samples) >= 32 * (batches + 1):
            break
    times = []
    for index in range(batches + 1):
        chunk = samples[32 * index:32 * (index + 1)]
        batch = {IMAGE_MEMBER: [data for _, data in chunk]}
        started = time.perf_counter()
        multicrop_batch(batch, rngs=[sample_rng(0, 0, 0, key) for key, _ in chunk], **stream.fn_kwargs)
        times.append(time.perf_counter() - started)
    return {"batch_seconds": sum(times[1:]) / batches}


def ray_run(preset: str, steps: int, threads: int, shards: Path, out: Path, extra: tuple[str, ...] = ()) -> dict:
    """``python -m lussray.train`` for warm-up + ``steps`` steps; throughput from its metrics."""
    dataset, overrides = PRESETS[preset]
    run = out / f"train-run-{preset}"
    subprocess.run(["rm", "-rf", str(run)], check=True)
    cmd = [sys.executable, "-m", "lussray.train", "--dataset", dataset, "--data", str(shards), "--run", str(run),
           "--max-steps", str(steps + 1), *overrides, *COMMON, *extra, f"pretrain.loop.torch_threads={threads}",
           f"dataset.num_classes={json.loads((shards / 'train' / 'manifest.json').read_text())['num_classes']}"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    timed = [row for row in rows if "loss" in row][1:]  # the first step includes pipeline start-up
    step_seconds = sum(row["step_seconds"] for row in timed) / len(timed)
    return {"images_per_s": 32 / step_seconds, "step_seconds": step_seconds,
            "peak_memory_mb": max(row["peak_rss_mb"] for row in timed)}


def _in_subprocess(part: str, preset: str, steps: int, threads: int, out: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--part", part, "--preset", preset, "--steps", str(steps),
                             "--threads", str(threads), "--out", str(out)],
                            check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="s50", choices=sorted(PRESETS), help="configuration of the Ray/bare comparison")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--part", choices=["bare", "augment"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench-out"))
    args = parser.parse_args()
    out = Path(args.out)
    from bench_ingest import make_data

    _, shards = make_data(out / "ingest-5000-256", 5000, 256)
    if args.part:
        part = bare(args.preset, args.steps, args.threads) if args.part == "bare" else \
            augment_alone(args.preset, args.steps, shards)
        print(json.dumps(part))
        return
    print(f"bench_train: Ray Train + Ray Data, {args.preset}, {args.steps} timed steps ...", flush=True)
    ray_result = ray_run(args.preset, args.steps, args.threads, shards, out)
    print("bench_train: the same with Ray Data's own scheduling loop (ingest.scheduler_pause_ms=0) ...", flush=True)
    unpaced = ray_run(args.preset, args.steps, args.threads, shards, out, ("ingest.scheduler_pause_ms=0",))
    print("bench_train: bare loop ...", flush=True)
    bare_result = _in_subprocess("bare", args.preset, args.steps, args.threads, out)
    print("bench_train: decode + augment alone ...", flush=True)
    augment_seconds = _in_subprocess("augment", args.preset, args.steps, args.threads, out)["batch_seconds"]
    limit = 32 / (bare_result["step_seconds"] + augment_seconds)
    configs = {}
    for preset in PRESETS:
        print(f"bench_train: step time and memory, {preset} ...", flush=True)
        configs[preset] = _in_subprocess("bare", preset, 2, args.threads, out)
    ratio = ray_result["images_per_s"] / bare_result["images_per_s"]
    of_limit = ray_result["images_per_s"] / limit
    print(f"\nPASS training step, batch 32, 1 worker, {args.threads} torch threads, CPU "
          f"({os.cpu_count()} cores)")
    print("| measurement | images/s | s/step | peak memory (MB) |\n|---|---:|---:|---:|")
    print(f"| Ray Train + streaming Ray Data ingest ({args.preset}) | {ray_result['images_per_s']:.2f} | "
          f"{ray_result['step_seconds']:.2f} | {ray_result['peak_memory_mb']:.0f} |")
    print(f"| the same, Ray Data's loop not paced (scheduler_pause_ms=0) | {unpaced['images_per_s']:.2f} | "
          f"{unpaced['step_seconds']:.2f} | {unpaced['peak_memory_mb']:.0f} |")
    print(f"| bare loop, in-memory views ({args.preset}) | {bare_result['images_per_s']:.2f} | "
          f"{bare_result['step_seconds']:.2f} | {bare_result['peak_memory_mb']:.0f} |")
    print(f"| decode + augment of one batch alone ({args.preset}) | {32 / augment_seconds:.2f} | "
          f"{augment_seconds:.2f} | - |")
    print(f"| limit of this machine: bare step + decode and augment | {limit:.2f} | {32 / limit:.2f} | - |")
    for preset, label in (("s50", "S50: R18, 2x224 + 6x96"), ("s919", "S919: R50, 2x224")):
        r = configs[preset]
        print(f"| bare, {label} | {r['images_per_s']:.2f} | {r['step_seconds']:.2f} | {r['peak_memory_mb']:.0f} |")
    print(f"Ray / bare: {ratio:.3f}; Ray / limit: {of_limit:.3f} (target >= 0.85)")
    result = {"ray_images_per_s": round(ray_result["images_per_s"], 3),
              "ray_unpaced_images_per_s": round(unpaced["images_per_s"], 3),
              "bare_images_per_s": round(bare_result["images_per_s"], 3),
              "limit_images_per_s": round(limit, 3), "augment_batch_seconds": round(augment_seconds, 3),
              "efficiency": round(ratio, 3), "of_limit": round(of_limit, 3), "preset": args.preset,
              "threads": args.threads, "load_average": os.getloadavg()[0],
              "configs": {k: {m: round(v, 3) for m, v in r.items()} for k, r in configs.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
