"""Re-estimating the running statistics of a network's BatchNorm layers on given inputs ("precise BN").

The running statistics of an untrained network (mean 0, variance 1), or of one trained on inputs
of another scale, make its eval-mode features a poor stand-in for what the network computes in
training. :func:`recalibrate_batchnorm` replaces them by the exact mean and variance of each BN
layer's inputs over the batches given (a cumulative average, as BN's ``momentum=None``), leaving
every weight as it was. PiCIE's ``initial_kmeans`` baseline clusters the untrained network's
features this way (lussray.stages.picie.initial_checkpoint).

This module is pure: no Ray.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that track running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Set every BN layer's running mean and variance to the average over ``batches``.

    Each batch is one forward pass in train mode; the layers average the batch statistics with
    equal weights (``momentum=None``). The model's mode and the layers' momenta are restored.

    Args:
        model: The network (not DDP-wrapped).
        batches: Model inputs.

    Returns:
        The number of batches seen (0 leaves the statistics untouched).
    """
    layers = batchnorm_layers(model)
    saved = [(layer.momentum, layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone())
             for layer in layers]
    training = model.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average of the batch statistics
    model.train()
    count = 0
    try:
        for batch in batches:
            model(batch)
            count += 1
    finally:
        for layer, (momentum, mean, var, tracked) in zip(layers, saved):
            layer.momentum = momentum
            if count == 0:
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
                layer.num_batches_tracked.copy_(tracked)
        model.train(training)
    return count


__all__ = ["batchnorm_layers", "recalibrate_batchnorm"]
