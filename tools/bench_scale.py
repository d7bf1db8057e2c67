"""Benchmark: label generation at scale, per stage: time, memory and bytes at three sizes.

    .venv/bin/python tools/bench_scale.py [--sizes 20000 100000 200000] [--out bench-out/scale]

For each size N (training images; validation is N / 20, 50 classes, 64 x 96 px images):

1. ``generate``: the synthetic ImageNet-S tree (``lussray.data.synthetic.generate_dataset``, in
   ``--workers`` processes, one chunk of one class in memory per process); with ``--render-once``
   only the smallest size is rendered and the larger trees copy its files under new names
   (:func:`repeat_tree`: rendering is the slowest part on a loaded 2-core machine, and the stages
   measured need the number of images, not new pixels);
2. ``prepare``: train and validation webdataset shards of ``--samples-per-shard`` images;
3. ``lussray labelgen`` with a random stage-2 checkpoint (ResNet-18 with pixel attention):
   ``embed`` (the actor pool), ``kmeans`` (K = 50, sharded, one actor per ``--rows-per-kmeans-actor``
   embeddings, so that each actor holds about the same share at every size: 1, 4, 8 actors at the
   default sizes), ``tau`` (the sweep on validation), ``pseudo_labels`` (the pseudo-label shards);
4. ``lussray predict`` on validation with a random segmenter (K = 50 + other), matched and scored.

Every stage runs in its own process on a fresh private Ray cluster where it uses one. Reported
per stage: seconds, images/s, the peak RSS of its driver and of its largest worker (Ray actors,
or the generator's and prepare's worker processes), and the bytes it wrote. Memory is sampled
from ``/proc`` (``VmHWM`` of every process of the stage's process tree, every 0.5 s);
labelgen's own records split its figures by step (``summary.json``, ``kmeans.json``), and the
k-means actors are shown apart: each holds N / actors embeddings by design.

Results: a table per size, a growth table (seconds per 1,000 images and peak memory against the
smallest size), ``<out>/bench_scale.json``; the last line printed is one JSON object with
per-size ``seconds`` (per stage and total) and ``peak_rss_mb`` (driver, largest actor, largest
k-means actor). A rerun keeps the stages already measured (``--fresh`` measures all again).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLASSES = 50
IMAGE_SIZE = (64, 96)  # (H, W): 64-96 px, the point is the number of images
VALIDATION_SHARE = 20  # validation images = N / 20
MODEL = {"arch": "resnet18", "hidden_dim": 64, "feat_dim": 32, "num_prototypes": 20, "shallow_stages": ()}
OVERRIDES = [f"dataset.num_classes={CLASSES}", "pretrain.arch=resnet18", "pretrain.hidden_mlp=64",
             "pretrain.feat_dim=32", "pretrain.num_prototypes=20", "ingest.eval_short_side=64", "ray.address=local",
             "ray.num_cpus=4"]
LABELGEN = ["labelgen.crop_size=56", "labelgen.batch_size=64", "labelgen.torch_threads=1",
            "labelgen.actor_pool_min=2", "labelgen.actor_pool_max=2", "labelgen.kmeans_iterations=20",
            "labelgen.kmeans_redo=3", "labelgen.tau_step=0.1", "labelgen.tau_split=validation"]
PREDICT = ["predict.actor_pool_min=2", "predict.actor_pool_max=2", "predict.torch_threads=1", "predict.batch_size=32"]
LABELGEN_STEPS = ("embed", "kmeans", "tau", "pseudo_labels")
RAY_SYSTEM_BINARIES = ("gcs_server", "raylet")
RAY_SYSTEM_SCRIPTS = ("dashboard/dashboard.py", "dashboard/agent.py", "log_monitor.py", "_private/monitor.py",
                      "runtime_env/agent")
RAY_SYSTEM_ACTORS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


# -- memory of a process tree ------------------------------------------------------------------


class TreeMemory:
    """Peak RSS (``VmHWM``) of a process and of every descendant, sampled from ``/proc`` every 0.5 s."""

    def __init__(self, root: int) -> None:
        self.root, self.peaks, self.commands = root, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.5)

    def sample(self) -> None:
        for pid in [self.root, *descendants(self.root)]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                # read every time: a Ray worker renames itself (ray::<actor>) once it runs
                self.commands[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    self.peaks[pid] = max(self.peaks.get(pid, 0), int(line.split()[1]) / 1024)

    def stop(self) -> dict[str, float]:
        """{driver, worker, ray_system}: the largest peak of each kind, MB."""
        self._stop.set()
        self._thread.join()
        kinds = {"driver": 0.0, "worker": 0.0, "ray_system": 0.0}
        for pid, peak in self.peaks.items():
            command = self.commands.get(pid, "")
            kind = "driver" if pid == self.root else "ray_system" if ray_system(command) else "worker"
            kinds[kind] = max(kinds[kind], round(peak, 1))
        return kinds


def ray_system(command: str) -> bool:
    """Whether a command line is one of Ray's own node processes (GCS, raylet, agents, monitors)."""
    binary = os.path.basename(command.split(" ", 1)[0])
    return (binary in RAY_SYSTEM_BINARIES or command.startswith(RAY_SYSTEM_ACTORS)
            or any(script in command for script in RAY_SYSTEM_SCRIPTS))


