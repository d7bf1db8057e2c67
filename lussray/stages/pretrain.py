"""Stage 1: PASS representation learning (SwAV + P2P + D2S) on Ray Train.

    python -m lussray.train --dataset synthetic-demo --data demo-out/shards --run demo-out/run
    ray job submit --working-dir . -- python -m lussray.train --dataset imagenet-s919 \\
        --data s3://bucket/imagenet-s919-shards --run s3://bucket/runs/s919

Checkpoints go to ``<run>/pretrain/checkpoint_step=<N>/checkpoint.pt``; a rerun with the same
``--run`` resumes from the latest one when it was made with the same inputs (config, data, ``--init``;
``<run>/pretrain/inputs.json``), and is refused otherwise (``--overwrite`` retrains).
``--max-steps N`` stops after N steps (checkpointing first).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lussray import storage
from lussray.completion import FORMAT_VERSION, checkpoint_fingerprint, config_fingerprint, data_fingerprint
from lussray.config import LussConfig, PretrainConfig, to_dict
from lussray.data.augment import IMAGENET_MEAN, MULTICROP_STD
from lussray.data.shards import read_manifest
from lussray.errors import UserError
from lussray.methods.pass_ import PASSMethod
from lussray.models.checkpoints import load_pretrained
from lussray.models.pass_model import PASSModel
from lussray.stages.loop import STREAM_KEYS, LoopSpec, StepState, lars_cosine_spec, steps_per_epoch

STAGE = "pretrain"


def normalize_views(views: torch.Tensor, mean=IMAGENET_MEAN, std=MULTICROP_STD) -> torch.Tensor:
    """uint8 (B, S, S, 3) views to normalised float (B, 3, S, S)."""
    x = views.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def queue_length_per_worker(queue_length: int, global_batch: int, world_size: int) -> int:
    """The reference rounds the queue down to a multiple of the global batch, then splits it."""
    return (queue_length // global_batch) * global_batch // world_size


@dataclass
class PretrainMethod:
    """Adapts :class:`PASSMethod` to the shared loop (batch columns -> views and grids)."""

    config: PretrainConfig
    num_views: int
    queue_per_worker: int
    init_checkpoint: Optional[str] = None

    def __post_init__(self) -> None:
        self.losses = PASSMethod(
            feat_dim=self.config.feat_dim,
            temperature=self.config.temperature,
            sinkhorn_epsilon=self.config.sinkhorn_epsilon,
            sinkhorn_iterations=self.config.sinkhorn_iterations,
            queue_length_per_worker=self.queue_per_worker,
            queue_start_epoch=self.config.queue_start_epoch,
            freeze_prototypes_steps=self.config.freeze_prototypes_steps,
            loss_weights=self.config.loss_weights,
            p2p_weight=self.config.p2p_weight,
        )

    def build_model(self) -> nn.Module:
        model = PASSModel(
            arch=self.config.arch, hidden_dim=self.config.hidden_mlp, feat_dim=self.config.feat_dim,
            num_prototypes=self.config.num_prototypes, shallow_stages=self.config.shallow_stages,
        )
        if self.init_checkpoint:
            print(f"[{STAGE}] initialised from {self.init_checkpoint}: "
                  f"{load_pretrained(model, self.init_checkpoint).summary()}", flush=True)
        return model

    def state_module(self) -> nn.Module:
        return self.losses

    def training_step(self, model, batch, state: StepState):
        views = [normalize_views(batch[f"crop_{v}"]) for v in range(self.num_views)]
        grids = (batch["p2p_grid_0"].float(), batch["p2p_grid_1"].float())
        return self.losses.training_step(model, views, grids, state.step, state.epoch)

    def before_step(self, model, state: StepState) -> None:
        self.losses.before_step(model, state.step)

    def after_backward(self, model, state: StepState) -> None:
        self.losses.after_backward(model, state.step)


def pretraining_manifest(config: LussConfig, data: str) -> dict[str, Any]:
    """The manifest of the split pretraining reads (``pretrain.split``).

    Raises:
        UserError: naming ``pretrain.split`` when that split was not prepared.
    """
    split = config.pretrain.split
    try:
        return read_manifest(data, split)
    except UserError as error:
        if split != "train-full":
            raise
        raise UserError(f"{error}. pretrain.split=train-full (the {config.dataset.name} preset, as the reference) "
                        f"pretrains on the ImageNet-1k train set: pack it with `lussray prepare --imagenet-train "
                        f"DIR --out {data}`, or set pretrain.split=train to pretrain on the dataset's own train "
                        f"split instead") from None


def build_spec(config: LussConfig, data: str, run: str, *, max_steps: Optional[int] = None,
               init_checkpoint: Optional[str] = None) -> LoopSpec:
    """The worker-side description of a pretraining run."""
    from lussray.data.ingest import multicrop_stream

    cfg, loop = config.pretrain, config.pretrain.loop
    num_samples = pretraining_manifest(config, data)["num_samples"]
    steps = steps_per_epoch(num_samples, loop, STAGE, storage.join(data, cfg.split))
    global_batch = loop.batch_size_per_worker * loop.num_workers
    queue = queue_length_per_worker(cfg.queue_length, global_batch, loop.num_workers)
    method_kwargs = {"config": cfg, "num_views": sum(cfg.crops.num_crops), "queue_per_worker": queue,
                     "init_checkpoint": init_checkpoint}
    stream = multicrop_stream(data, cfg.split, STAGE, cfg.crops, cfg.p2p_grid_size, config.ingest, config.seed)
    return lars_cosine_spec(STAGE, lambda: PretrainMethod(**method_kwargs), loop, config.ingest, run, stream=stream,
                            num_steps_per_epoch=steps, max_steps=max_steps, resolved_config=to_dict(config))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lussray train`` / ``python -m lussray.train``."""
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (checkpointing first)")
    parser.add_argument("--init", metavar="CHECKPOINT",
                        help="initialise from a lussray, torchvision or PASS/SwAV checkpoint")


