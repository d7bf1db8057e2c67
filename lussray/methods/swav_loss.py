"""The SwAV swapped-prediction loss, the image-to-image term L_i2i of PASS.

Implements eq. (1)-(2) of [0] (the SwAV paper; eq. (1) of the PASS paper is the evaluation
matching matrix, not this loss): for each crop t used for assignment, its codes q_t come from
Sinkhorn-Knopp on its prototype scores (optionally with the scores of queued embeddings of earlier
batches prepended, so the equipartition covers more samples than one batch); every other crop s
predicts them, ``l(z_s, q_t) = -sum_k q_t^(k) log softmax(z_s^T c / tau)^(k)``. The loss averages
over the other crops and then over the assignment crops, as the reference does. PASS [1] uses it
as its image-level loss (the L_i2i of eq. (5)) and reuses the codes as the D2S targets (eq. (4)).

References:
    - [0]: SwAV, 2020, arXiv:2006.09882.
    - [1]: PASS / ImageNet-S, "Large-scale Unsupervised Semantic Segmentation", TPAMI 2022,
      arXiv:2106.03149.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lussray.methods.sinkhorn import sinkhorn


def cross_entropy_to_codes(codes: Tensor, logits: Tensor, temperature: float) -> Tensor:
    """Mean over the batch of ``-sum_k codes_k * log_softmax(logits / temperature)_k``.

    Args:
        codes: Soft targets, (B, K), rows summing to 1; not differentiated.
        logits: Prototype scores of the predicting crop, (B, K).
        temperature: Softmax temperature tau (0.1).

    Returns:
        A scalar tensor.
    """
    log_probs = F.log_softmax(logits.float() / temperature, dim=1)
    return -(codes.detach() * log_probs).sum(dim=1).mean()


class SwAVLoss(nn.Module):
    """SwAV swapped prediction with Sinkhorn codes; ``forward`` has no side effects.

    The queue itself lives in :class:`lussray.methods.queue.FeatureQueue`; the caller passes the
    queue's scores in.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        assign_crops: Sequence[int] = (0, 1),
        distributed: bool = True,
    ) -> None:
        """Store the hyperparameters.

        Args:
            temperature: Softmax temperature tau of the predictions (0.1).
            sinkhorn_epsilon: Sinkhorn regularisation eps (0.05).
            sinkhorn_iterations: Sinkhorn iterations (3).
            assign_crops: Indices of the crops whose codes are predicted (the two global views).
            distributed: Let Sinkhorn all-reduce over workers when a process group exists.
        """
        super().__init__()
        self.temperature = temperature
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.assign_crops = tuple(int(c) for c in assign_crops)
        self.distributed = distributed

    @torch.no_grad()
    def codes(self, scores: Tensor, queue_scores: Tensor | None = None) -> Tensor:
        """Sinkhorn codes of one assignment crop.

        Args:
            scores: Prototype scores of the crop, (B, K).
            queue_scores: Scores of the queued embeddings, (L, K), prepended before Sinkhorn;
                None for no queue.

        Returns:
            Codes of the B batch rows, (B, K), each row summing to 1.
        """
        batch = scores.shape[0]
        rows = scores.detach().float()
        if queue_scores is not None:
            rows = torch.cat((queue_scores.detach().float(), rows))
        return sinkhorn(rows, self.sinkhorn_epsilon, self.sinkhorn_iterations, self.distributed)[-batch:]

    def forward(
        self, scores: Sequence[Tensor], queue_scores: Sequence[Tensor] | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Compute the loss.

        Args:
            scores: Per crop, prototype scores (B, K); all crops, global views first.
            queue_scores: Per assignment crop (same order as ``assign_crops``), the scores of its
                queued embeddings (L, K); None when the queue is not in use.

        Returns:
            ``(loss, codes)``: the scalar loss and, per assignment crop, its codes (B, K).

        Raises:
            ValueError: With fewer than two crops, an assignment crop out of range, or a
                ``queue_scores`` list of the wrong length.
        """
        num_crops = len(scores)
        if num_crops < 2:
            raise ValueError(f"swapped prediction needs at least 2 crops, got {num_crops}")
        if any(not 0 <= c < num_crops for c in self.assign_crops):
            raise ValueError(f"assign_crops {self.assign_crops} out of range for {num_crops} crops")
        if queue_scores is not None and len(queue_scores) != len(self.assign_crops):
            raise ValueError(f"expected {len(self.assign_crops)} queue score tensors, got {len(queue_scores)}")
        total = scores[0].new_zeros((), dtype=torch.float32)
        all_codes: list[Tensor] = []
        for i, crop in enumerate(self.assign_crops):
            q = self.codes(scores[crop], None if queue_scores is None else queue_scores[i])
            all_codes.append(q)
            others = [v for v in range(num_crops) if v != crop]
            total = total + sum(cross_entropy_to_codes(q, scores[v], self.temperature) for v in others) / len(others)
        return total / len(self.assign_crops), all_codes
