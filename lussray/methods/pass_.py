"""The PASS representation-learning method (stage 1): SwAV + P2P alignment + D2S supervision.

Implements the training objective of eq. (5) of [0],

    L = (w_0 L_i2i + sum_i w_{1+i} L_d2s^{s_i}) / sum(w) + w_p2p L_p2p,

with L_i2i the SwAV swapped-prediction loss ([1], :mod:`lussray.methods.swav_loss`), L_d2s the
deep-to-shallow loss of eq. (4) (:mod:`lussray.methods.d2s_loss`) and L_p2p the pixel-to-pixel
alignment of eq. (2) (:mod:`lussray.methods.p2p_loss`). The reference weights are w = (1, 1)
(image, stage 3) and w_p2p = 1.

The method supplies hooks to the shared training loop, which owns everything else (schedules,
AMP, the optimizer, checkpoints)::

    method.before_step(model, step)        # prototypes back on the unit sphere
    loss, logs = method.training_step(model, views, grids, step, epoch)
    loss.backward()
    method.after_backward(model, step)     # prototypes frozen during the first steps
    optimizer.step()

The method is an ``nn.Module`` so that its state, the SwAV queue, is in its ``state_dict``. Keep
it out of DDP (see :mod:`lussray.methods.queue`) and move it to the model's device.

References:
    - [0]: PASS / ImageNet-S, "Large-scale Unsupervised Semantic Segmentation", TPAMI 2022,
      arXiv:2106.03149.
    - [1]: SwAV, 2020, arXiv:2006.09882.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lussray.methods.d2s_loss import d2s_loss
from lussray.methods.p2p_loss import p2p_loss
from lussray.methods.queue import FeatureQueue
from lussray.methods.swav_loss import SwAVLoss
from lussray.models.heads import Prototypes


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def _prototypes(model: nn.Module) -> Prototypes:
    prototypes = getattr(unwrap(model), "prototypes", None)
    if not isinstance(prototypes, Prototypes):
        raise TypeError(f"{type(unwrap(model)).__name__} has no Prototypes attribute 'prototypes'")
    return prototypes


class PASSMethod(nn.Module):
    """Losses, hyperparameters and the queue of PASS pretraining.

    Attributes:
        queue: The per-worker :class:`~lussray.methods.queue.FeatureQueue` (persistent state).
        swav: The :class:`~lussray.methods.swav_loss.SwAVLoss` block.
    """

    def __init__(
        self,
        *,
        feat_dim: int,
        temperature: float = 0.1,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        assign_crops: Sequence[int] = (0, 1),
        queue_length_per_worker: int = 0,
        queue_start_epoch: int = 15,
        freeze_prototypes_steps: int = 0,
        loss_weights: Sequence[float] = (1.0, 1.0),
        p2p_weight: float = 1.0,
        distributed: bool = True,
    ) -> None:
        """Configure the method.

        Args:
            feat_dim: Embedding dimension D (for the queue).
            temperature: Softmax temperature of SwAV and D2S (0.1).
            sinkhorn_epsilon: Sinkhorn regularisation (0.05).
            sinkhorn_iterations: Sinkhorn iterations (3).
            assign_crops: Crops whose codes are predicted: the two global views.
            queue_length_per_worker: Queue rows per assignment crop on this worker (the global
                ``queue_length`` rounded down to a multiple of the global batch, divided by the
                number of workers); 0 disables the queue.
            queue_start_epoch: First epoch (0-based) of the queue (15 in the reference).
            freeze_prototypes_steps: Global steps (0-based, counted across epochs) during which
                the prototypes receive no update (1001 for S50, 5005 for S300/S919).
            loss_weights: ``(w_0, w_1, ...)``: the image-level weight, then one weight per shallow
                stage in the model's ``shallow_stages`` order.
            p2p_weight: Weight of the P2P term, added outside the weighted mean (1.0).
            distributed: All-reduce Sinkhorn sums across workers when a process group exists.

        Raises:
            ValueError: If ``loss_weights`` is empty or sums to zero.
        """
        super().__init__()
        if not loss_weights or sum(loss_weights) <= 0:
            raise ValueError(f"loss_weights must be non-empty with a positive sum, got {list(loss_weights)}")
        self.assign_crops = tuple(int(c) for c in assign_crops)
        self.temperature = temperature
        self.freeze_prototypes_steps = freeze_prototypes_steps
        self.loss_weights = tuple(float(w) for w in loss_weights)
        self.p2p_weight = p2p_weight
        self.swav = SwAVLoss(temperature, sinkhorn_epsilon, sinkhorn_iterations, self.assign_crops, distributed)
        self.queue = FeatureQueue(len(self.assign_crops), queue_length_per_worker, feat_dim, queue_start_epoch)

    def before_step(self, model: nn.Module, step: int) -> None:
        """Normalise the prototypes; call before every forward pass (the reference does).

        Args:
            model: The PASS model, possibly DDP-wrapped.
            step: Global step (unused; part of the hook signature).
        """
        _prototypes(model).normalize_()

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Drop the prototype gradients while ``step < freeze_prototypes_steps``.

        Call after ``backward`` and before the optimizer step (and before gradient clipping).

        Args:
            model: The PASS model, possibly DDP-wrapped.
            step: Global step, 0-based.
        """
        if step < self.freeze_prototypes_steps:
            _prototypes(model).cancel_gradients()

    def training_step(
        self,
        model: nn.Module,
        views: Sequence[Tensor],
        grids: tuple[Tensor, Tensor] | None,
        step: int,
        epoch: int,
    ) -> tuple[Tensor, dict[str, float]]:
        """Forward the views and compute the total loss of eq. (5) of [0].

        Side effect: once the queue is active (``epoch >= queue_start_epoch``), the embeddings of
        the assignment crops are pushed into it after its scores were taken.

        Args:
            model: A :class:`~lussray.models.pass_model.PASSModel`, possibly DDP-wrapped.
            views: Normalised float views, each (B, 3, S_v, S_v), the two global views first.
            grids: P2P grids of global views 0 and 1, each (B, G, G, 2); None skips P2P.
            step: Global step, 0-based (unused by the loss).
            epoch: Epoch, 0-based (decides whether the queue is pushed and used).

        Returns:
            ``(loss, logs)``: the scalar loss to back-propagate and float terms ``loss``,
            ``loss_i2i``, ``loss_d2s<stage>`` per shallow stage, ``loss_p2p`` (when grids were
            given) and ``queue_in_use`` (0 or 1).

        Raises:
            ValueError: If the model's shallow stages do not match ``loss_weights``.
        """
        out = model(views, grids)
        if len(out.shallow_logits) != len(self.loss_weights) - 1:
            raise ValueError(
                f"loss_weights {list(self.loss_weights)} need {len(self.loss_weights) - 1} shallow stages, "
                f"the model has {sorted(out.shallow_logits)}"
            )
        # Queue scores use the current (normalised) prototypes; the batch is pushed afterwards,
        # so it never meets itself in the queue.
        use_queue = self.queue.usable(epoch)
        queue_scores = None
        if use_queue:
            with torch.no_grad():
                prototypes = _prototypes(model).weight.detach().float()
                queue_scores = [rows.float() @ prototypes.t() for rows in self.queue.embeddings]
        loss_i2i, codes = self.swav(out.scores, queue_scores)
        if self.queue.active(epoch):
            self.queue.push(torch.stack([out.embeddings[c].detach() for c in self.assign_crops]))

        terms: dict[str, Tensor] = {"loss_i2i": loss_i2i}
        weighted = self.loss_weights[0] * loss_i2i
        for weight, (stage, logits) in zip(self.loss_weights[1:], out.shallow_logits.items()):
            terms[f"loss_d2s{stage}"] = d2s_loss(logits, codes, self.assign_crops, self.temperature)
            weighted = weighted + weight * terms[f"loss_d2s{stage}"]
        loss = weighted / sum(self.loss_weights)
        if out.pixel_predictions is not None and out.pixel_projections is not None:
            terms["loss_p2p"] = p2p_loss(out.pixel_predictions, out.pixel_projections)
            loss = loss + self.p2p_weight * terms["loss_p2p"]

        # One device-to-host copy for all logged values.
        names = ["loss", *terms]
        values = torch.stack([loss.detach().float(), *(t.detach().float() for t in terms.values())]).tolist()
        logs = dict(zip(names, values))
        logs["queue_in_use"] = float(use_queue)
        return loss, logs
