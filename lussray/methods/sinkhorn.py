"""Sinkhorn-Knopp equipartition of prototype scores into soft codes, as in SwAV.

Implements the online code computation of Section 3.1 of [0] (eq. (3)-(5) there): the codes Q
maximise ``Tr(Q^T C^T Z) + eps * H(Q)`` over the transportation polytope whose prototype marginal
is uniform (1/K) and whose sample marginal is uniform (1/B), approximated by a few
Sinkhorn-Knopp iterations. PASS [1] uses it unchanged (eps = 0.05, 3 iterations) for both the
image-level loss and the deep-to-shallow targets.

With ``distributed=True`` and an initialised process group, the sums over the batch are
all-reduced, so B is the global batch and the result equals the single-process codes of the
concatenated batch (the reference's ``distributed_sinkhorn``).

References:
    - [0]: SwAV, 2020, arXiv:2006.09882.
    - [1]: PASS / ImageNet-S, "Large-scale Unsupervised Semantic Segmentation", TPAMI 2022,
      arXiv:2106.03149.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _all_reduce(tensor: Tensor, distributed: bool, reduce_max: bool = False) -> Tensor:
    # Collectives run only when asked for and when a process group exists, so the block works
    # unchanged in a single process.
    if distributed and dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if reduce_max else dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.05, num_iters: int = 3, distributed: bool = False) -> Tensor:
    """Soft codes of a batch of prototype scores.

    Q = exp(scores / eps).T is K x B; it is scaled to total mass 1, then each iteration scales
    the rows (prototypes) to sum to 1/K and then the columns (samples) to sum to 1/B. The columns
    are exact after the last iteration, the rows approach 1/K as iterations grow. The result is
    multiplied by B, as SwAV does, so each returned row is a probability vector over prototypes.

    The global maximum score is subtracted before the exponential; this cancels in the first
    normalisation, so the codes are the reference's, but large ``scores / eps`` cannot overflow.
    Computation is in float32 whatever the input dtype (AMP).

    Args:
        scores: Prototype scores, (B, K); with a queue, the queue rows come first.
        epsilon: Entropic regularisation eps (0.05 in SwAV and PASS).
        num_iters: Number of Sinkhorn-Knopp iterations (3).
        distributed: All-reduce the batch sums across workers when torch.distributed is
            initialised; B is then the global number of rows.

    Returns:
        Codes, (B, K) float32, each row summing to 1.

    Raises:
        ValueError: If ``scores`` is not 2-D or ``num_iters`` is negative.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, K), got shape {tuple(scores.shape)}")
    if num_iters < 0:
        raise ValueError(f"num_iters must be >= 0, got {num_iters}")
    scores = scores.detach().float()
    shift = _all_reduce(scores.max().clone(), distributed, reduce_max=True)
    q = torch.exp((scores - shift) / epsilon).t()  # K x B
    num_prototypes = q.shape[0]
    num_samples = _all_reduce(torch.tensor(float(q.shape[1]), device=q.device), distributed)
    q /= _all_reduce(q.sum(), distributed)
    for _ in range(num_iters):
        # Prototype marginal: every row sums to 1/K (over the global batch).
        q /= _all_reduce(q.sum(dim=1, keepdim=True), distributed)
        q /= num_prototypes
        # Sample marginal: every column sums to 1/B; columns are local, no collective needed.
        q /= q.sum(dim=0, keepdim=True)
        q /= num_samples
    q *= num_samples
    return q.t()
