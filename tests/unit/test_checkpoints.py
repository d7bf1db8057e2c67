import pytest
import torch
import torchvision

from lussray.errors import UserError
from lussray.models.checkpoints import load_pretrained, translate_key
from lussray.models.pass_model import PASSModel

FEAT, HIDDEN, K = 32, 64, 20

# lussray prefix -> reference (PASS) prefix, written independently of the module's table.
TO_REFERENCE = {
    "backbone.": "",
    "pixel_projection.": "projection_head_pixel.",
    "pixel_predictor.": "predictor_head_pixel.",
    "shallow_heads.3.pixel.": "projection_head_pixel_shallow.projection_head_pixel3.",
    "shallow_heads.3.image.": "projection_head_shallow.projection_head_shallow3.",
    "projection_head.": "projection_head.",
    "prototypes.": "prototypes.",
}




def _model(seed=0):
    torch.manual_seed(seed)
    return PASSModel("resnet18", hidden_dim=HIDDEN, feat_dim=FEAT, num_prototypes=K, shallow_stages=(3,))


def _to_reference(key):
    for ours, theirs in TO_REFERENCE.items():
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise AssertionError(key)


def test_torchvision_resnet18(tmp_path):
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "r18.pth")
    model = _model()
    report = load_pretrained(model, tmp_path / "r18.pth")
    assert report.source_format == "torchvision"
    assert report.ignored == ["fc.weight", "fc.bias"] and not report.unexpected and not report.mismatched
    assert not any(k.startswith("backbone.") for k in report.missing)
    assert any(k.startswith("prototypes.") for k in report.missing)
    torch.testing.assert_close(model.backbone.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    torch.testing.assert_close(model.backbone.bn1.running_var, state["bn1.running_var"])


def test_pass_release_layout_with_ddp_prefix(tmp_path):
    source = _model(seed=1).state_dict()
    state = {
        "module." + _to_reference(k): v
        for k, v in source.items()
        if not k.startswith("projection_head.4.")  # SwAV's head has no final BN
    }
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "pass.pth.tar")
    model = _model(seed=2)
    report = load_pretrained(model, tmp_path / "pass.pth.tar")
    assert report.source_format == "pass/swav" and not report.unexpected and not report.mismatched
    assert sorted(report.missing) == ["projection_head.4.running_mean", "projection_head.4.running_var"]
    for key in ("prototypes.weight", "projection_head.0.weight", "pixel_predictor.3.bias",
                "shallow_heads.3.pixel.6.weight", "shallow_heads.3.image.3.weight", "backbone.conv1.weight"):
        torch.testing.assert_close(model.state_dict()[key], source[key])


def test_flattened_d2s_names_and_attention_and_classifier_keys():
    assert translate_key("projection_head_pixel_shallow3.0.weight") == "shallow_heads.3.pixel.0.weight"
    assert translate_key("projection_head_shallow2.4.running_mean") == "shallow_heads.2.image.4.running_mean"
    assert translate_key("fbg.atten.3.bias") == "pixel_attention.layers.3.bias"
    assert translate_key("fbg.threshold") == "pixel_attention.offset"
    assert translate_key("last_layer.weight") == "segmentation_head.weight"
    assert translate_key("fc.weight") is None
    assert translate_key("projection_head_pixel.6.weight") == "pixel_projection.6.weight"


def test_pixel_attention_checkpoint(tmp_path):
    model = PASSModel("resnet18", hidden_dim=8, feat_dim=4, num_prototypes=3, shallow_stages=(), pixel_attention=True)
    state = {"module.fbg.threshold": torch.full((1, 512, 1, 1), 0.5), "module.fbg.atten.4.bias": torch.ones(512)}
    torch.save(state, tmp_path / "att.pth")
    load_pretrained(model, tmp_path / "att.pth")
    assert torch.all(model.pixel_attention.offset == 0.5) and torch.all(model.pixel_attention.layers[4].bias == 1)


def test_lussray_format_round_trip_and_shape_mismatch(tmp_path):
    source = _model(seed=3)
    torch.save({"model": source.state_dict(), "step": 10}, tmp_path / "ours.pt")
    model = _model(seed=4)
    report = load_pretrained(model, tmp_path / "ours.pt", strict=True)
    assert report.source_format == "lussray" and not report.missing
    torch.testing.assert_close(model.prototypes.weight, source.prototypes.weight)

    other = PASSModel("resnet18", hidden_dim=HIDDEN, feat_dim=FEAT, num_prototypes=K + 5, shallow_stages=(3,))
    report = load_pretrained(other, tmp_path / "ours.pt")
    assert report.mismatched == [f"prototypes.weight: ({K}, {FEAT}) != ({K + 5}, {FEAT})"]
    with pytest.raises(UserError):
        load_pretrained(other, tmp_path / "ours.pt", strict=True)


def test_errors_name_the_file(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "foreign.pth")
    with pytest.raises(UserError, match="foreign.pth"):
        load_pretrained(_model(), tmp_path / "foreign.pth")
    with pytest.raises(UserError, match="missing.pth"):
        load_pretrained(_model(), tmp_path / "missing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="garbage.pth"):
        load_pretrained(_model(), tmp_path / "garbage.pth")


def test_moco_release_reads_the_query_encoder_only(tmp_path):
    torch.manual_seed(5)
    query, key = torchvision.models.resnet18(weights=None).state_dict(), torchvision.models.resnet18(weights=None)
    state = {f"module.encoder_q.{k}": v for k, v in query.items() if not k.startswith("fc.")}
    state["module.encoder_q.fc.0.weight"], state["module.encoder_q.fc.2.weight"] = torch.zeros(16, 512), torch.zeros(8, 16)
    state.update({f"module.encoder_k.{k}": v + 1 for k, v in key.state_dict().items()})
    state["module.queue"] = torch.zeros(8, 64)
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state}, tmp_path / "moco_v2.pth.tar")
    model = _model()
    report = load_pretrained(model, tmp_path / "moco_v2.pth.tar")
    assert report.source_format == "moco" and not report.unexpected and not report.mismatched
    assert report.ignored == ["fc.0.weight", "fc.2.weight"]
    assert not any(k.startswith("backbone.") for k in report.missing)
    assert any(k.startswith("projection_head.") for k in report.missing)
    torch.testing.assert_close(model.backbone.layer2[0].conv1.weight, query["layer2.0.conv1.weight"])
