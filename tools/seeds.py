"""Seed table: the demo pipeline, its baselines and the two other LUSS protocols over several seeds.

    .venv/bin/python tools/seeds.py --out runs/seeds --seeds 0,1,2
    .venv/bin/python tools/seeds.py --out runs/seeds-8x160 --seeds 0,1,2 synth.classes=8 synth.size=160 synth.seed=7
    .venv/bin/python tools/seeds.py --out runs/seeds-picie --method picie --dataset synthetic-scenes --no-crf

A scene method (``--method picie|stego|hp|fs4``, on ``--dataset synthetic-scenes``) runs ``lussray run
--method M --baselines`` per seed and is scored with the pixel protocol (mIoU and Acc, no F); the
ImageNet-S protocols (step 2's distance matching and semi-supervised rows) are PASS's alone.

For a dataset preset (``--dataset``, default ``synthetic-demo``) and the ``key=value`` overrides
given (passed to every command), it

1. generates the data once (``lussray synth`` into ``<out>/data/imagenet-s``, ``lussray prepare``
   into ``<out>/data/shards``; ``synth.classes=N`` also sets ``dataset.num_classes=N`` unless given);
2. for every seed ``s`` (the run-wide config key ``seed=s``), in ``<out>/seed-<s>``:
   ``lussray run --baselines --crf`` (pipeline, pipeline + CRF, every baseline), then the two
   protocols on the pretrained backbone (``lussray distmatch --split validation``, ``lussray
   semisup``, in the same run folder) and on a random one (``--checkpoint random`` /
   ``--init random``, in ``<out>/seed-<s>/random-backbone-protocols``);
3. prints, for every row, mean, min and max over the seeds of validation mIoU, Img-Acc and F, and
   two checks per seed: the pipeline beats every baseline on all three metrics, and the
   pretrained backbone beats the random one on both protocols (mIoU, Img-Acc and F).

Resuming: every command is a resumable lussray stage, and the tool records each finished command
(``<out>/seed-<s>/steps/<name>.json``: its argument list, seconds and load average); a rerun with
the same arguments skips recorded commands without starting them, so a stopped table continues
with the first unfinished stage. The log of every command is ``<out>/.../logs/<name>.log``.

Results: the table, ``<out>/seeds.json``; the last line printed is that JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lussray.stages.ray_cluster import RAY_START_TIMEOUT

METRICS = ("mIoU", "Acc", "F")
PROTOCOLS = ("distmatch", "semisup")
RANDOM_PROTOCOLS = "random-backbone-protocols"
# Ray's own start-up gives up after 30 s: lussray starts its local cluster again a few times
# (lussray.stages.ray_cluster), and a command that still fails is rerun (stages resume).


@dataclass(frozen=True)
class Step:
    """One lussray command; ``result`` exists once it has finished."""

    name: str
    args: tuple[str, ...]
    result: Path


def lussray(*args: str) -> tuple[str, ...]:
    """The argument list of a lussray command run by this interpreter."""
    return (sys.executable, "-m", "lussray.cli", *args)


def with_class_count(overrides: list[str]) -> list[str]:
    """``overrides`` plus ``dataset.num_classes=N`` when ``synth.classes=N`` is given alone."""
    keys = {item.split("=", 1)[0] for item in overrides}
    classes = [item.split("=", 1)[1] for item in overrides if item.startswith("synth.classes=")]
    if classes and "dataset.num_classes" not in keys:
        return [*overrides, f"dataset.num_classes={classes[-1]}"]
    return overrides


def data_steps(out: Path, common: tuple[str, ...]) -> list[Step]:
    """Generate the dataset and write its shards (both skip complete folders)."""
    tree, shards = out / "data" / "imagenet-s", out / "data" / "shards"
    return [Step("synth", lussray("synth", "--out", str(tree), *common), tree / "synth.json"),
            Step("prepare", lussray("prepare", "--src", str(tree), "--out", str(shards), *common),
                 shards / "validation" / "manifest.json")]


def seed_steps(out: Path, seed: int, common: tuple[str, ...], crf: bool, method: str = "pass") -> list[Step]:
    """The pipeline with its baselines, then (PASS) both protocols on the pretrained and on a random backbone."""
    shards, run = str(out / "data" / "shards"), out / f"seed-{seed}"
    random_run = run / RANDOM_PROTOCOLS
    given = (*common, f"seed={seed}")
    pipeline = Step("run", lussray("run", "--method", method, "--data", shards, "--run", str(run), "--baselines",
                                   *(("--crf",) if crf else ()), *given), run / "metrics.json")
    if method != "pass":
        return [pipeline]
    return [
        pipeline,
        Step("distmatch", lussray("distmatch", "--split", "validation", "--data", shards, "--run", str(run), *given),
             run / "distmatch" / "validation" / "summary.json"),
        Step("semisup", lussray("semisup", "--data", shards, "--run", str(run), *given),
             run / "semisup" / "validation" / "summary.json"),
        Step("distmatch-random", lussray("distmatch", "--split", "validation", "--data", shards, "--run",
                                         str(random_run), "--checkpoint", "random", *given),
             random_run / "distmatch" / "validation" / "summary.json"),
        Step("semisup-random", lussray("semisup", "--data", shards, "--run", str(random_run), "--init", "random",
                                       *given), random_run / "semisup" / "validation" / "summary.json"),
    ]


def run_step(step: Step, folder: Path, retries: int = 2) -> dict[str, Any]:
    """Run ``step`` unless its record shows the same arguments finished; returns the record.

    A command whose Ray cluster failed to start is run again, up to ``retries`` times.

    Raises:
        SystemExit: if the command fails (its exit status, with the log's path and tail).
    """
    record_path = folder / "steps" / f"{step.name}.json"
    if record_path.exists() and step.result.exists():
        record = json.loads(record_path.read_text())
        if record.get("args") == list(step.args):
            print(f"[seeds] {folder.name}/{step.name}: done before ({record['seconds']} s)", flush=True)
            return record
    log = folder / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[seeds] {folder.name}/{step.name}: running, log {log}", flush=True)
    load_before, started = os.getloadavg()[0], time.perf_counter()
    for attempt in range(retries + 1):
        with open(log, "w") as stream:
            status = subprocess.call(step.args, stdout=stream, stderr=subprocess.STDOUT)
        if status == 0 or attempt == retries or RAY_START_TIMEOUT not in log.read_text(errors="replace"):
            break
        print(f"[seeds] {folder.name}/{step.name}: Ray did not start in time, running it again", flush=True)
    seconds = round(time.perf_counter() - started, 1)
    if status != 0 or not step.result.exists():
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        print(f"[seeds] {folder.name}/{step.name} failed (exit {status}) after {seconds} s: {log}", file=sys.stderr)
        raise SystemExit(status or 1)
    record = {"args": list(step.args), "seconds": seconds, "load_before": round(load_before, 1),
              "load_after": round(os.getloadavg()[0], 1)}
    record_path.write_text(json.dumps(record, indent=1))
    print(f"[seeds] {folder.name}/{step.name}: {seconds} s (load {record['load_before']} -> "
          f"{record['load_after']})", flush=True)
    return record


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """mIoU, Acc (Img-Acc on ImageNet-S, pixel accuracy on scenes) and F where the protocol has it (percent)."""
    values = {"mIoU": metrics["mIoU"], "Acc": metrics["Acc"]}
    if "FMeasure" in metrics:
        values["F"] = metrics["FMeasure"]
    return values


def seed_rows(out: Path, seed: int) -> dict[str, dict[str, float]]:
    """Every row's metrics of one seed, read from the files the commands wrote (the method's headline row first)."""
    run = out / f"seed-{seed}"
    summary = json.loads((run / "metrics.json").read_text())
    rows = {name: headline(metrics) for name, metrics in summary["metrics"].items()}
    rows.update({f"baseline: {name}": headline(metrics) for name, metrics in summary["baselines"].items()})
    if summary.get("method", "pass") != "pass":
        return rows
    for protocol in PROTOCOLS:
        for backbone, root in (("pretrained", run), ("random", run / RANDOM_PROTOCOLS)):
            found = json.loads((root / protocol / "validation" / "summary.json").read_text())
            rows[f"{protocol}, {backbone}"] = headline(found["metrics"])
    return rows


def aggregate(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Mean, min, max and the per-seed values of every row and metric."""
    names = list(next(iter(per_seed.values())))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names:
        out[name] = {}
        for metric in next(iter(per_seed.values()))[name]:
            values = [per_seed[seed][name][metric] for seed in per_seed]
            out[name][metric] = {"mean": round(sum(values) / len(values), 2), "min": min(values),
                                 "max": max(values), "values": values}
    return out


