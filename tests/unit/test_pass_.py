import pytest
import torch

from lussray.methods.pass_ import PASSMethod
from lussray.models.pass_model import PASSModel
from lussray.optim.lars import LARS




B, FEAT, HIDDEN, K, G = 4, 32, 64, 20, 7


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(B, 3, s, s, generator=generator) for s in (96, 96, 48, 48)]
    grids = tuple(torch.rand(B, G, G, 2, generator=generator) * 2 - 1 for _ in range(2))
    grids[0][0] = -2.0  # one pair of crops without overlap
    grids[1][0] = -2.0
    return views, grids


def _model():
    torch.manual_seed(0)
    return PASSModel("resnet18", hidden_dim=HIDDEN, feat_dim=FEAT, num_prototypes=K, shallow_stages=(3,))


def test_full_step_with_backward():
    model = _model()
    method = PASSMethod(feat_dim=FEAT, queue_length_per_worker=8, queue_start_epoch=0, freeze_prototypes_steps=0)
    method.before_step(model, step=0)
    loss, logs = method.training_step(model, *_batch(), step=0, epoch=0)
    assert set(logs) == {"loss", "loss_i2i", "loss_d2s3", "loss_p2p", "queue_in_use"}
    assert torch.isfinite(loss) and logs["loss"] == pytest.approx(loss.item())
    expected = (logs["loss_i2i"] + logs["loss_d2s3"]) / 2 + logs["loss_p2p"]
    assert logs["loss"] == pytest.approx(expected, rel=1e-5)
    assert -1.0 <= logs["loss_p2p"] <= 0.0 and logs["queue_in_use"] == 0.0
    loss.backward()
    method.after_backward(model, step=0)
    for module in (model.backbone.conv1, model.projection_head[0], model.prototypes, model.pixel_predictor[3]):
        assert module.weight.grad is not None and torch.isfinite(module.weight.grad).all()
    assert model.shallow_heads["3"].pixel[0].weight.grad is not None
    assert int(method.queue.num_pushed) == B


def test_queue_is_used_once_full_and_saved_in_state_dict():
    model = _model()
    method = PASSMethod(feat_dim=FEAT, queue_length_per_worker=2 * B, queue_start_epoch=1)
    views, grids = _batch()
    with torch.no_grad():
        assert method.training_step(model, views, grids, 0, epoch=0)[1]["queue_in_use"] == 0.0
        assert int(method.queue.num_pushed) == 0  # not started in epoch 0
        for step in range(2):
            method.training_step(model, views, grids, step, epoch=1)
        assert method.training_step(model, views, grids, 3, epoch=1)[1]["queue_in_use"] == 1.0
    assert {"queue.embeddings", "queue.num_pushed"} <= set(method.state_dict())


def test_prototypes_frozen_during_the_first_steps():
    model = _model()
    method = PASSMethod(feat_dim=FEAT, freeze_prototypes_steps=1)
    optimizer = LARS(model.parameters(), lr=0.5, weight_decay=1e-6)

    def step(index):
        method.before_step(model, index)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss, _ = method.training_step(model, *_batch(index), step=index, epoch=0)
        optimizer.zero_grad()
        loss.backward()
        method.after_backward(model, index)
        optimizer.step()
        return before

    before = step(0)
    assert torch.equal(model.prototypes.weight, before["prototypes.weight"])
    assert not torch.equal(model.projection_head[0].weight, before["projection_head.0.weight"])
    before = step(1)
    assert not torch.equal(model.prototypes.weight, before["prototypes.weight"])


def test_before_step_normalises_prototypes():
    model = _model()
    with torch.no_grad():
        model.prototypes.weight.mul_(5)
    PASSMethod(feat_dim=FEAT).before_step(model, 0)
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(K))


def test_weights_must_match_shallow_stages():
    method = PASSMethod(feat_dim=FEAT, loss_weights=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        method.training_step(_model(), *_batch(), step=0, epoch=0)
