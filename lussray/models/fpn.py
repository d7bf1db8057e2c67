"""PiCIE's PanopticFPN: a ResNet with a light top-down decoder that outputs 1/4-resolution features.

The reference (``janghyuncho/PiCIE`` ``modules/fpn.py``, seed-methods.md section 1.3) decodes the
four ResNet stages res2..res5 (lussray's ``c1``..``c4``, strides 4, 8, 16, 32):

- a 1x1 convolution (with bias) per stage maps it to the FPN width (128 for ResNet-18/34, 256 for
  the bottleneck ResNets);
- top-down: ``o = conv(res5)``, then for res4, res3, res2 in turn
  ``o = bilinear_upsample(o, size of that stage) + conv(stage)`` (``align_corners=False``);
- the output is the res2 level: ``width`` channels at 1/4 of the input resolution (320 -> 80).

There are no 3x3 smoothing convolutions, BN or ReLU in the decoder, as in the reference. PiCIE uses
this map (L2-normalised by the loss and the clustering) as its per-pixel embedding f_theta(x) [0].

Deviations from the reference: the backbone is lussray's :class:`ResNetBackbone` (torchvision
modules with their names) instead of a copied torchvision ResNet; the decoder's 1x1 convolutions are
initialised by PyTorch's default ``Conv2d`` initialisation, as the reference leaves them.

References:
    - [0]: PiCIE, Cho et al., CVPR 2021, arXiv:2103.17070.
"""

from __future__ import annotations

import logging
import os
from typing import IO

import torch.nn.functional as F
from torch import Tensor, nn

from lussray.errors import UserError
from lussray.models.backbone import STAGES, ResNetBackbone
from lussray.models.checkpoints import LoadReport, load_pretrained

log = logging.getLogger(__name__)

#: The FPN width of the reference for each kind of residual block.
_BASIC_WIDTH = 128
_BOTTLENECK_WIDTH = 256


def default_width(arch: str) -> int:
    """The reference's FPN width: 128 for ResNet-18/34 (BasicBlock), 256 for ResNet-50 and deeper."""
    return _BASIC_WIDTH if arch in ("resnet18", "resnet34") else _BOTTLENECK_WIDTH


class FPNDecoder(nn.Module):
    """The top-down decoder: a 1x1 lateral convolution per stage and bilinear upsample-and-sum.

    Attributes:
        lateral: ``{"c1": Conv2d(C1, width, 1), ..., "c4": Conv2d(C4, width, 1)}``.
        width: Output channels.
    """

    def __init__(self, in_channels: dict[str, int], width: int) -> None:
        """Build the lateral convolutions.

        Args:
            in_channels: Channels of each stage output, ``{"c1": ..., "c4": ...}``.
            width: The FPN width (output channels).

        Raises:
            ValueError: If a stage is missing or ``width`` is not positive.
        """
        super().__init__()
        if width <= 0:
            raise ValueError(f"FPN width must be positive, got {width}")
        missing = [s for s in STAGES if s not in in_channels]
        if missing:
            raise ValueError(f"FPNDecoder needs the channels of stages {STAGES}, missing {missing}")
        self.width = width
        self.lateral = nn.ModuleDict({s: nn.Conv2d(in_channels[s], width, kernel_size=1) for s in STAGES})

    def forward(self, stages: dict[str, Tensor]) -> Tensor:
        """Decode the stage outputs.

        Args:
            stages: ``{"c1": (B, C1, H/4, W/4), ..., "c4": (B, C4, H/32, W/32)}``.

        Returns:
            (B, width, H/4, W/4), the res2 level.
        """
        out = self.lateral["c4"](stages["c4"])
        for name in ("c3", "c2", "c1"):
            lateral = self.lateral[name](stages[name])
            out = F.interpolate(out, size=lateral.shape[-2:], mode="bilinear", align_corners=False) + lateral
        return out


class PanopticFPN(nn.Module):
    """ResNet backbone + :class:`FPNDecoder`: images to 1/4-resolution pixel embeddings.

    The attribute names ``backbone`` and ``decoder`` make torchvision, PASS/SwAV and lussray
    checkpoints load by name with :func:`~lussray.models.checkpoints.load_pretrained`.

    Attributes:
        backbone: The ResNet.
        decoder: The FPN decoder.
        arch: Backbone architecture name.
        out_channels: The embedding dimension (the FPN width).
        stride: Input pixels per output cell (4).
    """

    stride = 4

    def __init__(self, arch: str = "resnet18", width: int | None = None) -> None:
        """Build the network with random weights.

        Args:
            arch: A :data:`~lussray.models.backbone.ARCHS` name (the reference uses resnet18).
            width: FPN width; None takes the reference's (:func:`default_width`).

        Raises:
            ValueError: On an unknown ``arch`` or a non-positive width.
        """
        super().__init__()
        self.arch = arch
        self.backbone = ResNetBackbone(arch)
        self.decoder = FPNDecoder(self.backbone.num_features, default_width(arch) if width is None else width)

    @property
    def out_channels(self) -> int:
        """Channels of the output embedding."""
        return self.decoder.width

    def forward(self, x: Tensor) -> Tensor:
        """Embed every pixel.

        Args:
            x: Normalised images (B, 3, H, W).

        Returns:
            (B, width, ceil(H/4), ceil(W/4)) features, not normalised.
        """
        return self.decoder(self.backbone(x))


def build_panoptic_fpn(
    arch: str = "resnet18",
    width: int | None = None,
    init: str | os.PathLike[str] | IO[bytes] | None = None,
) -> tuple[PanopticFPN, LoadReport | None]:
    """Build PiCIE's network and initialise it.

    ``init`` may be a lussray checkpoint (a PASS stage-1 backbone for a fully self-supervised
    start, or a PiCIE checkpoint, which also fills the decoder), a torchvision ResNet state dict
    (the reference starts from supervised ImageNet weights; the user supplies the file; ``fc.*``
    is ignored) or a PASS/SwAV release. Files are read with ``torch.load(weights_only=True)``.
    None keeps the random initialisation (torchvision's for the ResNet, PyTorch's default for the
    decoder). The decoder stays random unless the file holds ``decoder.*`` keys.

    Args:
        arch: Backbone architecture.
        width: FPN width (None: the reference's for ``arch``).
        init: Checkpoint to initialise from, or None.

    Returns:
        ``(model, report)``; ``report`` is None for a random initialisation.

    Raises:
        UserError: If the file cannot be read, or does not provide every backbone weight with the
            right shape (for example a ResNet-50 file for a ResNet-18 model).
    """
    model = PanopticFPN(arch, width)
    if init is None:
        return model, None
    report = load_pretrained(model, init)
    backbone_missing = [k for k in report.missing if k.startswith("backbone.")]
    backbone_mismatched = [m for m in report.mismatched if m.startswith("backbone.")]
    if backbone_missing or backbone_mismatched:
        raise UserError(
            f"{report.path} does not initialise the {arch} backbone: {len(backbone_missing)} weights missing "
            f"(first: {backbone_missing[:3]}), {len(backbone_mismatched)} of another shape "
            f"(first: {backbone_mismatched[:3]}); is it a checkpoint of another architecture?"
        )
    return model, report


__all__ = ["FPNDecoder", "PanopticFPN", "build_panoptic_fpn", "default_width"]
