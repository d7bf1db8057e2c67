"""PiCIE's loss against a float64 transcription of the paper, and its k-means step math."""

import math

import numpy as np
import pytest
import torch

from lussray.methods import picie
from lussray.methods.picie import ClusterTargets


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _l_clust(z, y, mu, weight, spherical):
    """Eq. (3) of PiCIE with d = cosine distance, summed/averaged per pixel, in float64 loops.

    z: (N, D) raw pixels, y: (N,) labels, mu: (K, D) centroids, weight: (K,) or None. Returns the
    (weighted) mean over pixels, as torch's cross-entropy averages.
    """
    total, norm = 0.0, 0.0
    for zi, yi in zip(z, y):
        if yi < 0:
            continue
        zi = zi / math.sqrt(sum(v * v for v in zi))
        dist = []
        for c in mu:
            if spherical:
                c = c / math.sqrt(sum(v * v for v in c))
                dist.append(1.0 - sum(a * b for a, b in zip(zi, c)))  # cosine distance
            else:
                dist.append(-sum(a * b for a, b in zip(zi, c)))  # reference: logit <z, c>
        log_den = math.log(sum(math.exp(-d) for d in dist))
        w = 1.0 if weight is None else weight[yi]
        total += w * (dist[yi] + log_den)  # -log(exp(-d_y) / sum_l exp(-d_l))
        norm += w
    return total / norm


def _pixels(feature_map):
    return feature_map.permute(0, 2, 3, 1).reshape(-1, feature_map.shape[1]).double().numpy()


