"""LARS: SGD with momentum and a layer-wise adaptive learning rate, with apex LARC semantics.

The reference (SwAV [1] and PASS [2]) wraps ``torch.optim.SGD(momentum=0.9, weight_decay=wd)`` in
apex's ``LARC(trust_coefficient=0.001, clip=False)``. lussray writes the same update here, without
apex. For every parameter w with gradient g in a group with learning rate lr and weight decay wd:

    if ||w|| > 0 and ||g|| > 0:
        local = trust * ||w|| / (||g|| + wd * ||w|| + eps)    (local LR of [0], Algorithm 1)
        if clip: local = min(local / lr, 1)
        d = local * (g + wd * w)
    else:
        d = g                    # apex then applies no weight decay either
    buf = momentum * buf + d     (buf = d on the first step, as torch SGD)
    w = w - lr * buf

As apex LARC, the adaptation applies to every parameter, BatchNorm weights and biases included;
the reference excludes nothing, and neither does lussray by default. A param group may set
``lars=False`` to get plain SGD with momentum and weight decay for its parameters. Parameters
without a gradient are skipped entirely (no decay, no momentum), which is how the frozen
prototypes stay put.

References:
    - [0]: LARS, You et al., 2017, arXiv:1708.03888.
    - [1]: SwAV, 2020, arXiv:2006.09882.
    - [2]: PASS / ImageNet-S, "Large-scale Unsupervised Semantic Segmentation", TPAMI 2022,
      arXiv:2106.03149.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-parameter step is scaled by the LARC trust ratio."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        clip: bool = False,
        lars: bool = True,
    ) -> None:
        """Create the optimizer.

        Args:
            params: Parameters or param groups (a group may override any option below).
            lr: Learning rate; the loop sets it per step from the schedule.
            momentum: Momentum (0.9).
            weight_decay: Weight decay (1e-6 in PASS), added to the gradient before the scaling.
            trust_coefficient: LARC trust coefficient eta (0.001).
            eps: Added to the denominator of the trust ratio (apex: 1e-8).
            clip: apex's clip mode (``min(local / lr, 1)``); the reference uses False.
            lars: Apply the adaptation (False: plain SGD for the group).

        Raises:
            ValueError: On a negative hyperparameter.
        """
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient < 0 or eps < 0:
            raise ValueError(
                f"LARS hyperparameters must be >= 0: lr={lr} momentum={momentum} "
                f"weight_decay={weight_decay} trust_coefficient={trust_coefficient} eps={eps}"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            clip=clip,
            lars=lars,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one update to every parameter that has a gradient.

        Args:
            closure: Optional closure that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["lars"]:
                    update = self._adapted(p, grad, lr, wd, group["trust_coefficient"], group["eps"], group["clip"])
                else:
                    update = grad.add(p, alpha=wd) if wd else grad.clone()
                if momentum:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = update.clone()
                    else:
                        buf.mul_(momentum).add_(update)
                    update = buf
                p.add_(update, alpha=-lr)
        return loss

    @staticmethod
    def _adapted(p: Tensor, grad: Tensor, lr: float, wd: float, trust: float, eps: float, clip: bool) -> Tensor:
        # Tensor arithmetic instead of Python branches: no device-to-host sync per parameter.
        w_norm = torch.linalg.vector_norm(p)
        g_norm = torch.linalg.vector_norm(grad)
        local = trust * w_norm / (g_norm + wd * w_norm + eps)
        if clip:
            local = torch.clamp(local / lr, max=1.0)
        adapt = (w_norm > 0) & (g_norm > 0)
        return torch.where(adapt, grad.add(p, alpha=wd) * local, grad)
