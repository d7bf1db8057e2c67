"""STEGO training on Ray Train: the correspondence loss of :mod:`lussray.methods.stego` through the shared loop.

    lussray run --method stego --dataset synthetic-scenes --data scenes/shards --run runs/stego --baselines
    lussray run --method stego --dataset cocostuff27 --data coco/shards --run runs/stego --featurizer dino_vitbase8_pretrain.pth

:class:`StegoAdapter` is the loop's ``Method``: the model is :class:`~lussray.models.stego_head.STEGOHeads`
(segmentation head, cluster probe, linear probe); the frozen featurizer lives beside it in the
adapter (:class:`~lussray.stages.scene_training.WorkerFeaturizer`). A batch holds every training
item (``image``: one of the five crops of an image, as STEGO's cropped datasets), its ground truth
(``label``, for the linear probe only) and ``image_pos``, the item's KNN partner drawn among its
first ``stego.num_neighbors`` neighbours of ``lussray knn`` (:func:`lussray.data.scene_views.stego_batch`).
Each step: the featurizer's features of both, the head's codes, the correspondence loss with
self, KNN and random-image pairs (eq. (4) of STEGO) plus the probe losses on detached codes.
Random sample points and partners come from a generator seeded by (seed, stage, rank, step). The
optimiser groups (head, linear probe, cluster probe) keep their own learning rates
(:meth:`StegoAdapter.param_groups`, the loop's hook).

:class:`ProbeOnlyAdapter` trains only the probes on an untrained head: the ``random_head`` baseline
of STEGO and HP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lussray.stages.featurizer import FeaturizerSpec
from lussray.stages.loop import StepState
from lussray.stages.scene_training import WorkerFeaturizer, step_generator, world_rank

STAGE = "stego"


def _labels(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    return batch["label"].long() if "label" in batch else None


@dataclass
class StegoAdapter:
    """The STEGO ``Method`` of the shared loop.

    Attributes:
        featurizer: the frozen featurizer.
        heads: ``STEGOHeads`` constructor arguments (:func:`lussray.stages.scene_training.heads_shape`).
        rates: :func:`lussray.methods.stego.param_groups` keyword arguments (learning rates, weight decay).
        correspondence: ``CorrespondenceConfig`` fields.
        correspondence_weight: weight of the correspondence loss.
        seed: the run's seed (step generators).
        stage: the stage's name (salts the step generators).
    """

    featurizer: FeaturizerSpec
    heads: dict[str, Any]
    rates: dict[str, float] = field(default_factory=dict)
    correspondence: dict[str, Any] = field(default_factory=dict)
    correspondence_weight: float = 1.0
    seed: int = 0
    stage: str = STAGE

    def __post_init__(self) -> None:
        from lussray.methods.stego import CorrespondenceConfig, STEGOMethod

        self.losses = STEGOMethod(correspondence=CorrespondenceConfig(**self.correspondence),
                                  correspondence_weight=self.correspondence_weight,
                                  feature_dropout=self.heads.get("dropout", 0.1))
        self.features = WorkerFeaturizer(self.featurizer)

    def build_model(self) -> nn.Module:
        from lussray.models.stego_head import STEGOHeads

        return STEGOHeads(**self.heads)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Head, linear probe and cluster probe, each with its own learning rate (the loop's hook)."""
        from lussray.methods.stego import param_groups

        return param_groups(model, **self.rates)

    def state_module(self) -> nn.Module:
        return self.losses

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor], state: StepState):
        # The item and its KNN partner go through the frozen featurizer in one forward.
        images = torch.cat([batch["image"], batch["image_pos"]])
        features = self.features(images).features.float()
        own, partner = features.chunk(2)
        generator = step_generator(self.seed, self.stage, world_rank(), state.step)  # drawn on the CPU
        return self.losses.training_step(model, own, partner, _labels(batch), generator=generator)

    def before_step(self, model: nn.Module, state: StepState) -> None:
        self.losses.before_step(model, state.step)

    def after_backward(self, model: nn.Module, state: StepState) -> None:
        self.losses.after_backward(model, state.step)


@dataclass
class ProbeOnlyAdapter:
    """The ``random_head`` baseline: the probes trained on the codes of a frozen, untrained head.

    The loop seeds torch from the run's seed before it builds the model, so every worker (and a
    resumed run) holds the same random head.

    Attributes:
        featurizer: the frozen featurizer.
        heads: ``STEGOHeads`` constructor arguments.
        rates: :func:`lussray.methods.stego.param_groups` keyword arguments (the head's are unused).
    """

    featurizer: FeaturizerSpec
    heads: dict[str, Any]
    rates: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.features = WorkerFeaturizer(self.featurizer)
        self._state = nn.Module()

    def build_model(self) -> nn.Module:
        from lussray.models.stego_head import STEGOHeads

        model = STEGOHeads(**self.heads)
        model.head.requires_grad_(False)
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The two probes with their own learning rates (the frozen head has no group)."""
        from lussray.methods.stego import param_groups

        return [group for group in param_groups(model, **self.rates) if group["params"]]

    def state_module(self) -> nn.Module:
        return self._state

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor], state: StepState):
        from lussray.methods.stego import probe_losses

        out = model(self.features(batch["image"]).features.float())
        probes = probe_losses(out.linear_logits, out.cluster_cosines, _labels(batch))
        loss = probes["loss_linear"] + probes["loss_cluster"]
        return loss, {name: float(value.detach()) for name, value in probes.items()}

    def before_step(self, model: nn.Module, state: StepState) -> None:
        pass

    def after_backward(self, model: nn.Module, state: StepState) -> None:
        pass