@pytest.mark.parametrize("spherical", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("mse", [False, True])
def test_loss_matches_float64_transcription(spherical, weighted, mse):
    gen = torch.Generator().manual_seed(3 + 2 * spherical + weighted)
    b, d, h, w, k = 2, 5, 3, 4, 4
    z1, z2 = torch.randn(b, d, h, w, generator=gen), torch.randn(b, d, h, w, generator=gen)
    mu1, mu2 = torch.randn(k, d, generator=gen) * 0.5, torch.randn(k, d, generator=gen) * 0.5
    y1, y2 = torch.randint(0, k, (b, h, w), generator=gen), torch.randint(0, k, (b, h, w), generator=gen)
    y1[0, 0, 0] = -1  # ignored pixel
    w1 = picie.class_weights(picie.label_counts(y1, k)) if weighted else None
    w2 = picie.class_weights(picie.label_counts(y2, k)) if weighted else None
    loss, parts = picie.picie_loss(z1, z2, ClusterTargets(mu1, y1, w1), ClusterTargets(mu2, y2, w2),
                                   spherical=spherical, mse=mse)

    p1, p2 = _pixels(z1), _pixels(z2)
    l1, l2 = y1.reshape(-1).numpy(), y2.reshape(-1).numpy()
    m1, m2 = mu1.double().numpy(), mu2.double().numpy()
    ww1 = None if w1 is None else w1.double().numpy()
    ww2 = None if w2 is None else w2.double().numpy()
    within = (_l_clust(p1, l1, m1, ww1, spherical) + _l_clust(p2, l2, m2, ww2, spherical)) / 2
    cross = (_l_clust(p1, l2, m2, ww2, spherical) + _l_clust(p2, l1, m1, ww1, spherical)) / 2
    expected = (within + cross) / 2
    if mse:
        expected = (expected + float(np.mean((_unit(p1) - _unit(p2)) ** 2))) / 2
    assert parts["within"].item() == pytest.approx(within, rel=1e-5)
    assert parts["cross"].item() == pytest.approx(cross, rel=1e-5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_gradient_flows_to_features_not_centroids():
    z1 = torch.randn(1, 4, 2, 2, requires_grad=True)
    z2 = torch.randn(1, 4, 2, 2, requires_grad=True)
    mu = torch.randn(3, 4, requires_grad=True)
    y = torch.zeros(1, 2, 2, dtype=torch.long)
    loss, _ = picie.picie_loss(z1, z2, ClusterTargets(mu, y), ClusterTargets(mu, y))
    loss.backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0 and mu.grad is None


def test_multihead_averages_heads():
    gen = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(1, 4, 2, 3, generator=gen), torch.randn(1, 4, 2, 3, generator=gen)
    heads = []
    for k in (3, 7):
        mu = torch.randn(k, 4, generator=gen)
        heads.append((ClusterTargets(mu, torch.randint(0, k, (1, 2, 3), generator=gen)),
                      ClusterTargets(mu.flip(0), torch.randint(0, k, (1, 2, 3), generator=gen))))
    total, parts = picie.picie_multihead_loss(z1, z2, heads)
    singles = [picie.picie_loss(z1, z2, *head)[0] for head in heads]
    torch.testing.assert_close(total, (singles[0] + singles[1]) / 2)
    torch.testing.assert_close(parts["head1"], singles[1])


@pytest.mark.parametrize("spherical", [True, False])
@pytest.mark.parametrize("n", [1, 37, 300])
def test_assignment_equals_brute_force(spherical, n):
    gen = torch.Generator().manual_seed(n)
    x = picie.normalize(torch.randn(n, 6, generator=gen))
    c = torch.randn(5, 6, generator=gen) * 0.7
    ids, sq = picie.assign(x, c, spherical, chunk_rows=16)
    cc = picie.normalize(c) if spherical else c
    brute = torch.stack([((x - cc[j]) ** 2).sum(1) for j in range(5)], dim=1)  # (n, K)
    assert torch.equal(ids, brute.argmin(1))
    torch.testing.assert_close(sq, brute.min(1).values, atol=1e-5, rtol=1e-5)
    if spherical:  # cosine: the nearest centroid is the most similar one
        assert torch.equal(ids, (x @ cc.T).argmax(1))


def test_assign_labels_shape_and_values():
    gen = torch.Generator().manual_seed(0)
    fmap = torch.randn(2, 4, 3, 5, generator=gen)
    c = torch.randn(6, 4, generator=gen)
    labels = picie.assign_labels(fmap, c)
    assert labels.shape == (2, 3, 5) and labels.dtype == torch.long
    z = picie.normalize(fmap, dim=1)
    expected = torch.einsum("bdhw,kd->bkhw", z, picie.normalize(c)).argmax(1)
    assert torch.equal(labels, expected)


@pytest.mark.parametrize("split", [0, 1, 50, 99, 100])
def test_stats_are_additive_over_two_halves(split):
    gen = torch.Generator().manual_seed(split)
    x = picie.normalize(torch.randn(100, 8, generator=gen))
    c = picie.normalize(torch.randn(4, 8, generator=gen))
    ids, sq = picie.assign(x, c)
    whole = picie.cluster_stats(x, ids, sq, 4)
    parts = picie.cluster_stats(x[:split], ids[:split], sq[:split], 4) + picie.cluster_stats(
        x[split:], ids[split:], sq[split:], 4)
    torch.testing.assert_close(parts.sums, whole.sums, rtol=0, atol=1e-12)
    assert torch.equal(parts.counts, whole.counts) and parts.num_points == 100
    torch.testing.assert_close(parts.sq_distance, whole.sq_distance, rtol=0, atol=1e-9)
    for j in range(4):  # and they are what a Lloyd mean needs
        torch.testing.assert_close(whole.sums[j], x[ids == j].double().sum(0))


def test_lloyd_update_gives_cluster_means_and_splits_empty_clusters():
    x = picie.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0]]))
    ids = torch.tensor([0, 0, 1, 1, 1])
    centroids, splits = picie.lloyd_update(picie.cluster_stats(x, ids, torch.zeros(5), 2), spherical=False)
    assert splits == 0
    torch.testing.assert_close(centroids, torch.stack([x[:2].mean(0), x[2:].mean(0)]))
    spherical, _ = picie.lloyd_update(picie.cluster_stats(x, ids, torch.zeros(5), 2), spherical=True)
    torch.testing.assert_close(spherical, picie.normalize(centroids))
    # A third, empty cluster is re-seeded next to a donor (faiss's split, perturbed by 1/1024).
    split, splits = picie.lloyd_update(picie.cluster_stats(x, ids, torch.zeros(5), 3), spherical=False)
    assert splits == 1
    assert min((split[2] - centroids[j]).abs().max().item() for j in range(2)) < 2e-3


