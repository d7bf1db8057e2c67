"""FS^4's classification modules on the pixel feature map: the classical and the modified CAM head.

Sec. 4.2.2 of [0]. Both map the feature map F (after the CAE module), (B, C, H, W), to the scores
q, (B, M), over the M global clusters of pyramid global guidance; the loss on q is Eq. (6)
(``lussray.methods.fs4.global_guidance_loss``).

- :class:`ClassicalCAMHead`: q = GAP(g(F)), g a 1x1 convolution (CAM [1]); the ablation's option.
- :class:`ModifiedCAMHead`: q = g1(ReLU(GAP(g2(F)))), g2 a 1x1 convolution, g1 a linear
  classifier; FS^4's default ("Mod." in Table 4).

The paper does not give the width of g2's output; ``hidden_channels`` defaults to the input width
C (256 for the paper's FPN). Both layers keep PyTorch's default initialisation and biases.

References:
    - [0]: FS^4, "Fully Self-Supervised Learning for Semantic Segmentation", 2022, arXiv:2202.11981.
    - [1]: CAM, "Learning Deep Features for Discriminative Localization", CVPR 2016, arXiv:1512.04150.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Names accepted by :func:`build_cam_head` (the first is FS^4's default).
CAM_HEADS: tuple[str, ...] = ("modified", "classical")


class ClassicalCAMHead(nn.Module):
    """q = GAP(g(F)) with g a 1x1 convolution C -> M (CAM [1], as written in Sec. 4.2.2 of [0])."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        """Build g.

        Args:
            in_channels: Channels C of F.
            num_classes: Number M of global clusters.
        """
        super().__init__()
        self.g = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def activation_maps(self, features: Tensor) -> Tensor:
        """The class activation maps g(F), (B, M, H, W), for inspection."""
        return self.g(features)

    def forward(self, features: Tensor) -> Tensor:
        """Scores q, (B, M), of a feature map (B, C, H, W)."""
        return self.g(features).mean(dim=(2, 3))


class ModifiedCAMHead(nn.Module):
    """q = g1(ReLU(GAP(g2(F)))): 1x1 conv g2 C -> hidden, then linear g1 hidden -> M (Sec. 4.2.2 of [0])."""

    def __init__(self, in_channels: int, num_classes: int, hidden_channels: int | None = None) -> None:
        """Build g2 and g1.

        Args:
            in_channels: Channels C of F.
            num_classes: Number M of global clusters.
            hidden_channels: Output channels of g2 (not given in [0]; default C).
        """
        super().__init__()
        hidden = in_channels if hidden_channels is None else hidden_channels
        self.g2 = nn.Conv2d(in_channels, hidden, kernel_size=1)
        self.g1 = nn.Linear(hidden, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        """Scores q, (B, M), of a feature map (B, C, H, W)."""
        pooled = self.g2(features).mean(dim=(2, 3))  # GAP, (B, hidden)
        return self.g1(torch.relu(pooled))


def build_cam_head(kind: str, in_channels: int, num_classes: int, hidden_channels: int | None = None) -> nn.Module:
    """The CAM head named ``kind`` (one of :data:`CAM_HEADS`).

    Args:
        kind: ``"modified"`` (FS^4) or ``"classical"`` (CAM, for the ablation).
        in_channels: Channels C of the feature map.
        num_classes: Number M of global clusters (50 in [0]).
        hidden_channels: Width of the modified head's g2 (default C); must be unset for classical.

    Returns:
        The head module.

    Raises:
        ValueError: On an unknown ``kind``, or ``hidden_channels`` given for the classical head.
    """
    if kind == "modified":
        return ModifiedCAMHead(in_channels, num_classes, hidden_channels)
    if kind == "classical":
        if hidden_channels is not None:
            raise ValueError("hidden_channels applies only to the modified CAM head")
        return ClassicalCAMHead(in_channels, num_classes)
    raise ValueError(f"unknown CAM head {kind!r}; expected one of {', '.join(CAM_HEADS)}")