def checks(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Per seed: the rows the pipeline fails to beat, and the protocols where random weights are not beaten.

    A failure is ``"<row> <metric> <value> >= <pipeline or pretrained value>"``; empty lists pass.
    """
    result: dict[str, Any] = {"pipeline_beats_every_baseline": {}, "pretrained_beats_random": {}}
    for seed, rows in per_seed.items():
        pipeline = next(iter(rows.values()))  # the headline row
        result["pipeline_beats_every_baseline"][seed] = [
            f"{name} {metric} {values[metric]} >= {pipeline[metric]}"
            for name, values in rows.items() if name.startswith("baseline: ")
            for metric in pipeline if values[metric] >= pipeline[metric]]
        if f"{PROTOCOLS[0]}, random" not in rows:  # a scene method: no ImageNet-S protocols
            result["pretrained_beats_random"][seed] = []
            continue
        result["pretrained_beats_random"][seed] = [
            f"{protocol} {metric} random {rows[f'{protocol}, random'][metric]} >= pretrained "
            f"{rows[f'{protocol}, pretrained'][metric]}"
            for protocol in PROTOCOLS for metric in METRICS
            if rows[f"{protocol}, random"][metric] >= rows[f"{protocol}, pretrained"][metric]]
    result["all_pass"] = all(not failures for group in ("pipeline_beats_every_baseline", "pretrained_beats_random")
                             for failures in result[group].values())
    return result


def table(rows: dict[str, dict[str, dict[str, Any]]], seeds: list[int]) -> str:
    """Mean [min, max] per row and metric."""
    lines = [f"validation over seeds {seeds}: mean [min, max], percent",
             f"{'':<32}" + "".join(f"{metric:>24}" for metric in next(iter(rows.values())))]
    for name, metrics in rows.items():
        cells = [f"{m['mean']:.2f} [{m['min']:.2f}, {m['max']:.2f}]" for m in metrics.values()]
        lines.append(f"{name:<32}" + "".join(f"{cell:>24}" for cell in cells))
    return "\n".join(lines)


def seed_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (distinct, non-negative)."""
    seeds = [int(part) for part in text.split(",") if part.strip()]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected distinct non-negative integers like 0,1,2, got {text!r}")
    return seeds


def markdown(rows: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The same table in Markdown (mean and [min, max] per metric), for the README."""
    metrics = list(next(iter(rows.values())))
    lines = ["| row | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m['mean']:.2f} [{m['min']:.2f}, {m['max']:.2f}]"
                                               for m in metrics.values()) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder of the data, the runs and seeds.json")
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2],
                        help="run seeds, comma-separated (default: 0,1,2)")
    parser.add_argument("--dataset", default="synthetic-demo", help="dataset preset (default: synthetic-demo)")
    parser.add_argument("--method", default="pass", choices=("pass", "picie", "stego", "hp", "fs4"),
                        help="the method of `lussray run` (default: pass; the others on scene data)")
    parser.add_argument("--config", help="experiment YAML passed to every command")
    parser.add_argument("--no-crf", action="store_true", help="leave out the pipeline + CRF row")
    parser.add_argument("--retries", type=int, default=2,
                        help="reruns of a command whose Ray cluster did not start (default 2)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every command")
    args = parser.parse_args()
    if any("=" not in item or item.startswith("seed=") for item in args.overrides):
        parser.error("overrides are key=value (the run seed comes from --seeds)")
    out = args.out.resolve()
    common = ("--dataset", args.dataset, *(("--config", args.config) if args.config else ()),
              *with_class_count(args.overrides))
    started = time.perf_counter()
    for step in data_steps(out, common):
        run_step(step, out, args.retries)
    records: dict[int, dict[str, Any]] = {}
    for seed in args.seeds:
        folder = out / f"seed-{seed}"
        records[seed] = {step.name: run_step(step, folder, args.retries)
                         for step in seed_steps(out, seed, common, not args.no_crf, args.method)}
    per_seed = {seed: seed_rows(out, seed) for seed in args.seeds}
    rows = aggregate(per_seed)
    verdict = checks(per_seed)
    print(table(rows, args.seeds))
    print(markdown(rows))
    for group in ("pipeline_beats_every_baseline", "pretrained_beats_random"):
        for seed, failures in verdict[group].items():
            print(f"{group}, seed {seed}: {'yes' if not failures else 'NO: ' + '; '.join(failures)}")
    result = {"method": args.method, "dataset": args.dataset, "overrides": list(common[2:]), "seeds": args.seeds, "rows": rows,
              "checks": verdict, "per_seed": {str(s): v for s, v in per_seed.items()},
              "seconds": {str(s): {name: r["seconds"] for name, r in steps.items()} for s, steps in records.items()},
              "load": {str(s): {name: [r["load_before"], r["load_after"]] for name, r in steps.items()}
                       for s, steps in records.items()},
              "wall_seconds": round(time.perf_counter() - started, 1)}
    (out / "seeds.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