def test_lloyd_of_two_workers_equals_one_process():
    gen = torch.Generator().manual_seed(11)
    x = picie.normalize(torch.randn(400, 6, generator=gen) + torch.randn(4, 6, generator=gen).repeat(100, 1))
    init = picie.init_centroids(x, 4, torch.Generator().manual_seed(0))
    single, objectives = picie.lloyd(x, init, num_iters=5)
    assert objectives[-1] <= objectives[0]

    # Two "workers" on halves whose statistics are summed as an all-reduce would.
    halves, centroids = (x[:150], x[150:]), init
    for _ in range(5):
        stats = []
        for part in halves:
            ids, sq = picie.assign(part, centroids)
            stats.append(picie.cluster_stats(part, ids, sq, 4))
        centroids, _ = picie.lloyd_update(stats[0] + stats[1])
    torch.testing.assert_close(centroids, single, rtol=0, atol=1e-6)


@pytest.mark.parametrize("spherical", [False, True])
def test_minibatch_update_is_a_running_mean(spherical):
    gen = torch.Generator().manual_seed(2)
    c = torch.randn(3, 4, generator=gen)
    running = torch.tensor([10, 5, 0])
    batch = torch.randn(6, 4, generator=gen)
    ids = torch.tensor([0, 0, 0, 2, 2, 2])  # cluster 1 absent
    stats = picie.cluster_stats(batch, ids, torch.zeros(6), 3)
    new, counts = picie.minibatch_update(c, running, stats, spherical=spherical)
    assert counts.tolist() == [13, 5, 3]
    # Reference form: lr = n_k / N_k, c <- (1 - lr) c + lr mean.
    expected0 = (1 - 3 / 13) * c[0] + (3 / 13) * batch[:3].mean(0)
    expected = torch.stack([expected0, c[1], batch[3:].mean(0)])
    if spherical:
        expected = picie.normalize(expected)
    torch.testing.assert_close(new, expected, atol=1e-6, rtol=1e-6)


def test_class_weights_are_frequencies():
    counts = torch.tensor([2, 6, 0, 2])
    torch.testing.assert_close(picie.class_weights(counts), torch.tensor([0.2, 0.6, 0.0, 0.2]))
    assert picie.class_weights(counts, "none") is None
    with pytest.raises(ValueError, match="balance"):
        picie.class_weights(counts, "inverse")


def test_all_reduce_is_identity_without_process_group():
    stats = picie.cluster_stats(torch.ones(2, 3), torch.tensor([0, 1]), torch.zeros(2), 2)
    assert picie.all_reduce_stats(stats) is stats and stats.counts.tolist() == [1, 1]


