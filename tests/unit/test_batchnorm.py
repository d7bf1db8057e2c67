"""Re-estimated BN statistics: the exact mean and (unbiased) variance of each layer's inputs."""

import torch
from torch import nn

from lussray.models.batchnorm import recalibrate_batchnorm


def test_statistics_are_the_average_over_the_batches_and_nothing_else_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    model.eval()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k}
    batches = [torch.randn(5, 3, 6, 6) * 3 + 1 for _ in range(3)]
    assert recalibrate_batchnorm(model, batches) == 3
    conv_out = torch.stack([model[0](b) for b in batches])  # (3 batches, 5, 4, 6, 6)
    expected_mean = conv_out.mean(dim=(1, 3, 4)).mean(0)
    expected_var = conv_out.transpose(1, 2).reshape(3, 4, -1).var(dim=2, unbiased=True).mean(0)
    torch.testing.assert_close(model[1].running_mean, expected_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, expected_var, rtol=1e-4, atol=1e-5)
    assert not model.training and model[1].momentum == 0.1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_batchnorm(model, []) == 0  # no batch: untouched
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
