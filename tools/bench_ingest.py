"""Benchmark: decode + two 224 crops with the full PASS augmentation, three ways, one run.

    .venv/bin/python tools/bench_ingest.py [--images 5000] [--size 256] [--cpus 2]

1. the Ray Data pipeline of lussray (the seeded epoch stream: window reads -> map_batches(multicrop_batch));
2. the baseline: torchvision ``ImageFolder`` + ``DataLoader(num_workers=2)`` over the same JPEGs,
   applying the same per-image transform (lussray.data.augment.MultiCropTransform);
3. decode only (the limit): JPEG decoding of the same files in ``--cpus`` processes.

The dataset (``lussray synth``) and its shards are cached under bench-out/ingest-<images>-<size>.
Prints a table, writes bench-out/bench_ingest.json; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lussray.cli import main as lussray_main  # noqa: E402
from lussray.config import MultiCropConfig  # noqa: E402
from lussray.data import augment  # noqa: E402

CROPS = MultiCropConfig(num_crops=[2], crop_sizes=[224], min_scales=[0.08], max_scales=[1.0])
CROP_KWARGS = {
    "num_crops": CROPS.num_crops, "crop_sizes": CROPS.crop_sizes, "min_scales": CROPS.min_scales,
    "max_scales": CROPS.max_scales, "flip_p": CROPS.flip_p, "color_jitter_strength": CROPS.color_jitter_strength,
    "grayscale_p": CROPS.grayscale_p, "blur_p": CROPS.blur_p,
}
BATCH = 32


def make_data(out: Path, images: int, size: int, classes: int = 10) -> tuple[Path, Path]:
    """Generated tree + shards, reused when already there."""
    tree, shards = out / "tree", out / "shards"
    per_class = -(-images // classes)
    common = ["--dataset", "synthetic-demo", f"dataset.num_classes={classes}"]
    assert lussray_main(["synth", "--out", str(tree), "--classes", str(classes), "--train-per-class", str(per_class),
                         "--val-per-class", "1", "--test-per-class", "1", "--semi-per-class", "1",
                         "--size", str(size), "--seed", "0", *common]) == 0
    assert lussray_main(["prepare", "--src", str(tree), "--out", str(shards), "--splits", "train",
                         "--samples-per-shard", "250", *common]) == 0
    return tree, shards


def bench_ray(shards: Path, cpus: int) -> float:
    import ray

    from lussray.config import IngestConfig
    from lussray.data.ingest import multicrop_stream
    from lussray.data.shards import read_manifest

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ingest = IngestConfig(map_batch_size=BATCH, cpus_per_map_task=1.0)
    stream = multicrop_stream(str(shards), "train", "pretrain", CROPS, 7, ingest, seed=0)
    rows = read_manifest(str(shards), "train")["num_samples"]
    dataset = stream.dataset(stream.plan(1, rows).windows(0, 0))  # one worker's epoch, as training reads it
    count, started = 0, None
    for batch in dataset.iter_batches(batch_size=BATCH, batch_format="numpy", prefetch_batches=4):
        if started is None:  # start the clock at the first batch: cluster start-up is not throughput
            started = time.perf_counter()
            continue
        count += len(batch["crop_0"])
    elapsed = time.perf_counter() - started
    ray.shutdown()
    return count / elapsed


class _SameTransform:
    """The per-image work of the Ray pipeline, as a torchvision transform on a PIL image."""

    def __init__(self) -> None:
        self.transform = augment.MultiCropTransform(**CROP_KWARGS)
        self.rng = np.random.default_rng()

    def __call__(self, image):
        views, boxes = self.transform(np.asarray(image), self.rng)
        grids = augment.correspondence_grids(boxes[0], boxes[1], 7)
        return [*views, *grids]


def _jpeg_loader(path: str) -> "object":
    from PIL import Image

    with open(path, "rb") as handle:
        return Image.fromarray(augment.decode_image(handle.read()))


def bench_dataloader(tree: Path, workers: int) -> float:
    import torch
    from torchvision.datasets import ImageFolder

    torch.set_num_threads(1)
    dataset = ImageFolder(str(tree / "train"), transform=_SameTransform(), loader=_jpeg_loader)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=workers, shuffle=True,
                                         persistent_workers=False, prefetch_factor=4)
    count, started = 0, None
    for views, _ in loader:
        if started is None:
            started = time.perf_counter()
            continue
        count += len(views[0])
    return count / (time.perf_counter() - started)


def _decode_file(path: str) -> int:
    with open(path, "rb") as handle:
        return augment.decode_image(handle.read()).shape[0]


def bench_decode(tree: Path, cpus: int) -> float:
    files = sorted(str(p) for p in (tree / "train").rglob("*.JPEG"))
    with multiprocessing.get_context("spawn").Pool(cpus) as pool:
        pool.map(_decode_file, files[: 4 * cpus])  # warm-up
        started = time.perf_counter()
        pool.map(_decode_file, files, chunksize=64)
    return len(files) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for Ray, DataLoader workers and decode processes")
    parser.add_argument("--out", default=str(ROOT / "bench-out"))
    args = parser.parse_args()
    out = Path(args.out)
    tree, shards = make_data(out / f"ingest-{args.images}-{args.size}", args.images, args.size)
    print("bench_ingest: measuring decode only ...", flush=True)
    decode = bench_decode(tree, args.cpus)
    print("bench_ingest: measuring DataLoader ...", flush=True)
    loader = bench_dataloader(tree, args.cpus)
    print("bench_ingest: measuring Ray Data ...", flush=True)
    ray_rate = bench_ray(shards, args.cpus)
    rows = [
        ("decode only (limit)", decode),
        (f"ImageFolder + DataLoader(num_workers={args.cpus}), same transform", loader),
        ("lussray Ray Data pipeline (epoch stream -> map_batches)", ray_rate),
    ]
    print(f"\n{args.images} images of {args.size} px, decode + 2x224 crops + full augmentation + P2P grids; "
          f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), {args.cpus} CPUs used")
    print(f"| {'pipeline':<66} | {'images/s':>8} |\n|{'-' * 68}|{'-' * 10}:|")
    for name, rate in rows:
        print(f"| {name:<66} | {rate:8.1f} |")
    result = {
        "ray_images_per_s": round(ray_rate, 1),
        "dataloader_images_per_s": round(loader, 1),
        "decode_only_images_per_s": round(decode, 1),
        "images": args.images, "size": args.size, "cpus": args.cpus,
        "ray_over_dataloader": round(ray_rate / loader, 3),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
