"""The heads of the PASS network: image projection, prototypes, pixel MLPs, D2S, attention, segmentation.

Every head is a small ``nn.Sequential`` (or a thin module around one) whose layer order is the
reference's, so ``lussray.models.checkpoints`` maps the public PASS/SwAV state dicts onto these
modules by key prefix alone (the Sequential indices agree).

Initialisation follows the reference: every Conv2d weight is
``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, conv biases keep PyTorch's default, affine
BatchNorms start at weight 1 and bias 0, and Linear layers keep PyTorch's default.

References:
    - [0]: PASS / ImageNet-S, "Large-scale Unsupervised Semantic Segmentation", TPAMI 2022,
      arXiv:2106.03149.
    - [1]: SwAV, 2020, arXiv:2006.09882.
    - [2]: SimSiam, 2021, arXiv:2011.10566 (the predictor of the pixel branch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def init_weights_(module: nn.Module) -> None:
    """Initialise the convolutions and BatchNorms of ``module`` in place, as the reference does.

    Args:
        module: Any module; its Conv2d weights get Kaiming-normal (fan_out, relu) values and its
            affine BatchNorms weight 1 and bias 0. Linear layers and conv biases are left alone.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ProjectionHead(nn.Sequential):
    """Image-level projection MLP g of [0] (SwAV's projection head [1] plus a final BN).

    Linear(C, hidden) -> BN1d -> ReLU -> Linear(hidden, D) -> BN1d(D, affine=False). The last,
    parameter-free BN is PASS's addition to SwAV's head. The caller L2-normalises the output.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        """Build the head.

        Args:
            in_dim: Input channels C (512 for R18, 2048 for R50 at c4).
            hidden_dim: Hidden width (``hidden_mlp`` of the reference: 512 for R18, 2048 for R50).
            out_dim: Embedding dimension D (``feat_dim``, 128).
        """
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
            nn.BatchNorm1d(out_dim, affine=False),
        )
        init_weights_(self)


class Prototypes(nn.Linear):
    """The SwAV prototypes: a bias-free Linear(D, K) whose rows are kept on the unit sphere.

    Scores are ``embedding @ weight.T``, i.e. cosine similarities once both are normalised.
    Normalisation and freezing are methods the training loop calls around the step, never
    side effects of ``forward``.
    """

    def __init__(self, feat_dim: int, num_prototypes: int) -> None:
        """Build the prototypes.

        Args:
            feat_dim: Embedding dimension D.
            num_prototypes: Number of prototypes K (500 for S50, 3000 for S300/S919).
        """
        super().__init__(feat_dim, num_prototypes, bias=False)

    @torch.no_grad()
    def normalize_(self) -> None:
        """L2-normalise each prototype (row of ``weight``) in place, without recording gradients.

        The reference does this at the start of every iteration, before the forward pass.
        """
        self.weight.copy_(F.normalize(self.weight, dim=1, p=2))

    def cancel_gradients(self) -> None:
        """Drop the prototype gradients (set ``weight.grad`` to None).

        Called after ``backward`` during the first ``freeze_prototypes_steps`` steps. With no
        gradient, SGD/LARS skip the parameter entirely (no momentum, no weight decay), as in the
        reference, so the prototypes stay exactly where they are.
        """
        self.weight.grad = None


class PixelProjectionHead(nn.Sequential):
    """Pixel-level projection MLP of [0] (the P2P projection, and the D2S pixel MLP p_s of eq. 3).

    conv1x1(C, hidden) -> BN -> ReLU -> conv1x1(hidden, hidden) -> BN -> ReLU
    -> conv1x1(hidden, D) -> BN(D, affine=False). Convolutions have no bias (a BN follows each).
    """

    def __init__(self, in_channels: int, hidden_dim: int, out_channels: int) -> None:
        """Build the head.

        Args:
            in_channels: Input channels C.
            hidden_dim: Hidden width.
            out_channels: Output channels (``feat_dim`` for P2P; the stage width C_s for D2S).
        """
        super().__init__(
            nn.Conv2d(in_channels, hidden_dim, 1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels, affine=False),
        )
        init_weights_(self)


class PixelPredictor(nn.Sequential):
    """The pixel-level predictor q of the P2P alignment (eq. 2 of [0], SimSiam-style [2]).

    conv1x1(D, D, no bias) -> BN -> ReLU -> conv1x1(D, D, with bias).
    """

    def __init__(self, dim: int) -> None:
        """Build the predictor.

        Args:
            dim: Pixel embedding dimension D (``feat_dim``).
        """
        super().__init__(
            nn.Conv2d(dim, dim, 1, bias=False),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 1),
        )
        init_weights_(self)


class ShallowHead(nn.Module):
    """The deep-to-shallow (D2S) head of one shallow stage s (eq. 3 of [0]).

    ``pixel`` is the pixel MLP p_s (C_s -> hidden -> hidden -> C_s, final BN without affine),
    followed by global average pooling, then ``image`` is the image MLP g_s
    (C_s -> hidden -> D, final BN without affine); the embedding is L2-normalised and scored
    against the *detached* prototypes, so D2S gradients never reach the prototypes.

    The stage width C_s is read from the backbone (layer3: 256 for R18, 1024 for R50). The
    reference computes it as ``C_last // (2 * (4 - s))``, which is right for stages 2 and 3 but
    wrong for stage 1 (R50: 2048 // 6 = 341 instead of 256; R18: 85 instead of 64); only stage 3
    is used by the published runs, so lussray's correct widths change nothing there.
    """

    def __init__(self, in_channels: int, hidden_dim: int, feat_dim: int) -> None:
        """Build the head.

        Args:
            in_channels: Channels C_s of the shallow stage output.
            hidden_dim: Hidden width of both MLPs.
            feat_dim: Embedding dimension D (that of the prototypes).
        """
        super().__init__()
        self.pixel = PixelProjectionHead(in_channels, hidden_dim, in_channels)
        self.image = ProjectionHead(in_channels, hidden_dim, feat_dim)

    def forward(self, features: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
        """Embed a shallow feature map and score it against the prototypes.

        Args:
            features: Shallow stage output, (B, C_s, H, W).
            prototypes: Prototype weights, (K, D); detached here.

        Returns:
            ``(embedding, logits)``: the L2-normalised embedding (B, D) and its scores (B, K).
        """
        pooled = self.pixel(features).mean(dim=(2, 3))
        embedding = F.normalize(self.image(pooled), dim=1, p=2)
        return embedding, embedding @ prototypes.detach().t()


class PixelAttention(nn.Module):
    """The pixel-attention module of [0] (``Mulpixelattn``, attribute ``fbg`` in the reference).

    A per-channel, per-pixel attention map in (0, 1):
    ``sigmoid(BN(conv1x1(ReLU(BN(conv1x1(x))))) + offset)`` with conv1x1 C -> C (with bias), an
    affine final BN and a learnable per-channel ``offset`` of shape (1, C, 1, 1) initialised to 0
    (called ``threshold`` in the reference).
    """

    def __init__(self, channels: int) -> None:
        """Build the module.

        Args:
            channels: Feature channels C (512 for R18, 2048 for R50); the hidden width equals C.
        """
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(channels, channels, 1),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1),
            nn.BatchNorm2d(channels, affine=True),
        )
        self.offset = nn.Parameter(torch.zeros(1, channels, 1, 1))
        init_weights_(self)

    def forward(self, features: Tensor) -> Tensor:
        """Compute the attention map.

        Args:
            features: (L2-normalised) feature map, (B, C, H, W).

        Returns:
            Attention in (0, 1), (B, C, H, W).
        """
        return torch.sigmoid(self.layers(features) + self.offset)


class SegmentationHead(nn.Conv2d):
    """The fine-tuning classifier of [0]: Conv2d(C, K + 1, 1) with bias on the last stage.

    Channel 0 is the "other" category, channels 1..K the generated categories.
    """

    def __init__(self, in_channels: int, num_categories: int) -> None:
        """Build the head.

        Args:
            in_channels: Feature channels C.
            num_categories: Number of generated categories K (the head outputs K + 1 channels).
        """
        super().__init__(in_channels, num_categories + 1, 1)
        init_weights_(self)
