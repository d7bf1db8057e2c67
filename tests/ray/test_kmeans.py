"""Sharded k-means over Ray actors equals faiss.Kmeans in one process on the same data."""

import os
import signal
import threading
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lussray.clustering import lloyd
from lussray.clustering.kmeans import (
    EmbeddingShard,
    group_files,
    openblas_env,
    read_embeddings_parquet,
    sharded_kmeans,
)
from lussray.errors import UserError
from tests.ray.kill import wait_for_process

pytestmark = pytest.mark.ray

N, D, K, NITER = 3000, 16, 10, 8
ACTOR = {"num_actors": 3, "cpus_per_actor": 0.5, "log_every": 0}
NO_SUBSAMPLING = {"max_points_per_centroid": 10**7}


def write_embeddings(path, x, fixed=True, column="embedding"):
    values = pa.array(x.ravel(), pa.float32())
    lists = (pa.FixedSizeListArray.from_arrays(values, x.shape[1]) if fixed
             else pa.ListArray.from_arrays(pa.array(np.arange(len(x) + 1) * x.shape[1], pa.int32()), values))
    keys = pa.array([f"{path.stem}/{i}" for i in range(len(x))])
    pq.write_table(pa.table({"key": keys, column: lists}), path)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Random 3000 x 16 float32 points with cluster structure, in 4 files of unequal size."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((N, D)) + 3 * rng.standard_normal((K, D))[rng.integers(0, K, N)]).astype(np.float32)
    root = tmp_path_factory.mktemp("embeddings")
    cuts = [700, 1600, 2300]
    paths = [write_embeddings(root / f"train-{i:06d}.parquet", part, fixed=i != 1)
             for i, part in enumerate(np.split(x, cuts))]
    return x, paths


def faiss_kmeans(x, spherical, nredo=1, seed=1234, init=None):
    kmeans = faiss.Kmeans(D, K, niter=NITER, nredo=nredo, seed=seed, spherical=spherical, **NO_SUBSAMPLING)
    kmeans.train(x, init_centroids=init)
    return kmeans


def assert_same(result, kmeans):
    np.testing.assert_allclose(result.centroids, kmeans.centroids, rtol=1e-4, atol=1e-4)
    assert result.objective == pytest.approx(float(kmeans.obj[-1]), rel=1e-4)
    np.testing.assert_allclose(result.iteration_objectives, kmeans.obj[-NITER:], rtol=1e-4)


def test_read_embeddings_and_groups(data):
    x, paths = data
    keys, fixed = read_embeddings_parquet(paths[0])
    _, variable = read_embeddings_parquet(paths[1])
    assert keys[0] == "train-000000/0" and fixed.dtype == np.float32 and fixed.flags.c_contiguous
    np.testing.assert_array_equal(np.concatenate([fixed, variable]), x[:1600])
    assert group_files([10, 10, 10, 10], 3) == [range(1), range(1, 3), range(3, 4)]
    assert group_files([100, 1, 1, 100], 2) == [range(2), range(2, 4)]
    assert group_files([5, 5], 4) == [range(1), range(1, 2)]


def test_openblas_kernels_are_forced_only_on_avx512_and_when_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    avx512, avx2 = tmp_path / "avx512", tmp_path / "avx2"
    avx512.write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512cd avx512bw avx512dq avx512vl\n")
    avx2.write_text("processor : 0\nflags : fpu sse avx2 fma\n")
    assert openblas_env(str(avx512)) == {"OPENBLAS_CORETYPE": "SkylakeX"}
    assert openblas_env(str(avx2)) == {} and openblas_env(str(tmp_path / "missing")) == {}
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert openblas_env(str(avx512)) == {}


@pytest.mark.parametrize("engine", ["faiss", "torch"])
@pytest.mark.parametrize("spherical", [False, True])
def test_equals_faiss_with_same_init(ray_cluster, data, spherical, engine):
    x, paths = data
    points = lloyd.normalize_rows(x, 1e-8) if spherical else x
    init = points[np.random.default_rng(1).choice(N, K, replace=False)]
    result = sharded_kmeans(paths, K, niter=NITER, spherical=spherical, normalize_rows=spherical,
                            init_centroids=init, engine=engine, **ACTOR)
    assert (result.num_points, result.dim) == (N, D) and len(result.peak_rss_mb_per_actor) == 3
    assert_same(result, faiss_kmeans(points, spherical, init=init))
    if spherical:
        np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, rtol=1e-5)


