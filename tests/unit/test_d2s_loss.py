import pytest
import torch
import torch.nn.functional as F

from lussray.methods.d2s_loss import d2s_loss
from lussray.models.pass_model import PASSModel




def test_cross_view_against_explicit_formula():
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(3, 5, generator=generator, dtype=torch.float64) for _ in range(2)]
    codes = [F.softmax(torch.randn(3, 5, generator=generator, dtype=torch.float64), dim=1) for _ in range(2)]
    expected = 0.0
    for q, other in ((codes[0], logits[1]), (codes[1], logits[0])):  # the code of view t -> the other view
        expected += -(q * F.log_softmax(other / 0.1, dim=1)).sum(dim=1).mean().item() / 2
    assert d2s_loss(logits, codes, (0, 1), 0.1).item() == pytest.approx(expected, rel=1e-6)


def test_shapes_and_no_gradient_to_prototypes():
    torch.manual_seed(0)
    model = PASSModel("resnet18", hidden_dim=16, feat_dim=8, num_prototypes=6, shallow_stages=(3, 2))
    views = [torch.randn(3, 3, 64, 64) for _ in range(2)]
    out = model(views)
    assert list(out.shallow_logits) == [3, 2]
    assert all(len(v) == 2 and v[0].shape == (3, 6) for v in out.shallow_logits.values())
    codes = [F.softmax(torch.randn(3, 6), dim=1) for _ in range(2)]
    loss = sum(d2s_loss(logits, codes) for logits in out.shallow_logits.values())
    loss.backward()
    assert model.prototypes.weight.grad is None
    assert model.shallow_heads["3"].image[0].weight.grad is not None
    assert model.backbone.layer3[0].conv1.weight.grad is not None
    assert model.backbone.layer4[0].conv1.weight.grad is None  # D2S of stage 3 stops at layer3


def test_bad_inputs():
    logits, codes = [torch.zeros(2, 3)] * 2, [torch.zeros(2, 3)] * 2
    with pytest.raises(ValueError):
        d2s_loss(logits, codes[:1], (0, 1))
    with pytest.raises(ValueError):
        d2s_loss(logits, codes, (0, 2))
    with pytest.raises(ValueError):
        d2s_loss(logits[:1], codes[:1], (0,))
