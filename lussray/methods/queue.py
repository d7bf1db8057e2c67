"""The per-worker FIFO queue of image embeddings used by SwAV's Sinkhorn step.

With small batches, one batch is too few samples to spread over thousands of prototypes; SwAV [0]
(Section 4.1, "small batches") keeps the embeddings of recent batches and prepends their scores
to the batch before Sinkhorn. PASS [1] keeps the reference behaviour:

- one queue per assignment crop and per worker, of ``queue_length // world_size`` rows (the
  global length is first rounded down to a multiple of the global batch);
- created at ``queue_start_epoch`` (15 for pretraining, 0 for pixel attention) and pushed every
  step from then on, newest rows first;
- used for Sinkhorn only once full (the reference tests that its last row is non-zero).

The queue is a persistent buffer, so it is part of ``state_dict`` and a resumed run gets it back
(the reference saves ``queue{rank}.pth`` next to the checkpoint). It is per worker: each worker
holds different rows, so a checkpoint must keep every worker's queue, and the queue must not sit
inside a DDP-wrapped module, whose buffer broadcast would overwrite all queues with rank 0's.

References:
    - [0]: SwAV, 2020, arXiv:2006.09882.
    - [1]: PASS / ImageNet-S, "Large-scale Unsupervised Semantic Segmentation", TPAMI 2022,
      arXiv:2106.03149.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FeatureQueue(nn.Module):
    """FIFO queue of L2-normalised embeddings, one row block per assignment crop.

    Buffers (persistent): ``embeddings`` (num_assign_crops, length_per_worker, feat_dim), newest
    row first, and ``num_pushed`` (scalar int64), the number of rows pushed so far, capped at
    the length.
    """

    embeddings: Tensor
    num_pushed: Tensor

    def __init__(self, num_assign_crops: int, length_per_worker: int, feat_dim: int, start_epoch: int = 0) -> None:
        """Create an empty queue.

        Args:
            num_assign_crops: Number of assignment crops (2).
            length_per_worker: Rows per crop on this worker; 0 disables the queue.
            feat_dim: Embedding dimension D.
            start_epoch: First epoch (0-based) in which the queue is pushed.

        Raises:
            ValueError: If a size is negative.
        """
        super().__init__()
        if num_assign_crops < 1 or length_per_worker < 0 or feat_dim < 1 or start_epoch < 0:
            raise ValueError(
                f"bad queue shape: crops={num_assign_crops} length={length_per_worker} "
                f"feat_dim={feat_dim} start_epoch={start_epoch}"
            )
        self.length = length_per_worker
        self.start_epoch = start_epoch
        self.register_buffer("embeddings", torch.zeros(num_assign_crops, length_per_worker, feat_dim))
        self.register_buffer("num_pushed", torch.zeros((), dtype=torch.long))

    def active(self, epoch: int) -> bool:
        """Whether the queue exists in ``epoch`` (is non-empty in size and started): push then."""
        return self.length > 0 and epoch >= self.start_epoch

    @property
    def filled(self) -> bool:
        """Whether every row holds a pushed embedding (reads one scalar from the device)."""
        return self.length > 0 and int(self.num_pushed.item()) >= self.length

    def usable(self, epoch: int) -> bool:
        """Whether Sinkhorn should use the queue in ``epoch``: started and full."""
        return self.active(epoch) and self.filled

    @torch.no_grad()
    def push(self, embeddings: Tensor) -> None:
        """Insert a batch at the front, dropping the oldest rows.

        Args:
            embeddings: (num_assign_crops, B, feat_dim); stored detached, in the queue's dtype.

        Raises:
            ValueError: On a shape mismatch.
        """
        crops, length, dim = self.embeddings.shape
        if embeddings.dim() != 3 or embeddings.shape[0] != crops or embeddings.shape[2] != dim:
            raise ValueError(f"expected ({crops}, B, {dim}) embeddings, got {tuple(embeddings.shape)}")
        if length == 0:
            return
        new = embeddings.detach().to(self.embeddings)[:, :length]
        batch = new.shape[1]
        self.embeddings[:, batch:] = self.embeddings[:, : length - batch].clone()
        self.embeddings[:, :batch] = new
        self.num_pushed.copy_(torch.clamp(self.num_pushed + batch, max=length))

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the queue."""
        self.embeddings.zero_()
        self.num_pushed.zero_()

    def extra_repr(self) -> str:
        """Shape and start epoch, for ``print(module)``."""
        crops, length, dim = self.embeddings.shape
        return f"crops={crops}, length_per_worker={length}, feat_dim={dim}, start_epoch={self.start_epoch}"
