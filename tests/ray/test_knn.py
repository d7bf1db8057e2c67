"""`lussray knn` end to end on tiny generated scenes: features over an actor pool, sharded search vs brute force."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lussray.cli import main
from lussray.data.partners import KnnFiles, list_matrix
from lussray.models.pass_model import PASSModel
from lussray.stages.knn import neighbours_of
from lussray.stages.loop import CHECKPOINT_FILE

pytestmark = pytest.mark.ray

TINY = ["pretrain.arch=resnet18", "knn.res=32", "knn.k=7", "knn.torch_threads=1", "knn.batch_size=16",
        "knn.query_block_size=13", "knn.search_actors=2", "knn.actor_pool_max=2"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn")
    assert main(["synth", "--kind", "scenes", "--out", str(root / "tree"), "--train-images", "18", "--val-images",
                 "2", "--size", "48", "--workers", "1", "--dataset", "synthetic-scenes"]) == 0
    assert main(["prepare", "--src", str(root / "tree"), "--out", str(root / "shards"), "--workers", "1",
                 "--samples-per-shard", "7", "--dataset", "synthetic-scenes"]) == 0
    run = root / "run"
    torch.manual_seed(0)
    model = PASSModel("resnet18", hidden_dim=32, feat_dim=16, num_prototypes=8, shallow_stages=(3,))
    (run / "pretrain" / "checkpoint_step=00000001").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "step": 1}, run / "pretrain" / "checkpoint_step=00000001" / CHECKPOINT_FILE)
    return root


def _knn(root: Path, *extra: str) -> int:
    return main(["knn", "--dataset", "synthetic-scenes", "--data", str(root / "shards"), "--run", str(root / "run"),
                 *TINY, *extra])


def test_knn_stage_equals_brute_force_and_refuses_other_inputs(ray_cluster, scenes, capsys):
    assert _knn(scenes) == 0
    files = KnnFiles(str(scenes / "run" / "knn"))
    summary = json.loads(Path(files.summary).read_text())
    assert summary["items"] == 90 and summary["images"] == 18 and summary["k"] == 7
    assert summary["shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    # brute force: every item's feature against all, the reference's torch.topk over the full similarity
    tables = [pq.read_table(files.feature_file(name)) for name in summary["shards"]]
    features = torch.from_numpy(np.concatenate([list_matrix(t.column("embedding")) for t in tables])).double()
    keys = [key for t in tables for key in t.column("key").to_pylist()]
    assert torch.allclose(features.norm(dim=1), torch.ones(90, dtype=torch.float64), atol=1e-5)
    want = (features @ features.T).topk(7, dim=1)
    start = 0
    for name in summary["shards"]:
        shard_keys, rows, scores = neighbours_of(files, name)
        assert shard_keys == keys[start : start + len(shard_keys)]
        np.testing.assert_array_equal(rows, want.indices[start : start + len(shard_keys)].numpy())
        np.testing.assert_allclose(scores, want.values[start : start + len(shard_keys)].numpy(), atol=1e-5)
        start += len(shard_keys)
    items = pq.read_table(files.items)
    assert items.column("key").to_pylist() == keys and items.num_rows == 90
    # a rerun with the same inputs is complete at once; other inputs are refused, naming the key
    capsys.readouterr()
    assert _knn(scenes) == 0
    assert "[knn] complete" in capsys.readouterr().out
    assert _knn(scenes, "knn.k=5") == 2
    assert "knn.k: 7 -> 5" in capsys.readouterr().err
    assert _knn(scenes, "knn.search_actors=1") == 0  # how the search runs does not change the result
    assert _knn(scenes, "knn.k=5", "--overwrite") == 0
    assert json.loads(Path(files.summary).read_text())["k"] == 5
