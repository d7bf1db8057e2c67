"""``lussray evaluate``: score predictions exactly as the official ImageNet-S evaluator, or by the pixel protocol.

Run::

    lussray evaluate --pred run/predict/validation --gt data/ImageNetS919/validation-segmentation \\
        --dataset imagenet-s919 --hungarian            # or --match FILE; neither: ids are GT ids
    lussray evaluate --pred DIR --gt DIR --classes 50 --list ImageNetS_im50_validation.txt
    lussray evaluate --pred DIR --gt DIR --classes 50 --sweep 0:0.8:0.01   # tau curve, <name>.npy scores
    lussray evaluate --protocol pixel --pred DIR --gt DIR --classes 27 --clusters 27 [--match identity]

It prints a table like the papers' (mIoU, b-mIoU, Img-Acc, F, mIoU per object size S/MS/ML/L and
their boundary versions) and writes ``metrics.json`` (plus ``match.json`` with ``--hungarian``)
to ``--out`` (default ``<run>/evaluate`` with ``--run``, else the prediction folder).

Metric definitions: :mod:`lussray.eval.metrics`; matching: :mod:`lussray.eval.matching`;
facts: shared/reference/pass-imagenet-s.md, section 3. Bad input (missing predictions,
predictions of another size than the ground truth, ids outside 0..N) ends with exit code 2 and a
message that counts the files and names the first ones.

``--protocol pixel`` is the scene-centric protocol of PiCIE, STEGO and HP (one pixel-level
Hungarian matching over the split, pixel accuracy, mIoU; :mod:`lussray.eval.pixel`): ground truth
0..C-1 and 1000 = ignore, predictions cluster ids 0..K-1 (``--clusters K``, default C), or class
ids with ``--match identity``; things/stuff means with ``--things IDS`` (default: the preset's
``dataset.thing_classes``, 0-11 for ``--dataset cocostuff27``). ``--protocol`` defaults to the
preset's ``dataset.protocol``, so ImageNet-S stays the default. Its metrics.json holds mIoU and
Acc (pixel accuracy) in percent, the per-class IoU, the matching and the confusion matrix.

This module is pure: no Ray, no torch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lussray.data.imagenet_s import IGNORE_ID
from lussray.errors import UserError
from lussray.eval.io import (
    MATCH_FILE,
    EvalItem,
    write_atomic,
    list_items,
    match_to_lookup,
    read_match,
    read_name_list,
    write_match,
)
from lussray.eval.matching import cooccurrence, hungarian_mapping
from lussray.eval.metrics import Metrics, compute_metrics
from lussray.eval.pixel import (
    MATCH_MODES,
    evaluate_pixel_items,
    format_pixel_per_class,
    format_pixel_table,
    list_pixel_items,
    parse_class_ids,
    things_stuff,
)
from lussray.eval.runner import accumulate
from lussray.eval.stats import BUCKET_NAMES, StatsAccumulator
from lussray.eval.sweep import SweepResult, parse_taus, sweep_folders

METRICS_FILE = "metrics.json"
HUNGARIAN = "hungarian"
PROTOCOLS = ("imagenet-s", "pixel")


@dataclass
class Evaluation:
    """What :func:`evaluate_items` found: the metrics and the matching applied."""

    metrics: Metrics
    mapping: np.ndarray | None  # None: predictions already in ground-truth ids
    seconds: float


def evaluate_items(
    items: Sequence[EvalItem],
    *,
    num_classes: int,
    match: dict[int, int] | str | None = None,
    workers: int | None = None,
    match_source: str = "match",
    progress: Callable[[str], None] | None = None,
) -> Evaluation:
    """Evaluate predictions on disk in one streaming pass.

    Args:
        items: (ground truth, prediction) pairs, see :func:`lussray.eval.io.list_items`.
        num_classes: N; ids 0..N, 1000 ignored.
        match: ``"hungarian"`` to compute the image-level matching, a {generated: GT} dict to
            apply, or None when predictions already use ground-truth ids.
        workers: processes (default one per core).
        match_source: how to name the match in messages (its file name).
        progress: receives progress lines (default: the logger of :mod:`lussray.eval.runner`).

    Raises:
        UserError: for bad files or an unusable match (the message names them).
    """
    started = time.perf_counter()
    mapping = None
    if isinstance(match, dict):
        mapping = match_to_lookup(match, num_classes, match_source)
        if mapping[0] != 0:
            raise UserError(f"{match_source}: id 0 (other) must map to 0, got {mapping[0]}")
    elif match not in (None, HUNGARIAN):
        raise ValueError(f"match must be None, 'hungarian' or a dict, got {match!r}")
    max_pred_id = num_classes if mapping is None else len(mapping) - 1
    acc = StatsAccumulator(num_classes, max_pred_id=max_pred_id)
    # With a known matching the workers decide Img-Acc per image; a Hungarian one is known later.
    worker_mapping = mapping if mapping is not None or match == HUNGARIAN else _identity(num_classes)
    accumulate(items, acc, mapping=worker_mapping, workers=workers, progress=progress)
    if match == HUNGARIAN:
        pred_images, pred_labels, gt_images, gt_labels = acc.presence()
        mapping = hungarian_mapping(
            cooccurrence(pred_images, pred_labels, gt_images, gt_labels, acc.num_images, num_classes)
        )
    metrics = compute_metrics(acc, mapping)
    return Evaluation(metrics, mapping, time.perf_counter() - started)


def _identity(num_classes: int) -> np.ndarray:
    return np.arange(num_classes + 1, dtype=np.int64)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def format_table(metrics: Metrics) -> str:
    """The papers' table: mIoU, b-mIoU, Img-Acc, F, then mIoU and b-mIoU per object size."""
    s = metrics.summary()
    header = ["mIoU", "b-mIoU", "Img-Acc", "F"] + list(BUCKET_NAMES) + [f"B{b}" for b in BUCKET_NAMES]
    values = [s["mIoU"], s["mBIoU"], s["Acc"], s["FMeasure"]] + [s[b] for b in BUCKET_NAMES]
    values += [s[f"B{b}"] for b in BUCKET_NAMES]
    cells = [_fmt(v) for v in values]
    widths = [max(len(h), len(c)) for h, c in zip(header, cells)]
    line = lambda row: "| " + " | ".join(x.rjust(w) for x, w in zip(row, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, line(cells)])