def _gloo_worker(rank, world_size, init_file, features, init, result_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        local = features.tensor_split(world_size)[rank]  # unequal parts: 7 and 6 rows
        centroids, objectives = picie.lloyd(local, init, num_iters=4)  # all_reduce_stats inside
        ids, sq = picie.assign(local, centroids)
        stats = picie.all_reduce_stats(picie.cluster_stats(local, ids, sq, len(init)))
        updated, counts = picie.minibatch_update(centroids, torch.full((len(init),), 5), stats)
        torch.save({"centroids": centroids, "objectives": objectives, "updated": updated, "counts": counts},
                   f"{result_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gloo_workers_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    gen = torch.Generator().manual_seed(4)
    features = picie.normalize(torch.randn(13, 5, generator=gen))
    init = picie.init_centroids(features, 3, torch.Generator().manual_seed(1))
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_gloo_worker, args=(2, str(tmp_path / "init"), features, init, str(tmp_path)), nprocs=2,
                       start_method=method)
    single, objectives = picie.lloyd(features, init, num_iters=4)
    ids, sq = picie.assign(features, single)
    updated, counts = picie.minibatch_update(single, torch.full((3,), 5), picie.cluster_stats(features, ids, sq, 3))
    for rank in range(2):
        part = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(part["centroids"], single, rtol=0, atol=1e-6)
        # sums of float32 squared distances, split in two: equal up to float32 rounding
        assert part["objectives"] == pytest.approx(objectives, rel=1e-6)
        torch.testing.assert_close(part["updated"], updated, rtol=0, atol=1e-6)
        assert torch.equal(part["counts"], counts)


# -- the epoch's clustering over the training workers ---------------------------------------------


def test_sample_pixels_draws_distinct_pixels_per_image_from_its_generator():
    fmap = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    rngs = [np.random.default_rng(1), np.random.default_rng(2)]
    rows = picie.sample_pixels(fmap, rngs, 6)
    assert rows.shape == (12, 3)
    for b in range(2):
        pixels = {tuple(fmap[b, :, y, x].tolist()) for y in range(4) for x in range(5)}
        picked = [tuple(r) for r in rows[6 * b : 6 * b + 6].tolist()]
        assert len(set(picked)) == 6 and set(picked) <= pixels
    again = picie.sample_pixels(fmap[1:], [np.random.default_rng(2)], 6)
    torch.testing.assert_close(again, rows[6:])  # image 1's pixels depend only on its generator
    assert picie.sample_pixels(fmap, [np.random.default_rng(0)] * 2, 99).shape == (40, 3)  # all of them


def test_global_init_in_one_process_is_init_centroids():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    a = picie.init_centroids_global(x, 5, torch.Generator().manual_seed(3))
    b = picie.init_centroids(x, 5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="from 3 points"):
        picie.init_centroids_global(x[:3], 5, torch.Generator())


def _fake_batches(keys_per_batch, dim=4, size=3, seed=0):
    """(keys, [view1, view2]) batches of clustered unit features, a pure function of each key."""
    centres = picie.normalize(torch.randn(3, dim, generator=torch.Generator().manual_seed(seed)))
    batches = []
    for keys in keys_per_batch:
        views = []
        for view in range(2):
            maps = []
            for key in keys:
                gen = torch.Generator().manual_seed(int.from_bytes(f"{key}/{view}".encode(), "little") % 2**31)
                owner = torch.randint(0, 3, (size, size), generator=gen)
                noise = 0.2 * torch.randn(dim, size, size, generator=gen)
                maps.append(centres[owner].permute(2, 0, 1) + noise)
            views.append(picie.normalize(torch.stack(maps), dim=1))
        batches.append((keys, views))
    return batches


EPOCH_KWARGS = {"epoch": 2, "seed": 5, "iterations": 4, "pixels_per_image": 4, "spherical": True}


def test_cluster_epoch_labels_every_pixel_by_key_and_survives_a_checkpoint(tmp_path):
    batches = _fake_batches([["a", "b"], ["c", "d"], ["e", "f"]])
    clusters = picie.cluster_epoch(lambda: iter(batches), [3, 5], sample_batches=2, **EPOCH_KWARGS)
    assert clusters.labels.shape == (6, 2, 2, 3, 3) and clusters.labels.dtype == torch.uint8
    assert clusters.keys == list("abcdef") and clusters.seconds["sampled_pixels"] == 2 * 4 * 4
    assert [c.shape for c in clusters.centroids[1]] == [(5, 4), (5, 4)]
    # the labels are the nearest centroids of each view's pixels
    keys, views = batches[2]
    expected = picie.assign_labels(views[1], clusters.centroids[0][1])
    assert torch.equal(clusters.lookup(["f", "e"])[:, 0, 1], expected.flip(0))
    weights = clusters.weights[0][0]
    assert weights.sum().item() == pytest.approx(1.0)  # frequencies of view 1's labels
    with pytest.raises(KeyError, match="'z' has no PiCIE labels for epoch 2"):
        clusters.lookup(["a", "z"])
    targets = clusters.targets(clusters.lookup(["a"]))
    assert len(targets) == 2 and targets[1][1].labels.shape == (1, 3, 3)
    # what a checkpoint holds (torch.load(weights_only=True)) restores the same clustering
    torch.save({"method": clusters.state()}, tmp_path / "c.pt")
    back = picie.EpochClusters.from_state(torch.load(tmp_path / "c.pt", weights_only=True)["method"])
    assert back.keys == clusters.keys and torch.equal(back.labels, clusters.labels)
    assert torch.equal(back.lookup(["d"]), clusters.lookup(["d"])) and back.epoch == 2


def _cluster_epoch_worker(rank, world_size, init_file, parts, result_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        batches = _fake_batches(parts[rank])
        sample = torch.cat([picie.sample_pixels(v[0], [np.random.default_rng(i) for i in range(len(k))], 5)
                            for k, v in batches])
        centroids, objectives = picie.kmeans(sample, 3, iterations=4, generator=torch.Generator().manual_seed(9))
        clusters = picie.cluster_epoch(lambda: iter(batches), [3, 4], **EPOCH_KWARGS)
        torch.save({"kmeans": centroids, "objectives": objectives, "clusters": clusters.state()},
                   f"{result_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_clustering_of_two_gloo_workers_equals_one_process(tmp_path):
    """Each worker holds its own batches; the result is one process's on the concatenation (same seed)."""
    import torch.multiprocessing as mp

    parts = [[["a", "b"], ["c", "d"]], [["e", "f"], ["g", "h"]]]  # rank 0's and rank 1's batches of the epoch
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_cluster_epoch_worker, args=(2, str(tmp_path / "init"), parts, str(tmp_path)), nprocs=2,
                       start_method=method)
    whole = _fake_batches(parts[0] + parts[1])
    # kmeans alone: one process on the rows of both workers, rank 0's first
    sample = torch.cat([torch.cat([picie.sample_pixels(v[0], [np.random.default_rng(i) for i in range(len(k))], 5)
                                   for k, v in _fake_batches(part)]) for part in parts])
    centroids, objectives = picie.kmeans(sample, 3, iterations=4, generator=torch.Generator().manual_seed(9))
    single = picie.cluster_epoch(lambda: iter(whole), [3, 4], **EPOCH_KWARGS)
    labelled = 0
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["kmeans"], centroids, rtol=0, atol=1e-6)
        assert got["objectives"] == pytest.approx(objectives, rel=1e-6)
        part = picie.EpochClusters.from_state(got["clusters"])
        for head in range(2):
            for view in range(2):
                torch.testing.assert_close(part.centroids[head][view], single.centroids[head][view], rtol=0, atol=1e-6)
                torch.testing.assert_close(part.weights[head][view], single.weights[head][view], rtol=0, atol=1e-7)
        assert torch.equal(part.lookup(part.keys), single.lookup(part.keys))  # every pixel, by key
        labelled += len(part.keys)
    assert labelled == len(single.keys) == 8


def test_kmeanspp_seeds_are_distinct_rows_spread_over_the_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = picie.normalize(torch.randn(4, 6, generator=gen)) * 10
    x = torch.cat([centres[j] + 0.01 * torch.randn(50, 6, generator=gen) for j in range(4)])
    seeds = picie.init_centroids_plusplus(x, 4, torch.Generator().manual_seed(1))
    rows = {tuple(r.tolist()) for r in x}
    assert all(tuple(s.tolist()) in rows for s in seeds)
    owners = {int(((centres - s) ** 2).sum(1).argmin()) for s in seeds}
    assert owners == {0, 1, 2, 3}  # one seed per far-apart cluster (random rows rarely manage it)
    identical = picie.init_centroids_plusplus(torch.ones(5, 3), 3, torch.Generator().manual_seed(0))
    assert torch.equal(identical, torch.ones(3, 3))  # zero distances: uniform draws, no error
    with pytest.raises(ValueError, match="init must be one of"):
        picie.kmeans(x, 2, iterations=1, generator=torch.Generator(), init="farthest")