def fingerprint(config: LussConfig, data: str, run: str, init_checkpoint: Optional[str]) -> dict:
    """What determines the stage's checkpoints (:mod:`lussray.completion`): config, data, initialisation."""
    return {"format": FORMAT_VERSION, **config_fingerprint(config, "pretrain", *STREAM_KEYS),
            "data": data_fingerprint(data, [config.pretrain.split]),
            "init": checkpoint_fingerprint(init_checkpoint, run)}


def pretrain(config: LussConfig, data: str, run: str, *, init: Optional[str] = None,
             max_steps: Optional[int] = None, overwrite: bool = False) -> dict[str, Any]:
    """Pretrain on the shards ``data`` into ``<run>/pretrain`` (resuming a run of the same inputs).

    Args:
        config: the resolved config (``pretrain``, ``ingest``, ``ray``).
        data: shards folder of ``lussray prepare`` (absolute path or URI).
        run: run folder (absolute path or URI).
        init: a lussray, torchvision or PASS/SwAV checkpoint to start from.
        max_steps: stop after this many steps (checkpointing first).
        overwrite: redo the stage when its folder holds outputs of other inputs.

    Returns:
        The stage summary: ``{"stage", "checkpoint"}``.
    """
    from lussray.data.ingest import init_ray
    from lussray.stages.loop import fit, run_training

    if init and not storage.exists(init):
        raise UserError(f"--init {init}: no such checkpoint")
    spec = build_spec(config, data, run, max_steps=max_steps, init_checkpoint=init)

    def start() -> None:
        init_ray(config.ray)
        fit(spec, config.pretrain.loop, run)

    checkpoint = run_training(spec, fingerprint(config, data, run, init), overwrite=overwrite, start=start)
    return {"stage": STAGE, "checkpoint": checkpoint}


def run(args: argparse.Namespace, config: LussConfig) -> int:
    """``lussray train``: :func:`pretrain` on ``--data`` into ``--run``."""
    if not args.data or not args.run:
        raise UserError("--data DIR (shards of `lussray prepare`) and --run DIR are required")
    # Ray workers run in their own working directories: hand them absolute paths.
    pretrain(config, storage.absolute(args.data), storage.absolute(args.run),
             init=storage.absolute(args.init) if args.init else None, max_steps=args.max_steps,
             overwrite=args.overwrite)
    return 0
