import math

import pytest
import torch

from lussray.models.cae import (
    MAPS_PER_CHUNK,
    ContextAwareEmbedding,
    context_aggregate,
    inverse_positive,
    positive,
    relation_map,
    rows_per_chunk,
)


def _inputs(batch=2, channels=3, height=3, width=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64)
    image = torch.rand(batch, 3, height, width, generator=generator, dtype=torch.float64)
    return features, image


OMEGA = torch.tensor([0.7, 1.3], dtype=torch.float64)
THETA = torch.tensor([0.4, 0.3, 0.2], dtype=torch.float64)


def _direct_relation(features, image, omega, theta):
    """P_ij = s_ij (w1 k1_ij + w2 k2_ij), Eqs. (7)-(9) of FS^4, one pixel pair at a time."""
    batch, channels, height, width = features.shape
    w1, w2 = (float(v) for v in omega)
    t1, t2, t3 = (float(v) for v in theta)
    side = max(height, width)
    pixels = [(r, c) for r in range(height) for c in range(width)]
    out = torch.zeros(batch, len(pixels), len(pixels), dtype=torch.float64)
    for b in range(batch):
        for i, (ri, ci) in enumerate(pixels):
            for j, (rj, cj) in enumerate(pixels):
                fi, fj = features[b, :, ri, ci], features[b, :, rj, cj]
                s = float(fi @ fj) / (float(fi.norm()) * float(fj.norm()))
                dp2 = ((ri - rj) / side) ** 2 + ((ci - cj) / side) ** 2
                dc2 = float(((image[b, :, ri, ci] - image[b, :, rj, cj]) ** 2).sum())
                k1 = math.exp(-dp2 / (2 * t1**2) - dc2 / (2 * t2**2))
                k2 = math.exp(-dp2 / (2 * t3**2))
                out[b, i, j] = s * (w1 * k1 + w2 * k2)
    return out


def _direct_context(features, relation):
    # sum_j P_ij f_j for every pixel i, (B, C, h, w).
    batch, channels, height, width = features.shape
    flat = features.reshape(batch, channels, -1)
    out = torch.zeros_like(flat)
    for b in range(batch):
        for i in range(flat.shape[2]):
            for j in range(flat.shape[2]):
                out[b, :, i] += relation[b, i, j] * flat[b, :, j]
    return out.reshape(features.shape)


def test_relation_map_matches_direct_evaluation_of_eqs_7_to_9():
    features, image = _inputs()
    expected = _direct_relation(features, image, OMEGA, THETA)
    torch.testing.assert_close(relation_map(features, image, OMEGA, THETA), expected)
    torch.testing.assert_close(relation_map(features, image, OMEGA, THETA, rows=slice(5, 9)), expected[:, 5:9])
    context = context_aggregate(features, image, OMEGA, THETA)
    torch.testing.assert_close(context, _direct_context(features, expected))


@pytest.mark.parametrize("chunk_rows", [1, 5, 7, 12, 100])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_chunked_context_and_gradients_equal_unchunked(chunk_rows, checkpoint):
    features, image = _inputs(height=3, width=4)
    results = []
    for rows, ckpt in ((None, False), (chunk_rows, checkpoint)):
        f = features.clone().requires_grad_()
        omega, theta = OMEGA.clone().requires_grad_(), THETA.clone().requires_grad_()
        out = context_aggregate(f, image, omega, theta, chunk_rows=rows, checkpoint=ckpt)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        results.append((out.detach(), f.grad, omega.grad, theta.grad))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


def test_module_with_equal_strides_is_the_refinement_formula():
    features, image = _inputs(channels=4, height=2, width=3)
    cae = ContextAwareEmbedding(4, relation_stride=4, out_stride=4, init_omega=(0.7, 1.3), init_theta=(0.4, 0.3, 0.2))
    cae = cae.double()
    big_image = image.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # (B, 3, 8, 12); area-shrinks back
    refined = cae(features, big_image)
    relation = _direct_relation(features, image, cae.omega.detach(), cae.theta.detach())
    expected = cae.h(features) + _direct_context(features, relation)
    torch.testing.assert_close(refined, expected)


def test_module_shapes_strides_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    cae = ContextAwareEmbedding(8, chunk_bytes=1)  # one query row per chunk
    features = torch.randn(2, 8, 16, 12, requires_grad=True)  # the FPN's 1/4 of a 64 x 48 image
    image = torch.rand(2, 3, 64, 48)
    refined = cae(features, image)
    assert refined.shape == (2, 8, 8, 6)  # 1/8; relations at 1/16 = 4 x 3
    refined.pow(2).mean().backward()
    for name, param in cae.named_parameters():
        assert param.grad is not None and torch.all(torch.isfinite(param.grad)), name
        assert param.grad.abs().sum() > 0, name
    assert features.grad.abs().sum() > 0


def test_parameters_stay_positive_after_a_step_that_pushes_them_negative():
    cae = ContextAwareEmbedding(2)
    before = (cae.raw_omega.detach().clone(), cae.raw_theta.detach().clone())
    (cae.omega.sum() + cae.theta.sum()).backward()  # gradient descent lowers every value
    with torch.no_grad():  # one plain SGD step, lr 1e4
        for param in (cae.raw_omega, cae.raw_theta):
            param -= 1e4 * param.grad
    assert torch.all(cae.raw_omega < before[0] - 100) and torch.all(cae.raw_theta < before[1] - 100)
    assert torch.all(cae.omega > 0) and torch.all(cae.theta > 0)
    out = cae(torch.randn(1, 2, 4, 4), torch.rand(1, 3, 32, 32))  # t at its floor: still finite
    assert torch.all(torch.isfinite(out))


@pytest.mark.parametrize("value", [1e-3, 0.05, 1.0, 40.0])
def test_inverse_positive_round_trips(value):
    assert positive(torch.tensor(inverse_positive(value), dtype=torch.float64)).item() == pytest.approx(value, rel=1e-9)
    with pytest.raises(ValueError):
        inverse_positive(0.0)


def test_rows_per_chunk_respects_the_budget():
    assert rows_per_chunk(128, 400, 64 * 2**20) == (64 * 2**20) // (MAPS_PER_CHUNK * 128 * 400 * 4)
    assert rows_per_chunk(1, 10, 2**40) == 10  # never more rows than pixels
    assert rows_per_chunk(4, 10**6, 1) == 1  # at least one row


def test_relations_run_in_float32_under_autocast():
    torch.manual_seed(0)
    cae = ContextAwareEmbedding(4)
    features, image = torch.randn(1, 4, 8, 8), torch.rand(1, 3, 32, 32)
    reference = cae(features, image)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = cae(features, image)
    assert mixed.dtype == torch.bfloat16 and torch.all(torch.isfinite(mixed.float()))
    torch.testing.assert_close(mixed.float(), reference, rtol=0.05, atol=0.05)
