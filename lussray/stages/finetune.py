"""Stage 4: segmentation fine-tuning on the pseudo labels (Ray Train, the shared loop).

    lussray finetune --dataset synthetic-demo --run demo-out/run
    lussray finetune --dataset imagenet-s919 --run s3://bucket/runs/s919 --data s3://bucket/runs/s919/labelgen/pseudo

The reference's fine-tuning (shared/reference/pass-imagenet-s.md, section 2.4;
``main_pixel_finetuning.py``): the stage-1 backbone (the latest ``<run>/pretrain`` checkpoint, or
``--init``; ``--init random`` for a baseline without pretraining) plus a new 1x1 head with K + 1
outputs (:class:`~lussray.models.segmenter.Segmenter`), trained with plain cross-entropy
(:func:`~lussray.models.segmenter.segmentation_loss`) on (image, pseudo label) pairs streamed from
``--data`` (default ``<run>/labelgen/pseudo``, the shards ``lussray labelgen`` writes) with the
joint RandomResizedCrop + flip of :func:`lussray.data.ingest.pair_stream` and no colour
augmentation; LARS with the per-step cosine schedule, as stage 1.

Checkpoints go to ``<run>/finetune/checkpoint_step=<N>/checkpoint.pt`` (the model-shape arguments
are recorded as ``config["segmenter"]``); a rerun with the same inputs (``<run>/finetune/inputs.json``:
config, pseudo-label manifest, backbone checkpoint) resumes from the latest one and returns at once
when training is complete; other inputs are refused (``--overwrite`` retrains). ``--max-steps N``
stops after N steps.

The semi-supervised protocol (:mod:`lussray.stages.semisup`) trains the same method on ground
truth through :func:`train_segmenter`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lussray import storage
from lussray.completion import FORMAT_VERSION, checkpoint_fingerprint, config_fingerprint, data_fingerprint
from lussray.config import LussConfig, TrainLoopConfig, to_dict
from lussray.data.augment import IMAGENET_MEAN, IMAGENET_STD
from lussray.data.shards import MANIFEST, read_manifest
from lussray.errors import UserError
from lussray.models.checkpoints import load_pretrained
from lussray.models.segmenter import Segmenter, segmentation_loss
from lussray.stages.loop import STREAM_KEYS, LoopSpec, StepState, lars_cosine_spec, steps_per_epoch
from lussray.stages.pretrain import normalize_views

STAGE = "finetune"
PSEUDO_LABELS = ("labelgen", "pseudo")  # <run>/labelgen/pseudo: the shards root labelgen writes
RANDOM_INIT = "random"


@dataclass
class SegmentationMethod:
    """Cross-entropy fine-tuning of a :class:`Segmenter` (the hooks of the shared loop).

    Attributes:
        arch: Backbone architecture.
        num_outputs: K + 1.
        init_checkpoint: Stage-1 (or any loadable) checkpoint for the backbone; None = random.
        ignore_index: 1000 for ground truth, None for pseudo labels (every pixel counts).
        stage: Log prefix.
    """

    arch: str
    num_outputs: int
    init_checkpoint: str | None = None
    ignore_index: int | None = None
    stage: str = STAGE

    def __post_init__(self) -> None:
        self._state = nn.Module()  # no state besides the model and the optimizer

    def build_model(self) -> nn.Module:
        model = Segmenter(self.arch, self.num_outputs)
        if self.init_checkpoint:
            print(f"[{self.stage}] initialised from {load_backbone(model, self.init_checkpoint).summary()}", flush=True)
        else:
            print(f"[{self.stage}] randomly initialised {self.arch} backbone (no pretraining)", flush=True)
        return model

    def state_module(self) -> nn.Module:
        return self._state

    def training_step(self, model, batch, state: StepState):
        # The pair pipeline delivers uint8 crops; the reference normalises with std 0.229 here.
        images = normalize_views(batch["image"], IMAGENET_MEAN, IMAGENET_STD)
        labels = batch["label"].long()
        self._check_labels(labels)
        loss, accuracy = segmentation_loss(model(images), labels, ignore_index=self.ignore_index)
        return loss, {"pixel_acc": float(accuracy)}

    def _check_labels(self, labels: torch.Tensor) -> None:
        valid = labels if self.ignore_index is None else labels[labels != self.ignore_index]
        if valid.numel() and (int(valid.max()) >= self.num_outputs or int(valid.min()) < 0):
            raise ValueError(f"[{self.stage}] label id {int(valid.max())} outside 0..{self.num_outputs - 1}: "
                             f"the labels do not fit K + 1 = {self.num_outputs} outputs "
                             f"(check labelgen.num_clusters / dataset.num_classes)")

    def before_step(self, model, state: StepState) -> None:
        pass

    def after_backward(self, model, state: StepState) -> None:
        pass


def load_backbone(model: Segmenter, checkpoint: str) -> Any:
    """Load ``checkpoint`` into ``model`` (by name) and insist that the whole backbone was in it.

    Returns:
        The :class:`~lussray.models.checkpoints.LoadReport`.

    Raises:
        UserError: if the file is unreadable or lacks backbone weights of ``model.arch``.
    """
    report = load_pretrained(model, checkpoint)
    missing = [key for key in report.missing if key.startswith("backbone.")]
    mismatched = [entry for entry in report.mismatched if entry.startswith("backbone.")]
    if missing or mismatched:
        first = (missing or mismatched)[0]
        raise UserError(f"{checkpoint} does not hold a {model.arch} backbone ({len(missing)} weights missing, "
                        f"{len(mismatched)} of another shape; first: {first}): is pretrain.arch right?")
    return report


def check_backbone(checkpoint: str | None, arch: str) -> None:
    """Fail early, on the driver, when ``checkpoint`` cannot initialise a ``arch`` backbone."""
    if checkpoint:
        load_backbone(Segmenter(arch, 2), checkpoint)


def build_spec(config: LussConfig, data: str, run: str, init_checkpoint: str | None, *,
               num_outputs: int, max_steps: int | None = None, stage: str = STAGE, split: str = "train",
               loop: TrainLoopConfig | None = None, ignore_index: int | None = None, ingest: Any = None) -> LoopSpec:
    """The worker-side description of a segmentation fine-tuning run.

    Args:
        config: The resolved config (``pretrain.arch``, ingest settings).
        data: Shards root holding ``split`` with labels (``seg.png``).
        run: The run folder; the stage writes ``<run>/<stage>``.
        init_checkpoint: Backbone initialisation, None for random weights.
        num_outputs: K + 1.
        max_steps: Stop after this many steps.
        stage: Stage name (``finetune`` or ``semisup``).
        split: Split of ``data`` to train on.
        loop: The loop settings (default ``config.finetune.loop``).
        ignore_index: Label id excluded from the loss (1000 for ground truth).
        ingest: The ingest settings of the pair stream (default ``config.ingest``).

    Raises:
        UserError: if the split holds fewer images than one global batch.
    """
    from lussray.data.ingest import pair_stream

    loop = loop or config.finetune.loop
    arch = config.pretrain.arch
    num_samples = read_manifest(data, split)["num_samples"]
    steps = steps_per_epoch(num_samples, loop, stage, storage.join(data, split))
    method_kwargs = {"arch": arch, "num_outputs": num_outputs, "init_checkpoint": init_checkpoint,
                     "ignore_index": ignore_index, "stage": stage}
    segmenter = {"arch": arch, "num_outputs": num_outputs, "stage": stage, "init": init_checkpoint, "data": data,
                 "split": split}
    stream = pair_stream(data, split, stage, ingest or config.ingest, config.seed)
    return lars_cosine_spec(stage, lambda: SegmentationMethod(**method_kwargs), loop, config.ingest, run, stream=stream,
                            num_steps_per_epoch=steps, max_steps=max_steps,
                            resolved_config={**to_dict(config), "segmenter": segmenter})


def fingerprint(config: LussConfig, data: str, run: str, init_checkpoint: str | None, *, num_outputs: int,
                stage: str, split: str, ingest: Any, ignore_index: int | None) -> dict:
    """What determines a segmentation stage's checkpoints (:mod:`lussray.completion`).

    The stage's config section (``finetune`` or ``semisup``, with its loop), the backbone
    architecture, the pair pipeline's crop settings, K + 1, the labels' manifest and the
    backbone's checkpoint (``init`` None: random).
    """
    crops = {"ingest": {"finetune_crop_size": ingest.finetune_crop_size,
                        "finetune_min_scale": ingest.finetune_min_scale}}
    return {"format": FORMAT_VERSION, **config_fingerprint(config, stage, "pretrain.arch", *STREAM_KEYS), **crops,
            "num_outputs": num_outputs, "ignore_index": ignore_index, "split": split,
            "data": data_fingerprint(data, [split]), "init": checkpoint_fingerprint(init_checkpoint, run)}


def train_segmenter(config: LussConfig, data: str, run: str, init_checkpoint: str | None, *, num_outputs: int,
                    ingest: Any = None, max_steps: int | None = None, stage: str = STAGE, split: str = "train",
                    loop: TrainLoopConfig | None = None, ignore_index: int | None = None,
                    overwrite: bool = False) -> str:
    """Fine-tune (or resume, or skip when complete) and return the latest checkpoint.

    Args:
        ingest: The ingest settings of the pair pipeline (default ``config.ingest``).
        overwrite: Retrain when ``<run>/<stage>`` holds checkpoints of other inputs (default: refuse).
        Others: as :func:`build_spec`.
    """
    from lussray.data.ingest import init_ray
    from lussray.stages.loop import fit, run_training

    ingest = ingest or config.ingest
    spec = build_spec(config, data, run, init_checkpoint, num_outputs=num_outputs, max_steps=max_steps,
                      stage=stage, split=split, loop=loop, ignore_index=ignore_index, ingest=ingest)

    def start() -> None:
        init_ray(config.ray)
        fit(spec, loop or config.finetune.loop, run)

    record = fingerprint(config, data, run, init_checkpoint, num_outputs=num_outputs, stage=stage, split=split,
                         ingest=ingest, ignore_index=ignore_index)
    return run_training(spec, record, overwrite=overwrite, start=start)


def init_checkpoint(run: str, given: str | None) -> str | None:
    """``--init``: ``random`` (None), a file, or by default the latest stage-1 checkpoint of the run."""
    from lussray.stages.attention import stage1_checkpoint

    if given == RANDOM_INIT:
        return None
    return stage1_checkpoint(run, storage.absolute(given) if given else None)


def num_categories(config: LussConfig, data: str) -> int:
    """K: ``labelgen.num_clusters`` (else ``dataset.num_classes``), checked against the pseudo-label manifest.

    Raises:
        UserError: if the manifest records another K.
    """
    k = config.labelgen.num_clusters or config.dataset.num_classes
    recorded = read_manifest(data, "train").get("num_classes")
    if recorded is not None and int(recorded) != k:
        raise UserError(f"{storage.join(data, 'train', MANIFEST)} holds labels of K = {recorded} categories, the "
                        f"config says K = {k} (labelgen.num_clusters / dataset.num_classes)")
    return k


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lussray finetune`` (``--data`` defaults to ``<run>/labelgen/pseudo``)."""
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (checkpointing first)")
    parser.add_argument("--init", metavar="CHECKPOINT",
                        help="backbone to start from: a lussray, torchvision or PASS/SwAV checkpoint, or "
                        "'random' (default: the latest under <run>/pretrain)")


