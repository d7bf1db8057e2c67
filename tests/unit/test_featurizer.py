"""Which frozen featurizer a STEGO/HP stage runs: a DINO file (arch from its shapes) or the run's stage-1 ResNet."""

import pytest
import torch

from lussray.config import load_config
from lussray.errors import UserError
from lussray.models.pass_model import PASSModel
from lussray.models.vit import DinoViTFeaturizer, infer_dino_arch
from lussray.stages import featurizer as featurizers
from lussray.stages.loop import CHECKPOINT_FILE


@pytest.fixture(scope="module")
def vit_small_state():
    torch.manual_seed(0)
    return DinoViTFeaturizer("vit_small", 8).vit.state_dict()


def test_dino_arch_and_patch_size_come_from_the_shapes(vit_small_state):
    assert infer_dino_arch(vit_small_state) == ("vit_small", 8)
    tiny = DinoViTFeaturizer(embed_dim=16, depth=1, num_heads=2, patch_size=16).vit.state_dict()
    with pytest.raises(UserError, match="width 16"):
        infer_dino_arch(tiny)
    with pytest.raises(UserError, match="not a DINO ViT"):
        infer_dino_arch({"conv1.weight": torch.zeros(1)})


def test_a_dino_file_is_resolved_checked_and_a_missing_weight_refused(tmp_path, vit_small_state, capsys):
    config = load_config("synthetic-scenes", method="stego")
    path = tmp_path / "dino.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit_small_state.items()}}, path)
    spec = featurizers.resolve(config, None, str(path))
    assert (spec.kind, spec.arch, spec.patch_size, spec.stride) == ("dino", "vit_small", 8, 8)
    assert featurizers.check(spec, "stego") == 384
    assert "missing 0, unexpected 0" in capsys.readouterr().out
    broken = dict(vit_small_state)
    del broken["norm.weight"]
    torch.save(broken, path)
    with pytest.raises(UserError, match="1 weights of the vit_small missing"):
        featurizers.check(featurizers.resolve(config, None, str(path)), "stego")
    with pytest.raises(UserError, match="no such file"):
        featurizers.resolve(config, None, str(tmp_path / "absent.pth"))


def test_without_a_file_the_runs_stage1_resnet_is_the_featurizer(tmp_path):
    config = load_config("synthetic-scenes", method="stego")  # pretrain.arch resnet18
    with pytest.raises(UserError, match="no stage-1 checkpoint"):
        featurizers.resolve(config, str(tmp_path))
    folder = tmp_path / "pretrain" / "checkpoint_step=00000003"
    folder.mkdir(parents=True)
    torch.save({"model": PASSModel("resnet18", hidden_dim=8, feat_dim=4, num_prototypes=3).state_dict(), "step": 3},
               folder / CHECKPOINT_FILE)
    spec = featurizers.resolve(config, str(tmp_path))
    assert (spec.kind, spec.arch, spec.stride, spec.affinity_temperature) == ("resnet", "resnet18", 8, 0.1)
    assert spec.checkpoint.endswith("checkpoint_step=00000003/checkpoint.pt")
    assert featurizers.check(spec, "hp") == 512
    assert spec.fingerprint(str(tmp_path))["checkpoint"]["path"] == "pretrain/checkpoint_step=00000003/checkpoint.pt"
