"""HP training on Ray Train: hidden positives (:mod:`lussray.methods.hp`) through the shared loop.

    lussray run --method hp --dataset synthetic-scenes --data scenes/shards --run runs/hp --baselines
    lussray run --method hp --dataset cocostuff27 --data coco/shards --run runs/hp --featurizer dino_deitsmall8_300ep_pretrain.pth

:class:`HPAdapter` is the loop's ``Method``: the model is :class:`~lussray.models.stego_head.HPHeads`
(head, EMA head, projector, probes; the EMA head is part of the model's state, so every
checkpoint carries it), the method state is :class:`~lussray.methods.hp.HPMethod` (the reference
pools, persistent buffers saved per worker beside the checkpoint). A batch holds every training
item (one of the five crops of an image), its photometric view ``image_aug`` and its ground truth
(linear probe only; :func:`lussray.data.scene_views.hp_batch`). Each step: the frozen features of
both views and the patch affinity of the first (the ViT's last-block attention, or the ResNet's
cosine affinity standing in for it), then :meth:`HPMethod.training_step`: global hidden positives
from the pools (task-agnostic Q^ag filled once, task-specific Q^sp renewed from the EMA head every
``hp.renew_interval`` steps; each step's pool entries are gathered from all workers with
``all_gather``, so every worker holds the same global pools), local hidden positives, the SupCon
loss with the kept fraction rho of negatives and reweighting, the consistency term and the probes.
After the backward pass the head's gradient is clipped (``hp.grad_norm``) and the EMA head takes
its momentum step. lambda rises linearly from ``hp.warmup`` to the last step of the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lussray.stages.featurizer import FeaturizerSpec
from lussray.stages.loop import StepState
from lussray.stages.scene_training import WorkerFeaturizer, step_generator, world_rank

STAGE = "hp"


@dataclass
class HPAdapter:
    """The HP ``Method`` of the shared loop.

    Attributes:
        featurizer: the frozen featurizer.
        heads: ``HPHeads`` constructor arguments (:func:`lussray.stages.scene_training.heads_shape`).
        rates: :func:`lussray.methods.stego.param_groups` keyword arguments (learning rates, weight decay).
        method: ``HPMethod`` keyword arguments besides ``feat_dim`` and ``dim``.
        total_steps: the last step of the run (the end of lambda's ramp).
        seed: the run's seed (step generators).
        stage: the stage's name (salts the step generators).
    """

    featurizer: FeaturizerSpec
    heads: dict[str, Any]
    rates: dict[str, float] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)
    total_steps: int = 1
    seed: int = 0
    stage: str = STAGE

    def __post_init__(self) -> None:
        from lussray.methods.hp import HPMethod

        self.losses = HPMethod(feat_dim=self.heads["in_dim"], dim=self.heads["dim"],
                               feature_dropout=self.heads.get("dropout", 0.1), **self.method)
        self.features = WorkerFeaturizer(self.featurizer)

    def build_model(self) -> nn.Module:
        from lussray.models.stego_head import HPHeads

        return HPHeads(**self.heads)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Head (AdamW with weight decay), linear probe, cluster probe, projector: each its own rate (the loop's hook)."""
        from lussray.methods.stego import param_groups

        return param_groups(model, **self.rates)

    def state_module(self) -> nn.Module:
        return self.losses

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor], state: StepState):
        frozen = self.features(batch["image"], attention=True)
        features_aug = self.features(batch["image_aug"]).features.float()
        labels = batch["label"].long() if "label" in batch else None
        generator = step_generator(self.seed, self.stage, world_rank(), state.step, frozen.features.device)
        return self.losses.training_step(model, frozen.features.float(), features_aug, frozen.patch_affinity, labels,
                                         state.step, self.total_steps, generator=generator)

    def before_step(self, model: nn.Module, state: StepState) -> None:
        self.losses.before_step(model, state.step)

    def after_backward(self, model: nn.Module, state: StepState) -> None:
        self.losses.after_backward(model, state.step)
