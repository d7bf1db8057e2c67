"""PiCIE's PanopticFPN: output shape and stride, gradient flow, initialisation from checkpoints."""

import pytest
import torch
import torch.nn.functional as F

from lussray.errors import UserError
from lussray.models.fpn import FPNDecoder, PanopticFPN, build_panoptic_fpn, default_width


@pytest.mark.parametrize(
    ("arch", "width", "size", "expected"),
    [("resnet18", None, 64, (2, 128, 16, 16)), ("resnet50", None, 64, (2, 256, 16, 16)),
     ("resnet18", 32, 96, (2, 32, 24, 24)), ("resnet18", None, 72, (2, 128, 18, 18))],
)
def test_output_is_res2_level_at_quarter_resolution(arch, width, size, expected):
    model = PanopticFPN(arch, width).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert tuple(out.shape) == expected
    assert model.stride == 4 and model.out_channels == expected[1]


def test_default_widths_are_the_reference_ones():
    assert default_width("resnet18") == 128 and default_width("resnet34") == 128
    assert default_width("resnet50") == 256


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_gradients_reach_every_level(arch):
    model = PanopticFPN(arch, width=16)
    model(torch.randn(1, 3, 64, 64)).square().mean().backward()
    for name in ("c1", "c2", "c3", "c4"):
        grad = model.decoder.lateral[name].weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    for layer in (model.backbone.layer1, model.backbone.layer4, model.backbone.conv1):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_decoder_is_the_top_down_bilinear_sum():
    torch.manual_seed(0)
    decoder = FPNDecoder({"c1": 3, "c2": 4, "c3": 5, "c4": 6}, width=2)
    stages = {"c1": torch.randn(1, 3, 8, 8), "c2": torch.randn(1, 4, 4, 4),
              "c3": torch.randn(1, 5, 2, 2), "c4": torch.randn(1, 6, 1, 1)}
    # Hand transcription: o = conv(c4); o = up(o) + conv(next), down to c1.
    o = decoder.lateral["c4"](stages["c4"])
    for name, size in (("c3", 2), ("c2", 4), ("c1", 8)):
        o = F.interpolate(o, size=(size, size), mode="bilinear", align_corners=False) + decoder.lateral[name](stages[name])
    torch.testing.assert_close(decoder(stages), o)


def test_init_from_torchvision_state_dict_and_lussray_checkpoint(tmp_path):
    torch.manual_seed(1)
    source = PanopticFPN("resnet18", width=8)
    torchvision_state = {k[len("backbone."):]: v for k, v in source.state_dict().items() if k.startswith("backbone.")}
    torchvision_state["fc.weight"], torchvision_state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_state, path)
    model, report = build_panoptic_fpn("resnet18", width=8, init=path)
    assert report is not None and report.source_format == "torchvision"
    torch.testing.assert_close(model.backbone.layer3[0].conv1.weight, source.backbone.layer3[0].conv1.weight)
    assert not torch.equal(model.decoder.lateral["c1"].weight, source.decoder.lateral["c1"].weight)  # stays random

    lussray_path = tmp_path / "picie.pt"
    torch.save({"model": source.state_dict(), "epoch": 3}, lussray_path)
    model, report = build_panoptic_fpn("resnet18", width=8, init=lussray_path)
    assert report.source_format == "lussray" and not report.missing
    torch.testing.assert_close(model.decoder.lateral["c1"].weight, source.decoder.lateral["c1"].weight)


def test_random_init_and_wrong_architecture(tmp_path):
    model, report = build_panoptic_fpn("resnet18", width=8)
    assert report is None and isinstance(model, PanopticFPN)
    wrong = {k[len("backbone."):]: v for k, v in PanopticFPN("resnet50", width=8).state_dict().items()
             if k.startswith("backbone.")}
    path = tmp_path / "r50.pth"
    torch.save(wrong, path)
    with pytest.raises(UserError, match="does not initialise the resnet18 backbone"):
        build_panoptic_fpn("resnet18", width=8, init=path)
