"""The PASS network for representation learning: ResNet backbone plus image, pixel and D2S heads.

The pretraining forward takes the multi-crop views (global views first) and returns everything
the PASS losses need (``lussray.methods.pass_``):

- the image branch for every crop: c4 average-pooled, projected (g), L2-normalised, scored
  against the prototypes (the SwAV branch of [1], eq. (2) there);
- the pixel branch for the two global views: c4 projected per pixel, sampled at the P2P
  correspondence grids so that position (i, j) of view 0 and of view 1 shows the same image point,
  then passed through the predictor (eq. (2) of [0]);
- the deep-to-shallow branch for the two global views: each shallow stage embedded as in eq. (3)
  of [0] and scored against the detached prototypes (eq. (4) of [0]).

Submodule names are lussray's; ``lussray.models.checkpoints`` maps the reference names onto them.

References:
    - [0]: PASS / ImageNet-S, "Large-scale Unsupervised Semantic Segmentation", TPAMI 2022,
      arXiv:2106.03149.
    - [1]: SwAV, 2020, arXiv:2006.09882.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lussray.models.backbone import ResNetBackbone, stage_name
from lussray.models.heads import (
    PixelAttention,
    PixelPredictor,
    PixelProjectionHead,
    ProjectionHead,
    Prototypes,
    ShallowHead,
)


class PASSOutput(NamedTuple):
    """What the pretraining forward returns; per-view tensors are batch-first.

    A NamedTuple, so DDP (``find_unused_parameters``) and ``torch.utils._pytree`` see its tensors.

    Attributes:
        embeddings: Per crop, the L2-normalised image embedding, (B, D); global views first.
        scores: Per crop, the prototype scores ``embedding @ prototypes.T``, (B, K).
        pixel_projections: The P2P projections z of global views 0 and 1 sampled at their grids,
            each (B, D, G, G); None when no grids were given.
        pixel_predictions: The predictor outputs p for the same positions, each (B, D, G, G);
            None when no grids were given.
        shallow_logits: Per shallow stage s, the D2S logits of the global views, a tuple of
            (B, K) tensors (one per global view), scored against the detached prototypes.
    """

    embeddings: tuple[Tensor, ...]
    scores: tuple[Tensor, ...]
    pixel_projections: tuple[Tensor, Tensor] | None
    pixel_predictions: tuple[Tensor, Tensor] | None
    shallow_logits: dict[int, tuple[Tensor, ...]]


def resolution_groups(views: Sequence[Tensor]) -> list[tuple[int, int]]:
    """Split the view list into runs of consecutive views with the same resolution.

    The multi-crop forward of SwAV [1] concatenates each run and sends it through the backbone
    in one batch (two 224 crops, then the 96 crops, ...).

    Args:
        views: Images, each (B, 3, H_v, W_v).

    Returns:
        ``[(start, end), ...]`` half-open index ranges covering ``views`` in order.

    Raises:
        ValueError: If ``views`` is empty.
    """
    if not views:
        raise ValueError("at least one view is required")
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[-2:] != views[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


def sample_at_grid(features: Tensor, grid: Tensor) -> Tensor:
    """Sample a feature map at grid_sample coordinates (bilinear, ``align_corners=False``).

    Positions where the two crops do not overlap carry -2 in the grid, outside [-1, 1], so they
    sample zeros (``padding_mode="zeros"``). The reference masks them in no other way: a zero
    projection has zero cosine with anything, so such positions add nothing to the P2P sum but
    still count in its mean, and they enter the predictor's BatchNorm statistics.

    Args:
        features: (B, D, H, W).
        grid: (B, G, G, 2) float, (x, y) in [-1, 1] (or -2 where there is no overlap).

    Returns:
        (B, D, G, G).
    """
    return F.grid_sample(features, grid.to(features.dtype), mode="bilinear", align_corners=False)


def upsample_features(features: Tensor, factor: int = 4) -> Tensor:
    """Bilinear x4 upsampling of the c4 map used by every pixel-attention path (stride 32 -> 8)."""
    return F.interpolate(features, scale_factor=factor, mode="bilinear", align_corners=False)


class PASSModel(nn.Module):
    """Backbone plus the heads of PASS [0].

    Attributes:
        backbone: :class:`~lussray.models.backbone.ResNetBackbone`.
        projection_head: Image-level MLP on pooled c4.
        prototypes: :class:`~lussray.models.heads.Prototypes`.
        pixel_projection: Pixel-level MLP of the P2P branch.
        pixel_predictor: Predictor of the P2P branch.
        shallow_heads: One :class:`~lussray.models.heads.ShallowHead` per shallow stage, keyed
            by the stage number as a string (``"3"``).
        pixel_attention: :class:`~lussray.models.heads.PixelAttention` when built with
            ``pixel_attention=True`` (stage 2), else None; the pretraining forward ignores it.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        hidden_dim: int = 2048,
        feat_dim: int = 128,
        num_prototypes: int = 3000,
        shallow_stages: Sequence[int] = (3,),
        pixel_attention: bool = False,
    ) -> None:
        """Build the network with random weights.

        Args:
            arch: Backbone architecture (``resnet18`` for S50, ``resnet50`` for S300/S919).
            hidden_dim: Hidden width of every MLP (``hidden_mlp``: 512 for R18, 2048 for R50).
            feat_dim: Embedding dimension D (128).
            num_prototypes: Number of prototypes K (500 for S50, 3000 for S300/S919).
            shallow_stages: Stages supervised by D2S (the published runs use ``(3,)``).
            pixel_attention: Also build the pixel-attention module of stage 2.

        Raises:
            ValueError: If a shallow stage is not in 1..3 or is repeated.
        """
        super().__init__()
        stages = tuple(int(s) for s in shallow_stages)
        if any(s not in (1, 2, 3) for s in stages) or len(set(stages)) != len(stages):
            raise ValueError(f"shallow stages must be distinct values in 1..3, got {list(shallow_stages)}")
        self.shallow_stages = stages
        self.backbone = ResNetBackbone(arch)
        channels = self.backbone.out_channels
        self.projection_head = ProjectionHead(channels, hidden_dim, feat_dim)
        self.prototypes = Prototypes(feat_dim, num_prototypes)
        self.pixel_projection = PixelProjectionHead(channels, hidden_dim, feat_dim)
        self.pixel_predictor = PixelPredictor(feat_dim)
        self.shallow_heads = nn.ModuleDict(
            {
                str(s): ShallowHead(self.backbone.num_features[stage_name(s)], hidden_dim, feat_dim)
                for s in stages
            }
        )
        self.pixel_attention = PixelAttention(channels) if pixel_attention else None

    def forward(self, views: Sequence[Tensor], grids: tuple[Tensor, Tensor] | None = None) -> PASSOutput:
        """Multi-resolution forward of the multi-crop views (the pretraining forward).

        Args:
            views: Normalised float images, each (B, 3, S_v, S_v); the two global views first,
                views of equal size consecutive.
            grids: P2P correspondence grids of global views 0 and 1, each (B, G, G, 2) in
                grid_sample coordinates; None skips the pixel branch.

        Returns:
            A :class:`PASSOutput`.

        Raises:
            ValueError: If the pixel or D2S branch is needed but the first resolution group is
                not exactly two views.
        """
        groups = resolution_groups(views)
        num_global = groups[0][1]
        if (grids is not None or self.shallow_stages) and num_global != 2:
            raise ValueError(f"P2P and D2S need exactly 2 global views first, got a first group of {num_global}")
        batch = views[0].shape[0]
        pooled: list[Tensor] = []
        first: dict[str, Tensor] = {}
        for index, (start, end) in enumerate(groups):
            features = self.backbone(torch.cat(list(views[start:end])))
            pooled.append(features["c4"].mean(dim=(2, 3)))
            if index == 0:
                first = features
        # One projection over all crops, so the BN statistics span global and local crops alike.
        embeddings = F.normalize(self.projection_head(torch.cat(pooled)), dim=1, p=2)
        scores = self.prototypes(embeddings)

        projections = predictions = None
        if grids is not None:
            z = sample_at_grid(self.pixel_projection(first["c4"]), torch.cat(list(grids)))
            p = self.pixel_predictor(z)
            projections, predictions = (z[:batch], z[batch:]), (p[:batch], p[batch:])
        shallow_logits: dict[int, tuple[Tensor, ...]] = {}
        for s in self.shallow_stages:
            _, logits = self.shallow_heads[str(s)](first[stage_name(s)], self.prototypes.weight)
            shallow_logits[s] = logits.split(batch)
        return PASSOutput(embeddings.split(batch), scores.split(batch), projections, predictions, shallow_logits)

    def attention_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Upsampled c4 features and their pixel attention (section 2.1 of the reference notes).

        Args:
            images: Normalised float images, (B, 3, H, W).

        Returns:
            ``(features, attention)``: the raw (un-normalised) c4 map upsampled x4, (B, C, H/8, W/8),
            and the attention ``fbg(normalize(features))`` in (0, 1) of the same shape.

        Raises:
            RuntimeError: If the model was built without pixel attention.
        """
        if self.pixel_attention is None:
            raise RuntimeError("this PASSModel has no pixel attention (build it with pixel_attention=True)")
        features = upsample_features(self.backbone(images)["c4"])
        return features, self.pixel_attention(F.normalize(features, dim=1, p=2))

    def cluster_embedding(self, images: Tensor) -> Tensor:
        """The image embedding that label generation clusters: mean over pixels of features * attention.

        The reference pools the *raw* features here, but the L2-normalised ones in training.

        Args:
            images: Normalised float images, (B, 3, H, W).

        Returns:
            (B, C) embeddings (not normalised).
        """
        features, attention = self.attention_maps(images)
        return (features * attention).mean(dim=(2, 3))


class PixelAttentionModel(PASSModel):
    """PASS with pixel attention, for stage 2.1: only the attention module and prototypes learn.

    The forward pools the L2-normalised upsampled c4 map weighted by its attention, then goes
    through the frozen projection head to the prototypes, so the SwAV loss of stage 1 trains the
    attention. The state dict has the keys of :class:`PASSModel` (plus ``pixel_attention.*``),
    so labelgen loads it into a ``PASSModel(pixel_attention=True)``. Frozen modules still run in
    train mode: backbone BatchNorm uses batch statistics, as in the reference.
    """

    def __init__(self, **kwargs) -> None:
        """Build the model; ``kwargs`` are those of :class:`PASSModel` (without ``pixel_attention``)."""
        super().__init__(**kwargs, pixel_attention=True)
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        for module in (self.pixel_attention, self.prototypes):
            for parameter in module.parameters():
                parameter.requires_grad_(True)

    def forward(self, views: Sequence[Tensor], grids: tuple[Tensor, Tensor] | None = None) -> PASSOutput:
        """Attention-pooled SwAV branch for every view (no P2P, no D2S).

        Args:
            views: Normalised float views, each (B, 3, S, S); equal sizes consecutive.
            grids: Ignored (part of the shared signature).

        Returns:
            A :class:`PASSOutput` with embeddings and scores only.
        """
        batch = views[0].shape[0]
        pooled = []
        for start, end in resolution_groups(views):
            features, attention = self.attention_maps(torch.cat(list(views[start:end])))
            pooled.append((F.normalize(features, dim=1, p=2) * attention).mean(dim=(2, 3)))
        embeddings = F.normalize(self.projection_head(torch.cat(pooled)), dim=1, p=2)
        scores = self.prototypes(embeddings)
        return PASSOutput(embeddings.split(batch), scores.split(batch), None, None, {})
