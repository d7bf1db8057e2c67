"""Stage 2.1: pixel attention trained on the frozen stage-1 network (Ray Train).

    lussray attention --dataset synthetic-demo --data demo-out/shards --run demo-out/run

Starts from the latest ``<run>/pretrain`` checkpoint (or ``--init``), trains only the pixel
attention and the prototypes with the SwAV loss of stage 1 on attention-pooled embeddings
(:class:`~lussray.models.pass_model.PixelAttentionModel`), and checkpoints to
``<run>/attention/checkpoint_step=<N>/checkpoint.pt``; a rerun resumes from the latest one when it
was made with the same inputs (``<run>/attention/inputs.json``: config, data, stage-1 checkpoint),
and is refused otherwise (``--overwrite`` retrains).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from lussray import storage
from lussray.completion import FORMAT_VERSION, checkpoint_fingerprint, config_fingerprint, data_fingerprint
from lussray.config import LussConfig, to_dict
from lussray.data.shards import read_manifest
from lussray.errors import UserError
from lussray.models.checkpoints import load_pretrained
from lussray.models.pass_model import PixelAttentionModel
from lussray.stages import pretrain
from lussray.stages.loop import STREAM_KEYS, LoopSpec, StepState, given_or_latest, lars_cosine_spec, steps_per_epoch

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
    """``--init`` if given, else the latest stage-1 checkpoint of the run (UserError when neither exists)."""
    return given_or_latest(init, "--init", run, pretrain.STAGE, "stage-1", "python -m lussray.train")


def build_spec(config: LussConfig, data: str, run: str, init_checkpoint: str, *,
               max_steps: int | None = None) -> LoopSpec:
    """The worker-side description of a pixel-attention run."""
    from lussray.data.ingest import multicrop_stream

    att, loop = config.attention, config.attention.loop
    num_samples = read_manifest(data, "train")["num_samples"]
    steps = steps_per_epoch(num_samples, loop, STAGE, storage.join(data, "train"))
    global_batch = loop.batch_size_per_worker * loop.num_workers
    # Stage 1's architecture and SwAV settings, with the attention stage's queue and freezing.
    method_config = dataclasses.replace(
        config.pretrain, queue_length=att.queue_length, queue_start_epoch=att.queue_start_epoch,
        freeze_prototypes_steps=att.freeze_prototypes_steps, loss_weights=[1.0], shallow_stages=[],
        crops=att.crops, loop=loop)
    queue = pretrain.queue_length_per_worker(att.queue_length, global_batch, loop.num_workers)
    method_kwargs = {"config": method_config, "num_views": sum(att.crops.num_crops), "queue_per_worker": queue,
                     "init_checkpoint": init_checkpoint}
    stream = multicrop_stream(data, "train", STAGE, att.crops, config.pretrain.p2p_grid_size, config.ingest,
                              config.seed)
    return lars_cosine_spec(STAGE, lambda: AttentionMethod(**method_kwargs), loop, config.ingest, run, stream=stream,
                            num_steps_per_epoch=steps, max_steps=max_steps, resolved_config=to_dict(config))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lussray attention``."""
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (checkpointing first)")
    parser.add_argument("--init", metavar="CHECKPOINT",
                        help="stage-1 checkpoint to start from (default: the latest under <run>/pretrain)")


#: The stage-1 settings the attention model and its SwAV loss are built from.
STAGE1_KEYS = tuple(f"pretrain.{key}" for key in (
    "arch", "hidden_mlp", "feat_dim", "num_prototypes", "temperature", "sinkhorn_epsilon", "sinkhorn_iterations"))


def fingerprint(config: LussConfig, data: str, run: str, init_checkpoint: str) -> dict:
    """What determines the stage's checkpoints (:mod:`lussray.completion`): config, data, stage-1 checkpoint."""
    return {"format": FORMAT_VERSION, **config_fingerprint(config, *STAGE1_KEYS, "attention", *STREAM_KEYS),
            "data": data_fingerprint(data, ["train"]), "init": checkpoint_fingerprint(init_checkpoint, run)}


def train_attention(config: LussConfig, data: str, run: str, *, init: str | None = None,
                    max_steps: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train pixel attention on ``data`` into ``<run>/attention`` (resuming a run of the same inputs).

    Args:
        config: the resolved config (``attention``, ``pretrain`` for the model, ``ingest``, ``ray``).
        data: shards folder (absolute path or URI).
        run: run folder (absolute path or URI).
        init: the stage-1 checkpoint (default: the latest under ``<run>/pretrain``).
        max_steps: stop after this many steps (checkpointing first).
        overwrite: redo the stage when its folder holds outputs of other inputs.

    Returns:
        The stage summary: ``{"stage", "checkpoint", "init"}``.
    """
    from lussray.data.ingest import init_ray
    from lussray.stages.loop import fit, run_training

    init = stage1_checkpoint(run, init)
    spec = build_spec(config, data, run, init, max_steps=max_steps)

    def start() -> None:
        init_ray(config.ray)
        fit(spec, config.attention.loop, run)

    checkpoint = run_training(spec, fingerprint(config, data, run, init), overwrite=overwrite, start=start)
    return {"stage": STAGE, "checkpoint": checkpoint, "init": init}


def run(args: argparse.Namespace, config: LussConfig) -> int:
    """``lussray attention``: :func:`train_attention` on ``--data`` into ``--run``."""
    if not args.data or not args.run:
        raise UserError("--data DIR (shards of `lussray prepare`) and --run DIR are required")
    train_attention(config, storage.absolute(args.data), storage.absolute(args.run),
                    init=storage.absolute(args.init) if args.init else None, max_steps=args.max_steps,
                    overwrite=args.overwrite)
    return 0
