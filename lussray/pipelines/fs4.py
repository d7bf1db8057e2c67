"""FS^4: PiCIE's pixel clustering guided by pyramid global pseudo labels, fully self-supervised, pixel protocol.

    lussray run --method fs4 --dataset synthetic-scenes --data DATA --run RUN --baselines [--crf]
    lussray run --method fs4 --dataset cocostuff27 --data s3://b/coco-shards --run s3://b/runs/fs4 --init swav.pth

Stages (:data:`STAGES`): ``train`` (PASS stage-1 pretraining on the same training data, the
instance-level self-supervised start; skipped with ``--init FILE``, which must then hold the
projector too unless ``fs4.labels.feature=backbone``), ``fs4-labels`` (pyramid views, global
k-means, active selection: :mod:`lussray.stages.fs4_labels`), ``fs4`` (training on the selected
views: :mod:`lussray.stages.fs4_train`), ``fs4-clusters`` (PiCIE's final k-means of the trained
network's pixel features of the training images), ``predict`` (validation: nearest centroid per
pixel, one Hungarian matching over the split; ``--crf`` also writes ``validation-crf``). Each stage
records its completion and inputs, so a rerun passes over finished stages and resumes the one that
stopped.

Baselines (``--baselines``), same validation images, same protocol:

- ``picie``: PiCIE's pipeline (:mod:`lussray.pipelines.picie`: training on the whole images, final
  k-means, prediction) from the same self-supervised start (the same stage-1 or ``--init``
  checkpoint) with PiCIE's own ``picie`` config (``<run>/baselines/picie``); with the scene presets
  its epochs and batch equal FS^4's (the budget in epochs; FS^4 sees the selected views, 40 % of
  six views per image, so its steps per epoch differ);
- ``random_backbone``: PiCIE's pipeline from a random initialisation (``<run>/baselines/random-backbone``),
  the floor any pretraining must beat. FS^4 itself is not run from a random start: its pseudo
  labels need a trained instance-level model.
"""

from __future__ import annotations

from typing import Any

from lussray import storage
from lussray.config import LussConfig
from lussray.errors import UserError
from lussray.pipelines import MethodResult, RunOptions, Stage, StageTimer
from lussray.pipelines import picie as picie_pipeline
from lussray.stages import fs4_labels, fs4_train, picie, predict, pretrain

PROTOCOL = "pixel"
BASELINES = "baselines"
REPORT = False  # report.html draws PASS's stages; FS^4's rows are in metrics.json

STAGES: tuple[Stage, ...] = (
    picie_pipeline.STAGES[0],
    Stage("fs4-labels", reads="<data>/train shards, the stage-1 checkpoint or --init",
          writes="fs4-labels/ (embeddings, centroids.npy, assign, selection.json, train/ view shards)",
          completion="fs4-labels/summary.json written last, same inputs.json"),
    Stage("fs4", reads="fs4-labels/train view shards, the stage-1 checkpoint or --init",
          writes="fs4/checkpoint_step=*/ (model with CAE and CAM head, Adam, the epoch's centroids; labels per worker)",
          completion="the final step's checkpoint in Ray Train's record, loadable, same inputs.json"),
    Stage("fs4-clusters", reads="<data>/train shards, the FS^4 checkpoint",
          writes="fs4-clusters/ (pixels/*.parquet, centroids.npy)",
          completion="fs4-clusters/summary.json written last, same inputs.json"),
    Stage("predict", reads="<data>/validation shards, the FS^4 checkpoint, the centroids",
          writes="predict/validation[-crf]/ (PNGs of cluster ids)",
          completion="predict/<split>/summary.json written last, same inputs.json"),
)


def initial_model(config: LussConfig, data: str, run: str, init: str | None, *, timer: StageTimer,
                  overwrite: bool = False) -> str:
    """The self-supervised start: ``init``, or PASS stage-1 pretraining run here first (its latest checkpoint)."""
    if init == picie_pipeline.RANDOM_INIT:
        raise UserError("--init random: FS^4's pseudo labels need a trained initial model (a stage-1, SwAV or "
                        "MoCo-v2 checkpoint)")
    if init is None:
        timer.run("train", pretrain.pretrain, config, data, run, overwrite=overwrite)
    return fs4_labels.initial_checkpoint(run, init)


def run_stages(config: LussConfig, data: str, run: str, *, init: str, crf: bool, timer: StageTimer,
               overwrite: bool = False) -> dict[str, Any]:
    """The pseudo labels, FS^4 training, its final k-means and the validation predictions from ``init``.

    Returns:
        The validation prediction summary (``metrics``).
    """
    timer.run("fs4-labels", fs4_labels.generate, config, data, run, checkpoint=init, overwrite=overwrite)
    trained = timer.run("fs4", fs4_train.train, config, run, init=init, overwrite=overwrite)
    stage = fs4_train.STAGE
    timer.run("fs4-clusters", picie.cluster, config, data, run, checkpoint=trained["checkpoint"],
              overwrite=overwrite, stage=stage)
    summary = timer.run("predict", picie.predict, config, data, run, checkpoint=trained["checkpoint"],
                        overwrite=overwrite, stage=stage)
    if crf:
        timer.run("predict-crf", picie.predict, config, data, run, checkpoint=trained["checkpoint"], crf=True,
                  overwrite=overwrite, stage=stage)
    return summary


def baselines(config: LussConfig, data: str, run: str, init: str, *, timer: StageTimer,
              overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """``picie`` (from ``init``) and ``random_backbone`` (PiCIE from a random start), each an evaluator summary."""
    out: dict[str, dict[str, Any]] = {}
    for name, folder, start in (("picie", "picie", init), ("random_backbone", "random-backbone",
                                                          picie_pipeline.RANDOM_INIT)):
        sub_timer = StageTimer(f"{name}/")
        summary = picie_pipeline.run_stages(config, data, storage.join(run, BASELINES, folder), init=start,
                                            crf=False, timer=sub_timer, overwrite=overwrite)
        timer.merge(sub_timer)
        out[name] = summary["metrics"]
    return out


def run_method(config: LussConfig, data: str, run: str, options: RunOptions, timer: StageTimer) -> MethodResult:
    """Every FS^4 stage, then its baselines when asked for."""
    if options.crf:
        predict.crf_refiner(config)  # fails now, not after the training, without the extra
    if options.test:
        print("[run] --test: FS^4's scene benchmarks have no test server; predictions of validation only", flush=True)
    if options.baselines:
        picie.check_config(config)  # the picie baseline's keys, before any training
    init = initial_model(config, data, run, options.init, timer=timer, overwrite=options.overwrite)
    summary = run_stages(config, data, run, init=init, crf=options.crf, timer=timer, overwrite=options.overwrite)
    rows = {"pipeline": summary["metrics"]}
    if options.crf:
        crf_summary = storage.join(run, predict.STAGE, predict.split_folder("validation", True), predict.SUMMARY_FILE)
        rows["pipeline + CRF"] = storage.read_json(crf_summary)["metrics"]
    found = baselines(config, data, run, init, timer=timer, overwrite=options.overwrite) if options.baselines else {}
    return MethodResult(rows=rows, baselines=found, protocol=PROTOCOL)
