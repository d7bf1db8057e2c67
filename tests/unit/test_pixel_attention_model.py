"""Stage-2 paths of the PASS model: attention maps, pooled embeddings, the attention-training model."""

import pytest
import torch
import torch.nn.functional as F

from lussray.models.pass_model import PASSModel, PixelAttentionModel, upsample_features

KWARGS = {"arch": "resnet18", "hidden_dim": 32, "feat_dim": 16, "num_prototypes": 10, "shallow_stages": ()}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PASSModel(**KWARGS, pixel_attention=True).eval()


def test_attention_maps_shapes_and_range(model):
    images = torch.randn(2, 3, 64, 96)
    features, attention = model.attention_maps(images)
    assert features.shape == attention.shape == (2, 512, 8, 12)  # stride 32, then x4
    assert torch.all((attention > 0) & (attention < 1))


def test_attention_offset_starts_at_zero(model):
    assert model.pixel_attention.offset.shape == (1, 512, 1, 1)
    assert torch.count_nonzero(PASSModel(**KWARGS, pixel_attention=True).pixel_attention.offset) == 0


def test_cluster_embedding_is_mean_of_raw_features_times_attention(model):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        c4 = model.backbone(images)["c4"]
        raw = F.interpolate(c4, scale_factor=4, mode="bilinear", align_corners=False)
        attention = model.pixel_attention(raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-12))
        expected = torch.stack([(raw[b] * attention[b]).sum(dim=(1, 2)) / (raw.shape[2] * raw.shape[3])
                                for b in range(2)])
        assert torch.allclose(model.cluster_embedding(images), expected, atol=1e-5)


def test_model_without_attention_refuses():
    with pytest.raises(RuntimeError, match="pixel attention"):
        PASSModel(**KWARGS).attention_maps(torch.randn(1, 3, 32, 32))


def test_upsample_is_bilinear_times_four():
    x = torch.arange(4.0).view(1, 1, 2, 2)
    assert upsample_features(x).shape == (1, 1, 8, 8)


def test_attention_model_trains_only_attention_and_prototypes():
    torch.manual_seed(0)
    model = PixelAttentionModel(**KWARGS)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prototypes", "pixel_attention"}
    views = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    out = model(views)
    assert len(out.embeddings) == 2 and out.embeddings[0].shape == (4, 16) and out.scores[0].shape == (4, 10)
    assert torch.allclose(out.embeddings[0].norm(dim=1), torch.ones(4), atol=1e-5)
    assert out.pixel_projections is None and out.shallow_logits == {}
    out.scores[0].sum().backward()
    assert model.pixel_attention.offset.grad is not None and model.pixel_attention.offset.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())


def test_attention_model_state_dict_loads_into_pass_model():
    source = PixelAttentionModel(**KWARGS)
    target = PASSModel(**KWARGS, pixel_attention=True)
    target.load_state_dict(source.state_dict(), strict=True)
