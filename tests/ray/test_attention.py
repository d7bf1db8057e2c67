"""Pixel-attention training on Ray Train: only the attention and the prototypes move."""

import pytest
import torch

from lussray.cli import main
from lussray.models.pass_model import PASSModel
from lussray.stages.loop import CHECKPOINT_FILE, latest_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = ["dataset.num_classes=3", "pretrain.hidden_mlp=32", "pretrain.feat_dim=16", "pretrain.num_prototypes=8",
        "attention.crops.crop_sizes=[64]", "attention.queue_length=16", "attention.loop.batch_size_per_worker=8",
        "attention.loop.base_lr=6.0", "attention.loop.log_every_steps=1", "ingest.map_batch_size=8",
        "ingest.cpus_per_map_task=0.5"]


def test_attention_trains_attention_and_prototypes_only(tmp_path, ray_cluster):
    assert main(["synth", "--out", str(tmp_path / "tree"), "--classes", "3", "--train-per-class", "12",
                 "--val-per-class", "1", "--test-per-class", "1", "--semi-per-class", "1", "--size", "64",
                 "--workers", "1"]) == 0
    assert main(["prepare", "--src", str(tmp_path / "tree"), "--out", str(tmp_path / "shards"), "--splits", "train",
                 "--workers", "1", "dataset.num_classes=3"]) == 0
    torch.manual_seed(0)
    stage1 = PASSModel(arch="resnet18", hidden_dim=32, feat_dim=16, num_prototypes=8)
    folder = tmp_path / "run" / "pretrain" / "checkpoint_step=00000005"
    folder.mkdir(parents=True)
    torch.save({"model": stage1.state_dict(), "step": 5}, folder / CHECKPOINT_FILE)

    assert main(["attention", "--data", str(tmp_path / "shards"), "--run", str(tmp_path / "run"),
                 "--max-steps", "2", *TINY]) == 0
    found = latest_checkpoint(str(tmp_path / "run" / "attention"))
    assert found and found.endswith("checkpoint_step=00000002/checkpoint.pt")
    trained = torch.load(found, weights_only=True)["model"]
    before = stage1.state_dict()
    assert torch.count_nonzero(trained["pixel_attention.offset"]) > 0
    assert not torch.equal(trained["prototypes.weight"], before["prototypes.weight"])
    frozen = [k for k, p in stage1.named_parameters() if k.startswith(("backbone.", "projection_head."))]
    assert frozen and all(torch.equal(trained[k], before[k]) for k in frozen)
    assert not any(k.startswith("shallow_heads.") for k in trained)


def test_attention_needs_a_stage1_checkpoint(tmp_path):
    (tmp_path / "shards").mkdir()
    assert main(["attention", "--data", str(tmp_path / "shards"), "--run", str(tmp_path / "run"), *TINY]) == 2
