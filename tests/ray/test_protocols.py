"""The distance-matching and semi-supervised protocols end to end on tiny generated data."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lussray.cli import main
from lussray.config import load_config
from lussray.eval.io import discover_keys, prediction_path, read_label
from lussray.eval.matching import cooccurrence, hungarian_mapping
from lussray.eval.metrics import compute_metrics
from lussray.eval.stats import StatsAccumulator, image_stats
from lussray.models.segmenter import Segmenter
from lussray.stages.distmatch import BackboneFeatures, OracleFeatures, distance_matching

pytestmark = pytest.mark.ray

CLASSES, SIZE = 3, 96
TINY = [
    f"dataset.num_classes={CLASSES}", "pretrain.arch=resnet18",
    f"ingest.eval_short_side={SIZE}", f"ingest.finetune_crop_size={SIZE}", "ingest.map_batch_size=8",
    "ingest.cpus_per_map_task=0.5",
    "distmatch.batch_size=4", "distmatch.torch_threads=1", "predict.batch_size=4", "predict.torch_threads=1",
    # one worker of batch 8 (steadier BatchNorm than 2 x 4), 3 steps per epoch on 24 images
    "semisup.loop.num_workers=1", "semisup.loop.cpus_per_worker=1", "semisup.loop.torch_threads=2",
    "semisup.loop.batch_size_per_worker=8", "semisup.loop.epochs=20", "semisup.loop.log_every_steps=5",
    "semisup.loop.checkpoint_every_steps=1000",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocols")
    assert main(["synth", "--out", str(root / "tree"), "--classes", str(CLASSES), "--train-per-class", "8",
                 "--val-per-class", "4", "--test-per-class", "1", "--semi-per-class", "8", "--size", str(SIZE),
                 # the generator's full clutter, not the demo's easier look: on large objects over plain
                 # backgrounds a random network's colour features already match well above chance
                 "--min-area", "0.02", "--background-contrast", "1", "--background-pool-size", "32",
                 "--workers", "1"]) == 0
    assert main(["prepare", "--src", str(root / "tree"), "--out", str(root / "shards"), "--splits", "train-semi",
                 "validation", "--workers", "1", "--samples-per-shard", "8", f"dataset.num_classes={CLASSES}"]) == 0
    return root


def _ground_truth(root: Path) -> list[np.ndarray]:
    gt_dir = root / "tree" / "validation-segmentation"
    return [read_label(prediction_path(gt_dir, key)).astype(np.int64) for key in discover_keys(gt_dir)]


def _baseline_miou(gts: list[np.ndarray], make, hungarian: bool) -> float:
    """mIoU of generated predictions, through the evaluator's statistics."""
    acc = StatsAccumulator(CLASSES)
    for gt in gts:
        acc.add(image_stats(make(gt), gt, CLASSES))
    mapping = None
    if hungarian:
        mapping = hungarian_mapping(cooccurrence(*acc.presence()[:2], *acc.presence()[2:], acc.num_images, CLASSES))
    return compute_metrics(acc, mapping).miou


def test_distance_matching_oracle_is_perfect_random_backbone_near_chance(ray_cluster, setup):
    config = load_config("synthetic-demo", overrides=TINY)
    shards = str(setup / "shards")
    oracle = distance_matching(config, shards, "validation", str(setup / "dm-oracle"), OracleFeatures,
                               {"num_classes": CLASSES})
    assert oracle["metrics"]["mIoU"] == pytest.approx(100.0, abs=1e-6)
    assert oracle["metrics_without_matching"]["mIoU"] == pytest.approx(100.0, abs=1e-6)
    assert oracle["metrics"]["Acc"] == pytest.approx(100.0)
    assert json.loads((setup / "dm-oracle" / "match.json").read_text()) == {str(i): i for i in range(CLASSES + 1)}

    random = distance_matching(config, shards, "validation", str(setup / "dm-random"), BackboneFeatures,
                               {"checkpoint": None, "arch": "resnet18", "upsample": 4, "torch_threads": 1})
    rng = np.random.default_rng(0)
    gts = _ground_truth(setup)
    chance = _baseline_miou(gts, lambda gt: rng.integers(0, CLASSES + 1, gt.shape), hungarian=True)
    all_other = _baseline_miou(gts, np.zeros_like, hungarian=False)
    print(f"distance matching mIoU: oracle 100, random backbone {random['metrics']['mIoU']:.2f}, "
          f"uniform chance {chance:.2f}, all other {all_other:.2f}")
    assert random["metrics"]["mIoU"] < chance + 10
    assert len(list((setup / "dm-random").glob("*/*.png"))) == len(gts)


def test_semisup_beats_the_random_backbone(ray_cluster, setup, tmp_path):
    shards, run = str(setup / "shards"), tmp_path / "run"
    assert main(["semisup", "--data", shards, "--run", str(run), "--init", "random", *TINY]) == 0
    tuned = json.loads((run / "semisup" / "validation" / "summary.json").read_text())
    assert tuned["inputs"]["match"] == "identity" and not (run / "semisup" / "validation" / "match.json").exists()

    # the same network untrained, predicted and scored the same way (no matching)
    torch.manual_seed(0)
    torch.save({"model": Segmenter("resnet18", CLASSES + 1).state_dict()}, tmp_path / "random.pt")
    assert main(["predict", "--split", "validation", "--data", shards, "--checkpoint", str(tmp_path / "random.pt"),
                 "--out", str(tmp_path / "random"), "--match", "identity", *TINY]) == 0
    untrained = json.loads((tmp_path / "random" / "summary.json").read_text())
    all_other = _baseline_miou(_ground_truth(setup), np.zeros_like, hungarian=False)
    print(f"semi-supervised mIoU: fine-tuned {tuned['metrics']['mIoU']:.2f}, untrained "
          f"{untrained['metrics']['mIoU']:.2f}, all other {all_other:.2f}")
    # 60 steps from scratch with random crops score 32-52 here (untrained 1.7, all-"other" 18)
    assert tuned["metrics"]["mIoU"] > untrained["metrics"]["mIoU"] + 10
    assert tuned["metrics"]["mIoU"] > all_other  # it learned categories, not only "other"


def test_bad_backbones_are_refused_before_any_work(setup, tmp_path, capsys):
    shards = str(setup / "shards")
    missing = tmp_path / "missing.pt"
    assert main(["distmatch", "--split", "validation", "--data", shards, "--checkpoint", str(missing),
                 "--out", str(tmp_path / "dm"), *TINY]) == 2
    assert str(missing) in capsys.readouterr().err
    torch.save({"model": Segmenter("resnet18", 2).state_dict()}, tmp_path / "r18.pt")
    for command in (["distmatch", "--split", "validation", "--checkpoint"], ["semisup", "--init"]):
        assert main([*command, str(tmp_path / "r18.pt"), "--data", shards, "--run", str(tmp_path / "run"),
                     *TINY, "pretrain.arch=resnet50"]) == 2
        assert "does not hold a resnet50 backbone" in capsys.readouterr().err
