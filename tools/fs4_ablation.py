"""FS^4's ablation (Table 4 of the paper) on generated scenes: every row trained and scored in one run.

    .venv/bin/python tools/fs4_ablation.py --out runs/fs4-ablation --seeds 0,1,2
    .venv/bin/python tools/fs4_ablation.py --out /tmp/fs4-smoke --seeds 0 --train-images 16 --val-images 4 \\
        --size 48 --smoke

Rows, each added to the one before, all from the same self-supervised start (PASS stage 1 trained
once per seed on the same images, ``<out>/seed-<s>/start``; or ``--init FILE``):

1. ``PiCIE``: PiCIE's pipeline (:func:`lussray.pipelines.picie.run_stages`);
2. ``+ CAE``: FS^4's training stage on the whole images (``fs4.labels.pyramid=false``,
   ``keep_fraction=1``) with the CAE module and no global guidance (``fs4.global_weight=0``);
3. ``+ GG``: global guidance with one label per image (the same labels, ``global_weight=1``), the
   classical CAM head;
4. ``+ PGG``: the six pyramid views and active selection (``pyramid=true``, ``keep_fraction=0.4``);
5. ``+ modified CAM head``: FS^4 (the method config as it is).

The paper's Table 4 adds GG before CAE (and starts from a MoCo-v2 model fine-tuned on COCO-Stuff);
here CAE comes first, as the issue lists the rows, so row 2 isolates the CAE module on PiCIE's data.
To keep rows 1 and 2 comparable, the FS^4 rows take PiCIE's sizes and budget: ``fs4.base_size``,
``fs4.view_size`` = ``picie.base_size``, ``picie.crop_size``, and ``fs4.loop``'s epochs, batch and
learning rate = ``picie.loop``'s (the ``key=value`` overrides given come after and win). Rows with the
same label settings share the pseudo labels (copied, same inputs).

Every stage is a resumable lussray stage, so a stopped tool continues where it stopped. Results: a
table (mean [min, max] over the seeds of validation mIoU and pixel accuracy, the pixel protocol) and
``<out>/fs4_ablation.json``; the last line printed is that JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seeds import aggregate, headline, markdown, seed_list, table

from lussray.cli import main as lussray_main
from lussray.config import LussConfig, load_config

METHOD = "fs4"
WHOLE_IMAGES = ("fs4.labels.pyramid=false", "fs4.labels.keep_fraction=1")
#: Overrides of ``--smoke``: a CPU-minutes run on tiny scenes (no meaningful figures).
SMOKE = ("ray.num_cpus=4", "pretrain.hidden_mlp=32", "pretrain.feat_dim=16", "pretrain.num_prototypes=8",
         "pretrain.loop.epochs=1", "pretrain.loop.batch_size_per_worker=4", "pretrain.loop.torch_threads=1",
         "fs4.labels.num_clusters=4", "fs4.labels.crop_view_size=48", "fs4.labels.resize=48",
         "fs4.labels.crop_size=40", "fs4.labels.kmeans_iterations=5", "fs4.labels.kmeans_redo=1",
         "labelgen.actor_pool_max=1", "labelgen.kmeans_actors=1", "picie.base_size=48", "picie.crop_size=32",
         "picie.loop.batch_size_per_worker=4", "picie.loop.epochs=1", "picie.loop.torch_threads=1",
         "fs4.loop.torch_threads=1", "picie.kmeans_pixels_per_image=8", "picie.kmeans_iterations=3",
         "picie.cluster.pixels_per_image=8", "picie.cluster.iterations=3", "picie.cluster.kmeans_actors=1",
         "ingest.map_batch_size=4", "ingest.cpus_per_map_task=0.5", "ingest.eval_short_side=48",
         "dataset.eval_crop_size=48", "predict.batch_size=8", "predict.torch_threads=1")


@dataclass(frozen=True)
class Row:
    """One row of the ablation: its name, its run folder, PiCIE's pipeline or FS^4's, its overrides."""

    name: str
    folder: str
    method: str
    overrides: tuple[str, ...] = ()


ROWS: tuple[Row, ...] = (
    Row("PiCIE", "picie", "picie"),
    Row("+ CAE", "cae", METHOD, (*WHOLE_IMAGES, "fs4.cae=true", "fs4.global_weight=0", "fs4.cam_head=classical")),
    Row("+ GG (one label per image)", "gg", METHOD, (*WHOLE_IMAGES, "fs4.cae=true", "fs4.cam_head=classical")),
    Row("+ PGG (pyramid, selection)", "pgg", METHOD, ("fs4.cae=true", "fs4.cam_head=classical")),
    Row("+ modified CAM head (FS^4)", "fs4", METHOD, ("fs4.cae=true", "fs4.cam_head=modified")),
)


def comparable(config: LussConfig) -> list[str]:
    """The FS^4 overrides that give its rows PiCIE's sizes and budget (epochs, batch, learning rate)."""
    picie, loop = config.picie, config.picie.loop
    return [f"fs4.base_size={picie.base_size}", f"fs4.view_size={picie.crop_size}", f"fs4.loop.epochs={loop.epochs}",
            f"fs4.loop.batch_size_per_worker={loop.batch_size_per_worker}", f"fs4.loop.num_workers={loop.num_workers}",
            f"fs4.loop.base_lr={loop.base_lr}", f"fs4.loop.final_lr={loop.final_lr}"]


