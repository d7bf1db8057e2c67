import pytest
import torch
from torch import nn

from lussray.models.heads import (
    PixelAttention,
    PixelPredictor,
    PixelProjectionHead,
    ProjectionHead,
    Prototypes,
    SegmentationHead,
    ShallowHead,
)




def test_projection_head_layout():
    head = ProjectionHead(16, 24, 8)
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert head[1].affine and not head[4].affine
    assert head(torch.randn(5, 16)).shape == (5, 8)


def test_prototypes_have_no_bias_and_normalize_in_place():
    prototypes = Prototypes(8, 6)
    assert prototypes.bias is None and prototypes.weight.shape == (6, 8)
    with torch.no_grad():
        prototypes.weight.mul_(3.0)
    prototypes.normalize_()
    torch.testing.assert_close(prototypes.weight.norm(dim=1), torch.ones(6))
    assert prototypes.weight.grad is None and prototypes.weight.requires_grad


def test_prototypes_cancel_gradients():
    prototypes = Prototypes(4, 3)
    prototypes(torch.randn(2, 4)).sum().backward()
    assert prototypes.weight.grad is not None
    prototypes.cancel_gradients()
    assert prototypes.weight.grad is None


def test_pixel_heads_layout_and_shapes():
    projection = PixelProjectionHead(12, 16, 8)
    convs = [m for m in projection if isinstance(m, nn.Conv2d)]
    assert [c.bias for c in convs] == [None, None, None]
    assert not projection[7].affine
    assert projection(torch.randn(2, 12, 3, 3)).shape == (2, 8, 3, 3)
    predictor = PixelPredictor(8)
    assert predictor[0].bias is None and predictor[3].bias is not None
    assert predictor(torch.randn(2, 8, 3, 3)).shape == (2, 8, 3, 3)


def test_conv_and_bn_init():
    head = PixelProjectionHead(64, 64, 64)
    weight = head[0].weight  # fan_out = 64 -> std sqrt(2 / 64)
    assert abs(weight.std().item() - (2 / 64) ** 0.5) < 0.03
    assert torch.all(head[1].weight == 1) and torch.all(head[1].bias == 0)


def test_shallow_head_uses_detached_prototypes():
    head = ShallowHead(12, 16, 8)
    prototypes = Prototypes(8, 5)
    embedding, logits = head(torch.randn(4, 12, 3, 3), prototypes.weight)
    assert embedding.shape == (4, 8) and logits.shape == (4, 5)
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(4))
    logits.sum().backward()
    assert prototypes.weight.grad is None
    assert head.pixel[0].weight.grad is not None and head.image[0].weight.grad is not None


def test_pixel_attention():
    attention = PixelAttention(6)
    assert attention.offset.shape == (1, 6, 1, 1) and torch.all(attention.offset == 0)
    assert attention.layers[0].bias is not None and attention.layers[4].affine
    att = attention(torch.randn(2, 6, 4, 4))
    assert att.shape == (2, 6, 4, 4) and torch.all((att > 0) & (att < 1))


@pytest.mark.parametrize("num_categories", [1, 5])
def test_segmentation_head(num_categories):
    head = SegmentationHead(8, num_categories)
    assert head(torch.randn(1, 8, 2, 2)).shape == (1, num_categories + 1, 2, 2)
    assert head.bias is not None
