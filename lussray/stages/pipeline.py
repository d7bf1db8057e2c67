"""``lussray run``: a method's stages in order, each skipped when complete, then the metrics and a report.

    lussray run --dataset synthetic-demo --data demo-out/shards --run demo-out/run --baselines --crf
    lussray run --method pass --dataset imagenet-s50 --data shards/ --run runs/s50
    ray job submit --working-dir . -- lussray run --dataset imagenet-s919 --data s3://b/shards --run s3://b/runs/s919

``--method`` (default ``pass``) chooses the module of :mod:`lussray.pipelines` that declares and runs
the stages; its config layer ``configs/method/<method>.yaml`` (and ``configs/method/<method>/<dataset>.yaml``)
sits between the dataset preset and ``--config``. PASS's stages and baselines are described in
:mod:`lussray.pipelines.pass_`.

Writes ``<run>/metrics.json`` (last, atomically) and ``<run>/report.html``; the final line printed
is one JSON object: ``{"method", "seed", "mIoU", "Acc", "F", "baselines": {name: mIoU}}`` (Acc: Img-Acc for
ImageNet-S, pixel accuracy for the pixel protocol; F only where the protocol has it).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from lussray import storage
from lussray.config import LussConfig
from lussray.errors import UserError
from lussray.pipelines import DEFAULT_METHOD, METHOD_NAMES, RunOptions, StageTimer, method_module

STAGE = "run"
METRICS_FILE = "metrics.json"


def headline(metrics: dict[str, Any]) -> dict[str, float | None]:
    """mIoU, Acc (Img-Acc or pixel accuracy) and F (None where the protocol has none) of a summary, percent."""
    return {"mIoU": metrics.get("mIoU"), "Acc": metrics.get("Acc"), "F": metrics.get("FMeasure")}


def metrics_table(rows: dict[str, dict[str, Any]]) -> str:
    """A fixed-width table of mIoU, Acc and F per row."""
    lines = [f"{'':<24}{'mIoU':>8}{'Acc':>8}{'F':>8}"]
    for name, metrics in rows.items():
        values = headline(metrics)
        lines.append(f"{name:<24}" + "".join(f"{'-' if v is None else f'{v:.2f}':>8}" for v in values.values()))
    return "\n".join(lines)


def final_line(method: str, rows: dict[str, dict[str, Any]], found: dict[str, dict[str, Any]],
               seed: int = 0) -> dict[str, Any]:
    """The JSON object ``lussray run`` prints last: the headline row's metrics and every baseline's mIoU."""
    values = headline(next(iter(rows.values())))
    if values["F"] is None:
        del values["F"]
    return {"method": method, "seed": seed, **values,
            "baselines": {name: headline(m)["mIoU"] for name, m in found.items()}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lussray run``."""
    parser.add_argument("--method", default=DEFAULT_METHOD, metavar="NAME",
                        help=f"the method to run, one of: {', '.join(METHOD_NAMES)} (default: {DEFAULT_METHOD})")
    parser.add_argument("--baselines", action="store_true",
                        help="also score the method's baselines (PASS: all-'other', the pipeline from a random "
                             "backbone and the raw pseudo labels)")
    parser.add_argument("--crf", action="store_true", help="also predict validation with dense-CRF refinement")
    parser.add_argument("--test", action="store_true", help="also predict the test split and pack its submission")
    parser.add_argument("--no-report", action="store_true", help="skip <run>/report.html")
    parser.add_argument("--featurizer", metavar="FILE",
                        help="STEGO/HP: a DINO ViT-S/8 or ViT-B/8 checkpoint as the frozen featurizer (default: PASS "
                        "stage-1 pretraining runs first and its ResNet is the featurizer)")
    parser.add_argument("--select-on-labels", action="store_true",
                        help="STEGO/HP: also report the checkpoint with the best validation cluster mIoU (uses "
                        "labels; the default choice, the last checkpoint, reads no ground truth)")
    parser.add_argument("--init", metavar="CHECKPOINT",
                        help="PiCIE, FS^4: the backbone, a lussray or torchvision checkpoint (default: PASS "
                        "stage-1 pretraining runs first on the same data and the method starts from it; FS^4's "
                        "pseudo labels also use its projector)")


def run(args: argparse.Namespace, config: LussConfig) -> int:
    """The method's whole pipeline on ``--data`` into ``--run``."""
    from lussray.data.ingest import init_ray

    method = method_module(args.method)
    if not args.data or not args.run:
        raise UserError("--data DIR (shards of `lussray prepare`) and --run DIR are required")
    data, run_root = storage.absolute(args.data), storage.absolute(args.run)
    options = RunOptions(baselines=args.baselines, crf=args.crf, test=args.test, overwrite=args.overwrite,
                         featurizer=storage.absolute(args.featurizer) if args.featurizer else None,
                         select_on_labels=args.select_on_labels,
                         init=storage.absolute(args.init) if args.init else None)
    init_ray(config.ray)
    started, timer = time.perf_counter(), StageTimer()
    result = method.run_method(config, data, run_root, options, timer)
    storage.write_json_atomic(storage.join(run_root, METRICS_FILE), {
        "method": args.method, "seed": config.seed, "protocol": result.protocol, "metrics": result.rows,
        "baselines": result.baselines,
        "stage_seconds": timer.seconds, "seconds": round(time.perf_counter() - started, 1), "data": data,
        "run": run_root})
    print(f"[{STAGE}] validation, fully unsupervised (percent):\n{metrics_table({**result.rows, **result.baselines})}",
          flush=True)
    if not args.no_report and getattr(method, "REPORT", True):
        from lussray.report import write_report

        path = timer.run("report", write_report, config, data, run_root)
        print(f"[{STAGE}] report: {path}", flush=True)
    import ray

    # Ray forwards worker output asynchronously; disconnecting first keeps the JSON the last line.
    ray.shutdown()
    print(json.dumps(final_line(args.method, result.rows, result.baselines, config.seed)), flush=True)
    return 0
