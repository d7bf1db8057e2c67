"""PiCIE: pixel clustering with invariance and equivariance on scene data, scored with the pixel protocol.

    lussray run --method picie --dataset synthetic-scenes --data DATA --run RUN --baselines [--crf]
    lussray run --method picie --dataset cocostuff27 --data s3://b/coco-shards --run s3://b/runs/picie --init R18.pth

Stages (:data:`STAGES`): ``train`` (PASS stage-1 pretraining on the same training data, the
backbone of a fully self-supervised start; skipped with ``--init FILE``, a lussray or torchvision
checkpoint), ``picie`` (training with the k-means every epoch over the Train workers,
:mod:`lussray.stages.picie`), ``picie-clusters`` (the final k-means of the trained network's pixel
features of the training images), ``predict`` (validation: nearest centroid per pixel, one
Hungarian matching over the split; ``--crf`` also writes ``validation-crf``). Each stage records its
completion and inputs, as PASS's do, so a rerun passes over finished stages and resumes the one that
stopped.

Baselines (``--baselines``), same validation images, same protocol:

- ``random_backbone``: the same pipeline (PiCIE training, final k-means, prediction) from a random
  initialisation instead of the pretrained backbone (``<run>/baselines/random-backbone``);
- ``initial_kmeans``: the final k-means and prediction of the untrained network PiCIE starts from
  (the same backbone and seeded decoder, its BN statistics re-estimated on training images seen as
  validation is), i.e. what PiCIE's training adds (``<run>/baselines/initial-kmeans``).
"""

from __future__ import annotations

from typing import Any

from lussray import storage
from lussray.config import LussConfig
from lussray.pipelines import MethodResult, RunOptions, Stage, StageTimer
from lussray.stages import picie, predict, pretrain

PROTOCOL = "pixel"
BASELINES = "baselines"
REPORT = False  # report.html draws PASS's stages (attention, pseudo labels); PiCIE's rows are in metrics.json
RANDOM_INIT = "random"

STAGES: tuple[Stage, ...] = (
    Stage("train", reads="<data>/train shards", writes="pretrain/checkpoint_step=*/ (only without --init)",
          completion="the final step's checkpoint in Ray Train's record, loadable, same inputs.json"),
    Stage("picie", reads="<data>/train shards, the stage-1 checkpoint or --init",
          writes="picie/checkpoint_step=*/ (model, Adam, the epoch's centroids; labels per worker)",
          completion="the final step's checkpoint in Ray Train's record, loadable, same inputs.json"),
    Stage("picie-clusters", reads="<data>/train shards, the PiCIE checkpoint",
          writes="picie-clusters/ (pixels/*.parquet, centroids.npy)",
          completion="picie-clusters/summary.json written last, same inputs.json"),
    Stage("predict", reads="<data>/validation shards, the PiCIE checkpoint, the centroids",
          writes="predict/validation[-crf]/ (PNGs of cluster ids)",
          completion="predict/<split>/summary.json written last, same inputs.json"),
)


def run_stages(config: LussConfig, data: str, run: str, *, init: str | None, crf: bool, timer: StageTimer,
               overwrite: bool = False) -> dict[str, Any]:
    """Pretraining (unless ``init`` gives the backbone), PiCIE, its final k-means, validation predictions.

    Args:
        init: a checkpoint, ``random``, or None (PASS stage-1 pretraining runs first and is the backbone).

    Returns:
        The validation prediction summary (``metrics``).
    """
    if init is None:
        timer.run("train", pretrain.pretrain, config, data, run, overwrite=overwrite)
    trained = timer.run("picie", picie.train, config, data, run, init=init, overwrite=overwrite)
    timer.run("picie-clusters", picie.cluster, config, data, run, checkpoint=trained["checkpoint"],
              overwrite=overwrite)
    summary = timer.run("predict", picie.predict, config, data, run, checkpoint=trained["checkpoint"],
                        overwrite=overwrite)
    if crf:
        timer.run("predict-crf", picie.predict, config, data, run, checkpoint=trained["checkpoint"], crf=True,
                  overwrite=overwrite)
    return summary


def initial_kmeans(config: LussConfig, data: str, run: str, init: str | None, *, timer: StageTimer,
                   overwrite: bool = False) -> dict[str, Any]:
    """The baseline of the untrained network: its final k-means and predictions, no PiCIE training."""
    root = storage.join(run, BASELINES, "initial-kmeans")
    backbone = picie.resolve_init(run, init)
    checkpoint = timer.run("baseline initial_kmeans (network)", picie.initial_checkpoint, config, data, run,
                           backbone, root, overwrite=overwrite)
    timer.run("baseline initial_kmeans (k-means)", picie.cluster, config, data, root, checkpoint=checkpoint,
              overwrite=overwrite)
    return timer.run("baseline initial_kmeans (predict)", picie.predict, config, data, root, checkpoint=checkpoint,
                     overwrite=overwrite)


def baselines(config: LussConfig, data: str, run: str, init: str | None, *, timer: StageTimer,
              overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """``random_backbone`` and ``initial_kmeans``, each an evaluator summary."""
    out = {"initial_kmeans": initial_kmeans(config, data, run, init, timer=timer, overwrite=overwrite)["metrics"]}
    sub_timer = StageTimer("random_backbone/")
    summary = run_stages(config, data, storage.join(run, BASELINES, "random-backbone"), init=RANDOM_INIT, crf=False,
                         timer=sub_timer, overwrite=overwrite)
    timer.merge(sub_timer)
    out["random_backbone"] = summary["metrics"]
    return out


def run_method(config: LussConfig, data: str, run: str, options: RunOptions, timer: StageTimer) -> MethodResult:
    """Every PiCIE stage, then its baselines when asked for."""
    if options.crf:
        predict.crf_refiner(config)  # fails now, not after the training, without the extra
    if options.test:
        print("[run] --test: PiCIE's scene benchmarks have no test server; predictions of validation only", flush=True)
    picie.check_config(config)
    summary = run_stages(config, data, run, init=options.init, crf=options.crf, timer=timer,
                         overwrite=options.overwrite)
    rows = {"pipeline": summary["metrics"]}
    if options.crf:
        crf_summary = storage.join(run, predict.STAGE, predict.split_folder("validation", True), predict.SUMMARY_FILE)
        rows["pipeline + CRF"] = storage.read_json(crf_summary)["metrics"]
    found = (baselines(config, data, run, options.init, timer=timer, overwrite=options.overwrite)
             if options.baselines else {})
    return MethodResult(rows=rows, baselines=found, protocol=PROTOCOL)
