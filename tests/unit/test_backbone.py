import pytest
import torch
import torch.nn.functional as F

from lussray.models.backbone import ResNetBackbone, stage_name




def test_resnet18_stage_shapes_at_96px():
    backbone = ResNetBackbone("resnet18").eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 96, 96))
    assert list(out) == ["c1", "c2", "c3", "c4"]
    expected = {"c1": (2, 64, 24, 24), "c2": (2, 128, 12, 12), "c3": (2, 256, 6, 6), "c4": (2, 512, 3, 3)}
    assert {k: tuple(v.shape) for k, v in out.items()} == expected
    assert backbone.num_features == {"c1": 64, "c2": 128, "c3": 256, "c4": 512}
    assert backbone.out_channels == 512


def test_resnet50_stage_widths():
    backbone = ResNetBackbone("resnet50")
    assert backbone.num_features == {"c1": 256, "c2": 512, "c3": 1024, "c4": 2048}


def test_no_classifier_and_torchvision_key_names():
    keys = ResNetBackbone("resnet18").state_dict().keys()
    assert "conv1.weight" in keys and "layer4.1.bn2.running_var" in keys
    assert not any(k.startswith(("fc.", "avgpool")) for k in keys)


def test_swav_stem_padding_equals_torchvision_padding():
    # SwAV/PASS: ConstantPad2d(1) then conv padding 2; torchvision: conv padding 3.
    x, w = torch.randn(1, 3, 17, 17), torch.randn(4, 3, 7, 7)
    swav = F.conv2d(F.pad(x, (1, 1, 1, 1)), w, stride=2, padding=2)
    torchvision_stem = F.conv2d(x, w, stride=2, padding=3)
    torch.testing.assert_close(swav, torchvision_stem)


@pytest.mark.parametrize("bad", ["resnet", "vit_b_16"])
def test_unknown_arch(bad):
    with pytest.raises(ValueError):
        ResNetBackbone(bad)


@pytest.mark.parametrize("stage", [0, 5])
def test_stage_name_range(stage):
    with pytest.raises(ValueError):
        stage_name(stage)