def test_torch_engine_keeps_the_rows_as_a_tensor_and_gives_the_faiss_statistics(data):
    torch = pytest.importorskip("torch")
    _, paths = data
    shards = {engine: EmbeddingShard(paths[:2], "embedding", True, False, False, 1, engine=engine)
              for engine in ("faiss", "torch")}
    assert shards["torch"].load() == shards["faiss"].load()
    assert isinstance(shards["torch"]._points, torch.Tensor) and isinstance(shards["faiss"]._points, np.ndarray)
    centroids = shards["faiss"].rows(np.arange(K))
    np.testing.assert_array_equal(shards["torch"].rows(np.arange(K)), centroids)
    faiss_stats, torch_stats = (shards[e].partial_stats(centroids) for e in ("faiss", "torch"))
    np.testing.assert_array_equal(torch_stats.counts, faiss_stats.counts)
    np.testing.assert_allclose(torch_stats.sums, faiss_stats.sums, rtol=1e-6, atol=1e-6)
    with pytest.raises(UserError, match="engine 'cuda' is not one of auto, faiss, torch"):
        EmbeddingShard(paths[:1], "embedding", True, False, False, 1, engine="cuda")


def test_redos_keep_the_best_objective_as_faiss(ray_cluster, data, capsys):
    x, paths = data
    result = sharded_kmeans(paths, K, niter=NITER, nredo=3, seed=5, normalize_rows=False,
                            **{**ACTOR, "log_every": 4})
    progress = [line for line in capsys.readouterr().out.splitlines() if " iter " in line]
    assert len(progress) == 6 and progress[-1].startswith("[kmeans] redo 3/3 iter 8/8 objective=")
    assert_same(result, faiss_kmeans(x, False, nredo=3, seed=5))
    # Redo r of seed s is redo 0 of seed s + r * stride; the kept one has the lowest objective.
    finals = [faiss_kmeans(x, False, seed=5 + r * lloyd.REDO_SEED_STRIDE).obj[-1] for r in range(3)]
    assert len(set(np.round(finals, 1))) > 1
    assert result.objective == pytest.approx(min(finals), rel=1e-4)


def test_as_many_points_as_clusters_gives_the_points(ray_cluster, tmp_path):
    x = np.random.default_rng(2).standard_normal((K, D)).astype(np.float32)
    path = write_embeddings(tmp_path / "train-000000.parquet", x)
    result = sharded_kmeans([path], K, normalize_rows=False, **ACTOR)
    np.testing.assert_array_equal(result.centroids, x)
    assert result.iteration_objectives == [0.0]


def _wait_for_free_cpus(ray, expected, timeout=20.0):
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return ray.available_resources().get("CPU", 0)


def test_errors_name_the_problem_and_free_the_actors(ray_cluster, data, tmp_path):
    x, paths = data
    free = ray_cluster.cluster_resources()["CPU"]
    with pytest.raises(UserError, match="no embedding files"):
        sharded_kmeans([], K, **ACTOR)
    with pytest.raises(UserError, match="K=5000 clusters but only 3000"):
        sharded_kmeans(paths, 5000, **ACTOR)
    other = write_embeddings(tmp_path / "train-000009.parquet", np.ones((20, D + 1), np.float32))
    with pytest.raises(UserError, match="dimension 17 in .*train-000009.parquet"):
        sharded_kmeans(paths + [other], K, **ACTOR)
    renamed = write_embeddings(tmp_path / "train-000010.parquet", x[:50], column="features")
    with pytest.raises(UserError, match="train-000010.parquet has no column 'embedding'"):
        sharded_kmeans([paths[0], renamed], K, **ACTOR)
    with pytest.raises(UserError, match="not found"):
        sharded_kmeans([str(tmp_path / "missing.parquet")], K, **ACTOR)
    assert _wait_for_free_cpus(ray_cluster, free) == free  # every actor was killed


def test_an_actor_killed_mid_iteration_is_rebuilt_and_the_result_is_unchanged(ray_cluster, tmp_path, capsys):
    # big enough that an iteration's search takes tens of milliseconds, so the kill lands inside one
    rng = np.random.default_rng(3)
    x = rng.standard_normal((240_000, 64)).astype(np.float32)
    paths = [write_embeddings(tmp_path / f"train-{i:06d}.parquet", part) for i, part in enumerate(np.split(x, 6))]
    args = dict(niter=40, seed=7, normalize_rows=True, num_actors=3, cpus_per_actor=0.5, log_every=0)
    unbroken = sharded_kmeans(paths, 200, **args)
    assert unbroken.rebuilds == 0
    capsys.readouterr()

    killed: list[int] = []
    finished = threading.Event()

    def kill_one_in_its_search() -> None:
        # the actor's process is named after the method it runs: kill it inside partial_stats
        pid = wait_for_process("ray::EmbeddingShard.partial_stats", under=os.getpid(), timeout_s=300,
                               running=lambda: not finished.is_set())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    watcher = threading.Thread(target=kill_one_in_its_search, daemon=True)
    watcher.start()
    try:
        result = sharded_kmeans(paths, 200, **args)
    finally:
        finished.set()
        watcher.join(timeout=60)
    assert killed, "the k-means run ended before an actor could be killed in its search"
    assert result.rebuilds == 1
    assert "died during partial_stats" in capsys.readouterr().out
    np.testing.assert_allclose(result.centroids, unbroken.centroids, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.iteration_objectives, unbroken.iteration_objectives, rtol=1e-9)
