"""Benchmark: `lussray evaluate` on an ImageNet-S919-sized validation set, the tau sweep, the pixel protocol.

    .venv/bin/python tools/bench_evaluate.py [--images 12419] [--classes 919] [--workers 2]
                                             [--cache bench-out/eval-cache] [--baseline-images 40]
    .venv/bin/python tools/bench_evaluate.py --protocol pixel [--images 2175] [--classes 27] [--workers 2]

``--protocol pixel`` (COCO-Stuff-27 val sized: 2,175 label maps of 320 x 320, 27 classes) is
described in :func:`main_pixel`; the rest of this text is the ImageNet-S benchmark.

1. Data: ``--images`` ground-truth maps of ImageNet size (about 500 x 375; 1-2 objects, ellipses or
   rectangles, of 1..919 on "other", with a 2-px ignore band on every object boundary) and a noisy
   permuted copy as predictions (ids permuted, objects shifted, some confusions, blobs and empty
   predictions), written as PNG in the official layout under ``--cache`` (reused when complete).
2. Full metric set + Hungarian matching over the PNG files (``evaluate_items``): images/s and the
   time of the whole validation set.
3. A tau sweep with 81 thresholds (0.00..0.80) over the same ground truth, with label-generation
   style predictions (ids 1..919 everywhere, "other" only through the foreground scores) made in
   the workers from each ground truth (the wall time includes making them; the CPU figure does not).
4. The official-style baseline on ``--baseline-images`` images: a straightforward per-image
   transcription of the official algorithm (tests/unit/test_eval_reference.py: per-label erosion,
   masking, histograms, per-class size-bucket concatenation), its CPU time per image measured for
   one pass and extrapolated: ``match.py`` + ``evaluator.py`` are a presence pass and a metric
   pass; ``evaluator.py --curve`` over 81 thresholds is a presence pass and 81 metric passes. Its
   erosion uses a (2d+1)-square minimum filter, as fast as cv2.erode (the official code's); the
   munkres matching time is not included (the baseline is a lower bound).

Wall times depend on what else runs on the machine; CPU milliseconds per image (all processes,
the pool's workers included) do not, and "at N free cores" is that times images / N. Prints
progress and a table, writes bench-out/bench_evaluate.json; the last line printed is one JSON
object with the keys images_per_s, sweep_seconds, validation_seconds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from lussray.data.imagenet_s import IGNORE_ID, encode_label, read_label_png  # noqa: E402
from lussray.eval.evaluate import evaluate_items, format_table  # noqa: E402
from lussray.eval.io import list_items, read_label, write_atomic  # noqa: E402
from lussray.eval.parallel import ordered_map  # noqa: E402
from lussray.eval.pixel import (  # noqa: E402
    confusion,
    evaluate_pixel_items,
    format_pixel_table,
    list_pixel_items,
    things_stuff,
)
from lussray.eval.sweep import DEFAULT_TAUS, sweep_tau  # noqa: E402
from tests.unit.test_eval_reference import official_metrics, official_presence  # noqa: E402

SIZES = ((375, 500), (375, 500), (375, 500), (500, 375), (333, 500), (500, 333), (400, 500), (500, 500))
SEED = 0


def wnid(class_id: int) -> str:
    return f"n{class_id:08d}"


def _permutation(classes: int) -> np.ndarray:
    perm = np.zeros(classes + 1, np.int64)
    perm[1:] = np.random.default_rng(SEED).permutation(classes) + 1
    return perm


def _draw(label: np.ndarray, rng: np.random.Generator, class_id: int, low: float, high: float) -> None:
    """Paint one ellipse or rectangle of ``class_id`` covering ~[low, high] of the image."""
    h, w = label.shape
    area = np.exp(rng.uniform(np.log(low), np.log(high))) * h * w
    aspect = rng.uniform(0.5, 2.0)
    bh, bw = min(h, int(np.sqrt(area / aspect)) + 1), min(w, int(np.sqrt(area * aspect)) + 1)
    top, left = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
    if rng.random() < 0.5:
        label[top : top + bh, left : left + bw] = class_id
        return
    yy, xx = np.ogrid[:bh, :bw]
    inside = ((yy - (bh - 1) / 2) / (bh / 2)) ** 2 + ((xx - (bw - 1) / 2) / (bw / 2)) ** 2 <= 1
    label[top : top + bh, left : left + bw][inside] = class_id


def _ignore_band(label: np.ndarray) -> np.ndarray:
    band = np.zeros(label.shape, bool)
    dx, dy = label[:, 1:] != label[:, :-1], label[1:] != label[:-1]
    band[:, 1:] |= dx
    band[:, :-1] |= dx
    band[1:] |= dy
    band[:-1] |= dy
    return band


def make_pair(index: int, classes: int) -> tuple[str, np.ndarray, np.ndarray]:
    """(key, ground truth, prediction) of image ``index``; deterministic."""
    rng = np.random.default_rng([SEED, index])
    class_id = index % classes + 1
    label = np.zeros(SIZES[rng.integers(len(SIZES))], np.int64)
    _draw(label, rng, class_id, 0.01, 0.7)
    if rng.random() < 0.3:
        _draw(label, rng, int(rng.integers(1, classes + 1)), 0.01, 0.2)
    gt = label.copy()
    gt[_ignore_band(label)] = IGNORE_ID
    # Prediction: permuted ids, shifted, sometimes confused, with blobs; 5% predict nothing.
    pred = _permutation(classes)[np.roll(label, tuple(rng.integers(-6, 7, 2)), axis=(0, 1))]
    roll = rng.random()
    if roll < 0.05:
        pred[:] = 0
    elif roll < 0.15:
        pred[pred > 0] = rng.integers(1, classes + 1)
    for _ in range(rng.integers(0, 4)):
        _draw(pred, rng, int(rng.integers(0, classes + 1)), 0.001, 0.02)
    return f"{wnid(class_id)}/img_{index:06d}", gt, pred


def _png(label: np.ndarray) -> bytes:
    # The official codec; zlib level 1 only to write the cache faster (decoding speed is alike).
    buffer = io.BytesIO()
    Image.fromarray(encode_label(label), mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _write_pair(index: int, classes: int, cache: Path) -> int:
    key, gt, pred = make_pair(index, classes)
    write_atomic(cache / "gt" / f"{key}.png", _png(gt))
    write_atomic(cache / "pred" / f"{key}.png", _png(pred))
    return index


def ensure_data(cache: Path, images: int, classes: int, workers: int) -> None:
    marker = cache / "complete.json"
    spec = {"images": images, "classes": classes, "seed": SEED, "version": 1}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        print(f"data: reusing {cache}", flush=True)
        return
    print(f"data: writing {images} ground-truth + prediction PNGs to {cache}", flush=True)
    started, step = time.perf_counter(), max(1, images // 10)
    for done, _ in enumerate(ordered_map(partial(_write_pair, classes=classes, cache=cache), range(images),
                                         workers=workers, chunk_size=32), start=1):
        if done % step == 0 or done == images:
            print(f"data: {done}/{images} ({done / (time.perf_counter() - started):.0f} pairs/s)", flush=True)
    write_atomic(marker, json.dumps(spec).encode())


def sweep_sample(sample: tuple[int, str], classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label-generation-style (pred, scores, gt) built from one ground truth, in the worker."""
    index, gt_path = sample
    gt = read_label(gt_path)
    rng = np.random.default_rng([SEED, index, 1])
    h, w = gt.shape
    base = np.where(gt == IGNORE_ID, 0, gt).astype(np.int64)
    cells = (h // 8 + 1, w // 8 + 1)
    background = rng.choice(rng.integers(1, classes + 1, 3), size=(cells[0] // 4 + 1, cells[1] // 4 + 1))
    background = background.repeat(32, 0).repeat(32, 1)[:h, :w]
    pred = np.where(base > 0, _permutation(classes)[base], background)
    object_cells = ndimage.maximum_filter(base[::8, ::8] > 0, size=2)[: cells[0], : cells[1]]
    low = rng.uniform(0.05, 0.5, object_cells.shape)
    high = rng.uniform(0.35, 0.9, object_cells.shape)
    coarse = np.where(object_cells, high, low).astype(np.float32)
    scores = coarse.repeat(8, 0).repeat(8, 1)
    scores = np.pad(scores, ((0, max(0, h - scores.shape[0])), (0, max(0, w - scores.shape[1]))), mode="edge")[:h, :w]
    return pred, scores, gt


def _baseline_boundary(label: np.ndarray) -> np.ndarray:
    """``get_boundary_mask(label + 1)`` with one (2d+1)-square erosion per value (cv2.erode speed)."""
    label = label + 1
    h, w = label.shape
    d = max(1, int(round(0.03 * np.sqrt(h**2 + w**2))))
    out = np.zeros(label.shape, np.int64)
    for v in np.unique(label):
        mask = np.pad((label == v).astype(np.uint8), 1)
        eroded = ndimage.minimum_filter(mask, size=2 * d + 1, mode="constant", cval=1)
        out += ((mask - eroded)[1:-1, 1:-1] > 0) * int(v)
    return out


def baseline(items, classes: int) -> dict[str, float]:
    """Seconds per image of one official-style pass (metrics) and of a presence pass (matching)."""
    started = time.process_time()
    gts = [read_label(i.gt_path).astype(np.int64) for i in items]
    preds = [read_label(i.pred_path).astype(np.int64) for i in items]
    decode = time.process_time() - started
    started = time.process_time()
    official_presence(preds, gts)
    presence = time.process_time() - started + decode
    started = time.process_time()
    official_metrics(preds, gts, classes, {i: i for i in range(classes + 1)}, boundary_map=_baseline_boundary)
    metrics = time.process_time() - started + decode
    return {"metric_pass_s_per_image": metrics / len(items), "presence_pass_s_per_image": presence / len(items)}


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# ---- --protocol pixel ----------------------------------------------------------------------------

SCENE_SIZE = 320
NUM_THINGS = 12  # COCO-Stuff-27: classes 0..11 things, 12..26 stuff


def make_scene_pair(index: int, classes: int) -> tuple[str, np.ndarray, np.ndarray]:
    """(key, ground truth, prediction) of scene ``index``: stuff regions, thing objects; deterministic.

    Ground truth: a coarse random grid of stuff classes (nearest-upsampled, so blocky regions),
    1-4 thing objects on it, a 2-px ignore band on every boundary and ~3% unlabelled blobs (1000).
    Prediction: cluster ids = a fixed permutation of the classes, shifted by a few pixels, with
    wrong blobs; 5% of the images predict one cluster everywhere.
    """
    rng = np.random.default_rng([SEED, index, 2])
    things = min(NUM_THINGS, classes - 1)
    cells = int(rng.integers(2, 6))
    grid = rng.integers(things, classes, (cells, cells))
    step = -(-SCENE_SIZE // cells)
    label = grid.repeat(step, 0).repeat(step, 1)[:SCENE_SIZE, :SCENE_SIZE].astype(np.int64)
    for _ in range(int(rng.integers(1, 5))):
        _draw(label, rng, int(rng.integers(0, things)), 0.005, 0.15)
    gt = label.copy()
    gt[_ignore_band(label)] = IGNORE_ID
    for _ in range(int(rng.integers(0, 3))):
        _draw(gt, rng, IGNORE_ID, 0.005, 0.03)
    perm = np.random.default_rng(SEED).permutation(classes)
    pred = perm[np.roll(label, tuple(rng.integers(-4, 5, 2)), axis=(0, 1))]
    if rng.random() < 0.05:
        pred[:] = perm[int(rng.integers(classes))]
    for _ in range(int(rng.integers(0, 4))):
        _draw(pred, rng, int(rng.integers(0, classes)), 0.002, 0.03)
    return f"val2017/{index:012d}", gt, pred


def _write_scene_pair(index: int, classes: int, cache: Path) -> int:
    key, gt, pred = make_scene_pair(index, classes)
    write_atomic(cache / "gt" / f"{key}.png", _png(gt))
    write_atomic(cache / "pred" / f"{key}.png", _png(pred))
    return index


def ensure_scene_data(cache: Path, images: int, classes: int, workers: int) -> None:
    marker = cache / "complete.json"
    spec = {"images": images, "classes": classes, "seed": SEED, "size": SCENE_SIZE, "version": 1}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        print(f"data: reusing {cache}", flush=True)
        return
    print(f"data: writing {images} scene ground-truth + prediction PNGs ({SCENE_SIZE} x {SCENE_SIZE}) to {cache}",
          flush=True)
    fn = partial(_write_scene_pair, classes=classes, cache=cache)
    for _ in ordered_map(fn, range(images), workers=workers, chunk_size=32):
        pass
    write_atomic(marker, json.dumps(spec).encode())


def bincount_baseline(items, classes: int) -> np.ndarray:
    """The straightforward NumPy evaluator: one process, decode, mask, ``np.bincount(gt * K + pred)``."""
    hist = np.zeros(classes * classes, np.int64)
    for item in items:
        gt, pred = read_label_png(item.gt_path), read_label_png(item.pred_path)
        mask = gt != IGNORE_ID
        hist += np.bincount(gt[mask].astype(np.int64) * classes + pred[mask], minlength=classes * classes)
    return hist.reshape(classes, classes)


def main_pixel(args: argparse.Namespace) -> None:
    """The pixel protocol: lussray (``evaluate_pixel_items``) next to an ``np.bincount`` baseline.

    1. Data: ``--images`` scene label maps of 320 x 320 (the evaluation crop) with ``--classes``
       classes and noisy permuted predictions (:func:`make_scene_pair`), as PNG under ``--cache``.
    2. lussray: the whole protocol on the PNG files (streaming, ``--workers`` processes, id
       checks, one Hungarian matching, metrics): images/s of wall time and CPU ms per image.
    3. Baseline in the same run: a one-process loop that decodes both PNGs, masks the ignore
       pixels and ``np.bincount``s ``gt * K + pred`` (no checks), then one
       ``linear_sum_assignment``; both confusion matrices must be equal.
    4. The counting alone on decoded arrays (first 200 images): lussray's table look-up +
       ``bincount`` vs the masked ``bincount``, to separate it from PNG decoding.
    Last line: JSON with pixel_images_per_s and baseline_images_per_s.
    """
    cache = Path(args.cache) / f"pixel-{args.images}-{args.classes}"
    ensure_scene_data(cache, args.images, args.classes, args.workers)
    items = list_pixel_items(cache / "gt", cache / "pred")
    load = os.getloadavg()[0]
    print(f"pixel: {len(items)} images, {args.classes} classes, {args.workers} workers (load average {load:.1f})",
          flush=True)

    started, cpu = time.perf_counter(), _cpu_seconds()
    evaluation = evaluate_pixel_items(items, num_classes=args.classes, num_clusters=args.classes,
                                      groups=things_stuff(range(min(NUM_THINGS, args.classes - 1)), args.classes),
                                      workers=args.workers, progress=partial(print, flush=True))
    pixel_seconds = time.perf_counter() - started
    pixel_cpu = (_cpu_seconds() - cpu) / len(items)
    print(format_pixel_table(evaluation.metrics), flush=True)
    perm = np.random.default_rng(SEED).permutation(args.classes)
    recovered = float(np.mean(evaluation.metrics.mapping[perm] == np.arange(args.classes)))

    started, cpu = time.perf_counter(), _cpu_seconds()
    hist = bincount_baseline(items, args.classes)
    linear_sum_assignment(hist, maximize=True)
    baseline_seconds = time.perf_counter() - started
    baseline_cpu = (_cpu_seconds() - cpu) / len(items)
    if not np.array_equal(hist, evaluation.metrics.hist):
        raise SystemExit("pixel: the baseline's confusion matrix differs from lussray's")

    arrays = [(read_label(i.pred_path), read_label(i.gt_path)) for i in items[:200]]
    t0 = time.process_time()
    for pred, gt in arrays:
        confusion(pred, gt, args.classes, args.classes)
    count_lussray = (time.process_time() - t0) / len(arrays)
    t0 = time.process_time()
    for pred, gt in arrays:
        mask = gt != IGNORE_ID
        np.bincount(gt[mask].astype(np.int64) * args.classes + pred[mask], minlength=args.classes ** 2)
    count_baseline = (time.process_time() - t0) / len(arrays)

    rows = [
        (f"lussray, {args.workers} workers", f"{pixel_seconds:.1f} s", f"{len(items) / pixel_seconds:.0f}",
         f"{pixel_cpu * 1e3:.2f}", f"{count_lussray * 1e3:.3f}"),
        ("np.bincount baseline, 1 process", f"{baseline_seconds:.1f} s", f"{len(items) / baseline_seconds:.0f}",
         f"{baseline_cpu * 1e3:.2f}", f"{count_baseline * 1e3:.3f}"),
    ]
    header = ("pixel protocol", "wall", "images/s", "CPU ms/img (all processes)", "counting only ms/img")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
    print(f"matching recovered {recovered:.1%} of the permutation; confusion matrices equal; "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

    report = {
        "pixel_images_per_s": round(len(items) / pixel_seconds, 1),
        "baseline_images_per_s": round(len(items) / baseline_seconds, 1),
        "images": len(items),
        "classes": args.classes,
        "size": SCENE_SIZE,
        "workers": args.workers,
        "pixel_seconds": round(pixel_seconds, 2),
        "baseline_seconds": round(baseline_seconds, 2),
        "pixel_cpu_ms_per_image": round(pixel_cpu * 1e3, 3),
        "baseline_cpu_ms_per_image": round(baseline_cpu * 1e3, 3),
        "counting_ms_per_image": {"lussray": round(count_lussray * 1e3, 4), "baseline": round(count_baseline * 1e3, 4)},
        "metrics": evaluation.metrics.summary(),
        "matching_recovered": recovered,
        "load_average": {"start": load, "end": os.getloadavg()[0]},
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
    }
    out = ROOT / "bench-out" / "bench_evaluate_pixel.json"
    write_atomic(out, (json.dumps(report, indent=2) + "\n").encode())
    print(f"wrote {out}")
    print(json.dumps({k: report[k] for k in ("pixel_images_per_s", "baseline_images_per_s", "pixel_seconds",
                                             "baseline_seconds")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=("imagenet-s", "pixel"), default="imagenet-s")
    parser.add_argument("--images", type=int, help="validation images (ImageNet-S919: 12,419; pixel: 2,175)")
    parser.add_argument("--classes", type=int, help="categories (ImageNet-S919: 919; pixel: 27)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", default=str(ROOT / "bench-out" / "eval-cache"))
    parser.add_argument("--baseline-images", type=int, default=40)
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()
    pixel = args.protocol == "pixel"
    args.images = args.images or (2175 if pixel else 12419)
    args.classes = args.classes or (27 if pixel else 919)
    if pixel:
        main_pixel(args)
        return

    cache = Path(args.cache) / f"{args.images}-{args.classes}"
    ensure_data(cache, args.images, args.classes, args.workers)
    items = list_items(cache / "gt", cache / "pred")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"evaluate: {len(items)} images, {args.classes} classes, {args.workers} workers (load average {load:.1f})",
          flush=True)

    started, cpu = time.perf_counter(), _cpu_seconds()
    evaluation = evaluate_items(items, num_classes=args.classes, match="hungarian", workers=args.workers,
                                progress=partial(print, flush=True))
    validation_seconds = time.perf_counter() - started
    cpu_per_image = (_cpu_seconds() - cpu) / len(items)
    images_per_s = len(items) / validation_seconds
    print(format_table(evaluation.metrics), flush=True)
    recovered = float(np.mean(evaluation.mapping[_permutation(args.classes)[1:]] == np.arange(1, args.classes + 1)))
    print(f"evaluate: {validation_seconds:.1f} s, {images_per_s:.0f} images/s; {cpu_per_image * 1000:.1f} ms of CPU "
          f"per image (all processes); matching recovered {recovered:.1%} of the permutation", flush=True)

    sweep_seconds = sweep_cpu = float("nan")
    sweep_best = None
    load_s_per_image = 0.0
    if not args.skip_sweep:
        samples = [(i, str(item.gt_path)) for i, item in enumerate(items)]
        t0 = time.process_time()
        for sample in samples[:50]:
            sweep_sample(sample, args.classes)
        load_s_per_image = (time.process_time() - t0) / min(50, len(samples))
        print(f"sweep: {len(DEFAULT_TAUS)} thresholds over {len(samples)} images", flush=True)
        started, cpu = time.perf_counter(), _cpu_seconds()
        result = sweep_tau(samples, num_classes=args.classes, taus=DEFAULT_TAUS,
                           load=partial(sweep_sample, classes=args.classes), workers=args.workers, chunk_size=16,
                           progress=partial(print, flush=True), total=len(samples))
        sweep_seconds = time.perf_counter() - started
        # CPU per image without the synthetic (pred, scores) generation, which a real sweep reads instead.
        sweep_cpu = (_cpu_seconds() - cpu) / len(samples) - load_s_per_image
        sweep_best = {"tau": result.best_tau, "mIoU": result.best.miou,
                      "pair_table_mb": round(result.pair_table_bytes / 2**20, 1)}
        print(f"sweep: {sweep_seconds:.1f} s; best tau {result.best_tau:.2f} (mIoU {result.best.miou:.2f}); "
              f"{sweep_cpu * 1000:.1f} ms of CPU per image plus {load_s_per_image * 1000:.1f} ms to generate "
              "its prediction and scores", flush=True)

    subset = items[: args.baseline_images]
    print(f"baseline: official-style transcription on {len(subset)} images", flush=True)
    base = baseline(subset, args.classes)
    # CPU per image: match.py + evaluator.py = presence pass + metric pass; --curve = presence + 81 passes.
    official_cpu = base["presence_pass_s_per_image"] + base["metric_pass_s_per_image"]
    official_sweep_cpu = base["presence_pass_s_per_image"] + len(DEFAULT_TAUS) * base["metric_pass_s_per_image"]
    cores = args.workers
    rows = [
        ("full metrics + Hungarian matching", f"{validation_seconds:.0f} s ({images_per_s:.0f} img/s)",
         f"{cpu_per_image * 1e3:.1f}", f"{len(items) * cpu_per_image / cores:.0f} s",
         f"{official_cpu * 1e3:.0f}", f"{len(items) * official_cpu / cores:.0f} s", f"{official_cpu / cpu_per_image:.0f}x"),
        (f"tau sweep, {len(DEFAULT_TAUS)} thresholds", f"{sweep_seconds:.0f} s ({len(items) / sweep_seconds:.0f} img/s)",
         f"{sweep_cpu * 1e3:.1f}", f"{len(items) * (sweep_cpu + load_s_per_image) / cores:.0f} s",
         f"{official_sweep_cpu * 1e3:.0f}", f"{len(items) * official_sweep_cpu / cores:.0f} s",
         f"{official_sweep_cpu / sweep_cpu:.0f}x"),
    ]
    header = ("task", "lussray wall (measured)", "lussray CPU ms/img", f"lussray at {cores} free cores",
              "official-style CPU ms/img", f"official-style at {cores} free cores", "speed-up (CPU)")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
    print(f"(load average at the end: {os.getloadavg()[0]:.1f}; other processes share the {os.cpu_count()} cores; "
          "the official-style rows exclude munkres)")

    report = {
        "images_per_s": round(images_per_s, 1),
        "sweep_seconds": round(sweep_seconds, 1),
        "validation_seconds": round(validation_seconds, 1),
        "images": len(items),
        "classes": args.classes,
        "workers": args.workers,
        "taus": len(DEFAULT_TAUS),
        "cpu_ms_per_image": round(cpu_per_image * 1000, 2),
        "validation_seconds_at_free_cores": round(len(items) * cpu_per_image / cores, 1),
        "sweep_cpu_ms_per_image": round(sweep_cpu * 1000, 2),
        "sweep_generation_ms_per_image": round(load_s_per_image * 1000, 2),
        "metrics": evaluation.metrics.summary(),
        "matching_recovered": recovered,
        "sweep_best": sweep_best,
        "baseline": {**base, "images": len(subset), "cpu_ms_per_image": round(official_cpu * 1000, 1),
                     "sweep_cpu_ms_per_image": round(official_sweep_cpu * 1000, 1),
                     "validation_seconds_at_free_cores": round(len(items) * official_cpu / cores, 1),
                     "sweep_seconds_at_free_cores": round(len(items) * official_sweep_cpu / cores, 1),
                     "munkres_not_included": True},
        "load_average": {"start": load, "end": os.getloadavg()[0]},
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
    }
    out = ROOT / "bench-out" / "bench_evaluate.json"
    write_atomic(out, (json.dumps(report, indent=2) + "\n").encode())
    print(f"wrote {out}")
    print(json.dumps({k: report[k] for k in ("images_per_s", "sweep_seconds", "validation_seconds")}))


if __name__ == "__main__":
    main()
