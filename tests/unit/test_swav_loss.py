import math

import pytest
import torch

from lussray.methods.swav_loss import SwAVLoss


def _reference_loss(scores, queue_scores, assign_crops, temperature, epsilon, iters):
    """Slow float64 transcription of SwAV's swapped prediction (eq. 1-2 of the SwAV paper)."""
    scores = [s.double().tolist() for s in scores]
    batch, num_prototypes = len(scores[0]), len(scores[0][0])
    total = 0.0
    for i, crop in enumerate(assign_crops):
        rows = (queue_scores[i].double().tolist() if queue_scores is not None else []) + scores[crop]
        n = len(rows)
        q = [[math.exp(rows[b][k] / epsilon) for b in range(n)] for k in range(num_prototypes)]  # K x n
        mass = sum(map(sum, q))
        q = [[v / mass for v in row] for row in q]
        for _ in range(iters):
            q = [[v / sum(row) / num_prototypes for v in row] for row in q]
            columns = [sum(q[k][b] for k in range(num_prototypes)) for b in range(n)]
            q = [[q[k][b] / columns[b] / n for b in range(n)] for k in range(num_prototypes)]
        codes = [[q[k][b] * n for k in range(num_prototypes)] for b in range(n - batch, n)]
        others = [v for v in range(len(scores)) if v != crop]
        subloss = 0.0
        for v in others:
            for b in range(batch):
                logits = [x / temperature for x in scores[v][b]]
                top = max(logits)
                log_norm = top + math.log(sum(math.exp(x - top) for x in logits))
                subloss -= sum(codes[b][k] * (logits[k] - log_norm) for k in range(num_prototypes)) / batch
        total += subloss / len(others)
    return total / len(assign_crops)


@pytest.mark.parametrize("num_crops", [2, 4])
@pytest.mark.parametrize("queue_length", [0, 6])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_against_float64_transcription(num_crops, queue_length, temperature):
    generator = torch.Generator().manual_seed(num_crops * 10 + queue_length)
    scores = [torch.rand(5, 7, generator=generator) * 2 - 1 for _ in range(num_crops)]
    queue = [torch.rand(queue_length, 7, generator=generator) * 2 - 1 for _ in range(2)] if queue_length else None
    loss, codes = SwAVLoss(temperature, 0.05, 3, (0, 1), distributed=False)(scores, queue)
    expected = _reference_loss(scores, queue, (0, 1), temperature, 0.05, 3)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert len(codes) == 2 and codes[0].shape == (5, 7)


def test_codes_carry_no_gradient_and_scores_do():
    scores = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    loss, codes = SwAVLoss()(scores)
    assert not any(c.requires_grad for c in codes)
    loss.backward()
    assert all(s.grad is not None and torch.isfinite(s.grad).all() for s in scores)


def test_bad_inputs():
    with pytest.raises(ValueError):
        SwAVLoss()([torch.randn(2, 3)])
    with pytest.raises(ValueError):
        SwAVLoss(assign_crops=(0, 3))([torch.randn(2, 3)] * 2)
    with pytest.raises(ValueError):
        SwAVLoss()([torch.randn(2, 3)] * 2, [torch.randn(4, 3)])
