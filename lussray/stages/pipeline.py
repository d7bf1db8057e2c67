"""``lussray run``: every stage in order, each skipped when complete, then the metrics and a report.

    lussray run --dataset synthetic-demo --data demo-out/shards --run demo-out/run --baselines --crf
    ray job submit --working-dir . -- lussray run --dataset imagenet-s919 --data s3://b/shards --run s3://b/runs/s919

Stages: ``train`` (PASS pretraining), ``attention``, ``labelgen``, ``finetune``, ``predict``
(validation, the evaluator's Hungarian matching; ``--crf`` also writes ``validation-crf``;
``--test`` also predicts the test split and packs its submission). Each stage records its own
completion (a final checkpoint, ``summary.json``, a manifest) and the inputs that made it
(``inputs.json``, :mod:`lussray.completion`), so a rerun of ``lussray run`` after an interruption
passes over finished stages in seconds and continues inside the one that stopped, while a rerun
with a changed config is refused at the first stage whose inputs changed; ``--overwrite`` redoes
that stage and the ones after it, keeping the stages before.

``--baselines`` also scores, on the same validation images with the same evaluator:

- ``all_other``: every pixel "other";
- ``random_backbone``: the whole pipeline without pretraining, i.e. attention, label generation,
  fine-tuning and prediction from a seeded random backbone (in ``<run>/baselines/random-backbone``);
- ``pseudo_labels``: the pseudo labels themselves (labelgen's nearest-centroid pixel labels at its
  chosen tau) on validation, before any fine-tuning. With ``labelgen.tau_split=validation`` (the
  reference) the tau is fitted to these very images, which makes this baseline optimistic; the demo
  preset fits it on train-semi, so no stage sees validation's ground truth.

Writes ``<run>/metrics.json`` (last, atomically) and ``<run>/report.html``; the final line printed
is one JSON object: ``{"mIoU", "Acc", "F", "baselines": {name: mIoU}}``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from lussray import storage
from lussray.completion import FORMAT_VERSION, StageRecord, config_fingerprint, data_fingerprint
from lussray.config import LussConfig
from lussray.errors import UserError
from lussray.stages import attention, finetune, labelgen, predict, pretrain

STAGE = "run"
METRICS_FILE = "metrics.json"
BASELINES = "baselines"


def stage_args(data: str, run: str, **flags: Any) -> argparse.Namespace:
    """The namespace a stage's ``run(args, config)`` reads, with every flag at its default."""
    defaults = {"max_steps": None, "init": None, "checkpoint": None, "tau": None, "split": "validation",
                "out": None, "match": None, "submission": False, "method": None, "crf": False, "overwrite": False}
    return argparse.Namespace(data=data, run=run, **{**defaults, **flags})


def headline(metrics: dict[str, Any]) -> dict[str, float | None]:
    """mIoU, Img-Acc and F of an evaluator summary (percent)."""
    return {"mIoU": metrics.get("mIoU"), "Acc": metrics.get("Acc"), "F": metrics.get("FMeasure")}


