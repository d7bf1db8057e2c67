"""PASS (the default method): LUSS on ImageNet-S-style data, scored with the ImageNet-S protocol.

    lussray run --method pass --dataset synthetic-demo --data demo-out/shards --run demo-out/run --baselines --crf
    ray job submit --working-dir . -- lussray run --dataset imagenet-s919 --data s3://b/shards --run s3://b/runs/s919

Stages (:data:`STAGES`): ``train`` (PASS pretraining), ``attention``, ``labelgen``, ``finetune``,
``predict`` (validation, the evaluator's Hungarian matching; ``--crf`` also writes ``validation-crf``;
``--test`` also predicts the test split and packs its submission). Each stage records its own
completion (a final checkpoint, ``summary.json``, a manifest) and the inputs that made it
(``inputs.json``, :mod:`lussray.completion`), so a rerun after an interruption passes over finished
stages in seconds and continues inside the one that stopped, while a rerun with a changed config is
refused at the first stage whose inputs changed; ``--overwrite`` redoes that stage and the ones after
it, keeping the stages before.

Baselines (``--baselines``), on the same validation images with the same evaluator:

- ``all_other``: every pixel "other";
- ``random_backbone``: the whole pipeline without pretraining, i.e. attention, label generation,
  fine-tuning and prediction from a seeded random backbone (in ``<run>/baselines/random-backbone``);
- ``pseudo_labels``: the pseudo labels themselves (labelgen's nearest-centroid pixel labels at its
  chosen tau) on validation, before any fine-tuning. With ``labelgen.tau_split=validation`` (the
  reference) the tau is fitted to these very images, which makes this baseline optimistic; the demo
  preset fits it on train-semi, so no stage sees validation's ground truth.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lussray import storage
from lussray.completion import FORMAT_VERSION, StageRecord, config_fingerprint, data_fingerprint
from lussray.config import LussConfig
from lussray.pipelines import MethodResult, RunOptions, Stage, StageTimer
from lussray.seeds import derived_seed
from lussray.stages import attention, finetune, labelgen, predict, pretrain

STAGE = "run"  # log prefix and record owner of the baselines, which `lussray run` computes
PROTOCOL = "imagenet-s"
BASELINES = "baselines"

STAGES: tuple[Stage, ...] = (
    Stage("train", reads="<data>/train shards", writes="pretrain/checkpoint_step=*/",
          completion="the final step's checkpoint in Ray Train's record, loadable, same inputs.json"),
    Stage("attention", reads="<data>/train shards, the stage-1 checkpoint", writes="attention/checkpoint_step=*/",
          completion="the final step's checkpoint in Ray Train's record, loadable, same inputs.json"),
    Stage("labelgen", reads="<data>/{train,validation,train-semi} shards, the attention checkpoint",
          writes="labelgen/ (embeddings, centroids, tau, pseudo/ shards)",
          completion="labelgen/summary.json written last, same inputs.json"),
    Stage("finetune", reads="labelgen/pseudo shards, the stage-1 checkpoint", writes="finetune/checkpoint_step=*/",
          completion="the final step's checkpoint in Ray Train's record, loadable, same inputs.json"),
    Stage("predict", reads="<data>/validation shards, the segmentation checkpoint",
          writes="predict/validation[-crf]/ (PNGs, match.json)",
          completion="predict/<split>/summary.json written last, same inputs.json"),
)


def run_stages(config: LussConfig, data: str, run: str, *, init: str | None, crf: bool, test: bool,
               timer: StageTimer, overwrite: bool = False) -> dict[str, Any]:
    """Pretraining (unless ``init`` gives the backbone) through validation predictions; their summary.

    Every stage compares the same ``config`` with its own inputs record, so a changed value is
    refused (or, with ``overwrite``, redone) at the first stage that reads it, and the stages
    after it follow (their upstream checkpoint or labels changed).
    """
    if init is None:
        timer.run("train", pretrain.pretrain, config, data, run, overwrite=overwrite)
    timer.run("attention", attention.train_attention, config, data, run, init=init, overwrite=overwrite)
    timer.run("labelgen", labelgen.generate, config, data, run, overwrite=overwrite)
    timer.run("finetune", finetune.finetune, config, run, init=init, overwrite=overwrite)
    summary = timer.run("predict", predict.predict, config, data, run=run, split="validation", overwrite=overwrite)
    if crf:
        timer.run("predict-crf", predict.predict, config, data, run=run, split="validation", crf=True,
                  overwrite=overwrite)
    if test:
        timer.run("predict-test", predict.predict, config, data, run=run, split="test", submission=True,
                  overwrite=overwrite)
    return summary


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
    keys = ("arch", "hidden_mlp", "feat_dim", "num_prototypes")
    record = StageRecord(root, {"format": FORMAT_VERSION,
                                **config_fingerprint(config, *(f"pretrain.{key}" for key in keys), "seed")}, STAGE)
    record.check(overwrite)
    if not storage.exists(record.path):
        storage.write_json_atomic(record.path, record.fingerprint)
    if not storage.exists(path):
        pre = config.pretrain
        torch.manual_seed(derived_seed(config.seed, "random_backbone"))
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


def baselines(config: LussConfig, data: str, run: str, *, timer: StageTimer,
              overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """Every baseline's evaluator summary, by name."""
    out: dict[str, dict[str, Any]] = {}
    out["all_other"] = timer.run("baseline all_other", all_other_baseline, config, data, run, overwrite)
    pseudo = pseudo_label_baseline(run)
    if pseudo is not None:
        out["pseudo_labels"] = pseudo
    random_run = storage.join(run, BASELINES, "random-backbone")
    init = random_backbone_checkpoint(config, run, overwrite)
    sub_timer = StageTimer("random_backbone/")
    summary = run_stages(config, data, random_run, init=init, crf=False, test=False, timer=sub_timer,
                         overwrite=overwrite)
    timer.merge(sub_timer)
    out["random_backbone"] = summary["metrics"]
    return out



def run_method(config: LussConfig, data: str, run: str, options: RunOptions, timer: StageTimer) -> MethodResult:
    """Every PASS stage, then its baselines when asked for."""
    if options.crf:
        predict.crf_refiner(config)  # fails now, not after an hour of training, without the extra
    summary = run_stages(config, data, run, init=None, crf=options.crf, test=options.test, timer=timer,
                         overwrite=options.overwrite)
    rows = {"pipeline": summary["metrics"]}
    if options.crf:
        crf_summary = storage.join(run, predict.STAGE, predict.split_folder("validation", True), predict.SUMMARY_FILE)
        rows["pipeline + CRF"] = storage.read_json(crf_summary)["metrics"]
    found = baselines(config, data, run, timer=timer, overwrite=options.overwrite) if options.baselines else {}
    return MethodResult(rows=rows, baselines=found, protocol=PROTOCOL)
