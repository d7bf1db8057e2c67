import pytest
import torch

from lussray.methods.p2p_loss import p2p_loss
from lussray.models.pass_model import sample_at_grid


def _grid(batch, size, generator):
    return torch.rand(batch, size, size, 2, generator=generator) * 2 - 1


def test_identical_aligned_features_give_the_minimum():
    z = torch.randn(2, 4, 3, 3)
    assert p2p_loss((z, z), (z, z)).item() == pytest.approx(-1.0)
    assert p2p_loss((-z, -z), (z, z)).item() == pytest.approx(1.0)


def test_stop_gradient_on_projections():
    p1, p2, z1, z2 = (torch.randn(2, 4, 3, 3, requires_grad=True) for _ in range(4))
    p2p_loss((p1, p2), (z1, z2)).backward()
    assert p1.grad is not None and p2.grad is not None
    assert z1.grad is None and z2.grad is None


def test_against_explicit_mean_over_positions():
    p1, p2, z1, z2 = (torch.randn(2, 4, 3, 3, dtype=torch.float64) for _ in range(4))
    total = 0.0
    for b in range(2):
        for i in range(3):
            for j in range(3):
                total += torch.cosine_similarity(p1[b, :, i, j], z2[b, :, i, j], dim=0).item()
                total += torch.cosine_similarity(p2[b, :, i, j], z1[b, :, i, j], dim=0).item()
    assert p2p_loss((p1, p2), (z1, z2)).item() == pytest.approx(-total / (2 * 2 * 9), rel=1e-5)


def test_non_overlapping_positions_sample_zeros_and_add_nothing():
    features = torch.randn(1, 4, 5, 5)
    grid = torch.full((1, 2, 2, 2), -2.0)
    sampled = sample_at_grid(features, grid)
    assert torch.all(sampled == 0)
    p = torch.randn(1, 4, 2, 2)
    assert p2p_loss((p, p), (sampled, sampled)).item() == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_invariant_to_flip_handling(seed):
    # A horizontally flipped view with its grid's x mirrored samples the same points.
    generator = torch.Generator().manual_seed(seed)
    f1, f2 = torch.randn(2, 3, 6, 7, 7, generator=generator)
    g1, g2 = _grid(3, 4, generator), _grid(3, 4, generator)
    z1, z2 = sample_at_grid(f1, g1), sample_at_grid(f2, g2)
    loss = p2p_loss((z1 * 2 + 1, z2 * 2 + 1), (z1, z2))

    g2_flipped = g2.clone()
    g2_flipped[..., 0] = -g2_flipped[..., 0]
    z2_flipped = sample_at_grid(f2.flip(-1), g2_flipped)
    torch.testing.assert_close(z2_flipped, z2)
    torch.testing.assert_close(p2p_loss((z1 * 2 + 1, z2_flipped * 2 + 1), (z1, z2_flipped)), loss)


def test_shape_mismatch():
    with pytest.raises(ValueError):
        p2p_loss((torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)), (torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 3, 3)))
