"""Same seed, same numbers: pretrain + attention + labelgen twice with one seed, once with another.

The stages run in this process on the session's Ray cluster (2 Train workers each). Run B stops
pretraining half-way (a checkpoint, then a new ``fit`` that resumes from it) and must still end with
bitwise the checkpoint of the unbroken run A, then byte-identical pseudo labels and equal metrics;
run C, another seed, must differ.
"""

import json
from pathlib import Path

import pytest
import torch

from lussray.cli import main
from lussray.config import load_config
from lussray.data.shards import iter_tar, shard_paths
from lussray.stages import attention, labelgen, pretrain
from lussray.stages.loop import latest_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = [
    "dataset.num_classes=3", "ray.num_cpus=4",
    "pretrain.hidden_mlp=32", "pretrain.feat_dim=16", "pretrain.num_prototypes=8",
    "pretrain.queue_length=16", "pretrain.queue_start_epoch=1", "pretrain.freeze_prototypes_steps=2",
    "pretrain.crops.num_crops=[2,1]", "pretrain.crops.crop_sizes=[48,24]",
    "pretrain.crops.min_scales=[0.3,0.1]", "pretrain.crops.max_scales=[1.0,0.3]",
    "pretrain.loop.batch_size_per_worker=4", "pretrain.loop.epochs=3", "pretrain.loop.base_lr=0.3",
    "pretrain.loop.checkpoint_every_steps=3", "pretrain.loop.log_every_steps=1", "pretrain.loop.torch_threads=1",
    "attention.queue_length=0", "attention.crops.num_crops=[2]", "attention.crops.crop_sizes=[48]",
    "attention.crops.min_scales=[0.3]", "attention.crops.max_scales=[1.0]",
    "attention.loop.batch_size_per_worker=4", "attention.loop.epochs=1", "attention.loop.base_lr=1.0",
    "attention.loop.checkpoint_every_steps=10", "attention.loop.torch_threads=1",
    "ingest.map_batch_size=4", "ingest.cpus_per_map_task=0.5", "ingest.shuffle_window_rows=8",
    "ingest.eval_short_side=64",
    "labelgen.crop_size=56", "labelgen.kmeans_redo=2", "labelgen.kmeans_iterations=5", "labelgen.batch_size=8",
    "labelgen.tau_step=0.2", "labelgen.tau_split=validation", "labelgen.torch_threads=1",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    assert main(["synth", "--out", str(root / "tree"), "--classes", "3", "--train-per-class", "8",
                 "--val-per-class", "2", "--test-per-class", "1", "--semi-per-class", "1", "--size", "64",
                 "--workers", "1"]) == 0
    assert main(["prepare", "--src", str(root / "tree"), "--out", str(root / "shards"), "--workers", "1",
                 "--samples-per-shard", "10", "dataset.num_classes=3"]) == 0
    return str(root / "shards")


def _run(shards: str, run: Path, seed: int, stop_at: int | None = None) -> dict:
    """Pretrain (stopping at ``stop_at`` first, then resuming), attention and labelgen; what they made."""
    config = load_config("synthetic-demo", overrides=[*TINY, f"seed={seed}"])
    if stop_at:
        pretrain.pretrain(config, shards, str(run), max_steps=stop_at)
        assert torch.load(latest_checkpoint(str(run / "pretrain")), weights_only=True)["step"] == stop_at
    pretrain.pretrain(config, shards, str(run))
    attention.train_attention(config, shards, str(run))
    labelgen.generate(config, shards, str(run))
    labels = {key: members["seg.png"] for path in shard_paths(str(run / "labelgen" / "pseudo"), "train")
              for key, members in iter_tar(path)}
    summary = json.loads((run / "labelgen" / "summary.json").read_text())
    return {"pretrain": torch.load(latest_checkpoint(str(run / "pretrain")), weights_only=True),
            "attention": torch.load(latest_checkpoint(str(run / "attention")), weights_only=True),
            "labels": labels, "metrics": summary["metrics"]}


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_seed_gives_the_same_checkpoints_labels_and_metrics(shards, tmp_path, ray_cluster):
    a = _run(shards, tmp_path / "a", seed=0)
    b = _run(shards, tmp_path / "b", seed=0, stop_at=4)  # stopped mid-epoch 1 (3 steps per epoch), resumed
    assert a["pretrain"]["step"] == b["pretrain"]["step"] == 9
    assert _same_tensors(a["pretrain"]["model"], b["pretrain"]["model"])
    assert _same_tensors(a["pretrain"]["method"], b["pretrain"]["method"])  # the SwAV queue
    assert _same_tensors(a["attention"]["model"], b["attention"]["model"])
    assert a["labels"] == b["labels"] and len(a["labels"]) == 24
    assert a["metrics"] == b["metrics"] and a["metrics"]["validation"]["mIoU"] > 0

    c = _run(shards, tmp_path / "c", seed=1)
    assert not torch.equal(a["pretrain"]["model"]["prototypes.weight"], c["pretrain"]["model"]["prototypes.weight"])
    assert a["labels"].keys() == c["labels"].keys() and a["labels"] != c["labels"]
