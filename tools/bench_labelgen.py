"""Benchmark: label generation through the Ray actor pool vs the bare model, and its memory.

    .venv/bin/python tools/bench_labelgen.py [--sizes 2000 20000] [--actors 2]

For each size N: generate N images (64 px, 10 classes), pack them into 500-image shards, write
a random stage-2 checkpoint (ResNet-18 with pixel attention) and run ``lussray labelgen`` (fixed
tau, so no sweep) on a fresh local cluster. Reported: images/s of the embedding pass through the
actor pool (``--actors`` actors, one torch thread each; actor start-up included), the same model's
``cluster_embedding`` on in-memory tensors in one process with as many threads and the same batch,
and the peak RSS of the driver and of the largest actor (it must not grow with N: every actor
holds one shard at a time and k-means actors hold only their part of the embeddings).

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


def bare(threads: int, images: int = 2048) -> float:
    """images/s of cluster_embedding on in-memory normalised crops, one process."""
    import torch

    from lussray.models.pass_model import PASSModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = PASSModel(**MODEL, pixel_attention=True).eval()
    batch = torch.randn(BATCH, 3, CROP, CROP)
    with torch.inference_mode():
        model.cluster_embedding(batch)  # warm-up
        started = time.perf_counter()
        for _ in range(images // BATCH):
            model.cluster_embedding(batch)
    return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[2000, 20000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench-out"))
    args = parser.parse_args()
    out = Path(args.out)
    runs = {}
    for images in args.sizes:
        folder = out / "labelgen" / f"n{images}"
        make_data(folder, images)
        summary = pool_run(folder, args.actors)
        runs[images] = {"images": summary["images"], "embed_s": summary["step_seconds"]["embed"],
                        "kmeans_s": summary["step_seconds"]["kmeans"],
                        "pseudo_labels_s": summary["step_seconds"]["pseudo_labels"],
                        "pool_images_per_s": summary["images"] / summary["step_seconds"]["embed"],
                        "peak_rss_mb_driver": summary["peak_rss_mb"]["driver"],
                        "peak_rss_mb_actor": summary["peak_rss_mb"]["actor"]}
    bare_rate = bare(args.actors)
    small, large = runs[args.sizes[0]], runs[args.sizes[1]]
    print(f"{'images':>8} {'embed s':>8} {'pool img/s':>10} {'kmeans s':>8} {'labels s':>8} "
          f"{'driver MB':>9} {'actor MB':>9}")
    for images, row in runs.items():
        print(f"{images:>8} {row['embed_s']:>8.1f} {row['pool_images_per_s']:>10.1f} {row['kmeans_s']:>8.1f} "
              f"{row['pseudo_labels_s']:>8.1f} {row['peak_rss_mb_driver']:>9.0f} {row['peak_rss_mb_actor']:>9.0f}")
    print(f"bare cluster_embedding, {args.actors} threads, batch {BATCH}: {bare_rate:.1f} img/s "
          f"(pool/bare at N={args.sizes[1]}: {large['pool_images_per_s'] / bare_rate:.2f})")
    result = {
        "pool_images_per_s": round(large["pool_images_per_s"], 1),
        "bare_images_per_s": round(bare_rate, 1),
        "peak_rss_mb_small": round(max(small["peak_rss_mb_driver"], small["peak_rss_mb_actor"]), 1),
        "peak_rss_mb_large": round(max(large["peak_rss_mb_driver"], large["peak_rss_mb_actor"]), 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_labelgen.json").write_text(json.dumps({"runs": runs, **result}, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
