"""`lussray fs4 labels` end to end on tiny generated scenes: exact global selection, streamable view shards, reruns."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from lussray.cli import main
from lussray.data.augment import IMAGENET_MEAN, IMAGENET_STD, decode_image
from lussray.data.fs4_views import MEMBERS, ViewRecord, fs4_batch, view_key
from lussray.data.ingest import EpochStream
from lussray.data.shards import iter_tar, load_manifest, shard_paths
from lussray.methods.fs4 import active_selection, nearest_centres, num_selected, pyramid_view_images
from lussray.models.pass_model import PASSModel
from lussray.stages.loop import CHECKPOINT_FILE
from lussray.stages.pretrain import normalize_views

pytestmark = [pytest.mark.ray, pytest.mark.slow]

IMAGES, K = 16, 4
MODEL = {"arch": "resnet18", "hidden_dim": 32, "feat_dim": 16, "num_prototypes": 8}
VIEWS = {"crop_view_size": 64, "resize": 64, "crop": 56}
TINY = ["pretrain.hidden_mlp=32", "pretrain.feat_dim=16", "pretrain.num_prototypes=8", f"fs4.labels.num_clusters={K}",
        "fs4.labels.crop_view_size=64", "fs4.labels.resize=64", "fs4.labels.crop_size=56",
        "fs4.labels.kmeans_iterations=5", "fs4.labels.kmeans_redo=2", "labelgen.actor_pool_max=1",
        "labelgen.kmeans_actors=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Scene shards of 6 images each (3 shards) and a random stage-1 checkpoint."""
    root = tmp_path_factory.mktemp("fs4")
    assert main(["synth", "--dataset", "synthetic-scenes", "--out", str(root / "tree"), "--train-images", str(IMAGES),
                 "--val-images", "2", "--size", "64", "--workers", "1"]) == 0
    assert main(["prepare", "--dataset", "synthetic-scenes", "--src", str(root / "tree"), "--out", str(root / "shards"),
                 "--workers", "1", "--samples-per-shard", "6"]) == 0
    torch.manual_seed(0)
    folder = root / "checkpoint_step=00000001"
    folder.mkdir()
    torch.save({"model": PASSModel(**MODEL, shallow_stages=()).state_dict(), "step": 1}, folder / CHECKPOINT_FILE)
    return root


def _args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["fs4", "labels", "--dataset", "synthetic-scenes", "--data", str(data / "shards"), "--run", str(run),
            *TINY, *extra]


def _expected_views(data: Path) -> tuple[list[str], np.ndarray]:
    """Every view key in (shard, image, view) order and its global feature, computed here from the checkpoint."""
    model = PASSModel(**MODEL, shallow_stages=())
    model.load_state_dict(torch.load(data / "checkpoint_step=00000001" / CHECKPOINT_FILE)["model"])
    model.eval()
    keys, features = [], []
    for path in shard_paths(str(data / "shards"), "train"):
        for key, members in iter_tar(path):
            views = np.stack(pyramid_view_images(decode_image(members["jpg"]), **VIEWS))
            with torch.inference_mode():
                pooled = model.backbone(normalize_views(torch.from_numpy(views), IMAGENET_MEAN, IMAGENET_STD))["c4"]
                features.append(F.normalize(model.projection_head(pooled.mean(dim=(2, 3))), dim=1).numpy())
            keys += [view_key(key, view) for view in range(6)]
    return keys, np.concatenate(features)


def _shard_records(out: Path) -> dict[str, ViewRecord]:
    records = {}
    for path in shard_paths(str(out), "train"):
        for key, members in iter_tar(path):
            assert set(members) == set(MEMBERS) and key not in records
            records[key] = ViewRecord.from_json(members["json"])
            assert records[key].key == key
    return records


