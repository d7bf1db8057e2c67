import pytest
import torch

from lussray.optim.lars import LARS


def _hand_step(w, g, lr, wd, trust=0.001, eps=1e-8):
    w_norm, g_norm = w.norm(), g.norm()
    local = trust * w_norm / (g_norm + wd * w_norm + eps)
    return w - lr * local * (g + wd * w)


@pytest.mark.parametrize("wd", [0.0, 1e-6, 0.1])
def test_one_step_against_hand_computation(wd):
    w0 = torch.tensor([[3.0, -4.0], [1.0, 2.0]])
    g = torch.tensor([[0.5, 0.25], [-1.0, 0.0]])
    p = torch.nn.Parameter(w0.clone())
    p.grad = g.clone()
    LARS([p], lr=0.6, momentum=0.9, weight_decay=wd).step()
    torch.testing.assert_close(p.data, _hand_step(w0, g, 0.6, wd))


def test_momentum_second_step():
    w0, g = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([0.3, 0.0, -0.4])
    p = torch.nn.Parameter(w0.clone())
    optimizer = LARS([p], lr=0.5, momentum=0.9, weight_decay=0.01)
    p.grad = g.clone()
    optimizer.step()
    w1 = p.data.clone()
    d0 = 0.001 * w0.norm() / (g.norm() + 0.01 * w0.norm() + 1e-8) * (g + 0.01 * w0)
    d1 = 0.001 * w1.norm() / (g.norm() + 0.01 * w1.norm() + 1e-8) * (g + 0.01 * w1)
    p.grad = g.clone()
    optimizer.step()
    torch.testing.assert_close(p.data, w1 - 0.5 * (0.9 * d0 + d1))


def test_zero_norm_params_take_the_raw_gradient_without_decay():
    p = torch.nn.Parameter(torch.zeros(3))  # e.g. a BN bias at init
    p.grad = torch.tensor([1.0, -2.0, 0.5])
    LARS([p], lr=0.1, weight_decay=0.5).step()
    torch.testing.assert_close(p.data, -0.1 * torch.tensor([1.0, -2.0, 0.5]))


def test_params_without_gradient_are_untouched_and_plain_sgd_groups():
    frozen = torch.nn.Parameter(torch.ones(2))
    plain = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    plain.grad = torch.tensor([1.0, 0.0])
    LARS([{"params": [frozen]}, {"params": [plain], "lars": False}], lr=0.1, weight_decay=0.5).step()
    assert torch.equal(frozen.data, torch.ones(2))
    torch.testing.assert_close(plain.data, torch.tensor([1.0, 1.0]) - 0.1 * torch.tensor([1.5, 0.5]))


def test_clip_mode():
    w0, g = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0])
    p = torch.nn.Parameter(w0.clone())
    p.grad = g.clone()
    LARS([p], lr=1e-4, trust_coefficient=0.001, clip=True).step()
    local = min(0.001 * 5.0 / (1.0 + 1e-8) / 1e-4, 1.0)  # 50 -> clipped to 1
    torch.testing.assert_close(p.data, w0 - 1e-4 * local * g)


def test_state_dict_round_trip():
    p = torch.nn.Parameter(torch.ones(2))
    optimizer = LARS([p], lr=0.1)
    p.grad = torch.ones(2)
    optimizer.step()
    restored = LARS([p], lr=0.1)
    restored.load_state_dict(optimizer.state_dict())
    torch.testing.assert_close(restored.state[p]["momentum_buffer"], optimizer.state[p]["momentum_buffer"])
