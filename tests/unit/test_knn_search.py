"""The KNN search blocks: per-shard top-k on EmbeddingShard and the driver's merge, against brute force."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from lussray.clustering.kmeans import EmbeddingShard, _torch_top_k
from lussray.clustering.knn_search import merge_top_k
from lussray.data.partners import write_parquet


def _features(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's way: full cosine similarity, torch.topk (float64 to keep the order exact)."""
    sims = torch.from_numpy(x).double() @ torch.from_numpy(x).double().T
    top = sims.topk(k, dim=1)
    return top.values.numpy(), top.indices.numpy()


def _write(tmp_path, x: np.ndarray, files: int) -> list[str]:
    paths = []
    for i, part in enumerate(np.array_split(np.arange(len(x)), files)):
        path = str(tmp_path / f"f{i}.parquet")
        table = pa.table({"key": [f"k{j}" for j in part],
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x[part].ravel()), x.shape[1])})
        write_parquet(path, table)
        paths.append(path)
    return paths


def _shards(paths: list[str], groups: list[list[int]]) -> list[EmbeddingShard]:
    shards = []
    for group in groups:
        shard = EmbeddingShard([paths[i] for i in group], "embedding", True, True, False, 1)
        shard.load()
        shards.append(shard)
    return shards


@pytest.mark.parametrize("groups,k", [([[0, 1, 2]], 5), ([[0], [1, 2]], 5), ([[0], [1], [2]], 30), ([[0, 1], [2]], 1)])
def test_sharded_top_k_equals_brute_force(tmp_path, groups, k):
    x = _features(90, 12)
    paths = _write(tmp_path, x, 3)
    shards = _shards(paths, groups)
    starts = np.cumsum([0] + [s.num_rows() for s in shards])
    queries = x[10:40]
    results = [s.top_k(queries, k) for s in shards]
    scores, rows = merge_top_k([r[0] for r in results], [r[1] + starts[a] for a, r in enumerate(results)], k)
    want_scores, want_rows = _brute_force(x, k)
    np.testing.assert_array_equal(rows, want_rows[10:40])
    np.testing.assert_allclose(scores, want_scores[10:40], atol=1e-5)
    assert (rows[:, 0] == np.arange(10, 40)).all()  # the item itself comes first


def test_shard_file_rows_and_k_beyond_its_rows(tmp_path):
    x = _features(20, 4)
    paths = _write(tmp_path, x, 2)
    shard = _shards(paths, [[1]])[0]
    assert shard.file_rows() == [(paths[1], 10)]
    scores, rows = shard.top_k(x[:3], 50)
    assert scores.shape == rows.shape == (3, 10) and rows.min() >= 0 and rows.max() < 10


def test_merge_breaks_ties_by_the_smaller_row():
    scores = [np.array([[0.9, 0.5]], np.float32), np.array([[0.9, 0.5]], np.float32)]
    rows = [np.array([[7, 2]]), np.array([[3, 1]])]
    merged_scores, merged_rows = merge_top_k(scores, rows, 3)
    assert merged_rows.tolist() == [[3, 7, 1]]
    assert merged_scores.tolist() == [[pytest.approx(0.9), pytest.approx(0.9), pytest.approx(0.5)]]


def test_torch_rows_path_equals_brute_force():
    x = _features(50, 8, seed=3)
    scores, rows = _torch_top_k(torch.from_numpy(x), x[:7], 6, chunk_rows=3)
    want_scores, want_rows = _brute_force(x, 6)
    np.testing.assert_array_equal(rows, want_rows[:7])
    np.testing.assert_allclose(scores, want_scores[:7], atol=1e-5)