class _Timer:
    """Seconds per stage, printed as each one ends."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.seconds = prefix, {}

    def run(self, name: str, fn, *args) -> Any:
        print(f"[{STAGE}] {self.prefix}{name} ...", flush=True)
        started = time.perf_counter()
        result = fn(*args)
        if isinstance(result, int) and result != 0:
            raise UserError(f"stage {name} exited with {result}")
        self.seconds[name] = round(time.perf_counter() - started, 1)
        print(f"[{STAGE}] {self.prefix}{name}: {self.seconds[name]} s", flush=True)
        return result


def run_stages(config: LussConfig, data: str, run: str, *, init: str | None, crf: bool, test: bool,
               timer: _Timer, overwrite: bool = False) -> dict[str, Any]:
    """Pretraining (unless ``init`` gives the backbone) through validation predictions; their summary.

    Every stage compares the same ``config`` with its own inputs record, so a changed value is
    refused (or, with ``overwrite``, redone) at the first stage that reads it, and the stages
    after it follow (their upstream checkpoint or labels changed).
    """
    def args(data_dir: str | None, **flags: Any) -> argparse.Namespace:
        return stage_args(data_dir, run, overwrite=overwrite, **flags)

    if init is None:
        timer.run("train", pretrain.run, args(data), config)
    timer.run("attention", attention.run, args(data, init=init), config)
    timer.run("labelgen", labelgen.run, args(data), config)
    timer.run("finetune", finetune.run, args(None, init=init), config)
    timer.run("predict", predict.run, args(data, split="validation"), config)
    if crf:
        timer.run("predict-crf", predict.run, args(data, split="validation", crf=True), config)
    if test:
        timer.run("predict-test", predict.run, args(data, split="test", submission=True), config)
    return storage.read_json(storage.join(run, predict.STAGE, "validation", predict.SUMMARY_FILE))


# -- baselines ------------------------------------------------------------------------------------


class AllOtherPredictor:
    """The trivial baseline: every pixel "other" (a :class:`lussray.stages.predict.Predictor`)."""

    def predict(self, images, sizes, labels) -> list[np.ndarray]:
        return [np.zeros(tuple(size), np.int64) for size in sizes]


def all_other_baseline(config: LussConfig, data: str, run: str, overwrite: bool = False) -> dict[str, Any]:
    """Scores of the all-"other" prediction (no matching needed: 0 is 0)."""
    out = storage.join(run, BASELINES, "all-other")
    record = StageRecord(out, {"format": FORMAT_VERSION, **config_fingerprint(config, "dataset.num_classes"),
                               "data": data_fingerprint(data, ["validation"])}, STAGE)
    record.check(overwrite)
    summary_path = storage.join(out, predict.SUMMARY_FILE)
    if storage.exists(summary_path) and record.recorded() is not None:
        return storage.read_json(summary_path)["metrics"]
    storage.makedirs(out)
    with record.recording(produced=lambda: storage.exists(summary_path)):
        result = predict.predict_split(config, data, "validation", out, AllOtherPredictor, {}, pool=config.predict,
                                       evaluate=True, stage=STAGE)
        metrics, _ = predict.score(result.accumulator, predict.IDENTITY)
        summary = {"num_images": len(result.keys), "metrics": predict.json_safe(metrics.to_dict())}
        storage.write_json_atomic(summary_path, summary)
    return summary["metrics"]


def random_backbone_checkpoint(config: LussConfig, run: str, overwrite: bool = False) -> str:
    """A seeded random stage-1 model saved as a checkpoint (``<run>/baselines/random-backbone/init.pt``).

    ``<run>/baselines/random-backbone/inputs.json`` records the model settings it was drawn with;
    other settings are refused, or with ``overwrite`` the whole random-backbone run is redone.
    """
    import io

    import torch

    from lussray.models.pass_model import PASSModel

    root = storage.join(run, BASELINES, "random-backbone")
    path = storage.join(root, "init.pt")
    keys = ("arch", "hidden_mlp", "feat_dim", "num_prototypes", "loop.seed")
    record = StageRecord(root, {"format": FORMAT_VERSION,
                                **config_fingerprint(config, *(f"pretrain.{key}" for key in keys))}, STAGE)
    record.check(overwrite)
    if not storage.exists(record.path):
        storage.write_json_atomic(record.path, record.fingerprint)
    if not storage.exists(path):
        pre = config.pretrain
        torch.manual_seed(pre.loop.seed)
        model = PASSModel(arch=pre.arch, hidden_dim=pre.hidden_mlp, feat_dim=pre.feat_dim,
                          num_prototypes=pre.num_prototypes, shallow_stages=[])
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "step": 0}, buffer)
        storage.write_bytes_atomic(path, buffer.getvalue())
    return path


def pseudo_label_baseline(run: str) -> dict[str, Any] | None:
    """The pseudo labels' validation scores at labelgen's tau (None without validation ground truth)."""
    summary = storage.read_json(labelgen.Outputs(storage.join(run, labelgen.STAGE)).summary)
    return summary.get("metrics", {}).get("validation")


def baselines(config: LussConfig, data: str, run: str, *, timer: _Timer,
              overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """Every baseline's evaluator summary, by name."""
    out: dict[str, dict[str, Any]] = {}
    out["all_other"] = timer.run("baseline all_other", all_other_baseline, config, data, run, overwrite)
    pseudo = pseudo_label_baseline(run)
    if pseudo is not None:
        out["pseudo_labels"] = pseudo
    random_run = storage.join(run, BASELINES, "random-backbone")
    init = random_backbone_checkpoint(config, run, overwrite)
    sub_timer = _Timer("random_backbone/")
    summary = run_stages(config, data, random_run, init=init, crf=False, test=False, timer=sub_timer,
                         overwrite=overwrite)
    timer.seconds.update({f"random_backbone/{k}": v for k, v in sub_timer.seconds.items()})
    out["random_backbone"] = summary["metrics"]
    return out


