"""The k-means step math (lussray.clustering.lloyd) against numpy transcriptions and faiss."""

import faiss
import numpy as np
import pytest

from lussray.clustering import lloyd


def _data(n=300, d=6, k=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((k, d)).astype(np.float32)


def _step(points, centroids, spherical):
    index = lloyd.flat_index(points.shape[1], inner_product=spherical)
    distances, ids = lloyd.nearest_centroids(index, points, centroids)
    return lloyd.block_stats(points, ids, distances, len(centroids))


@pytest.mark.parametrize("spherical", [False, True])
def test_one_step_equals_numpy(spherical):
    points, centroids = _data()
    if spherical:
        points, centroids = lloyd.normalize_rows(points), lloyd.normalize_rows(centroids)
    x, c = points.astype(np.float64), centroids.astype(np.float64)
    if spherical:
        score = x @ c.T
        ids, best = score.argmax(1), score.max(1)
    else:
        score = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        ids, best = score.argmin(1), score.min(1)
    stats = _step(points, centroids, spherical)
    counts = np.bincount(ids, minlength=len(c))
    sums = np.stack([x[ids == j].sum(0) for j in range(len(c))])
    np.testing.assert_array_equal(stats.counts, counts)
    np.testing.assert_allclose(stats.sums, sums, rtol=1e-6, atol=1e-5)
    assert stats.objective == pytest.approx(best.sum(), rel=1e-5)
    updated, num_splits = lloyd.update_centroids(stats, spherical)
    means = sums / counts[:, None]
    expected = means / np.linalg.norm(means, axis=1, keepdims=True) if spherical else means
    assert num_splits == 0 and updated.dtype == np.float32
    np.testing.assert_allclose(updated, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cuts", [[100], [1, 299], [50, 120, 250]])
def test_merged_partials_equal_whole_block(cuts):
    points, centroids = _data()
    whole = _step(points, centroids, False)
    merged = lloyd.merge_stats([_step(block, centroids, False) for block in np.split(points, cuts)])
    np.testing.assert_array_equal(merged.counts, whole.counts)
    np.testing.assert_allclose(merged.sums, whole.sums, rtol=1e-6, atol=1e-5)
    assert merged.objective == pytest.approx(whole.objective, rel=1e-6)
    assert merged.num_points == len(points)


def test_block_stats_chunks_sum_in_float64(monkeypatch):
    points, centroids = _data(n=1000)
    index = lloyd.flat_index(points.shape[1], inner_product=False)
    distances, ids = lloyd.nearest_centroids(index, points, centroids)
    monkeypatch.setattr(lloyd, "SUM_CHUNK_ROWS", 64)
    stats = lloyd.block_stats(points, ids, distances, len(centroids))
    exact = np.zeros((len(centroids), points.shape[1]))
    np.add.at(exact, ids, points.astype(np.float64))
    assert stats.sums.dtype == np.float64
    np.testing.assert_allclose(stats.sums, exact, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("chunk", [64, lloyd.SUM_CHUNK_ROWS])
def test_device_step_equals_faiss_step(spherical, chunk):
    torch = pytest.importorskip("torch")
    points, centroids = _data(n=1000)
    if spherical:
        points, centroids = lloyd.normalize_rows(points), lloyd.normalize_rows(centroids)
    index = lloyd.flat_index(points.shape[1], inner_product=spherical)
    distances, ids = lloyd.nearest_centroids(index, points, centroids)
    expected = lloyd.block_stats(points, ids, distances, len(centroids))
    x, c = torch.from_numpy(points), torch.from_numpy(centroids)
    device_distances, device_ids = lloyd.device_assign(x, c, spherical, chunk)
    np.testing.assert_array_equal(device_ids.numpy(), ids)
    np.testing.assert_allclose(device_distances.numpy(), distances, rtol=1e-5, atol=1e-5)
    stats = lloyd.device_block_stats(x, c, spherical, chunk)
    assert stats.sums.dtype == np.float64 and stats.counts.dtype == np.int64
    np.testing.assert_array_equal(stats.counts, expected.counts)
    np.testing.assert_allclose(stats.sums, expected.sums, rtol=1e-6, atol=1e-5)
    assert stats.objective == pytest.approx(expected.objective, rel=1e-5)


def test_split_fills_every_empty_cluster_with_perturbed_copies():
    rng = np.random.default_rng(1)
    centroids = rng.standard_normal((6, 5)).astype(np.float32)
    centroids[[1, 4]] = 0
    counts = np.array([40, 0, 1, 30, 0, 29], np.float32)
    before_centroids, before_counts = centroids.copy(), counts.copy()
    num_splits = lloyd.split_empty_clusters(centroids, counts, num_points=100)
    assert num_splits == 2
    assert (counts > 0).all() and counts.sum() == before_counts.sum()
    assert counts[2] == 1  # a singleton (probability (1 - 1) / (n - k) = 0) is never a donor
    eps = np.float32(1 / 1024)
    even = np.arange(5) % 2 == 0
    for empty in (1, 4):
        # The donor keeps the other half: its centroid is the mirror perturbation of the copy.
        donor = int(np.flatnonzero(np.isclose(centroids, centroids[empty], rtol=0.01).all(1) &
                                   (np.arange(6) != empty))[0])
        assert counts[empty] > 0 and counts[donor] > 0
        ratio = centroids[empty] / centroids[donor]
        np.testing.assert_allclose(ratio[even], (1 + eps) / (1 - eps), rtol=1e-6)
        np.testing.assert_allclose(ratio[~even], (1 - eps) / (1 + eps), rtol=1e-6)
    assert not np.array_equal(centroids, before_centroids)


def test_split_donor_is_drawn_as_faiss_does():
    # Draws of std::mt19937(1234) / 2^32: 0.19152, 0.49766, ...; p = (size - 1) / (n - k) =
    # [-1/16, 8/16, 9/16]: cluster 0 rejects 0.19152, cluster 1 (not the largest) takes 0.49766.
    centroids = np.array([[0, 0], [2, 4], [1, 1]], np.float32)
    counts = np.array([0, 9, 10], np.float32)
    assert lloyd.split_empty_clusters(centroids, counts, num_points=19) == 1
    np.testing.assert_array_equal(counts, [4.5, 4.5, 10])  # faiss's float counts halve exactly
    eps = np.float32(1 / 1024)
    np.testing.assert_array_equal(centroids[0], np.array([2, 4], np.float32) * [1 + eps, 1 - eps])
    np.testing.assert_array_equal(centroids[1], np.array([2, 4], np.float32) * [1 - eps, 1 + eps])
    np.testing.assert_array_equal(centroids[2], [1, 1])


def test_update_with_empty_clusters_matches_faiss():
    points, _ = _data(n=400, d=4, k=6, seed=3)
    init = points[:6].copy()
    init[[2, 5]] += 100.0  # nobody picks these two: they are split in the first update
    kmeans = faiss.Kmeans(4, 6, niter=1, seed=3, max_points_per_centroid=10**6)
    kmeans.train(points, init_centroids=init)
    updated, num_splits = lloyd.update_centroids(_step(points, init, False), spherical=False)
    assert num_splits == kmeans.iteration_stats[0]["nsplit"] == 2
    np.testing.assert_allclose(updated, kmeans.centroids, rtol=1e-5, atol=1e-6)


def test_spherical_update_gives_unit_rows_and_keeps_zero_rows():
    points, centroids = _data()
    updated, _ = lloyd.update_centroids(_step(points, centroids, True), spherical=True)
    np.testing.assert_allclose(np.linalg.norm(updated, axis=1), 1.0, rtol=1e-6)
    x = np.array([[3, 4], [0, 0]], np.float32)
    np.testing.assert_allclose(lloyd.normalize_rows(x), [[0.6, 0.8], [0, 0]])
    np.testing.assert_allclose(lloyd.normalize_rows(x, eps=1e-8), x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8))


@pytest.mark.parametrize("redo", [0, 2])
def test_initial_rows_are_faiss_initial_centroids(redo):
    points, _ = _data(n=500, d=4, k=7, seed=4)
    seed = 11 + redo * lloyd.REDO_SEED_STRIDE  # faiss's redo r of seed s samples like redo 0 of s + r * stride
    kmeans = faiss.Kmeans(4, 7, niter=1, seed=seed, max_points_per_centroid=10**6)
    kmeans.train(points)
    rows = lloyd.initial_rows(len(points), 7, 11, redo)
    assert len(set(rows.tolist())) == 7 and rows.min() >= 0 and rows.max() < len(points)
    updated, _ = lloyd.update_centroids(_step(points, points[rows], False), spherical=False)
    np.testing.assert_allclose(updated, kmeans.centroids, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(rows, lloyd.initial_rows(len(points), 7, 11, redo + 1))


def test_is_better_minimises_l2_and_maximises_inner_product():
    assert lloyd.is_better(1.0, None, spherical=False) and lloyd.is_better(1.0, None, spherical=True)
    assert lloyd.is_better(1.0, 2.0, spherical=False) and not lloyd.is_better(1.0, 2.0, spherical=True)


@pytest.mark.parametrize("spherical", [False, True])
def test_gpu_index_is_float32_on_device_0_and_keeps_its_resources(monkeypatch, spherical):
    # No GPU here: stand-ins record how the GPU index is built and search on the CPU.
    built = {}

    class Config:
        device, useFloat16 = -1, True

    def gpu_index(metric):
        def make(resources, dim, config):
            built.update(resources=resources, device=config.device, fp16=config.useFloat16, metric=metric)
            return faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
        return make

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatConfig", Config, raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatL2", gpu_index("l2"), raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatIP", gpu_index("ip"), raising=False)
    index = lloyd.flat_index(6, inner_product=spherical, use_gpu=True)
    assert built["metric"] == ("ip" if spherical else "l2") and (built["device"], built["fp16"]) == (0, False)
    assert built["resources"] in index.referenced_objects
    points, centroids = _data()
    stats = lloyd.block_stats(points, *lloyd.nearest_centroids(index, points, centroids)[::-1], len(centroids))
    assert stats.num_points == len(points)
