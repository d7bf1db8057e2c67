"""The actors of `lussray fs4 labels`, run in this process (no Ray): views, assignment, selection per shard."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lussray.data.fs4_views import ViewRecord, view_key
from lussray.data.shards import iter_tar, write_tar
from lussray.errors import UserError
from lussray.methods.fs4 import active_selection, nearest_centres, selection_cutoff
from lussray.models.pass_model import PASSModel
from lussray.stages.fs4_labels import AssignViews, EmbedViews, WriteViews, load_initial_model

MODEL = {"arch": "resnet18", "hidden_dim": 16, "feat_dim": 8, "num_prototypes": 4}
VIEWS = {"crop_fraction": 0.5, "crop_view_size": 48, "resize": 40, "crop": 32}


def _jpeg(seed: int, size=(30, 44)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, size + (3,), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def shard_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    torch.save({"model": PASSModel(**MODEL, shallow_stages=()).state_dict()}, tmp_path / "init.pt")
    shard = tmp_path / "train-000000.tar"
    write_tar(((f"g/img{i}", {"jpg": _jpeg(i), "json": b"{}"}) for i in range(5)), str(shard))
    return shard, tmp_path / "init.pt"


def test_actors_embed_assign_and_write_the_selected_views_of_a_shard(shard_and_checkpoint, tmp_path):
    shard, checkpoint = shard_and_checkpoint
    embedder = EmbedViews(str(checkpoint), MODEL, "projector", VIEWS, batch_size=2, torch_threads=1)
    row = embedder({"shard": np.array([str(shard)]), "out": np.array([str(tmp_path / "e.parquet")])})
    assert row["num_images"] == [5] and row["peak_rss_mb"][0] > 0
    table = pq.read_table(tmp_path / "e.parquet").to_pydict()
    assert table["key"] == [view_key(f"g/img{i}", v) for i in range(5) for v in range(6)]
    assert [table[name][:6] for name in ("top", "left", "height", "width")] == [
        [0, 0, 0, 15, 15, 7], [0, 0, 22, 0, 22, 11], [30, 15, 15, 15, 15, 15], [44, 22, 22, 22, 22, 22]]
    features = np.asarray(table["embedding"], np.float32)
    assert features.shape == (30, 8) and np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)

    centroids = features[[0, 7, 14]] + 0.01
    AssignViews(centroids).process({"shard": str(shard), "embeddings": str(tmp_path / "e.parquet"),
                                    "out": str(tmp_path / "a.parquet"), "first_index": 60})
    assigned = pq.read_table(tmp_path / "a.parquet").to_pydict()
    labels, distances = nearest_centres(features, centroids)
    assert assigned["label"] == labels.tolist() and assigned["index"] == list(range(60, 90))
    np.testing.assert_allclose(assigned["distance"], distances)

    # a cutoff computed over more views than this shard's: the shard keeps exactly its part of them
    others = np.random.default_rng(1).random(60) * distances.max()
    everything = np.concatenate([others, np.asarray(assigned["distance"])])
    cutoff = selection_cutoff(everything, 0.4)
    kept = active_selection(everything, 0.4)[60:]
    out = tmp_path / "views" / "train-000000.tar"
    writer = WriteViews({"distance": cutoff.distance, "index": cutoff.index, "num_kept": cutoff.num_kept,
                         "num_views": cutoff.num_views}, num_clusters=3)
    writer.process({"shard": str(shard), "assign": str(tmp_path / "a.parquet"), "out": str(out)})
    samples = list(iter_tar(str(out)))
    assert [key for key, _ in samples] == np.asarray(assigned["key"])[kept].tolist()
    for key, members in samples:
        record = ViewRecord.from_json(members["json"])
        position = assigned["key"].index(key)
        assert record.label == assigned["label"][position] and record.size == (30, 44)
        assert members["jpg"] == _jpeg(int(record.image[5:]))  # the original bytes


def test_initial_model_must_hold_the_backbone_and_the_projector_it_is_asked_for(shard_and_checkpoint, tmp_path):
    _, checkpoint = shard_and_checkpoint
    backbone_only = {key.removeprefix("backbone."): value for key, value in torch.load(checkpoint)["model"].items()
                     if key.startswith("backbone.")}
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in backbone_only.items()}}, tmp_path / "moco.pth")
    with pytest.raises(UserError, match="fs4.labels.feature=backbone"):
        load_initial_model(str(tmp_path / "moco.pth"), MODEL, "projector")
    assert not load_initial_model(str(tmp_path / "moco.pth"), MODEL, "backbone").training
    with pytest.raises(UserError, match="pretrain.arch"):
        load_initial_model(str(checkpoint), {**MODEL, "arch": "resnet34"}, "projector")


def test_whole_images_only_give_one_view_per_image(shard_and_checkpoint, tmp_path):
    shard, checkpoint = shard_and_checkpoint
    embedder = EmbedViews(str(checkpoint), MODEL, "backbone", VIEWS, batch_size=2, torch_threads=1, num_views=1)
    assert embedder.process({"shard": str(shard), "out": str(tmp_path / "e.parquet")})["num_images"] == 5
    table = pq.read_table(tmp_path / "e.parquet").to_pydict()
    assert table["key"] == [view_key(f"g/img{i}", 0) for i in range(5)] and set(table["height"]) == {30}
    assert np.asarray(table["embedding"]).shape == (5, 512)  # pooled layer 4 of a ResNet-18
