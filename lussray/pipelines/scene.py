"""What the STEGO and HP pipelines share: the featurizer, training, the probes' rows, the baselines.

A run of ``lussray run --method stego|hp``:

1. the featurizer: ``--featurizer FILE`` (a DINO ViT-S/8 or ViT-B/8 checkpoint); without one, PASS
   stage-1 pretraining (:func:`lussray.stages.pretrain.pretrain`) runs first on the same training
   data and its frozen ResNet is the featurizer;
2. (STEGO) ``lussray knn``: the KNN partners;
3. training on Ray Train with the shared loop (:func:`lussray.stages.scene_training.train`);
4. predictions of validation scored with the pixel protocol: the cluster probe (the headline,
   fully unsupervised), with ``--crf`` the cluster probe + dense CRF, and the linear probe, which
   trains on ground truth and is marked "uses labels".

The checkpoint is chosen without labels: the last one. ``--select-on-labels`` adds the references'
rule as an extra row marked as using labels: the kept checkpoint (Ray Train keeps the last two)
with the best validation cluster mIoU.

Baselines (``--baselines``), scored the same way: ``frozen_kmeans`` (k-means of the frozen
features, no training) and ``random_head`` (the untrained head with its cluster probe);
:mod:`lussray.stages.scene_baselines`.
"""

from __future__ import annotations

from typing import Any

from lussray import storage
from lussray.config import LussConfig
from lussray.pipelines import MethodResult, RunOptions, StageTimer
from lussray.stages import featurizer as featurizers
from lussray.stages import pretrain, probe_predict, scene_baselines, scene_training

PROTOCOL = "pixel"
BASELINES = "baselines"
LINEAR_ROW = "linear probe (uses labels)"


def featurizer_spec(config: LussConfig, data: str, run: str, options: RunOptions,
                    timer: StageTimer) -> featurizers.FeaturizerSpec:
    """The DINO file given, else the run's PASS stage-1 ResNet (pretrained here first)."""
    if not (options.featurizer or config.featurizer.file):
        timer.run("train", pretrain.pretrain, config, data, run, overwrite=options.overwrite)
    return featurizers.resolve(config, run, options.featurizer)


def chosen_on_labels(config: LussConfig, data: str, run: str, stage: str, section: Any,
                     overwrite: bool) -> dict[str, Any] | None:
    """The references' checkpoint choice (uses labels): the kept checkpoint with the best validation cluster mIoU."""
    from lussray.stages.loop import CHECKPOINT_FILE, intact_checkpoint, reported_checkpoints

    stage_dir = storage.join(run, stage)
    best = None
    for folder, recorded in sorted((reported_checkpoints(stage_dir) or {}).items()):
        path = storage.join(stage_dir, folder, CHECKPOINT_FILE)
        if not intact_checkpoint(path, recorded):
            continue
        out = storage.join(run, probe_predict.STAGE, stage, f"validation-cluster-{folder}")
        metrics = probe_predict.predict_probe(config, data, run, path, section=section, out=out,
                                              overwrite=overwrite).get("metrics")
        if metrics and (best is None or metrics["mIoU"] > best["mIoU"]):
            best = {**metrics, "checkpoint": folder, "uses_labels": True}
    return best


def rows(config: LussConfig, data: str, run: str, checkpoint: str, *, stage: str, section: Any,
         options: RunOptions, timer: StageTimer) -> dict[str, dict[str, Any]]:
    """The method's scored rows: cluster probe (headline), + CRF, the linear probe, the label-chosen checkpoint."""
    found: dict[str, dict[str, Any]] = {}
    summary = timer.run("predict", probe_predict.predict_probe, config, data, run, checkpoint, section=section,
                        overwrite=options.overwrite)
    found["cluster probe"] = summary["metrics"]
    if options.crf:
        summary = timer.run("predict-crf", probe_predict.predict_probe, config, data, run, checkpoint,
                            section=section, crf=True, overwrite=options.overwrite)
        found["cluster probe + CRF"] = summary["metrics"]
    summary = timer.run("predict-linear", probe_predict.predict_probe, config, data, run, checkpoint,
                        section=section, probe="linear", overwrite=options.overwrite)
    found[LINEAR_ROW] = summary["metrics"]
    if options.select_on_labels:
        chosen = timer.run("select-on-labels", chosen_on_labels, config, data, run, stage, section, options.overwrite)
        if chosen is not None:
            found[f"cluster probe, checkpoint {chosen['checkpoint']} chosen on validation labels (uses labels)"] = chosen
    return found


def baselines(config: LussConfig, data: str, run: str, spec: featurizers.FeaturizerSpec, in_dim: int, *,
              section_key: str, options: RunOptions, timer: StageTimer) -> dict[str, dict[str, Any]]:
    """``frozen_kmeans`` and ``random_head``, each an evaluator summary."""
    section = getattr(config, section_key)
    out: dict[str, dict[str, Any]] = {}
    summary = timer.run("baseline frozen_kmeans", scene_baselines.frozen_kmeans, config, data, run, spec, section,
                        section_key=section_key, overwrite=options.overwrite)
    out["frozen_kmeans"] = summary["metrics"]
    root = storage.join(run, BASELINES, section_key)  # frozen_kmeans (no head) is shared by the methods
    checkpoint = timer.run("baseline random_head (train probes)", scene_training.train, config, data, root,
                           kind="random_head", stage="random-head", section_key=section_key, spec=spec,
                           in_dim=in_dim, overwrite=options.overwrite)
    summary = timer.run("baseline random_head (predict)", probe_predict.predict_probe, config, data, root, checkpoint,
                        section=section, out=storage.join(root, "random-head", "validation"),
                        overwrite=options.overwrite)
    out["random_head"] = summary["metrics"]
    return out


def run_scene_method(kind: str, config: LussConfig, data: str, run: str, options: RunOptions,
                     timer: StageTimer) -> MethodResult:
    """Every stage of STEGO (``kind="stego"``) or HP (``"hp"``), then the baselines when asked for."""
    from lussray.stages import knn

    section = getattr(config, kind)
    if options.crf:
        probe_predict.crf_refine(config)  # fails now, not after the training, without the extra
    spec = featurizer_spec(config, data, run, options, timer)
    in_dim = featurizers.check(spec, kind)
    knn_dir = None
    if kind == "stego":
        timer.run("knn", knn.knn, config, data, run, featurizer=options.featurizer, overwrite=options.overwrite)
        knn_dir = storage.join(run, knn.STAGE)
    checkpoint = timer.run(kind, scene_training.train, config, data, run, kind=kind, stage=kind, section_key=kind,
                           spec=spec, in_dim=in_dim, knn=knn_dir, overwrite=options.overwrite)
    found = rows(config, data, run, checkpoint, stage=kind, section=section, options=options, timer=timer)
    extra = (baselines(config, data, run, spec, in_dim, section_key=kind, options=options, timer=timer)
             if options.baselines else {})
    return MethodResult(rows=found, baselines=extra, protocol=PROTOCOL)