def test_fs4_labels_selects_the_closest_views_of_the_dataset_and_resumes(data, tmp_path, ray_cluster, capsys):
    run = tmp_path / "run"
    (run / "pretrain").mkdir(parents=True)
    os.symlink(data / "checkpoint_step=00000001", run / "pretrain" / "checkpoint_step=00000001")
    assert main(_args(data, run)) == 0
    out = run / "fs4-labels"

    # every view's label and distance: its nearest centre of centroids.npy, by cosine
    keys, features = _expected_views(data)
    labels, distances = nearest_centres(features, np.load(out / "centroids.npy"))
    tables = [pq.read_table(path).to_pydict() for path in sorted((out / "assign").glob("*.parquet"))]
    assigned = {name: sum((t[name] for t in tables), []) for name in ("key", "index", "label", "distance")}
    assert assigned["key"] == keys and assigned["index"] == list(range(6 * IMAGES))
    assert assigned["label"] == labels.tolist()
    np.testing.assert_allclose(assigned["distance"], distances, atol=1e-5)

    # the shards hold exactly the closest 40 % of all views of the dataset, with their labels
    kept = active_selection(np.asarray(assigned["distance"]), 0.4)
    records = _shard_records(out)
    assert len(records) == num_selected(6 * IMAGES, 0.4) == kept.sum()
    assert sorted(records) == sorted(np.asarray(keys)[kept].tolist())
    by_key = dict(zip(keys, zip(labels.tolist(), assigned["distance"])))
    assert all(by_key[key] == (r.label, r.distance) for key, r in records.items())
    manifest = load_manifest(str(out / "train" / "manifest.json"))
    assert manifest["num_samples"] == len(records) and all(entry["chunks"] is not None for entry in manifest["shards"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == len(records) and summary["views"] == 6 * IMAGES and summary["images"] == IMAGES
    assert summary["histogram"] == np.bincount(labels, minlength=K).tolist()
    assert sum(summary["kept_histogram"]) == len(records)
    assert sum(summary["kept_per_view"].values()) == len(records)

    # the training stream reads the view shards with FS^4's batch function, no join: one row per kept view
    stream = EpochStream(str(out), "train", "fs4", MEMBERS, fs4_batch, {"base_size": 32, "view_size": 24}, seed=0,
                         map_batch_size=8)
    streamed = {}
    for batch in stream.dataset(stream.plan(1, len(records)).windows(0, 0)).iter_batches(batch_size=8,
                                                                                          batch_format="numpy"):
        assert batch["image1"].shape[1:] == (24, 24, 3) and batch["crop"].shape[1:] == (5,)
        streamed.update(zip(batch["__key__"].tolist(), batch["global_label"].tolist()))
    assert streamed == {key: record.label for key, record in records.items()}

    # a complete stage is skipped; other inputs are refused naming the key
    capsys.readouterr()
    assert main(_args(data, run)) == 0 and "complete" in capsys.readouterr().out
    assert main(_args(data, run, "fs4.labels.keep_fraction=0.5")) == 2
    assert "fs4.labels.keep_fraction: 0.4 -> 0.5" in capsys.readouterr().err

    # an interrupted stage resumes: only the missing view shard is written again, the same bytes
    shards = sorted((out / "train").glob("*.tar"))
    before = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in shards}
    for path in (out / "summary.json", out / "train" / "manifest.json", out / "selection.json", shards[1],
                 Path(f"{shards[1]}.done.json")):
        path.unlink()
    assert main(_args(data, run)) == 0
    printed = capsys.readouterr().out
    assert "embed: 3 of 3 shards done before" in printed and "kmeans: done before" in printed
    assert "assign: 3 of 3 shards done before" in printed and "resuming, 2 of 3 shards already written" in printed
    for path in shards:
        assert path.read_bytes() == before[path.name][1]
        assert (path.stat().st_mtime_ns == before[path.name][0]) == (path != shards[1])
    assert json.loads((out / "summary.json").read_text())["kept"] == len(records)


def test_fs4_labels_refuses_bad_input_before_any_work(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(data, run)) == 2  # no stage-1 checkpoint under <run>/pretrain, none given
    assert "run `lussray train` first or pass --checkpoint" in capsys.readouterr().err
    checkpoint = str(data / "checkpoint_step=00000001" / CHECKPOINT_FILE)
    too_many = f"fs4.labels.num_clusters={6 * IMAGES + 1}"
    assert main(["fs4", "labels", "--checkpoint", checkpoint, *_args(data, run, too_many)[2:]]) == 2
    assert f"fs4.labels.num_clusters={6 * IMAGES + 1} exceeds the {6 * IMAGES} views" in capsys.readouterr().err
    assert not (run / "fs4-labels").exists()