# -- the command ------------------------------------------------------------------------------------


def metrics_table(rows: dict[str, dict[str, Any]]) -> str:
    """A fixed-width table of mIoU, Img-Acc and F per row."""
    lines = [f"{'':<24}{'mIoU':>8}{'Acc':>8}{'F':>8}"]
    for name, metrics in rows.items():
        values = headline(metrics)
        lines.append(f"{name:<24}" + "".join(f"{'-' if v is None else f'{v:.2f}':>8}" for v in values.values()))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lussray run``."""
    parser.add_argument("--baselines", action="store_true",
                        help="also score all-'other', the pipeline from a random backbone and the raw pseudo labels")
    parser.add_argument("--crf", action="store_true", help="also predict validation with dense-CRF refinement")
    parser.add_argument("--test", action="store_true", help="also predict the test split and pack its submission")
    parser.add_argument("--no-report", action="store_true", help="skip <run>/report.html")


def run(args: argparse.Namespace, config: LussConfig) -> int:
    """The whole pipeline on ``--data`` into ``--run``."""
    from lussray.data.ingest import init_ray

    if not args.data or not args.run:
        raise UserError("--data DIR (shards of `lussray prepare`) and --run DIR are required")
    data, run_root = storage.absolute(args.data), storage.absolute(args.run)
    if args.crf:
        predict.crf_refiner(config)  # fails now, not after an hour of training, without the extra
    init_ray(config.ray)
    started, timer = time.perf_counter(), _Timer("")
    summary = run_stages(config, data, run_root, init=None, crf=args.crf, test=args.test, timer=timer,
                         overwrite=args.overwrite)
    rows = {"pipeline": summary["metrics"]}
    if args.crf:
        crf_summary = storage.join(run_root, predict.STAGE, predict.split_folder("validation", True),
                                   predict.SUMMARY_FILE)
        rows["pipeline + CRF"] = storage.read_json(crf_summary)["metrics"]
    found = baselines(config, data, run_root, timer=timer, overwrite=args.overwrite) if args.baselines else {}
    result = {"metrics": rows, "baselines": found, "stage_seconds": timer.seconds,
              "seconds": round(time.perf_counter() - started, 1), "data": data, "run": run_root}
    storage.write_json_atomic(storage.join(run_root, METRICS_FILE), result)
    print(f"[{STAGE}] validation, fully unsupervised (percent):\n{metrics_table({**rows, **found})}", flush=True)
    if not args.no_report:
        from lussray.report import write_report

        path = timer.run("report", write_report, config, data, run_root)
        print(f"[{STAGE}] report: {path}", flush=True)
    import ray

    # Ray forwards worker output asynchronously; disconnecting first keeps the JSON the last line.
    ray.shutdown()
    print(json.dumps({**headline(summary["metrics"]),
                      "baselines": {name: headline(m)["mIoU"] for name, m in found.items()}}), flush=True)
    return 0

