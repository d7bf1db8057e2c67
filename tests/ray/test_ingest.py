"""Ray Data ingest end to end on tiny shards: seeded training streams (shapes, determinism, resume), evaluation images."""

import pytest
import torch

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


INGEST = IngestConfig(map_batch_size=4, cpus_per_map_task=0.5, eval_short_side=48, finetune_crop_size=40,
                      shuffle_window_rows=8)
CROPS = MultiCropConfig(num_crops=[2, 3], crop_sizes=[64, 32], min_scales=[0.3, 0.1], max_scales=[1.0, 0.3])


def _epoch(stream, world, rows, epoch, rank, batch_size=4, skip=0):
    plan = stream.plan(world, rows)
    windows = plan.stream(rank, epoch, epoch + 1, skip=skip)
    return list(stream.batches(windows, batch_size))


def test_multicrop_stream_shapes(ray_cluster, shards):
    stream = ingest.multicrop_stream(shards, "train", "pretrain", CROPS, 7, INGEST, seed=0)
    batches = _epoch(stream, 1, 12, 0, 0, batch_size=5)
    assert len(batches) == 2  # 12 rows, drop_last
    for batch in batches:
        for v, size in enumerate([64, 64, 32, 32, 32]):
            assert tuple(batch[f"crop_{v}"].shape) == (5, size, size, 3) and batch[f"crop_{v}"].dtype == torch.uint8
        assert tuple(batch["boxes"].shape) == (5, 5, 5)
        for g in (0, 1):
            grid = batch[f"p2p_grid_{g}"]
            assert tuple(grid.shape) == (5, 7, 7, 2) and grid.dtype == torch.float32
            assert bool(((grid.abs() <= 1.0 + 1e-6) | (grid == -2)).all())
        assert len(batch["__key__"]) == 5 and all(str(key).startswith("n00") for key in batch["__key__"])


def test_streams_are_seeded_disjoint_per_rank_and_resume_exactly(ray_cluster, shards):
    stream = ingest.multicrop_stream(shards, "train", "pretrain", CROPS, 5, INGEST, seed=0)
    keys = lambda batches: [str(k) for b in batches for k in b["__key__"]]  # noqa: E731
    first = _epoch(stream, 2, 6, 1, 0, batch_size=2)
    again = _epoch(stream, 2, 6, 1, 0, batch_size=2)
    for a, b in zip(first, again):  # the same rows, views and order in a second pass
        assert keys([a]) == keys([b]) and torch.equal(a["crop_0"], b["crop_0"]) and torch.equal(a["boxes"], b["boxes"])
    other_rank = _epoch(stream, 2, 6, 1, 1, batch_size=2)
    assert len(set(keys(first)) | set(keys(other_rank))) == 12
    # a resume after one batch gives the rest of the epoch, identical
    resumed = _epoch(stream, 2, 6, 1, 0, batch_size=2, skip=2)
    assert keys(resumed) == keys(first)[2:] and torch.equal(resumed[0]["crop_2"], first[1]["crop_2"])
    next_epoch = _epoch(stream, 2, 6, 2, 0, batch_size=2)
    other_seed = _epoch(ingest.multicrop_stream(shards, "train", "pretrain", CROPS, 5, INGEST, seed=1), 2, 6, 1, 0, 2)
    for changed in (next_epoch, other_seed):
        assert keys(changed) != keys(first) or not torch.equal(changed[0]["crop_0"], first[0]["crop_0"])


def test_pair_stream(ray_cluster, shards):
    stream = ingest.pair_stream(shards, "validation", "finetune", INGEST, seed=0)
    batches = _epoch(stream, 1, 12, 0, 0, batch_size=4)
    assert sum(len(b["image"]) for b in batches) == 12
    for batch in batches:
        assert tuple(batch["image"].shape) == (4, 40, 40, 3) and tuple(batch["label"].shape) == (4, 40, 40)
        assert set(batch["label"].unique().tolist()) <= {0, 1, 2, 1000}


def test_evaluation_images(ray_cluster, shards):
    rows = ingest.evaluation_images(shards, "validation", INGEST).take_all()
    assert len(rows) == 12
    for row in rows:
        assert tuple(row["original_size"]) == (72, 96)
        assert row["image"].shape == (48, 64, 3)  # shorter side 72 -> 48, aspect kept
        assert row["label"].shape == (72, 96)
        assert row["label"].max() == 1000 and row["key"].startswith("n00")


def test_scheduler_pause_paces_ray_datas_loop_and_is_registered_once(ray_cluster, shards, monkeypatch):
    import dataclasses

    import ray.data

    pauses = []
    monkeypatch.setattr(ingest, "_pause_step", pauses.append)  # the loop runs in this process's executor thread
    paced = ingest.pair_stream(shards, "validation", "finetune", INGEST, seed=0)
    assert paced.scheduler_pause_s == INGEST.scheduler_pause_ms / 1000 > 0
    for _ in range(2):  # a second stream replaces the first one's callback instead of adding another
        assert len(_epoch(paced, 1, 8, 0, 0)) == 2
    registered = [cls for cls in ray.data.DataContext.get_current().custom_execution_callback_classes
                  if getattr(cls, "lussray_pause", False)]
    assert len(registered) == 1
    assert pauses and set(pauses) == {paced.scheduler_pause_s}

    pauses.clear()
    unpaced = dataclasses.replace(paced, scheduler_pause_s=0.0)
    assert len(_epoch(unpaced, 1, 8, 0, 0)) == 2
    assert pauses == []
    assert not any(getattr(cls, "lussray_pause", False)
                   for cls in ray.data.DataContext.get_current().custom_execution_callback_classes)