def descendants(root: int) -> list[int]:
    """Every live descendant of ``root``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


#: What Ray prints when its raylet did not register within its fixed 30 s (a machine loaded by other jobs).
RAY_START_TIMEOUT = "The current node timed out during startup"


def run_stage(name: str, command: list[str], log: Path, attempts: int = 10) -> tuple[float, dict[str, float]]:
    """Run one stage's command with its output in ``log``; (seconds, peak memory by kind).

    A stage whose private Ray cluster did not start (before any work) is started again.
    """
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    for attempt in range(1, attempts + 1):
        started = time.perf_counter()
        with open(log, "w") as out:
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
            memory = TreeMemory(proc.pid)
            code = proc.wait()
            peaks = memory.stop()
        seconds = time.perf_counter() - started
        if code == 0:
            return seconds, peaks
        if RAY_START_TIMEOUT not in log.read_text() or attempt == attempts:
            break
        print(f"bench_scale: {name}: Ray did not start within its 30 s (load {os.getloadavg()[0]:.0f}); "
              f"starting the stage again", flush=True)
    sys.exit(f"bench_scale: {name} failed (exit {code}); see {log}:\n{log.read_text()[-3000:]}")


def folder_bytes(*paths: Path) -> int:
    """Bytes of the files under ``paths``."""
    return sum(file.stat().st_size for path in paths if path.exists()
               for file in ([path] if path.is_file() else path.rglob("*")) if file.is_file())


# -- inputs ------------------------------------------------------------------------------------


def generate(out: Path, images: int, workers: int) -> None:
    """The synthetic tree (in this process when called with --part generate)."""
    from lussray.data.synthetic import generate_dataset

    per_class = images // CLASSES
    generate_dataset(out, classes=CLASSES, train_per_class=per_class, val_per_class=max(1, per_class // VALIDATION_SHARE),
                     test_per_class=0, semi_per_class=0, size=IMAGE_SIZE, seed=0, workers=workers, log=print)


def repeat_tree(pool: Path, out: Path, images: int) -> None:
    """A tree of ``images`` training images (and images / 20 validation ones with ground truth) under new
    names, whose files are copies of the rendered ``pool`` tree's, cycled class by class.

    Rendering runs at 20-300 images/s on 2 shared cores; the stages measured here only need the
    number of images (their bytes repeat every ``len(pool)`` images).
    """
    from lussray.data.imagenet_s import segmentation_dir

    per_class, val_per_class = images // CLASSES, max(1, images // CLASSES // VALIDATION_SHARE)
    wnids = sorted(path.name for path in (pool / "train").iterdir())
    (out / "categories.txt").parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pool / "categories.txt", out / "categories.txt")
    for c, wnid in enumerate(wnids):
        for split, count in (("train", per_class), ("validation", val_per_class)):
            sources = sorted((pool / split / wnid).iterdir())
            (out / split / wnid).mkdir(parents=True, exist_ok=True)
            if split == "validation":
                (out / segmentation_dir(split) / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                source = sources[i % len(sources)]
                name = f"{wnid}_{i}" if split == "train" else f"ILSVRC2012_val_{c * count + i + 1:08d}"
                shutil.copyfile(source, out / split / wnid / f"{name}.JPEG")
                if split == "validation":
                    shutil.copyfile(pool / segmentation_dir(split) / wnid / f"{source.stem}.png",
                                    out / segmentation_dir(split) / wnid / f"{name}.png")
    print(f"repeated {pool} into {images} training images", flush=True)


def checkpoints(folder: Path) -> tuple[Path, Path]:
    """A random stage-2 (pixel attention) checkpoint and a random segmenter checkpoint."""
    import torch

    from lussray.models.pass_model import PixelAttentionModel
    from lussray.models.segmenter import Segmenter

    attention, segmenter = folder / "attention.pt", folder / "segmenter.pt"
    torch.manual_seed(0)
    if not attention.exists():
        torch.save({"model": PixelAttentionModel(**MODEL).state_dict()}, attention)
    if not segmenter.exists():
        torch.save({"model": Segmenter("resnet18", CLASSES + 1).state_dict(),
                    "config": {"segmenter": {"arch": "resnet18"}}}, segmenter)
    return attention, segmenter


# -- one size ----------------------------------------------------------------------------------


def measure(images: int, args: argparse.Namespace) -> dict:
    """Every stage at one size; {stage: figures}.

    Each stage's figures are kept in ``<size>/<stage>.figures.json``: a rerun of the bench (after
    a failure, or with more sizes) keeps what was measured and runs only the stages without them,
    from scratch (their outputs are removed first).
    """
    folder = Path(args.out) / f"n{images}"
    if args.fresh and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tree, shards, run = folder / "tree", folder / "shards", folder / "run"
    train, validation = images // CLASSES * CLASSES, max(1, images // CLASSES // VALIDATION_SHARE) * CLASSES
    py, lussray = sys.executable, [sys.executable, "-m", "lussray.cli"]
    stages: dict[str, dict] = {}

    def stage(name: str, output: Path, command: list[str]) -> tuple[float, dict] | None:
        record = folder / f"{name}.figures.json"
        if record.exists():
            stages.update(json.loads(record.read_text()))
            return None
        shutil.rmtree(output, ignore_errors=True)
        return run_stage(name, command, folder / f"{name}.log")

    def keep(name: str, rows: dict) -> None:
        (folder / f"{name}.figures.json").write_text(json.dumps(rows))
        stages.update(rows)

    pool = Path(args.out) / f"n{min(args.sizes)}" / "tree"
    repeat = ["--pool", str(pool)] if images > min(args.sizes) and args.render_once else []
    if ran := stage("generate", tree, [py, __file__, "--part", "generate", "--images", str(images),
                                       "--workers", str(args.workers), "--out", str(tree), *repeat]):
        keep("generate", {"generate": figures(ran[0], train + validation, ran[1], folder_bytes(tree))})
    if ran := stage("prepare", shards, [*lussray, "prepare", "--src", str(tree), "--out", str(shards), "--splits",
                                        "train", "validation", "--workers", str(args.workers), "--samples-per-shard",
                                        str(args.samples_per_shard), f"dataset.num_classes={CLASSES}"]):
        keep("prepare", {"prepare": figures(ran[0], train + validation, ran[1], folder_bytes(shards))})
    attention, segmenter = checkpoints(folder)
    kmeans_actors = max(1, -(-train // args.rows_per_kmeans_actor))
    if ran := stage("labelgen", run / "labelgen", [
            *lussray, "labelgen", "--data", str(shards), "--run", str(run), "--checkpoint", str(attention),
            *OVERRIDES, *LABELGEN, f"labelgen.kmeans_actors={kmeans_actors}",
            f"labelgen.kmeans_cpus_per_actor={min(1.0, 2.0 / kmeans_actors):.3f}"]):
        keep("labelgen", {**labelgen_steps(run / "labelgen", train, validation, ran[1], kmeans_actors),
                          "labelgen_total": figures(ran[0], train, ran[1], folder_bytes(run / "labelgen"))})
    out = run / "predict" / "validation"
    if ran := stage("predict", out, [*lussray, "predict", "--split", "validation", "--data", str(shards),
                                     "--checkpoint", str(segmenter), "--out", str(out), *OVERRIDES, *PREDICT]):
        keep("predict", {"predict": figures(ran[0], validation, ran[1], folder_bytes(out))})
    return stages


def figures(seconds: float, images: int, peaks: dict[str, float], written: int, **extra) -> dict:
    return {"seconds": round(seconds, 1), "images": images, "images_per_s": round(images / max(seconds, 1e-9), 1),
            "peak_rss_mb_driver": peaks["driver"], "peak_rss_mb_actor": peaks["worker"],
            "peak_rss_mb_ray_system": peaks.get("ray_system", 0.0), "bytes_written": written, **extra}


def labelgen_steps(root: Path, train: int, validation: int, peaks: dict[str, float], kmeans_actors: int) -> dict:
    """labelgen's steps from its own records (driver peak by step, actor peak by pool pass)."""
    summary = json.loads((root / "summary.json").read_text())
    kmeans = json.loads((root / "kmeans.json").read_text())
    rss = summary["peak_rss_mb"]
    actors = {"embed": rss["actor_by_pass"].get("embed", 0.0),
              "kmeans": max(kmeans["peak_rss_mb_per_actor"]),
              "tau": rss["actor_by_pass"].get("validation statistics", 0.0),
              "pseudo_labels": rss["actor_by_pass"].get("pseudo labels", 0.0)}
    written = {"embed": folder_bytes(root / "embeddings"), "kmeans": folder_bytes(root / "centroids.npy",
                                                                                  root / "kmeans.json"),
               "tau": folder_bytes(root / "tau.json"), "pseudo_labels": folder_bytes(root / "pseudo")}
    counts = {"embed": train, "kmeans": train, "tau": validation, "pseudo_labels": train}
    out = {}
    for step in LABELGEN_STEPS:
        step_peaks = {"driver": rss["driver_by_step"][step], "worker": actors[step]}
        extra = {"kmeans_actors": kmeans_actors} if step == "kmeans" else {}
        if step == "embed":
            pool = summary["pools"]["embed"]
            extra = {"startup_s": pool["startup_s"], "steady_images_per_s": pool["steady_images_per_s"]}
        out[step] = figures(summary["step_seconds"][step], counts[step], step_peaks, written[step], **extra)
    return out


