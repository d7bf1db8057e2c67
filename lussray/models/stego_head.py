"""The trainable modules of STEGO [0] and HP [1] on top of a frozen featurizer.

- :class:`SegmentationHead`: STEGO's head S, ``code = W1 drop(f) + W3 relu(W2 drop(f))`` with 1x1
  convolutions (``projection_type: nonlinear``; the linear branch alone with ``nonlinear=False``);
  each branch draws its own Dropout2d(0.1) mask, as the reference's two ``self.dropout`` calls.
- :class:`ClusterProbe`: learnable centroids scored by cosine (STEGO's ``ClusterLookup``).
- :class:`LinearProbe`: a 1x1 convolution to the classes (STEGO's ``linear_probe``).
- :class:`STEGOHeads`: head + probes, the module a STEGO run trains (the probes see detached codes).
- :class:`HPHeads`: STEGO's heads plus HP's momentum (EMA) head S' and projector Z (a linear layer
  whose output the loss L2-normalises, section 4.1 of [1]).

The featurizer is not part of these modules: it is frozen, loaded from its own file, and would
make every checkpoint carry its weights (344 MB for ViT-B/8). The losses live in
``lussray.methods.stego`` and ``lussray.methods.hp``.

References:
    - [0]: STEGO, "Unsupervised Semantic Segmentation by Distilling Feature Correspondences",
      ICLR 2022.
    - [1]: HP, "Leveraging Hidden Positives for Unsupervised Semantic Segmentation", CVPR 2023.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SegmentationHead(nn.Module):
    """STEGO's segmentation head: linear plus nonlinear 1x1-conv branches.

    Attributes:
        linear: Conv1x1(C -> dim).
        nonlinear: Conv1x1(C -> C), ReLU, Conv1x1(C -> dim); None when built with ``nonlinear=False``.
        dropout: Dropout2d applied to the features before each branch.
    """

    def __init__(self, in_dim: int, dim: int, *, nonlinear: bool = True, dropout: float = 0.1) -> None:
        """Build the head (PyTorch's default Conv2d initialisation, as the reference).

        Args:
            in_dim: Feature channels C (384 for ViT-S, 768 for ViT-B).
            dim: Code dimension (STEGO 70, 100 in the Cityscapes checkpoint; HP 512, 256 Potsdam).
            nonlinear: Add the nonlinear branch (``projection_type: nonlinear``).
            dropout: Channel dropout probability before each branch (0.1).
        """
        super().__init__()
        self.dim = dim
        self.linear = nn.Conv2d(in_dim, dim, 1)
        self.nonlinear = (
            nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.ReLU(), nn.Conv2d(in_dim, dim, 1)) if nonlinear else None
        )
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, features: Tensor) -> Tensor:
        """Codes of a feature map.

        Args:
            features: (B, C, h, w).

        Returns:
            (B, dim, h, w).
        """
        code = self.linear(self.dropout(features))
        if self.nonlinear is not None:
            code = code + self.nonlinear(self.dropout(features))
        return code


class ClusterProbe(nn.Module):
    """Cosine similarity to learnable centroids (STEGO's ``ClusterLookup``).

    Attributes:
        centroids: (K, dim) parameter, initialised ``randn`` as the reference.
    """

    def __init__(self, dim: int, num_clusters: int) -> None:
        """Build the probe.

        Args:
            dim: Code dimension.
            num_clusters: K (classes plus ``extra_clusters``).
        """
        super().__init__()
        self.centroids = nn.Parameter(torch.randn(num_clusters, dim))

    def forward(self, code: Tensor) -> Tensor:
        """Cosine of every code to every centroid.

        Args:
            code: (B, dim, h, w).

        Returns:
            (B, K, h, w) cosines.
        """
        return torch.einsum("bchw,kc->bkhw", F.normalize(code, dim=1), F.normalize(self.centroids, dim=1))

    @staticmethod
    def log_probs(cosines: Tensor, alpha: float = 2.0) -> Tensor:
        """``log_softmax(alpha * cos)`` over clusters, the reference's evaluation scores (alpha 2)."""
        return F.log_softmax(cosines * alpha, dim=1)


class LinearProbe(nn.Conv2d):
    """A 1x1 convolution from codes to class logits (STEGO's ``linear_probe``); it uses labels."""

    def __init__(self, dim: int, num_classes: int) -> None:
        """Build the probe.

        Args:
            dim: Code dimension.
            num_classes: Classes of the ground truth.
        """
        super().__init__(dim, num_classes, 1)


class STEGOOutput(NamedTuple):
    """What :meth:`STEGOHeads.forward` returns (a NamedTuple for DDP and pytree).

    Attributes:
        code: Codes of the images, (B, dim, h, w), with gradient.
        code_pos: Codes of the KNN images, (B, dim, h, w); None when not given.
        linear_logits: The linear probe on the detached codes, (B, num_classes, h, w).
        cluster_cosines: The cluster probe on the detached codes, (B, K, h, w).
    """

    code: Tensor
    code_pos: Tensor | None
    linear_logits: Tensor
    cluster_cosines: Tensor


class STEGOHeads(nn.Module):
    """Everything a STEGO run trains: segmentation head, cluster probe and linear probe.

    Attributes:
        head: :class:`SegmentationHead`.
        cluster_probe: :class:`ClusterProbe` with ``num_classes + extra_clusters`` centroids.
        linear_probe: :class:`LinearProbe`.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        num_classes: int,
        *,
        extra_clusters: int = 0,
        nonlinear: bool = True,
        dropout: float = 0.1,
    ) -> None:
        """Build the heads.

        Args:
            in_dim: Featurizer channels C.
            dim: Code dimension.
            num_classes: Ground-truth classes (27 for COCO-Stuff-27 and Cityscapes-27).
            extra_clusters: Centroids beyond ``num_classes`` (0 in the reference configs).
            nonlinear: Build the nonlinear branch of the head.
            dropout: Dropout2d probability inside the head.
        """
        super().__init__()
        self.num_classes = num_classes
        self.head = SegmentationHead(in_dim, dim, nonlinear=nonlinear, dropout=dropout)
        self.cluster_probe = ClusterProbe(dim, num_classes + extra_clusters)
        self.linear_probe = LinearProbe(dim, num_classes)

    def probes(self, code: Tensor) -> tuple[Tensor, Tensor]:
        """``(linear_logits, cluster_cosines)`` of the **detached** codes (the probes never train the head)."""
        detached = code.detach()
        return self.linear_probe(detached), self.cluster_probe(detached)

    def forward(self, features: Tensor, features_pos: Tensor | None = None) -> STEGOOutput:
        """Codes of the images (and of their KNN images) and the probe outputs.

        Args:
            features: Frozen features, (B, C, h, w).
            features_pos: Frozen features of the KNN images, (B, C, h, w), or None.

        Returns:
            A :class:`STEGOOutput`.
        """
        code = self.head(features)
        code_pos = self.head(features_pos) if features_pos is not None else None
        linear_logits, cosines = self.probes(code)
        return STEGOOutput(code, code_pos, linear_logits, cosines)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with ``requires_grad=False`` (the start of an EMA)."""
    clone = copy.deepcopy(module)
    for parameter in clone.parameters():
        parameter.requires_grad_(False)
    return clone


@torch.no_grad()
def ema_update_(ema: nn.Module, online: nn.Module, momentum: float) -> None:
    """``p_ema <- m p_ema + (1 - m) p`` for every parameter; buffers are copied (HP's ``ema_model_update``).

    Args:
        ema: The momentum copy (same architecture as ``online``).
        online: The module in training.
        momentum: m (HP's ``ema_m``: 0.99 COCO, 0.999 Cityscapes/Potsdam).
    """
    for p_ema, p in zip(ema.parameters(), online.parameters(), strict=True):
        p_ema.mul_(momentum).add_(p.detach(), alpha=1.0 - momentum)
    for b_ema, b in zip(ema.buffers(), online.buffers(), strict=True):
        b_ema.copy_(b)


class HPOutput(NamedTuple):
    """What :meth:`HPHeads.forward` returns.

    Attributes:
        code: Codes s of the images, (B, dim, h, w), with gradient.
        code_ema: Codes of the momentum head S', (B, dim, h, w), no gradient.
        code_mix: The LHP-mixed codes (eq. (9) of [1]) when local weights were given, else None.
        z: L2-normalised projections Z(s), (B*h*w, dim), raster order per image.
        z_aug: Projections of the photometrically augmented images, (B*h*w, dim); None if not given.
        z_mix: Projections of ``code_mix``, (B*h*w, dim); None without local weights.
        linear_logits: Linear probe on the detached codes, (B, num_classes, h, w).
        cluster_cosines: Cluster probe on the detached codes, (B, K, h, w).
    """

    code: Tensor
    code_ema: Tensor
    code_mix: Tensor | None
    z: Tensor
    z_aug: Tensor | None
    z_mix: Tensor | None
    linear_logits: Tensor
    cluster_cosines: Tensor


def flatten_patches(maps: Tensor) -> Tensor:
    """(B, C, h, w) -> (B*h*w, C), image by image, raster order within an image."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


class HPHeads(STEGOHeads):
    """STEGO's heads plus HP's momentum head and projector.

    Attributes:
        ema_head: Frozen copy of ``head`` updated by :meth:`update_ema`.
        projector: Linear(dim, dim); its output is L2-normalised.
        code_dropout: Dropout2d on ``code_ema`` and ``code_mix`` (the reference returns
            ``dropout(code_ema)`` and ``dropout(code_3x3)`` when ``dropout`` is on).
    """

    def __init__(self, in_dim: int, dim: int, num_classes: int, **kwargs) -> None:
        """Build the heads; arguments as :class:`STEGOHeads`."""
        super().__init__(in_dim, dim, num_classes, **kwargs)
        self.ema_head = frozen_copy(self.head)
        self.projector = nn.Linear(dim, dim)
        self.code_dropout = nn.Dropout2d(self.head.dropout.p)

    def project(self, code: Tensor) -> Tensor:
        """``normalize(Z(s))`` per patch: (B, dim, h, w) -> (B*h*w, dim)."""
        return F.normalize(self.projector(flatten_patches(code)), dim=1)

    def update_ema(self, momentum: float) -> None:
        """One momentum step of ``ema_head`` towards ``head``."""
        ema_update_(self.ema_head, self.head, momentum)

    def forward(
        self,
        features: Tensor,
        features_aug: Tensor | None = None,
        local_weights: Tensor | None = None,
    ) -> HPOutput:
        """Everything the HP loss needs, in one call (so DDP sees every trained parameter).

        Args:
            features: Frozen features, (B, C, h, w).
            features_aug: Frozen features of the photometric augmentation, or None.
            local_weights: LHP weights (B, 9, h, w) from
                :func:`lussray.methods.hp.local_positive_weights`, or None.

        Returns:
            An :class:`HPOutput`.
        """
        from lussray.methods.hp import propagate_local  # methods import models, not the reverse, at import time

        code = self.head(features)
        with torch.no_grad():
            code_ema = self.code_dropout(self.ema_head(features))
        code_mix = None if local_weights is None else self.code_dropout(propagate_local(code, local_weights))
        z_aug = self.project(self.head(features_aug)) if features_aug is not None else None
        z_mix = self.project(code_mix) if code_mix is not None else None
        linear_logits, cosines = self.probes(code)
        return HPOutput(code, code_ema, code_mix, self.project(code), z_aug, z_mix, linear_logits, cosines)


__all__ = [
    "ClusterProbe",
    "HPHeads",
    "HPOutput",
    "LinearProbe",
    "STEGOHeads",
    "STEGOOutput",
    "SegmentationHead",
    "ema_update_",
    "flatten_patches",
    "frozen_copy",
]