def format_curve(result: SweepResult) -> str:
    """One line per threshold, like PASS ``evaluator.py --curve``, with the best marked."""
    lines = ["   tau    mIoU  b-mIoU  Img-Acc       F       S      MS      ML       L"]
    for k, row in enumerate(result.curve()):
        mark = "  <- best" if k == result.best_index else ""
        values = [row[name] for name in ("mIoU", "mBIoU", "Acc", "FMeasure", "S", "MS", "ML", "L")]
        lines.append(f"{row['tau']:6.2f} " + " ".join(f"{_fmt(v):>7}" for v in values) + mark)
    return "\n".join(lines)


def format_per_class(metrics: Metrics, names: Sequence[str] | None = None) -> str:
    """Per-class IoU and boundary IoU, one class per line (0 is "other")."""
    lines = ["class            IoU   b-IoU"]
    for c, (iou, biou) in enumerate(zip(metrics.iou, metrics.boundary_iou)):
        name = "other" if c == 0 else (names[c - 1] if names and c - 1 < len(names) else str(c))
        lines.append(f"{name:<12} {iou:7.2f} {biou:7.2f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lussray evaluate`` (the common flags are added by the CLI)."""
    parser.add_argument(
        "--protocol", choices=PROTOCOLS,
        help="imagenet-s: the official evaluator; pixel: one pixel-level matching over the split, pixel "
        "accuracy and mIoU (COCO-Stuff-27, Cityscapes-27); default: the preset's dataset.protocol "
        "(imagenet-s unless a scene-centric --dataset)",
    )
    parser.add_argument(
        "--pred", required=True, metavar="DIR",
        help="predictions: DIR/<wnid>/<name>.png (official codec); pixel: the ground truth's relative paths",
    )
    parser.add_argument(
        "--gt", required=True, metavar="DIR",
        help="ground truth: the <split>-segmentation folder; pixel: any tree of label PNGs (0..C-1, 1000 ignore)",
    )
    matching = parser.add_mutually_exclusive_group()
    matching.add_argument(
        "--match", metavar="FILE|MODE",
        help="imagenet-s: match.json mapping generated ids to ground-truth ids; "
        f"pixel: {' or '.join(MATCH_MODES)} (default hungarian; identity for predictions in class ids)",
    )
    matching.add_argument(
        "--hungarian", action="store_true",
        help="compute the image-level Hungarian matching (written to OUT/match.json)",
    )
    matching.add_argument(
        "--sweep", nargs="?", const="0:0.8:0.01", metavar="MIN:MAX:STEP",
        help="sweep the 'other' threshold tau over <name>.npy foreground scores next to the "
        "predictions, with a Hungarian matching per tau (default 0:0.8:0.01, PASS --curve)",
    )
    parser.add_argument(
        "--classes", type=int, metavar="N", help="number of categories N (default: dataset.num_classes)"
    )
    parser.add_argument(
        "--clusters", type=int, metavar="K", help="pixel: prediction ids are clusters 0..K-1 (default: --classes)"
    )
    parser.add_argument(
        "--things", metavar="IDS",
        help="pixel: the 'thing' class ids, e.g. 0-11 (the others are 'stuff'); reports both means "
        "(default: 0..dataset.thing_classes-1 of the preset, e.g. 0-11 for --dataset cocostuff27)",
    )
    parser.add_argument("--list", metavar="FILE", help="image list (official names file or <wnid>/<name> per line)")
    parser.add_argument("--workers", type=int, metavar="W", help="worker processes (default: one per core)")
    parser.add_argument("--out", metavar="DIR", help="where metrics.json goes (default: <run>/evaluate, else --pred)")
    parser.add_argument("--per-class", action="store_true", help="also print the IoU of every class")


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if args.run:
        return Path(args.run) / "evaluate"
    return Path(args.pred)


def _write_json(path: Path, content: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(_finite(content), indent=2, allow_nan=False) + "\n").encode())


