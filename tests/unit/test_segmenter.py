"""Segmenter: shapes, the fine-tuning loss, the reference inference rule, checkpoint loading."""

import pytest
import torch
import torch.nn.functional as F

from lussray.models.checkpoints import load_pretrained
from lussray.models.pass_model import PASSModel
from lussray.models.segmenter import (
    Segmenter,
    infer_labels,
    resize_nearest,
    segmentation_loss,
    upsample_argmax,
)


@pytest.mark.parametrize("size,logit_size", [((64, 64), (2, 2)), ((96, 160), (3, 5))])
def test_forward_is_stride_32_with_k_plus_1_outputs(size, logit_size):
    model = Segmenter("resnet18", num_outputs=6).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 6, *logit_size)
    assert model.segmentation_head.out_channels == 6 and model.segmentation_head.bias is not None


def test_num_outputs_must_include_other():
    with pytest.raises(ValueError):
        Segmenter("resnet18", num_outputs=1)


def _reference_loss(logits, labels, ignore_index):
    """Float64 transcription: nearest x0.5 labels, bilinear logits, mean CE over counted pixels."""
    target = F.interpolate(labels[:, None].double(), scale_factor=0.5, mode="nearest")[:, 0].long()
    up = F.interpolate(logits.double(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    logp = up.log_softmax(1)
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    picked = logp.gather(1, target.clamp(max=logits.shape[1] - 1)[:, None])[:, 0]
    return -(picked[keep]).mean()


@pytest.mark.parametrize("ignore_index", [None, 1000])
def test_segmentation_loss_matches_transcription(ignore_index):
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 2, 2, requires_grad=True)
    labels = torch.randint(0, 4, (3, 16, 16))
    if ignore_index is not None:
        labels[:, :4] = ignore_index
    loss, accuracy = segmentation_loss(logits, labels, ignore_index=ignore_index)
    assert loss.item() == pytest.approx(_reference_loss(logits, labels, ignore_index).item(), rel=1e-5)
    assert 0.0 <= accuracy.item() <= 1.0
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("size", [(7, 9), (37, 23), (64, 64), (5, 300)])
def test_upsample_argmax_equals_interpolate_then_argmax(size):
    torch.manual_seed(1)
    logits = torch.randn(5, 3, 4)
    expected = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0].argmax(0)
    got = upsample_argmax(logits, size, band_pixels=50)  # many bands
    assert got.shape == size and got.dtype == torch.long
    assert (got == expected).float().mean() > 0.999


@pytest.mark.parametrize("size", [(2, 3), (10, 7), (33, 65)])
def test_resize_nearest_equals_interpolate(size):
    label = torch.arange(5 * 6).view(5, 6)
    expected = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    assert torch.equal(resize_nearest(label, size), expected)


def test_small_image_is_upsampled_straight_to_its_size():
    torch.manual_seed(2)
    logits = torch.randn(4, 2, 3)
    labels = infer_labels(logits, (20, 30), max_res=100)
    expected = F.interpolate(logits[None], size=(20, 30), mode="bilinear", align_corners=False)[0].argmax(0)
    assert labels.shape == (20, 30) and torch.equal(labels, expected)


@pytest.mark.parametrize("size", [(12, 18), (18, 12)])
def test_large_image_rule_fixes_the_height_at_max_res(size):
    """H * W > max_res^2: argmax at (max_res, int(max_res * W / H)), then nearest to (H, W)."""
    torch.manual_seed(3)
    logits = torch.randn(4, 2, 3)
    height, width = size
    max_res = 8  # 12 * 18 = 216 > 64
    low = F.interpolate(logits[None], size=(max_res, int(max_res * width / height)), mode="bilinear",
                        align_corners=False)[0].argmax(0)
    expected = F.interpolate(low[None, None].float(), size=size, mode="nearest")[0, 0].long()
    labels = infer_labels(logits, size, max_res=max_res)
    assert labels.shape == size and torch.equal(labels, expected)
    direct = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0].argmax(0)
    assert not torch.equal(labels, direct)  # the rule is really taken


def test_loads_the_backbone_of_a_pretraining_checkpoint(tmp_path):
    torch.manual_seed(4)
    pretrained = PASSModel("resnet18", hidden_dim=32, feat_dim=16, num_prototypes=8, shallow_stages=(3,))
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": pretrained.state_dict(), "step": 3}, path)  # the loop's layout
    torch.manual_seed(5)
    model = Segmenter("resnet18", num_outputs=4)
    head_before = model.segmentation_head.weight.clone()
    report = load_pretrained(model, path)
    for key, value in pretrained.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert torch.equal(model.segmentation_head.weight, head_before)  # the head stays new
    assert set(report.missing) == {"segmentation_head.weight", "segmentation_head.bias"}
    assert any(key.startswith("prototypes") for key in report.unexpected)


def test_segmenter_checkpoint_round_trip_and_pass_head_name(tmp_path):
    torch.manual_seed(6)
    model = Segmenter("resnet18", num_outputs=3)
    reference_names = {("last_layer." + k[len("segmentation_head."):] if k.startswith("segmentation_head.")
                        else k[len("backbone."):]): v for k, v in model.state_dict().items()}
    torch.save({"state_dict": {"module." + k: v for k, v in reference_names.items()}}, tmp_path / "pass.pth")
    fresh = Segmenter("resnet18", num_outputs=3)
    report = load_pretrained(fresh, tmp_path / "pass.pth", strict=True)
    assert not report.missing
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
