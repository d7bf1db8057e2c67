"""What the STEGO and HP training stages share: the frozen featurizer on the worker, seeded draws, the optimiser.

- :class:`WorkerFeaturizer`: the frozen featurizer inside a Train worker. It is not part of the
  trained model (DDP never sees it, checkpoints never carry its weights: 344 MB for ViT-B/8);
  the adapter builds it once per worker and moves it to the batch's device.
- :func:`step_generator`: the ``torch.Generator`` of one step's random choices (STEGO's sample
  points and random partners, HP's kept negatives and pool patches), seeded from (run seed,
  worker rank, step). A resumed run therefore draws what an uninterrupted run would have drawn.
- :class:`GroupedAdamW`: one AdamW with a parameter group per module and its own learning rate and
  weight decay (:func:`lussray.methods.stego.param_groups`: AdamW with weight decay 0 is Adam, so
  this is the references' separate Adam optimisers of the head and the two probes). The loop hands
  the optimiser factory a flat parameter list, so the adapter tags each parameter with its group
  name when it builds the model (:func:`tag_param_groups`) and the factory groups by the tag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lussray.stages.featurizer import FeaturizerSpec

#: The attribute :func:`tag_param_groups` sets on each trained parameter: the name of its optimiser group.
GROUP_ATTRIBUTE = "lussray_param_group"


def world_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed of (run seed, worker rank, step), well mixed (numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) & (2**63 - 1)


def step_generator(seed: int, rank: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one step's random choices on ``device``, seeded by :func:`step_seed`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(step_seed(seed, rank, step))
    return generator


class WorkerFeaturizer:
    """The frozen featurizer of a Train worker: built on first use, on the device of the images it gets."""

    def __init__(self, spec: FeaturizerSpec) -> None:
        self.spec = spec
        self.module: nn.Module | None = None
        self._device: torch.device | None = None

    def __call__(self, images: torch.Tensor, attention: bool = False) -> Any:
        """``FeaturizerOutput`` of uint8 (B, h, w, 3) images (normalised here), without gradient."""
        from lussray.stages.featurizer import to_input

        if self.module is None:
            self.module = self.spec.build()[0]
        if self._device != images.device:
            self.module.to(images.device)
            self._device = images.device
        with torch.no_grad():
            return self.module(to_input(images, images.device), attention=attention)


def tag_param_groups(groups: list[dict[str, Any]]) -> None:
    """Mark every parameter of ``groups`` (:func:`lussray.methods.stego.param_groups`) with its group's name."""
    for group in groups:
        for parameter in group["params"]:
            setattr(parameter, GROUP_ATTRIBUTE, group["name"])


@dataclass(frozen=True)
class GroupedAdamW:
    """Optimiser factory of the loop: one AdamW whose groups are the tagged parameters' groups.

    Attributes:
        lrs: learning rate per group name.
        weight_decays: weight decay per group name (0 when absent).
    """

    lrs: dict[str, float]
    weight_decays: dict[str, float] = field(default_factory=dict)

    def __call__(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        by_name: dict[str, list[nn.Parameter]] = {name: [] for name in self.lrs}
        for parameter in params:
            name = getattr(parameter, GROUP_ATTRIBUTE, None)
            if name not in by_name:
                raise ValueError(f"a trained parameter of shape {tuple(parameter.shape)} has no optimiser group "
                                 f"(tag {name!r}; groups {sorted(by_name)})")
            by_name[name].append(parameter)
        groups = [{"params": by_name[name], "lr": lr, "initial_lr": lr, "name": name,
                   "weight_decay": self.weight_decays.get(name, 0.0)} for name, lr in self.lrs.items() if by_name[name]]
        return torch.optim.AdamW(groups)


def optimizer_factory(section: Any, *, train_head: bool = True) -> GroupedAdamW:
    """The :class:`GroupedAdamW` of a ``stego``/``hp`` section (the projector, HP only, learns at the head's rate)."""
    head_lr = section.head_lr if train_head else 0.0
    return GroupedAdamW(lrs={"head": head_lr, "linear_probe": section.linear_lr, "cluster_probe": section.cluster_lr,
                             "projector": head_lr},
                        weight_decays={"head": section.head_weight_decay})


def heads_shape(section: Any, num_classes: int, in_dim: int) -> dict[str, Any]:
    """The constructor arguments of ``STEGOHeads``/``HPHeads`` (recorded in checkpoints for prediction)."""
    return {"in_dim": int(in_dim), "dim": int(section.dim), "num_classes": int(num_classes),
            "extra_clusters": int(section.extra_clusters), "nonlinear": bool(section.nonlinear),
            "dropout": float(section.dropout)}


__all__ = ["GROUP_ATTRIBUTE", "GroupedAdamW", "WorkerFeaturizer", "heads_shape", "optimizer_factory",
           "step_generator", "step_seed", "tag_param_groups", "world_rank"]
