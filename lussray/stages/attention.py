"""Stage 2.1: pixel attention trained on the frozen stage-1 network (Ray Train).

    lussray attention --dataset synthetic-demo --data demo-out/shards --run demo-out/run

Starts from the latest ``<run>/pretrain`` checkpoint (or ``--init``), trains only the pixel
attention and the prototypes with the SwAV loss of stage 1 on attention-pooled embeddings
(:class:`~lussray.models.pass_model.PixelAttentionModel`), and checkpoints to
``<run>/attention/checkpoint_step=<N>/checkpoint.pt``; a rerun resumes from the latest one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

from torch import nn

from lussray import storage
from lussray.config import LussConfig, to_dict
from lussray.data.shards import read_manifest
from lussray.errors import UserError
from lussray.models.checkpoints import load_pretrained
from lussray.models.pass_model import PixelAttentionModel
from lussray.optim.lars import LARS
from lussray.optim.schedules import cosine_schedule
from lussray.stages import pretrain
from lussray.stages.loop import LoopSpec, StepState, latest_checkpoint

STAGE = "attention"


@dataclass
class AttentionMethod(pretrain.PretrainMethod):
    """The pretraining method on a :class:`PixelAttentionModel`: SwAV only, with its queue."""

    def build_model(self) -> nn.Module:
        cfg = self.config
        model = PixelAttentionModel(arch=cfg.arch, hidden_dim=cfg.hidden_mlp, feat_dim=cfg.feat_dim,
                                    num_prototypes=cfg.num_prototypes, shallow_stages=cfg.shallow_stages)
        if self.init_checkpoint:
            print(f"[{STAGE}] initialised from {self.init_checkpoint}: "
                  f"{load_pretrained(model, self.init_checkpoint).summary()}", flush=True)
        return model

    def training_step(self, model, batch, state: StepState):
        views = [pretrain.normalize_views(batch[f"crop_{v}"]) for v in range(self.num_views)]
        return self.losses.training_step(model, views, None, state.step, state.epoch)


def stage1_checkpoint(run: str, init: str | None) -> str:
    """``--init`` if given, else the latest stage-1 checkpoint of the run.

    Raises:
        UserError: when neither exists.
    """
    if init:
        if not storage.exists(init):
            raise UserError(f"--init {init}: no such checkpoint")
        return init
    found = latest_checkpoint(storage.join(run, pretrain.STAGE))
    if found is None:
        raise UserError(f"no stage-1 checkpoint under {storage.join(run, pretrain.STAGE)}: "
                        f"run `python -m lussray.train` first or pass --init CHECKPOINT")
    return found


def build_spec(config: LussConfig, data: str, run: str, init_checkpoint: str, *,
               max_steps: int | None = None) -> LoopSpec:
    """The worker-side description of a pixel-attention run."""
    att, loop = config.attention, config.attention.loop
    num_samples = read_manifest(data, "train")["num_samples"]
    global_batch = loop.batch_size_per_worker * loop.num_workers
    steps_per_epoch = num_samples // global_batch
    if steps_per_epoch < 1:
        raise UserError(f"{num_samples} training images are fewer than one global batch of {global_batch}: "
                        f"lower attention.loop.batch_size_per_worker or num_workers")
    # Stage 1's architecture and SwAV settings, with the attention stage's queue and freezing.
    method_config = dataclasses.replace(
        config.pretrain, queue_length=att.queue_length, queue_start_epoch=att.queue_start_epoch,
        freeze_prototypes_steps=att.freeze_prototypes_steps, loss_weights=[1.0], shallow_stages=[],
        crops=att.crops, loop=loop)
    queue = pretrain.queue_length_per_worker(att.queue_length, global_batch, loop.num_workers)
    method_kwargs = {"config": method_config, "num_views": sum(att.crops.num_crops), "queue_per_worker": queue,
                         "init_checkpoint": init_checkpoint}
    optim_kwargs = {"lr": loop.base_lr, "momentum": loop.momentum, "weight_decay": loop.weight_decay,
                        "trust_coefficient": loop.lars_trust_coefficient}
    return LoopSpec(
        stage=STAGE,
        method_factory=lambda: AttentionMethod(**method_kwargs),
        optimizer_factory=lambda params: LARS(params, **optim_kwargs),
        lr_at=lambda step, total: cosine_schedule(step, total_steps=total, base_value=loop.base_lr,
                                                  final_value=loop.final_lr, warmup_steps=loop.warmup_steps),
        run_dir=storage.join(run, STAGE),
        batch_size_per_worker=loop.batch_size_per_worker,
        steps_per_epoch=steps_per_epoch,
        epochs=loop.epochs,
        checkpoint_every_steps=loop.checkpoint_every_steps,
        log_every_steps=loop.log_every_steps,
        max_steps=max_steps,
        amp=loop.amp,
        sync_batchnorm=loop.sync_batchnorm,
        prefetch_batches=config.ingest.prefetch_batches,
        shuffle_buffer_size=config.ingest.shuffle_buffer_size,
        torch_threads=loop.torch_threads,
        resolved_config={**to_dict(config), "seed": loop.seed},
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lussray attention``."""
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (checkpointing first)")
    parser.add_argument("--init", metavar="CHECKPOINT",
                        help="stage-1 checkpoint to start from (default: the latest under <run>/pretrain)")


def run(args: argparse.Namespace, config: LussConfig) -> int:
    """Train pixel attention on ``--data`` into ``--run`` (resuming when it holds a checkpoint)."""
    from lussray.data.ingest import init_ray, multicrop_views
    from lussray.stages.loop import completed_checkpoint, fit

    if not args.data or not args.run:
        raise UserError("--data DIR (shards of `lussray prepare`) and --run DIR are required")
    data, run_root = (path if storage.is_uri(path) else os.path.abspath(path) for path in (args.data, args.run))
    init = stage1_checkpoint(run_root, args.init)
    spec = build_spec(config, data, run_root, init, max_steps=args.max_steps)
    if completed_checkpoint(spec):
        return 0
    init_ray(config.ray)
    dataset = multicrop_views(data, "train", config.attention.crops, config.pretrain.p2p_grid_size, config.ingest)
    fit(spec, dataset, config.attention.loop, config.ingest, run_root)
    return 0
