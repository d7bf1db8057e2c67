"""FS^4's network: PiCIE's PanopticFPN, optionally refined by the CAE module, with a CAM head on its features.

Sec. 4 and Fig. 2 of FS^4 [0]. The pixel branch is PiCIE's network [1] (a ResNet + FPN,
:class:`~lussray.models.fpn.PanopticFPN`) whose feature map f is refined by the context-aware
embedding module (:class:`~lussray.models.cae.ContextAwareEmbedding`, Sec. 4.3) into F; PiCIE's
pixel clustering (L_p) runs on F. The classification module (:mod:`lussray.models.fs4_heads`,
Sec. 4.2.2) maps F to the scores q over the global clusters of the guidance loss L_w (Eq. 6).

``forward(images)`` returns F alone, so PiCIE's clustering, final k-means and prediction use an
FS^4 network exactly as a PiCIE one; ``forward(images, with_scores=True)`` returns (F, q) from the
same pass (one DDP call per training step).

The CAE module's colour kernel (Eq. 8) needs the raw colours: the network receives images
normalised with :data:`~lussray.data.augment.IMAGENET_MEAN` / ``IMAGENET_STD`` (training and
prediction both do) and undoes that normalisation to get RGB in [0, 1], the units of the CAE's
default colour bandwidth.

References:
    - [0]: FS^4, "Fully Self-Supervised Learning for Semantic Segmentation", 2022, arXiv:2202.11981.
    - [1]: PiCIE, CVPR 2021, arXiv:2103.17070.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lussray.data.augment import IMAGENET_MEAN, IMAGENET_STD
from lussray.models.cae import DEFAULT_CHUNK_BYTES, ContextAwareEmbedding
from lussray.models.fs4_heads import build_cam_head


class FS4Network(nn.Module):
    """F = CAE(f(x), x) (or f(x) without CAE) and q = CAM(F).

    Attributes:
        fpn: PiCIE's network (``backbone`` + ``decoder``), f.
        cae: The CAE module, or None.
        cam_head: The classification module over the global clusters.
        out_channels: Channels of F (the FPN width).
    """

    def __init__(self, fpn: nn.Module, cae: ContextAwareEmbedding | None, cam_head: nn.Module,
                 mean: tuple[float, float, float] = IMAGENET_MEAN,
                 std: tuple[float, float, float] = IMAGENET_STD) -> None:
        """Assemble the parts.

        Args:
            fpn: Images (B, 3, H, W), normalised with ``mean``/``std``, to f (B, C, h, w).
            cae: The CAE module on f (None: F = f, the ablation's rows without CAE).
            cam_head: F (B, C, h', w') to q (B, M).
            mean: Normalisation mean of the input images (undone for the CAE's colours).
            std: Normalisation std of the input images.
        """
        super().__init__()
        self.fpn = fpn
        self.cae = cae
        self.cam_head = cam_head
        self.out_channels = fpn.out_channels
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def features(self, images: Tensor) -> Tensor:
        """F, (B, C, h, w): the FPN's 1/4 map, or with CAE the refined 1/8 map."""
        fpn = self.fpn(images)
        if self.cae is None:
            return fpn
        colours = images * self.std.to(images.dtype) + self.mean.to(images.dtype)  # RGB in [0, 1]
        return self.cae(fpn, colours)

    def forward(self, images: Tensor, with_scores: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """F, or (F, q) with ``with_scores`` (q: (B, M) scores of the CAM head)."""
        features = self.features(images)
        return (features, self.cam_head(features)) if with_scores else features


def build_fs4_network(fpn: nn.Module, *, num_global_clusters: int, cam_head: str = "modified",
                      cam_hidden_channels: int | None = None, cae: bool = True,
                      cae_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> FS4Network:
    """Wrap a PanopticFPN into FS^4's network (the keyword arguments are what a checkpoint records).

    Args:
        fpn: PiCIE's network (its ``out_channels`` is C).
        num_global_clusters: M, the global clusters of the pseudo labels.
        cam_head: ``modified`` (FS^4) or ``classical`` (:func:`~lussray.models.fs4_heads.build_cam_head`).
        cam_hidden_channels: Width of the modified head's g2 (None: C).
        cae: Add the CAE module.
        cae_chunk_bytes: Memory budget of one chunk of the CAE relation map.

    Returns:
        The network, new layers with PyTorch's default initialisation (seed the RNG before).

    Raises:
        ValueError: On an unknown CAM head.
    """
    channels = fpn.out_channels
    module = ContextAwareEmbedding(channels, chunk_bytes=cae_chunk_bytes) if cae else None
    return FS4Network(fpn, module, build_cam_head(cam_head, channels, num_global_clusters, cam_hidden_channels))


def record_kwargs(record: dict[str, Any]) -> dict[str, Any]:
    """The :func:`build_fs4_network` keyword arguments of a checkpoint's ``fs4`` record."""
    names = ("num_global_clusters", "cam_head", "cam_hidden_channels", "cae", "cae_chunk_bytes")
    return {name: record[name] for name in names if name in record}