def finetune(config: LussConfig, run: str, *, data: str | None = None, init: str | None = None,
             max_steps: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune on pseudo labels into ``<run>/finetune`` (resuming a run of the same inputs).

    Args:
        config: the resolved config (``finetune``, ``ingest``, ``pretrain.arch``, ``labelgen.num_clusters``, ``ray``).
        run: run folder (absolute path or URI).
        data: (image, label) shards (default ``<run>/labelgen/pseudo``).
        init: the backbone: a checkpoint file, ``random``, or by default the latest under ``<run>/pretrain``.
        max_steps: stop after this many steps (checkpointing first).
        overwrite: redo the stage when its folder holds outputs of other inputs.

    Returns:
        The stage summary: ``{"stage", "checkpoint", "num_categories"}``.
    """
    data = data or storage.join(run, *PSEUDO_LABELS)
    if not storage.exists(storage.join(data, "train", MANIFEST)):
        raise UserError(f"no pseudo labels at {storage.join(data, 'train', MANIFEST)}: run `lussray labelgen` "
                        f"first, or pass --data with (image, label) shards")
    k = num_categories(config, data)
    backbone = init_checkpoint(run, init)
    check_backbone(backbone, config.pretrain.arch)
    checkpoint = train_segmenter(config, data, run, backbone, num_outputs=k + 1, max_steps=max_steps,
                                 overwrite=overwrite)
    print(f"[{STAGE}] checkpoint: {checkpoint}", flush=True)
    return {"stage": STAGE, "checkpoint": checkpoint, "num_categories": k}


def run(args: argparse.Namespace, config: LussConfig) -> int:
    """``lussray finetune``: :func:`finetune` into ``--run``."""
    if not args.run:
        raise UserError("--run DIR is required")
    finetune(config, storage.absolute(args.run), data=storage.absolute(args.data) if args.data else None,
             init=args.init, max_steps=args.max_steps, overwrite=args.overwrite)
    return 0