def run(args: argparse.Namespace, config: Any) -> int:
    """Evaluate, print the table, write metrics.json; return the exit code.

    Raises:
        UserError: for bad input (the CLI prints it and exits with code 2).
    """
    num_classes = args.classes if args.classes is not None else config.dataset.num_classes
    if num_classes < 1:
        raise UserError(f"--classes must be >= 1, got {num_classes}")
    protocol = getattr(args, "protocol", None) or getattr(config.dataset, "protocol", "imagenet-s")
    if protocol == "pixel":
        return run_pixel(args, num_classes, thing_classes=getattr(config.dataset, "thing_classes", 0))
    for flag in ("clusters", "things"):
        if getattr(args, flag, None) is not None:
            raise UserError(f"--{flag} belongs to --protocol pixel")
    keys = read_name_list(args.list) if args.list else None
    items = list_items(args.gt, args.pred, keys)
    out = _out_dir(args)
    info: dict[str, Any] = {
        "pred": str(args.pred),
        "gt": str(args.gt),
        "list": args.list,
        "num_classes": num_classes,
        "num_images": len(items),
    }
    print(f"lussray evaluate: {len(items)} images, N = {num_classes} classes, predictions {args.pred}")

    if args.sweep is not None:
        try:
            taus = parse_taus(args.sweep)
        except ValueError as error:
            raise UserError(f"--sweep: {error}") from error
        missing = [str(i.foreground_path) for i in items if not i.foreground_path.is_file()]
        if missing:
            raise UserError(f"{len(missing)} of {len(items)} foreground-score files are missing: {missing[0]}")
        started = time.perf_counter()
        result = sweep_folders(items, num_classes=num_classes, taus=taus, workers=args.workers)
        print(format_curve(result))
        print(f"best tau = {result.best_tau:.2f} (Hungarian matching per tau)")
        print(format_table(result.best))
        info.update(matching="hungarian per tau", seconds=round(time.perf_counter() - started, 3))
        _write_json(out / METRICS_FILE, {**info, **result.to_dict()})
        print(f"wrote {out / METRICS_FILE}")
        return 0

    if args.hungarian:
        match: dict[int, int] | str | None = HUNGARIAN
        info["matching"] = "hungarian"
    elif args.match:
        match = read_match(args.match)
        info["matching"] = str(args.match)
    else:
        match = None
        info["matching"] = "none (predictions use ground-truth ids)"
        if (Path(args.pred) / MATCH_FILE).is_file():
            print(f"note: {Path(args.pred) / MATCH_FILE} exists but is not applied; pass --match to use it")
    evaluation = evaluate_items(
        items, num_classes=num_classes, match=match, workers=args.workers,
        match_source=os.path.basename(args.match) if args.match else "match",
    )
    print(f"matching: {info['matching']}")
    print(format_table(evaluation.metrics))
    if args.per_class:
        print(format_per_class(evaluation.metrics))
    if args.hungarian:
        match_path = write_match(out / MATCH_FILE, evaluation.mapping)
        info["match_file"] = str(match_path)
        print(f"wrote {match_path}")
    info["seconds"] = round(evaluation.seconds, 3)
    _write_json(out / METRICS_FILE, {**info, **evaluation.metrics.to_dict()})
    print(f"wrote {out / METRICS_FILE} ({len(items)} images in {evaluation.seconds:.1f} s)")
    return 0


