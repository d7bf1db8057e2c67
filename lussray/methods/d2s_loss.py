"""The deep-to-shallow (D2S) supervision loss of PASS.

Implements eq. (4) of [0]: the Sinkhorn codes of the deep (last-stage) embedding of one global
view supervise the shallow-stage embedding of eq. (3) of the *other* global view, with the same
clustering loss as the image level (SwAV's swapped prediction [1]):

    L_d2s^s = mean over assignment crops t, other global views v of
              -sum_k q_t^(k) log softmax(h_v^s / tau)^(k),

where h_v^s are the shallow logits of view v at stage s, scored against the detached prototypes,
and tau = 0.1 (the reference reuses the SwAV temperature). With the two global views of PASS,
"the other view" is the single view v = 1 - t. Cross-view supervision is the paper's default
(Table IX(d) of [0]); same-view supervision over-fits.

The reference indexes its concatenated shallow logits by ``2 * (3 - stage)``, which is correct
only when the shallow stages are listed in decreasing order ([3, 2]); lussray keys them by stage.

References:
    - [0]: PASS / ImageNet-S, "Large-scale Unsupervised Semantic Segmentation", TPAMI 2022,
      arXiv:2106.03149.
    - [1]: SwAV, 2020, arXiv:2006.09882.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lussray.methods.swav_loss import cross_entropy_to_codes


def d2s_loss(
    shallow_logits: Sequence[Tensor],
    codes: Sequence[Tensor],
    assign_crops: Sequence[int] = (0, 1),
    temperature: float = 0.1,
) -> Tensor:
    """Cross-entropy of the other global views' shallow predictions against the deep codes.

    Args:
        shallow_logits: Per global view, the shallow logits of one stage, (B, K).
        codes: Per assignment crop, its deep Sinkhorn codes, (B, K) (from the SwAV loss).
        assign_crops: Global-view index of each entry of ``codes``.
        temperature: Softmax temperature tau (0.1).

    Returns:
        A scalar tensor.

    Raises:
        ValueError: If ``codes`` and ``assign_crops`` differ in length, an assignment crop is not
            a global view, or there is no other global view.
    """
    num_global = len(shallow_logits)
    if len(codes) != len(assign_crops):
        raise ValueError(f"{len(codes)} code tensors for {len(assign_crops)} assignment crops")
    if not assign_crops or num_global < 2 or any(not 0 <= c < num_global for c in assign_crops):
        raise ValueError(f"assign_crops {tuple(assign_crops)} must index {num_global} (>= 2) global views")
    total: Tensor | None = None
    for q, crop in zip(codes, assign_crops):
        others = [v for v in range(num_global) if v != crop]
        term = sum(cross_entropy_to_codes(q, shallow_logits[v], temperature) for v in others) / len(others)
        total = term if total is None else total + term
    assert total is not None
    return total / len(assign_crops)
