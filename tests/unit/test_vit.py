"""Frozen featurizers: DINO ViT on timm (tiny random configs) and lussray's ResNet."""

import argparse
import io

import pytest
import torch
import torch.nn.functional as F

from lussray.errors import UserError
from lussray.models.pass_model import PASSModel, upsample_features
from lussray.models.vit import (
    DinoViTFeaturizer,
    build_featurizer,
    interpolate_pos_embed,
    read_dino_state_dict,
)

TINY = {"embed_dim": 16, "depth": 2, "num_heads": 2, "img_size": 32}


def tiny_vit(seed: int = 0) -> DinoViTFeaturizer:
    torch.manual_seed(seed)
    featurizer = DinoViTFeaturizer(patch_size=8, **TINY)
    with torch.no_grad():  # timm zero-initialises cls_token / pos_embed; random values test more
        for parameter in featurizer.vit.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return featurizer


def dino_keys(depth: int) -> set[str]:
    """The parameter names of DINO's vision_transformer.py (release files) for ``depth`` blocks."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(depth):
        for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{layer}.weight", f"blocks.{i}.{layer}.bias"}
    return keys


def test_parameter_names_are_dinos():
    assert set(tiny_vit().vit.state_dict()) == dino_keys(TINY["depth"])


def test_frozen_and_always_eval():
    featurizer = tiny_vit().train()
    assert not any(p.requires_grad for p in featurizer.parameters())
    assert not featurizer.vit.training


def test_features_match_timm_forward_at_native_size():
    featurizer = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    out = featurizer(images)
    tokens = featurizer.vit.forward_features(images)
    assert out.features.shape == (2, 16, 4, 4)
    torch.testing.assert_close(out.features, tokens[:, 1:].transpose(1, 2).reshape(2, 16, 4, 4))


def _layer_norm64(x, norm):
    return F.layer_norm(x, x.shape[-1:], norm.weight.double(), norm.bias.double(), norm.eps)


def test_attention_against_float64_transcription():
    featurizer = tiny_vit()
    images = torch.randn(2, 3, 32, 40)
    captured = {}
    block = featurizer.vit.blocks[-1]
    handle = block.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0].detach()))
    out = featurizer(images)
    handle.remove()
    x = captured["x"].double()  # input of the last block, (B, 1 + 20, 16)
    qkv = _layer_norm64(x, block.norm1) @ block.attn.qkv.weight.double().t() + block.attn.qkv.bias.double()
    heads, d = 2, 8
    q, k = qkv[..., :16], qkv[..., 16:32]
    logits = torch.zeros(2, heads, x.shape[1], x.shape[1], dtype=torch.float64)
    for h in range(heads):
        logits[:, h] = q[..., h * d : (h + 1) * d] @ k[..., h * d : (h + 1) * d].transpose(1, 2) / d**0.5
    expected_affinity = logits.mean(dim=1)[:, 1:, 1:]
    expected_cls = logits.softmax(dim=-1)[:, :, 0, 1:].reshape(2, heads, 4, 5)
    assert out.patch_affinity.shape == (2, 20, 20) and out.cls_attention.shape == (2, heads, 4, 5)
    torch.testing.assert_close(out.patch_affinity.double(), expected_affinity, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.cls_attention.double(), expected_cls, rtol=1e-4, atol=1e-6)
    assert out.features.shape == (2, 16, 4, 5)


def test_no_attention_when_not_asked():
    out = tiny_vit()(torch.randn(1, 3, 32, 32), attention=False)
    assert out.patch_affinity is None and out.cls_attention is None


def test_rejects_size_not_multiple_of_patch():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_vit()(torch.randn(1, 3, 30, 32))


def test_pos_embed_interpolation_is_dinos():
    pos = torch.randn(1, 1 + 16, 4)
    assert interpolate_pos_embed(pos, (4, 4)) is pos
    out = interpolate_pos_embed(pos, (6, 5))
    assert out.shape == (1, 31, 4)
    torch.testing.assert_close(out[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 4, 4, 4).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, scale_factor=(6.1 / 4, 5.1 / 4), mode="bicubic")
    torch.testing.assert_close(out[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 30, 4))


def _save(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("layout", ["release", "teacher"])
def test_dino_layout_checkpoint_loads_with_no_missing_keys_and_same_outputs(layout):
    source = tiny_vit(seed=1)
    state = source.vit.state_dict()
    if layout == "teacher":  # a DINO training checkpoint's teacher entry: DDP + multi-crop prefixes, DINO head
        teacher = {f"module.backbone.{k}": v for k, v in state.items()}
        teacher["module.head.mlp.0.weight"] = torch.zeros(3, 16)
        state = {"teacher": teacher, "student": {k: v + 1 for k, v in teacher.items()}}
    target = tiny_vit(seed=2)
    images = torch.randn(2, 3, 32, 48)
    assert not torch.equal(target(images).features, source(images).features)
    report = target.load_checkpoint(_save(state), strict=True)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert len(report.loaded) == len(dino_keys(TINY["depth"]))
    assert report.ignored == (["module.head.mlp.0.weight"] if layout == "teacher" else [])
    for got, want in zip(target(images), source(images)):
        assert torch.equal(got, want)


def test_report_lists_missing_unexpected_and_mismatched():
    state = tiny_vit().vit.state_dict()
    del state["norm.bias"]
    state["blocks.0.extra"] = torch.zeros(1)
    state["pos_embed"] = torch.zeros(1, 5, 16)
    report = tiny_vit().load_checkpoint(_save(state))
    assert report.missing == ["norm.bias", "pos_embed"]
    assert report.unexpected == ["blocks.0.extra"]
    assert report.mismatched == ["pos_embed: (1, 5, 16) != (1, 17, 16)"]
    with pytest.raises(UserError, match="does not match"):
        tiny_vit().load_checkpoint(_save(state), strict=True)


def test_unsafe_or_empty_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="weights_only"):
        read_dino_state_dict(_save({"args": argparse.Namespace(arch="vit_small"), "teacher": {}}))
    with pytest.raises(UserError, match="not found"):
        read_dino_state_dict(str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="none of its"):
        tiny_vit().load_checkpoint(_save({"something.else": torch.zeros(2)}))


def test_resnet_featurizer_loads_a_lussray_checkpoint_and_uses_cosine_affinity():
    torch.manual_seed(0)
    pass_model = PASSModel(arch="resnet18", hidden_dim=16, feat_dim=8, num_prototypes=5).eval()
    featurizer, report = build_featurizer("resnet18", _save({"model": pass_model.state_dict(), "step": 3}),
                                          affinity_temperature=0.5)
    assert report.missing == [] and report.unexpected == []
    assert any(k.startswith("prototypes") for k in report.ignored)
    images = torch.randn(2, 3, 64, 64)
    out = featurizer.train()(images)
    assert featurizer.stride == 8 and out.features.shape == (2, 512, 8, 8) and out.cls_attention is None
    with torch.no_grad():
        expected = upsample_features(pass_model.backbone(images)["c4"])
    torch.testing.assert_close(out.features, expected)
    flat = out.features.double().flatten(2)
    for b in range(2):
        for i in (0, 17, 63):
            for j in (0, 5, 40):
                cos = F.cosine_similarity(flat[b, :, i], flat[b, :, j], dim=0)
                assert abs(out.patch_affinity[b, i, j].item() - cos.item() / 0.5) < 1e-4
    assert not any(p.requires_grad for p in featurizer.parameters())


def test_build_featurizer_rejects_unknown_names():
    with pytest.raises(UserError, match="unknown featurizer"):
        build_featurizer("vit_huge")
