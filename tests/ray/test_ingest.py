"""Ray Data ingest end to end on tiny shards: shapes, dtypes, grids, pairs, evaluation images."""

import numpy as np
import pytest

from lussray.cli import main
from lussray.config import IngestConfig, MultiCropConfig
from lussray.data import ingest
from tests.helpers import make_tree

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest")
    src = make_tree(root / "tree", per_class=6, size=(72, 96))
    assert main(["prepare", "--src", str(src), "--out", str(root / "shards"), "--workers", "1",
                 "--samples-per-shard", "4", "dataset.num_classes=2"]) == 0
    return str(root / "shards")


INGEST = IngestConfig(map_batch_size=4, cpus_per_map_task=0.5, eval_short_side=48, finetune_crop_size=40)


def test_multicrop_views(ray_cluster, shards):
    crops = MultiCropConfig(num_crops=[2, 3], crop_sizes=[64, 32], min_scales=[0.3, 0.1], max_scales=[1.0, 0.3])
    dataset = ingest.multicrop_views(shards, "train", crops, 7, INGEST)
    rows = 0
    for batch in dataset.iter_batches(batch_size=5, batch_format="numpy"):
        b = len(batch["crop_0"])
        rows += b
        for v, size in enumerate([64, 64, 32, 32, 32]):
            assert batch[f"crop_{v}"].shape == (b, size, size, 3) and batch[f"crop_{v}"].dtype == np.uint8
        assert batch["boxes"].shape == (b, 5, 5)
        for g in (0, 1):
            grid = batch[f"p2p_grid_{g}"]
            assert grid.shape == (b, 7, 7, 2) and grid.dtype == np.float32
            assert np.all((np.abs(grid) <= 1.0 + 1e-6) | (grid == -2))
    assert rows == 12


def test_train_worker_view_through_iter_torch_batches(ray_cluster, shards):
    crops = MultiCropConfig(num_crops=[2], crop_sizes=[48], min_scales=[0.3], max_scales=[1.0])
    dataset = ingest.multicrop_views(shards, "train", crops, 5, INGEST)
    batch = next(iter(dataset.iter_torch_batches(batch_size=4, drop_last=True)))
    assert tuple(batch["crop_1"].shape) == (4, 48, 48, 3) and tuple(batch["p2p_grid_1"].shape) == (4, 5, 5, 2)


def test_segmentation_pairs(ray_cluster, shards):
    rows = ingest.segmentation_pairs(shards, "validation", INGEST).take_all()
    assert len(rows) == 12
    for row in rows:
        assert row["image"].shape == (40, 40, 3) and row["label"].shape == (40, 40)
        assert set(np.unique(row["label"])) <= {0, 1, 2, 1000}


def test_evaluation_images(ray_cluster, shards):
    rows = ingest.evaluation_images(shards, "validation", INGEST).take_all()
    assert len(rows) == 12
    for row in rows:
        assert tuple(row["original_size"]) == (72, 96)
        assert row["image"].shape == (48, 64, 3)  # shorter side 72 -> 48, aspect kept
        assert row["label"].shape == (72, 96)
        assert row["label"].max() == 1000 and row["key"].startswith("n00")