# -- report ------------------------------------------------------------------------------------


def print_size(images: int, stages: dict) -> None:
    print(f"\n{images} training images ({os.getloadavg()[0]:.1f} load average at the end)")
    print(f"| stage | seconds | images | images/s | driver peak RSS (MB) | largest actor peak RSS (MB) | written (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in stages.items():
        print(f"| {name} | {row['seconds']:.1f} | {row['images']} | {row['images_per_s']:.1f} | "
              f"{row['peak_rss_mb_driver']:.0f} | {row['peak_rss_mb_actor']:.0f} | {row['bytes_written'] / 2**20:.1f} |")


def print_growth(results: dict[int, dict]) -> None:
    sizes = sorted(results)
    base = sizes[0]
    print(f"\ngrowth against {base} images: seconds per 1,000 images (linear time: equal) and peak memory "
          f"(flat: equal)")
    header = " | ".join(f"s/1k @ {n}" for n in sizes) + " | " + " | ".join(f"driver MB @ {n}" for n in sizes) \
        + " | " + " | ".join(f"actor MB @ {n}" for n in sizes)
    print(f"| stage | {header} |\n|---|" + "---:|" * (3 * len(sizes)))
    for name in results[base]:
        if not all(name in results[n] for n in sizes):
            continue
        rows = [results[n][name] for n in sizes]
        per_k = " | ".join(f"{1000 * row['seconds'] / max(row['images'], 1):.2f}" for row in rows)
        driver = " | ".join(f"{row['peak_rss_mb_driver']:.0f}" for row in rows)
        actor = " | ".join(f"{row['peak_rss_mb_actor']:.0f}" for row in rows)
        print(f"| {name} | {per_k} | {driver} | {actor} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 200_000])
    parser.add_argument("--out", default=str(ROOT / "bench-out" / "scale"))
    parser.add_argument("--workers", type=int, default=2, help="processes of the generator and of prepare")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--rows-per-kmeans-actor", type=int, default=25_000)
    parser.add_argument("--fresh", action="store_true", help="measure every stage again, from new inputs")
    parser.add_argument("--render-once", action="store_true",
                        help="render only the smallest size; larger trees repeat its files under new names")
    parser.add_argument("--pool", help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=["generate"], help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part == "generate":
        if args.pool:
            repeat_tree(Path(args.pool), Path(args.out), args.images)
        else:
            generate(Path(args.out), args.images, args.workers)
        return
    print(f"bench_scale: sizes {args.sizes}, load average {os.getloadavg()}", flush=True)
    results = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for images in args.sizes:
        print(f"bench_scale: {images} images ...", flush=True)
        results[images] = measure(images, args)
        print_size(images, results[images])
        write_json(out, summarize(results), results)  # what ran so far, should a later size not finish
    print_growth(results)
    summary = summarize(results)
    write_json(out, summary, results)
    print(json.dumps(summary))


def summarize(results: dict[int, dict]) -> dict:
    """Per-size seconds (per stage, total) and peak memory (driver, largest actor, k-means actor, Ray)."""
    return {
        "sizes": sorted(results),
        "seconds": {str(n): {**{name: row["seconds"] for name, row in stages.items()},
                             "total": round(sum(row["seconds"] for name, row in stages.items()
                                                if name not in LABELGEN_STEPS), 1)}
                    for n, stages in results.items()},
        "peak_rss_mb": {str(n): {"driver": max(row["peak_rss_mb_driver"] for row in stages.values()),
                                 "actor": max(row["peak_rss_mb_actor"] for name, row in stages.items()
                                              if name not in ("kmeans", "labelgen_total")),
                                 "kmeans_actor": stages["kmeans"]["peak_rss_mb_actor"],
                                 "ray_system": max(row["peak_rss_mb_ray_system"] for row in stages.values())}
                        for n, stages in results.items()},
    }


def write_json(out: Path, summary: dict, results: dict[int, dict]) -> None:
    (out / "bench_scale.json").write_text(json.dumps({**summary, "stages": {str(n): s for n, s in results.items()},
                                                      "load_average_end": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