def run_pixel(args: argparse.Namespace, num_classes: int, thing_classes: int = 0) -> int:
    """``--protocol pixel``: evaluate, print the table, write metrics.json; return the exit code.

    Args:
        args: the parsed flags.
        num_classes: C.
        thing_classes: T from the preset: classes 0..T-1 are things, the others stuff (0: no
            groups, unless ``--things``).

    Raises:
        UserError: for bad input or flags of the other protocol.
    """
    for flag, name in (("hungarian", "--hungarian"), ("sweep", "--sweep"), ("list", "--list")):
        if getattr(args, flag) not in (None, False):
            raise UserError(f"{name} belongs to --protocol imagenet-s (pixel: --match {'|'.join(MATCH_MODES)})")
    match = args.match or MATCH_MODES[0]
    if match not in MATCH_MODES:
        raise UserError(f"--protocol pixel: --match must be one of {', '.join(MATCH_MODES)}, got {match!r}")
    if num_classes > IGNORE_ID:
        raise UserError(f"--protocol pixel: --classes must be at most {IGNORE_ID} (the ignore id), got {num_classes}")
    num_clusters = args.clusters if args.clusters is not None else num_classes
    if num_clusters < 1:
        raise UserError(f"--clusters must be >= 1, got {num_clusters}")
    if args.things is not None:
        groups = things_stuff(parse_class_ids(args.things, num_classes), num_classes)
    elif 0 < thing_classes < num_classes:
        groups = things_stuff(range(thing_classes), num_classes)
    else:
        groups = None
    items = list_pixel_items(args.gt, args.pred)
    out = _out_dir(args)
    print(f"lussray evaluate --protocol pixel: {len(items)} images, C = {num_classes} classes, "
          f"K = {num_clusters} clusters, matching {match}, predictions {args.pred}")
    evaluation = evaluate_pixel_items(items, num_classes=num_classes, num_clusters=num_clusters, match=match,
                                      groups=groups, workers=args.workers)
    metrics = evaluation.metrics
    print(format_pixel_table(metrics))
    if args.per_class:
        print(format_pixel_per_class(metrics))
    info = {
        "protocol": "pixel",
        "pred": str(args.pred),
        "gt": str(args.gt),
        "num_classes": num_classes,
        "num_clusters": num_clusters,
        "matching": match,
        "groups": {name: list(ids) for name, ids in (groups or {}).items()},
        "seconds": round(evaluation.seconds, 3),
    }
    _write_json(out / METRICS_FILE, {**info, **metrics.to_dict()})
    print(f"wrote {out / METRICS_FILE} ({len(items)} images, {metrics.labelled_pixels} labelled pixels "
          f"in {evaluation.seconds:.1f} s)")
    return 0


def _finite(value: Any) -> Any:
    """Replace NaN (an empty size bucket) by None, recursively, so the JSON stays standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