def make_data(out: Path, dataset: str, synth_args: list[str]) -> str:
    """Generate the scenes and their shards once (``<out>/data``); returns the shards folder."""
    tree, shards = out / "data" / "tree", out / "data" / "shards"
    if not (tree / "synth.json").is_file():
        if tree.exists():
            shutil.rmtree(tree)  # an interrupted generation
        assert lussray_main(["synth", "--dataset", dataset, "--out", str(tree), *synth_args]) == 0
    if not (shards / "validation" / "manifest.json").is_file():
        assert lussray_main(["prepare", "--dataset", dataset, "--src", str(tree), "--out", str(shards)]) == 0
    return str(shards)


def share_labels(seed_dir: Path, row: Row) -> None:
    """Copy the pseudo labels of an earlier row with the same label settings (the stage then finds them complete)."""
    whole = set(WHOLE_IMAGES) <= set(row.overrides)
    for other in ROWS:
        if other.method != METHOD or other.folder == row.folder or (set(WHOLE_IMAGES) <= set(other.overrides)) != whole:
            continue
        source, target = seed_dir / other.folder / "fs4-labels", seed_dir / row.folder / "fs4-labels"
        if (source / "summary.json").is_file() and not target.exists():
            shutil.copytree(source, target)
            return


def run_row(row: Row, config: LussConfig, data: str, seed_dir: Path, init: str) -> dict[str, float]:
    """Train and score one row; its validation mIoU and pixel accuracy."""
    from lussray.pipelines import StageTimer
    from lussray.pipelines import fs4 as fs4_pipeline
    from lussray.pipelines import picie as picie_pipeline

    run, timer = str(seed_dir / row.folder), StageTimer(f"{row.folder}/")
    if row.method == "picie":
        summary = picie_pipeline.run_stages(config, data, run, init=init, crf=False, timer=timer)
    else:
        share_labels(seed_dir, row)
        summary = fs4_pipeline.run_stages(config, data, run, init=init, crf=False, timer=timer)
    return headline(summary["metrics"])


def run_seed(seed: int, args: argparse.Namespace, data: str, common: list[str]) -> dict[str, dict[str, float]]:
    """Every row of one seed, from one stage-1 start."""
    from lussray.data.ingest import init_ray
    from lussray.pipelines import StageTimer
    from lussray.pipelines import fs4 as fs4_pipeline

    seed_dir = args.out / f"seed-{seed}"
    base = load_config(args.dataset, overrides=[*common, f"seed={seed}"], method=METHOD)
    init_ray(base.ray)
    init = fs4_pipeline.initial_model(base, data, str(seed_dir / "start"), args.init, timer=StageTimer("start/"))
    fair = comparable(base)
    print(f"[ablation] seed {seed}: start {init}; FS^4 rows with PiCIE's sizes and budget: {' '.join(fair)}",
          flush=True)
    rows = {}
    for row in ROWS:
        config = load_config(args.dataset, overrides=[*fair, *row.overrides, *common, f"seed={seed}"], method=METHOD)
        rows[row.name] = run_row(row, config, data, seed_dir, init)
        print(f"[ablation] seed {seed} {row.name}: {rows[row.name]}", flush=True)
    return rows


def gains(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, list[float]]:
    """Per row (from the second), its mIoU minus the previous row's, per seed: what each module added."""
    names = [row.name for row in ROWS]
    return {names[i]: [round(rows[names[i]]["mIoU"] - rows[names[i - 1]]["mIoU"], 2) for rows in per_seed.values()]
            for i in range(1, len(names))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder of the data, the runs and fs4_ablation.json")
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2], help="run seeds (default: 0,1,2)")
    parser.add_argument("--dataset", default="synthetic-scenes", help="a scene dataset preset (default: synthetic-scenes)")
    parser.add_argument("--data", help="existing shards (default: generate the scenes into <out>/data)")
    parser.add_argument("--init", help="the self-supervised start (default: PASS stage 1 per seed)")
    parser.add_argument("--train-images", type=int, help="generated training images (lussray synth's default if unset)")
    parser.add_argument("--val-images", type=int, help="generated validation images")
    parser.add_argument("--size", type=int, help="generated image side")
    parser.add_argument("--smoke", action="store_true", help="tiny model and schedules: checks the tool, not FS^4")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every row")
    args = parser.parse_args()
    synth_args = ["--workers", "1"] + [
        f"--{flag.replace('_', '-')}={value}" for flag, value in
        (("train_images", args.train_images), ("val_images", args.val_images), ("size", args.size)) if value]
    data = args.data or make_data(args.out, args.dataset, synth_args)
    common = [*(SMOKE if args.smoke else ()), *args.overrides]
    per_seed = {seed: run_seed(seed, args, data, common) for seed in args.seeds}
    rows = aggregate(per_seed)
    result = {"dataset": args.dataset, "seeds": args.seeds, "overrides": common, "rows": rows,
              "gains_mIoU": gains(per_seed), "smoke": args.smoke}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fs4_ablation.json").write_text(json.dumps(result, indent=1))
    print(table(rows, args.seeds))
    print(markdown(rows))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
