"""The non-contrastive pixel-to-pixel (P2P) alignment loss of PASS.

Implements eq. (2) of [0]: the pixel projections z_1, z_2 of two views, sampled at the same image
points, are aligned through the pixel predictor q with a stop-gradient on the target side, as
SimSiam [1] does for images:

    L_p2p = -1/2 [cos(p_1, sg(z_2)) + cos(p_2, sg(z_1))],   p_i = q(z_i),

averaged over every grid position (G x G, 7 x 7 in the reference) and every image. Only
same-position pairs are pulled together; no pixel is pushed away (hence "non-contrastive").
The minimum is -1.

Positions where the two crops do not overlap were sampled as zeros (grid value -2); a zero
vector has cosine 0 with anything (after ``F.normalize``), so they add nothing but still count in
the mean, as in the reference.

References:
    - [0]: PASS / ImageNet-S, "Large-scale Unsupervised Semantic Segmentation", TPAMI 2022,
      arXiv:2106.03149.
    - [1]: SimSiam, 2021, arXiv:2011.10566.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def _negative_cosine(prediction: Tensor, target: Tensor) -> Tensor:
    # Cosine along the channel axis at every position, target detached (stop-gradient).
    p = F.normalize(prediction.float(), dim=1, p=2)
    z = F.normalize(target.detach().float(), dim=1, p=2)
    return -(p * z).sum(dim=1).mean()


def p2p_loss(predictions: tuple[Tensor, Tensor], projections: tuple[Tensor, Tensor]) -> Tensor:
    """Symmetrised negative cosine between aligned pixel predictions and projections.

    Args:
        predictions: ``(p_1, p_2)``, predictor outputs of views 0 and 1, each (B, D, G, G).
        projections: ``(z_1, z_2)``, projections of views 0 and 1 at the same positions, each
            (B, D, G, G); not differentiated.

    Returns:
        A scalar tensor in [-1, 1].

    Raises:
        ValueError: If the four shapes differ.
    """
    p1, p2 = predictions
    z1, z2 = projections
    if not p1.shape == p2.shape == z1.shape == z2.shape:
        raise ValueError(
            f"P2P inputs must share one shape, got {[tuple(t.shape) for t in (p1, p2, z1, z2)]}"
        )
    return 0.5 * (_negative_cosine(p1, z2) + _negative_cosine(p2, z1))
