"""Schedules as pure functions of the global step.

The reference (SwAV [0], PASS [1]) precomputes a per-iteration array: a linear warmup
``linspace(start_warmup, base_lr, warmup_iters)`` followed by a half-cosine from ``base_lr`` to
``final_lr`` over the remaining iterations. A streaming Ray Data shard has no reliable length, so
lussray computes the value from the step alone; the loop derives ``total_steps`` from the epoch
count and the (known) number of steps per epoch.

For steps after the warmup this equals the reference's array entry exactly
(``final + (base - final) * (1 + cos(pi * t / T)) / 2`` with t = step - warmup, T = total - warmup).
During warmup it rises linearly from ``warmup_start_value`` at step 0 and would reach the base value
at step ``warmup_steps``; ``linspace`` instead reaches it one step earlier. PASS uses no warmup.

References:
    - [0]: SwAV, 2020, arXiv:2006.09882.
    - [1]: PASS / ImageNet-S, "Large-scale Unsupervised Semantic Segmentation", TPAMI 2022,
      arXiv:2106.03149.
"""

from __future__ import annotations

import math


def cosine_schedule(
    step: int,
    *,
    total_steps: int,
    base_value: float,
    final_value: float,
    warmup_steps: int = 0,
    warmup_start_value: float = 0.0,
) -> float:
    """Value of a warmup + half-cosine schedule at a global step.

    Args:
        step: Global step, 0-based.
        total_steps: Steps of the whole run (warmup included); the value is ``final_value``
            from here on.
        base_value: Value at the end of the warmup (step ``warmup_steps``), e.g. lr 0.6.
        final_value: Value at ``total_steps``, e.g. lr 0.0006.
        warmup_steps: Length of the linear warmup (0: none).
        warmup_start_value: Value at step 0 when there is a warmup.

    Returns:
        The scheduled value.

    Raises:
        ValueError: If ``step`` or ``warmup_steps`` is negative or ``total_steps <= warmup_steps``.
    """
    if step < 0 or warmup_steps < 0 or total_steps <= warmup_steps:
        raise ValueError(
            f"need 0 <= step and 0 <= warmup_steps < total_steps, got {step}, {warmup_steps}, {total_steps}"
        )
    if step < warmup_steps:
        return warmup_start_value + (base_value - warmup_start_value) * step / warmup_steps
    if step >= total_steps:
        return final_value
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_value + 0.5 * (base_value - final_value) * (1.0 + math.cos(math.pi * progress))
