"""PiCIE's loss and its per-epoch pixel k-means, as pure torch functions.

PiCIE [0] alternates, every epoch, (a) k-means over the pixel embeddings of the training set,
separately for each view, and (b) training with a cross-entropy towards the fixed centroids. In
the notation of [0] (Sec. 3): z is an L2-normalised pixel embedding, mu the K centroids of a view,
y the pixel's cluster, d the cosine distance.

- Eq. (1), the clustering: ``min_{y, mu} sum_{i,p} ||z_ip - mu_{y_ip}||^2``
  (:func:`assign`, :func:`cluster_stats`, :func:`lloyd_update`, :func:`minibatch_update`).
- Eqs. (2)-(3), the clustering loss: ``L_clust(z, y, mu) = -log(exp(-d(z, mu_y)) / sum_l
  exp(-d(z, mu_l)))``. With ``d = 1 - cos`` the constant cancels in the softmax, so the logits
  are the cosine similarities ``<z, mu_l>`` (:func:`cluster_logits`, :func:`clustering_ce`).
- The multi-view objective of Sec. 3 (invariance and equivariance), views z1 = f(G(P1 x)) and
  z2 = G(f(P2 x)) clustered separately into (y1, mu1) and (y2, mu2):
  ``L_within = L_clust(z1, y1, mu1) + L_clust(z2, y2, mu2)``,
  ``L_cross = L_clust(z1, y2, mu2) + L_clust(z2, y1, mu1)``, ``L = L_within + L_cross``
  (:func:`picie_loss`).

The equation numbers after (3) are not given here: the copy of the paper in shared/papers holds
only its abstract, so they could not be checked.

The reference code (``janghyuncho/PiCIE`` ``train_picie.py`` and ``commons.py``, seed-methods.md
sections 1.4 and 1.6), and its options:

- logits = ``<normalize(f), c>``, frozen 1x1 convolutions holding the centroids, no bias, no
  temperature; ``loss = (L_cross / 2 + L_within / 2) / 2``, i.e. the paper's L / 4 with every
  term a mean over pixels. lussray keeps these means.

The scale of :func:`picie_loss` (settled): it returns the reference's value, the mean of the four
per-pixel-mean cross-entropies, which is ``L_p / 4`` with ``L_p = L_within + L_cross`` the paper's
sum (:data:`PAPER_LOSS_FACTOR` = 4). PiCIE's learning rates (Adam 1e-4, 1e-3 on Cityscapes) were
tuned on this scale, so lussray trains on it. A method that adds a loss to PiCIE's at the paper's
scale (FS^4's Eq. 5, ``L = L_w + L_p``) multiplies by :data:`PAPER_LOSS_FACTOR`; keeping the
reference's scale instead means weighting L_w by 1/4 against the paper: either way the choice
must be stated where the sum is formed.
- ``balance`` (reference default; off with ``--no_balance``): the cross-entropy of a view is
  weighted by its cluster *frequencies* ``counts / counts.sum()`` (not inverse frequencies; see
  :func:`class_weights`), as torch's weighted mean.
- ``--mse``: ``loss = (loss + MSE(normalize(f1), normalize(f2))) / 2``.
- k-means: cosine metric, i.e. faiss L2 k-means on the normalised embeddings: Lloyd iterations on
  the first ``num_init_batches`` batches, then one running-mean (Sculley) update per further batch
  (:func:`minibatch_update`); labels are ``argmin ||f - c||^2`` over the raw (unnormalised)
  centroids.

Deviations (each selectable): ``spherical=True`` (the default here) L2-normalises the centroids
after every update, so the assignment, the label assignment and the logits all use the same
cosine similarity, as the brief asks ("L2-normalised features and centroids");
``spherical=False`` keeps the reference's raw mean centroids (norm < 1), its squared-L2 assignment
and its logits ``<z, c>``. Empty clusters in a Lloyd update are re-seeded exactly as faiss does
(:func:`lussray.clustering.lloyd.update_centroids`); in a mini-batch update they keep their centroid,
as the reference's. The over-clustering variant "PiCIE + H" of [0] is read here as a second set of
centroids (more clusters) on the same embeddings whose loss is averaged with the main one
(:func:`picie_multihead_loss`); the reference code has no such option, so this is lussray's reading.

Distribution: per-cluster sums and counts are additive over disjoint sets of pixels, so workers
compute :class:`ClusterStats` on their own pixels and :func:`all_reduce_stats` combines them; the
update is then the one a single process would make on all pixels.

The epoch's clustering in lussray (:func:`cluster_epoch`, run by the training workers themselves at
the start of every epoch): (a) a pass over the first batches of each worker's part of the epoch
embeds both views and keeps ``pixels_per_image`` random pixels of every image (drawn from the
image's own generator, :func:`lussray.seeds.sample_rng`), then Lloyd iterations (:func:`kmeans`)
run on these samples with the statistics all-reduced, from k-means++ seeds drawn out of the union
of the samples (:func:`init_centroids_plusplus`; the reference's random rows with ``init="random"``,
:func:`init_centroids_global`): the k-means a single process would run on the concatenated
samples, with no process holding more than its own; (b) a second pass over all
batches of the epoch assigns every pixel of both views to its nearest centroid; the labels stay in
the worker's memory keyed by sample key (:class:`EpochClusters`). Why a sample instead of the
reference's initial batches + one mini-batch update per later batch: a few hundred random pixels
per image from a few thousand random images estimate the centroids about as well as all pixels
(neighbouring pixels are nearly copies), full Lloyd iterations on them converge where the single
pass of running means does not, and the pass (a) covers only the sampled images, so an epoch's
clustering costs one forward pass over the epoch (b) plus a fraction of one, where the reference
makes two full passes. Memory of pass (a) at COCO-Stuff scale: the reference's 20 x 256 images
with 640 of their 6,400 pixels each per view is 3.3M x 128 x 4 B = 1.7 GB per view for all
workers together (210 MB per view on each of 8 workers), against the reference's 16.8 GB init
buffer in one process; the labels of pass (b) are 49,629 x 2 x 6,400 B = 635 MB (uint8) for all
workers together.

References:
    - [0]: PiCIE, Cho et al., CVPR 2021, arXiv:2103.17070.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lussray.clustering.lloyd import PartialStats, update_centroids
from lussray.seeds import derived_seed, sample_rng, stage_salt

#: Rows per chunk in nearest-centroid searches (bounds the (chunk, K) score matrix).
ASSIGN_CHUNK_ROWS = 65536

BALANCE_MODES = ("frequency", "none")

#: :func:`picie_loss` is the paper's ``L_p = L_within + L_cross`` divided by this (the reference's scale).
PAPER_LOSS_FACTOR = 4.0

#: Salt of the per-image generators that choose the pixels of an epoch's k-means sample.
SAMPLE_SALT = stage_salt("picie-kmeans-pixels")


# -- k-means ------------------------------------------------------------------------------------


@dataclass
class ClusterStats:
    """Sufficient statistics of a set of pixels against K centroids (additive over disjoint sets).

    Attributes:
        sums: (K, D) float64, sum of the pixels assigned to each centroid.
        counts: (K,) int64, pixels per centroid.
        sq_distance: () float64, sum of squared L2 distances to the assigned centroids (the
            k-means objective of Eq. (1)).
    """

    sums: Tensor
    counts: Tensor
    sq_distance: Tensor

    def __add__(self, other: ClusterStats) -> ClusterStats:
        """The statistics of the union of two disjoint sets."""
        return ClusterStats(self.sums + other.sums, self.counts + other.counts, self.sq_distance + other.sq_distance)

    @property
    def num_points(self) -> int:
        """Number of pixels covered."""
        return int(self.counts.sum())

    def to_partial_stats(self) -> PartialStats:
        """The same statistics as :class:`lussray.clustering.lloyd.PartialStats` (numpy)."""
        return PartialStats(self.sums.detach().cpu().double().numpy(), self.counts.detach().cpu().long().numpy(),
                            float(self.sq_distance))


def normalize(x: Tensor, dim: int = -1) -> Tensor:
    """L2-normalise along ``dim`` (``F.normalize``: eps 1e-12, zero vectors stay zero)."""
    return F.normalize(x, p=2.0, dim=dim)


def assign(
    features: Tensor, centroids: Tensor, spherical: bool = True, chunk_rows: int = ASSIGN_CHUNK_ROWS
) -> tuple[Tensor, Tensor]:
    """Nearest centroid of every (L2-normalised) feature.

    With ``spherical`` the centroids are unit vectors and the nearest one maximises the cosine;
    otherwise it minimises the squared L2 distance to the raw centroid, ``||f||^2 - 2 <f, c> +
    ||c||^2`` (the reference's label assignment). For unit centroids both agree. Ties go to the
    lowest index.

    Args:
        features: (N, D), L2-normalised by the caller.
        centroids: (K, D).
        spherical: Use the cosine (centroids are normalised here as well).
        chunk_rows: Rows scored at a time.

    Returns:
        ``(ids, sq_distances)``: (N,) int64 and (N,) float32 squared L2 distances of the features to
        their (normalised, when spherical) centroids.
    """
    centroids = normalize(centroids.to(features.dtype)) if spherical else centroids.to(features.dtype)
    c_sq = (centroids * centroids).sum(dim=1)  # (K,)
    ids, distances = [], []
    for start in range(0, len(features), chunk_rows):
        chunk = features[start : start + chunk_rows]
        # ||f||^2 - 2 <f, c> + ||c||^2 as one addmm plus the row norms (about 3x faster than spelled out)
        sq = torch.addmm(c_sq, chunk, centroids.T, alpha=-2.0) + torch.linalg.vector_norm(chunk, dim=1,
                                                                                        keepdim=True).square()
        best, idx = sq.min(dim=1)
        ids.append(idx)
        distances.append(best.clamp_min(0.0))
    if not ids:
        return features.new_zeros(0, dtype=torch.long), features.new_zeros(0)
    return torch.cat(ids), torch.cat(distances).float()


def cluster_stats(features: Tensor, ids: Tensor, sq_distances: Tensor, k: int) -> ClusterStats:
    """Per-cluster sums and counts and the objective of assigned pixels (in float64).

    Args:
        features: (N, D) features.
        ids: (N,) cluster ids in [0, K).
        sq_distances: (N,) squared distances to the assigned centroids.
        k: Number of clusters K.

    Returns:
        The :class:`ClusterStats`, on the features' device.
    """
    sums = torch.zeros(k, features.shape[1], dtype=torch.float64, device=features.device)
    sums.index_add_(0, ids, features if features.dtype == torch.float64 else features.double())
    counts = torch.bincount(ids, minlength=k).long()
    return ClusterStats(sums, counts, sq_distances.double().sum())


def all_reduce_stats(stats: ClusterStats, group: object | None = None) -> ClusterStats:
    """Sum the statistics over the workers of a ``torch.distributed`` group, in place.

    A no-op (returns ``stats``) when ``torch.distributed`` is not initialised, so single-process
    code and tests call it unchanged. With the gloo backend the tensors must be on the CPU.

    Args:
        stats: This worker's statistics.
        group: Process group (None: the default group).

    Returns:
        ``stats``, now holding the sums over all workers.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return stats
    for tensor in (stats.sums, stats.counts, stats.sq_distance):
        torch.distributed.all_reduce(tensor, group=group)
    return stats


def lloyd_update(stats: ClusterStats, spherical: bool = True) -> tuple[Tensor, int]:
    """The Lloyd M-step from (all-reduced) statistics: means, faiss's empty-cluster split.

    Reuses :func:`lussray.clustering.lloyd.update_centroids` (numpy; K x D is small), so the result is
    the faiss ``Clustering`` update of the sharded k-means actors.

    Args:
        stats: Statistics of all pixels.
        spherical: L2-normalise the centroids.

    Returns:
        ``(centroids, num_splits)``: (K, D) float32 on the statistics' device, and the number of
        empty clusters re-seeded.
    """
    centroids, num_splits = update_centroids(stats.to_partial_stats(), spherical)
    return torch.from_numpy(centroids).to(stats.sums.device), num_splits


def minibatch_update(
    centroids: Tensor, running_counts: Tensor, stats: ClusterStats, spherical: bool = True
) -> tuple[Tensor, Tensor]:
    """The reference's mini-batch (running-mean) update of the centroids by one batch.

    For every cluster k with n_k > 0 pixels in the batch: ``N_k += n_k``,
    ``c_k <- (1 - n_k / N_k) c_k + (n_k / N_k) mean_k``, i.e. ``c_k + (sum_k - n_k c_k) / N_k``.
    Clusters absent from the batch are unchanged. Given all-reduced statistics, every worker makes
    the update a single process makes on the concatenated batch.

    Args:
        centroids: (K, D) current centroids.
        running_counts: (K,) pixels seen so far per cluster (the reference starts them at the
            counts of the initial clustering).
        stats: The batch's statistics (assigned with ``centroids``).
        spherical: L2-normalise the updated centroids (lussray's default; the reference does not).

    Returns:
        ``(centroids, running_counts)``, new tensors (float32 and int64).
    """
    counts = running_counts.long() + stats.counts.to(running_counts.device)
    present = stats.counts > 0
    old = centroids.double()
    step = (stats.sums - stats.counts[:, None].double() * old) / counts.clamp_min(1)[:, None].double()
    new = torch.where(present[:, None], old + step, old).float()
    return (normalize(new) if spherical else new), counts


def init_centroids(features: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """K distinct random rows of ``features`` as initial centroids (seeded).

    Args:
        features: (N, D) with N >= K.
        k: Number of clusters.
        generator: A seeded CPU ``torch.Generator``.

    Returns:
        (K, D) copy of the chosen rows.

    Raises:
        ValueError: If there are fewer than K rows.
    """
    if len(features) < k:
        raise ValueError(f"cannot initialise {k} centroids from {len(features)} points")
    rows = torch.randperm(len(features), generator=generator)[:k].to(features.device)
    return features[rows].clone()


def lloyd(
    features: Tensor,
    centroids: Tensor,
    num_iters: int,
    spherical: bool = True,
    reduce: Callable[[ClusterStats], ClusterStats] = all_reduce_stats,
) -> tuple[Tensor, list[float]]:
    """Lloyd iterations on this worker's features, the statistics combined by ``reduce``.

    With the default ``reduce`` and an initialised process group every worker runs the k-means of
    the union of the workers' features (same initial centroids required); without one, the
    single-process k-means.

    Args:
        features: (N, D) L2-normalised features of this worker.
        centroids: (K, D) initial centroids (identical on every worker).
        num_iters: Number of iterations.
        spherical: Cosine k-means (see :func:`assign`).
        reduce: Combines the workers' statistics.

    Returns:
        ``(centroids, objectives)``: the final (K, D) float32 centroids and the mean squared
        distance of each iteration's assignment (before its update).
    """
    objectives = []
    features64 = features.double()  # once: the float64 statistics of every iteration read it
    for _ in range(num_iters):
        ids, sq = assign(features, centroids, spherical)
        stats = reduce(cluster_stats(features64, ids, sq, len(centroids)))
        objectives.append(float(stats.sq_distance) / max(stats.num_points, 1))
        centroids, _ = lloyd_update(stats, spherical)
        centroids = centroids.to(features.device)
    return centroids, objectives


def _distributed(group: object | None = None) -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _sum_over_workers(tensor: Tensor, group: object | None = None) -> Tensor:
    """The sum of a CPU tensor over the workers (through the GPU where the backend is nccl)."""
    if not _distributed(group):
        return tensor
    on_gpu = torch.distributed.get_backend(group) == "nccl"
    work = tensor.cuda() if on_gpu else tensor
    torch.distributed.all_reduce(work, group=group)
    return work.cpu() if on_gpu else work


def init_centroids_global(features: Tensor, k: int, generator: torch.Generator, group: object | None = None) -> Tensor:
    """K distinct random rows of the union of the workers' features, the same on every worker.

    The union is the workers' rows concatenated in rank order; the generator (seeded alike on
    every worker) draws K of its row indices, each worker fills in the rows it holds, and a sum
    over the workers completes the matrix. In a single process (or without an initialised
    process group) this is :func:`init_centroids` of ``features``.

    Args:
        features: (N_r, D) rows of this worker (N_r may differ between workers).
        k: Number of clusters.
        generator: A CPU ``torch.Generator`` seeded identically on every worker.
        group: Process group (None: the default group).

    Returns:
        (K, D) float32 on the features' device.

    Raises:
        ValueError: If all workers together hold fewer than K rows.
    """
    count = torch.tensor([len(features)], dtype=torch.long, device=features.device)
    if _distributed(group):
        counts = [torch.zeros_like(count) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(counts, count, group=group)
        sizes = [int(c) for c in counts]
        offset = sum(sizes[: torch.distributed.get_rank(group)])
    else:
        sizes, offset = [len(features)], 0
    total = sum(sizes)
    if total < k:
        raise ValueError(f"cannot initialise {k} centroids from {total} points")
    rows = torch.randperm(total, generator=generator)[:k].to(features.device)
    mine = (rows >= offset) & (rows < offset + len(features))
    out = torch.zeros(k, features.shape[1], dtype=torch.float64, device=features.device)
    out[mine] = features[rows[mine] - offset].double()
    if _distributed(group):
        torch.distributed.all_reduce(out, group=group)
    return out.float()


def _gather_scalar(value: Tensor, group: object | None) -> list[float]:
    """Every worker's value of a float64 scalar tensor, in rank order."""
    if not _distributed(group):
        return [float(value)]
    values = [torch.zeros_like(value) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(values, value, group=group)
    return [float(v) for v in values]


def _pick_row(features: Tensor, weights: Tensor, generator: torch.Generator, group: object | None) -> Tensor:
    """One row of the union drawn with probability proportional to ``weights`` (uniform if they sum to 0)."""
    sizes = _gather_scalar(torch.tensor(float(len(features)), dtype=torch.float64, device=features.device), group)
    sums = _gather_scalar(weights.sum(), group)
    rank = torch.distributed.get_rank(group) if _distributed(group) else 0
    draw = float(torch.rand(1, generator=generator, dtype=torch.float64))
    totals = sums if sum(sums) > 0 else sizes  # all rows on the centroids already: uniform
    target, owner = draw * sum(totals), len(totals) - 1
    for index, total in enumerate(totals):
        if target < total:
            owner = index
            break
        target -= total
    row = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device)
    if rank == owner and len(features):
        local = weights.cumsum(0) if sum(sums) > 0 else torch.arange(1, len(features) + 1, device=features.device,
                                                                        dtype=torch.float64)
        index = min(int(torch.searchsorted(local, torch.tensor([target], dtype=torch.float64,
                                                                device=features.device), right=True)),
                    len(features) - 1)
        row = features[index].double()
    if _distributed(group):
        torch.distributed.all_reduce(row, group=group)
    return row.float()


def init_centroids_plusplus(features: Tensor, k: int, generator: torch.Generator,
                            group: object | None = None) -> Tensor:
    """k-means++ seeding over the union of the workers' features, the same on every worker.

    The first centroid is a uniform row, each next one a row drawn with probability proportional
    to its squared distance to the nearest centroid so far (Arthur & Vassilvitskii, 2007). Workers
    exchange only their distance sums and the chosen row, so the draw is the one a single process
    makes on the concatenated rows (up to float64 summation order).

    Args:
        features: (N_r, D) rows of this worker.
        k: Number of clusters.
        generator: A CPU generator seeded identically on every worker.
        group: Process group (None: the default group).

    Returns:
        (K, D) float32 on the features' device.

    Raises:
        ValueError: If all workers together hold fewer than K rows.
    """
    total = sum(_gather_scalar(torch.tensor(float(len(features)), dtype=torch.float64, device=features.device), group))
    if total < k:
        raise ValueError(f"cannot initialise {k} centroids from {int(total)} points")
    x = features.double()
    x_sq = (x * x).sum(1)

    def sq_distances(row: Tensor) -> Tensor:  # ||x - r||^2 = ||x||^2 - 2 <x, r> + ||r||^2: a matrix-vector product
        r = row.double()
        return (x_sq - 2.0 * (x @ r) + r @ r).clamp_min(0.0)

    rows = [_pick_row(features, torch.zeros(len(features), dtype=torch.float64, device=features.device), generator,
                      group)]
    nearest = sq_distances(rows[0])
    for _ in range(1, k):
        rows.append(_pick_row(features, nearest, generator, group))
        nearest = torch.minimum(nearest, sq_distances(rows[-1]))
    return torch.stack(rows)


KMEANS_INITS = ("kmeans++", "random")


def kmeans(
    features: Tensor,
    k: int,
    *,
    iterations: int,
    generator: torch.Generator,
    spherical: bool = True,
    init: str = "kmeans++",
    group: object | None = None,
) -> tuple[Tensor, list[float]]:
    """Eq. (1) over the union of the workers' features: global initial centroids, then Lloyd.

    Every worker calls it with its own rows and an identically seeded generator and gets the
    centroids a single process gets on the concatenated rows (up to float64 summation order).

    Args:
        features: (N_r, D) L2-normalised rows of this worker.
        k: Number of clusters K.
        iterations: Lloyd iterations.
        generator: Seeded CPU generator of the initial rows (the same on every worker).
        spherical: Cosine k-means (see :func:`assign`).
        init: ``"kmeans++"`` (:func:`init_centroids_plusplus`) or ``"random"`` rows
            (:func:`init_centroids_global`, the reference's faiss initialisation).
        group: Process group of the workers (None: the default group).

    Returns:
        ``(centroids, objectives)`` as :func:`lloyd`.

    Raises:
        ValueError: On an unknown ``init``.
    """
    if init not in KMEANS_INITS:
        raise ValueError(f"init must be one of {KMEANS_INITS}, got {init!r}")
    seeding = init_centroids_plusplus if init == "kmeans++" else init_centroids_global
    centroids = seeding(features, k, generator, group)
    return lloyd(features, centroids, iterations, spherical, reduce=partial(all_reduce_stats, group=group))


def sample_pixels(features: Tensor, rngs: Sequence[np.random.Generator], count: int) -> Tensor:
    """``count`` distinct random pixels of every feature map, each map's drawn with its own generator.

    Args:
        features: (B, D, h, w) L2-normalised maps.
        rngs: B numpy generators (one per image: the draw depends on nothing else).
        count: Pixels per map (all of them when ``count >= h * w``).

    Returns:
        (B * min(count, h * w), D) rows, image by image.
    """
    batch, dim, height, width = features.shape
    if len(rngs) != batch:
        raise ValueError(f"{len(rngs)} generators for {batch} feature maps")
    size = min(count, height * width)
    picks = np.stack([rng.choice(height * width, size, replace=False) for rng in rngs]) if batch else \
        np.zeros((0, size), np.int64)
    index = torch.from_numpy(picks.astype(np.int64)).to(features.device)
    chosen = torch.gather(features.flatten(2), 2, index[:, None, :].expand(batch, dim, size))  # (B, D, size)
    return chosen.permute(0, 2, 1).reshape(-1, dim)


def flatten_pixels(feature_map: Tensor) -> Tensor:
    """(B, D, h, w) -> (B*h*w, D) L2-normalised pixel features (row order b, y, x)."""
    return normalize(feature_map.detach().permute(0, 2, 3, 1).reshape(-1, feature_map.shape[1]))


def assign_labels(feature_map: Tensor, centroids: Tensor, spherical: bool = True) -> Tensor:
    """Label every pixel with its nearest centroid: the targets of the next epoch.

    Args:
        feature_map: (B, D, h, w) embeddings (normalised here).
        centroids: (K, D).
        spherical: See :func:`assign`.

    Returns:
        (B, h, w) int64 labels.
    """
    batch, _, height, width = feature_map.shape
    ids, _ = assign(flatten_pixels(feature_map), centroids, spherical)
    return ids.view(batch, height, width)


def class_weights(counts: Tensor, balance: str = "frequency") -> Tensor | None:
    """The cross-entropy class weights of a view from its label counts.

    ``"frequency"`` is the reference's default: ``counts / counts.sum()``. Frequent clusters thus
    weigh *more* (the name "balance" suggests the opposite; this is what the reference computes).
    ``"none"`` is its ``--no_balance``.

    Args:
        counts: (K,) pixels per cluster over the epoch's label assignment.
        balance: ``"frequency"`` or ``"none"``.

    Returns:
        (K,) float32 weights, or None.

    Raises:
        ValueError: On an unknown mode.
    """
    if balance not in BALANCE_MODES:
        raise ValueError(f"balance must be one of {BALANCE_MODES}, got {balance!r}")
    if balance == "none":
        return None
    counts = counts.double()
    return (counts / counts.sum().clamp_min(1.0)).float()


# -- loss ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterTargets:
    """The fixed clustering of one view for an epoch: centroids, this batch's labels, weights.

    Attributes:
        centroids: (K, D) centroids of the view (no gradient).
        labels: (B, h, w) int64 cluster of every pixel of the view (-1: ignored).
        weight: (K,) cross-entropy class weights, or None (see :func:`class_weights`).
    """

    centroids: Tensor
    labels: Tensor
    weight: Tensor | None = None


def cluster_logits(features: Tensor, centroids: Tensor, spherical: bool = True) -> Tensor:
    """The logits of Eq. (3): ``<normalize(z), mu_l>`` for every pixel and centroid.

    Args:
        features: (B, D, h, w) embeddings (normalised here).
        centroids: (K, D) centroids, detached (they are fixed during the epoch).
        spherical: Normalise the centroids too (cosine); False keeps the reference's raw centroids.

    Returns:
        (B, K, h, w) logits.
    """
    centroids = centroids.detach().to(features.dtype)
    if spherical:
        centroids = normalize(centroids)
    return torch.einsum("bdhw,kd->bkhw", normalize(features, dim=1), centroids)


def clustering_ce(features: Tensor, targets: ClusterTargets, spherical: bool = True) -> Tensor:
    """``L_clust`` of Eq. (3), averaged over pixels (weighted mean when ``targets.weight``).

    Args:
        features: (B, D, h, w) embeddings.
        targets: Centroids, labels (B, h, w) and optional class weights.
        spherical: See :func:`cluster_logits`.

    Returns:
        The scalar loss.
    """
    logits = cluster_logits(features, targets.centroids, spherical)
    weight = None if targets.weight is None else targets.weight.to(logits.device, logits.dtype)
    return F.cross_entropy(logits, targets.labels.long(), weight=weight, ignore_index=-1)


def picie_loss(
    features1: Tensor,
    features2: Tensor,
    view1: ClusterTargets,
    view2: ClusterTargets,
    *,
    spherical: bool = True,
    mse: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PiCIE's multi-view loss: within-view and cross-view clustering cross-entropies.

    ``within = (L_clust(z1, y1, mu1) + L_clust(z2, y2, mu2)) / 2`` (invariance to the photometric
    change within each view's own clustering), ``cross = (L_clust(z1, y2, mu2) + L_clust(z2, y1,
    mu1)) / 2`` (each view must predict the other's clusters: photometric invariance and geometric
    equivariance, since z2 = G(f(P2 x)) is aligned with z1 = f(G(P1 x))), ``loss = (within +
    cross) / 2``: the paper's ``L_p = L_within + L_cross`` divided by :data:`PAPER_LOSS_FACTOR`
    (4), the reference's scale, which its learning rates were tuned on. Multiply by
    :data:`PAPER_LOSS_FACTOR` to add another loss at the paper's scale (FS^4's Eq. 5).

    Args:
        features1: (B, D, h, w) z1, view 1's embeddings of the transformed image.
        features2: (B, D, h, w) z2, view 2's transformed feature map (same pixels as z1).
        view1: View 1's centroids mu1 and labels y1 (from clustering z1 before the step).
        view2: View 2's centroids mu2 and labels y2.
        spherical: See :func:`cluster_logits`.
        mse: The reference's ``--mse``: ``loss = (loss + MSE(normalize(z1), normalize(z2))) / 2``.

    Returns:
        ``(loss, parts)`` with parts ``within``, ``cross`` (and ``mse``), detached.

    Raises:
        ValueError: If the two feature maps differ in shape.
    """
    if features1.shape != features2.shape:
        raise ValueError(f"the two views' feature maps differ: {tuple(features1.shape)} vs {tuple(features2.shape)}")
    within = (clustering_ce(features1, view1, spherical) + clustering_ce(features2, view2, spherical)) / 2
    cross = (clustering_ce(features1, view2, spherical) + clustering_ce(features2, view1, spherical)) / 2
    loss = (within + cross) / 2
    parts = {"within": within.detach(), "cross": cross.detach()}
    if mse:
        mse_term = F.mse_loss(normalize(features1, dim=1), normalize(features2, dim=1))
        loss = (loss + mse_term) / 2
        parts["mse"] = mse_term.detach()
    return loss, parts


def picie_multihead_loss(
    features1: Tensor,
    features2: Tensor,
    heads: Sequence[tuple[ClusterTargets, ClusterTargets]],
    *,
    spherical: bool = True,
    mse: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """"PiCIE + H": the mean of :func:`picie_loss` over clusterings of the same embeddings.

    ``heads[0]`` is the main clustering (K = number of classes); further entries are
    over-clusterings (larger K). The MSE term, if any, enters once.

    Args:
        features1: See :func:`picie_loss`.
        features2: See :func:`picie_loss`.
        heads: (view 1, view 2) targets per clustering, at least one.
        spherical: See :func:`cluster_logits`.
        mse: See :func:`picie_loss`.

    Returns:
        ``(loss, parts)``; parts are ``within``/``cross`` of the main head and ``head{i}`` losses.

    Raises:
        ValueError: If ``heads`` is empty.
    """
    if not heads:
        raise ValueError("picie_multihead_loss needs at least one head")
    losses, parts = [], {}
    for i, (view1, view2) in enumerate(heads):
        loss, head_parts = picie_loss(features1, features2, view1, view2, spherical=spherical)
        losses.append(loss)
        parts[f"head{i}"] = loss.detach()
        if i == 0:
            parts.update(head_parts)
    total = torch.stack(losses).mean()
    if mse:
        mse_term = F.mse_loss(normalize(features1, dim=1), normalize(features2, dim=1))
        total = (total + mse_term) / 2
        parts["mse"] = mse_term.detach()
    return total, parts


def label_counts(labels: Tensor, k: int) -> Tensor:
    """(K,) int64 number of pixels per cluster in a label tensor (ignoring -1)."""
    flat = labels.reshape(-1)
    return torch.bincount(flat[flat >= 0], minlength=k).long()


# -- the epoch's clustering, distributed over the training workers --------------------------------

#: What :func:`cluster_epoch` iterates: (sample keys, one (B, D, h, w) L2-normalised map per view).
EmbeddedBatch = tuple[Sequence[str], Sequence[Tensor]]


def label_dtype(num_clusters: Sequence[int]) -> torch.dtype:
    """The smallest integer dtype holding every cluster id (uint8 for K <= 256)."""
    return torch.uint8 if max(num_clusters) <= 256 else torch.int16 if max(num_clusters) <= 32768 else torch.int32


@dataclass
class EpochClusters:
    """One epoch's clustering on one worker: centroids and weights of every head and view, labels by key.

    Attributes:
        epoch: The epoch these targets belong to.
        centroids: ``[head][view]`` (K_head, D) float32 centroids (the same on every worker).
        weights: ``[head][view]`` (K_head,) cross-entropy weights or None (the same on every worker).
        keys: The sample keys of this worker's images of the epoch, in iteration order.
        labels: (N, heads, views, h, w) cluster ids of every pixel of those images (CPU, small dtype).
        objectives: ``[head][view]`` the k-means objective (mean squared distance) of the last iteration.
        seconds: Wall time of the sample pass + k-means and of the label pass.
    """

    epoch: int
    centroids: list[list[Tensor]]
    weights: list[list[Tensor | None]]
    keys: list[str]
    labels: Tensor
    objectives: list[list[float]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rows = {key: row for row, key in enumerate(self.keys)}
        if len(self._rows) != len(self.keys):
            raise ValueError("a sample key occurs twice in one epoch's clustering")

    def lookup(self, keys: Iterable[Any]) -> Tensor:
        """(B, heads, views, h, w) int64 labels of the samples ``keys`` (CPU).

        Raises:
            KeyError: naming a key this worker did not label for this epoch.
        """
        try:
            rows = [self._rows[str(key)] for key in keys]
        except KeyError as error:
            raise KeyError(f"sample {error.args[0]!r} has no PiCIE labels for epoch {self.epoch} on this worker "
                           f"({len(self.keys)} labelled): the training batches differ from the clustering pass") \
                from None
        return self.labels[torch.tensor(rows, dtype=torch.long)].long()

    def targets(self, labels: Tensor) -> list[tuple[ClusterTargets, ClusterTargets]]:
        """The (view 1, view 2) :class:`ClusterTargets` of every head for a batch's ``labels``.

        Args:
            labels: (B, heads, 2, h, w) from :meth:`lookup`, on the features' device.
        """
        device = labels.device
        out = []
        for head, (centroids, weights) in enumerate(zip(self.centroids, self.weights)):
            out.append(tuple(
                ClusterTargets(centroids[view].to(device), labels[:, head, view],
                               None if weights[view] is None else weights[view].to(device))
                for view in range(2)))
        return out  # type: ignore[return-value]

    def state(self) -> dict[str, Any]:
        """Plain containers of tensors and strings (``torch.load(weights_only=True)`` reads them).

        ``seconds`` (wall time) stays out: a resumed run's checkpoint equals an unbroken run's bitwise.
        """
        return {"epoch": self.epoch, "centroids": self.centroids, "weights": self.weights, "keys": self.keys,
                "labels": self.labels, "objectives": self.objectives}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochClusters:
        """The inverse of :meth:`state`."""
        return cls(int(state["epoch"]), state["centroids"], state["weights"], list(state["keys"]), state["labels"],
                   state.get("objectives", []))


def _sample_pass(batches: Iterator[EmbeddedBatch], *, num_batches: int | None, seed: int, epoch: int,
                 pixels_per_image: int) -> list[Tensor]:
    """Pass (a): ``pixels_per_image`` random pixels of every image of the first ``num_batches``, per view."""
    samples: list[list[Tensor]] = []
    for index, (keys, views) in enumerate(batches):
        if num_batches is not None and index >= num_batches:
            break
        rngs = [sample_rng(seed, SAMPLE_SALT, epoch, str(key)) for key in keys]  # one stream per image, both views
        if not samples:
            samples = [[] for _ in views]
        for view, features in enumerate(views):
            samples[view].append(sample_pixels(features, rngs, pixels_per_image))
    close = getattr(batches, "close", None)
    if close is not None:  # stop the data pipeline behind a generator now, not at garbage collection
        close()
    if not samples:
        raise ValueError("the epoch's clustering pass got no batch")
    return [torch.cat(parts) for parts in samples]


def _label_pass(batches: Iterable[EmbeddedBatch], centroids: list[list[Tensor]], *, spherical: bool,
                dtype: torch.dtype) -> tuple[list[str], Tensor, list[list[Tensor]]]:
    """Pass (b): the nearest centroid of every pixel of every view and head; keys, labels, counts."""
    keys: list[str] = []
    chunks: list[Tensor] = []
    counts = [[torch.zeros(len(c), dtype=torch.long) for c in head] for head in centroids]
    for batch_keys, views in batches:
        per_head = []
        for head, head_centroids in enumerate(centroids):
            labels = [assign_labels(features, head_centroids[view].to(features.device), spherical)
                      for view, features in enumerate(views)]
            for view, view_labels in enumerate(labels):
                counts[head][view] += label_counts(view_labels, len(head_centroids[view])).cpu()
            per_head.append(torch.stack(labels, dim=1))  # (B, views, h, w)
        chunks.append(torch.stack(per_head, dim=1).to("cpu", dtype))  # (B, heads, views, h, w)
        keys.extend(str(key) for key in batch_keys)
    if not chunks:
        raise ValueError("the epoch's label pass got no batch")
    return keys, torch.cat(chunks), counts


def cluster_epoch(
    batches: Callable[[], Iterator[EmbeddedBatch]],
    num_clusters: Sequence[int],
    *,
    epoch: int,
    seed: int,
    iterations: int,
    pixels_per_image: int,
    sample_batches: int | None = None,
    spherical: bool = True,
    balance: str = "frequency",
    init: str = "kmeans++",
    group: object | None = None,
) -> EpochClusters:
    """One epoch's clustering on this worker: k-means over a pixel sample, then every pixel's label.

    Every worker of the process group calls it at once with its own part of the epoch (the same
    number of batches on each); the k-means statistics and the label counts are all-reduced, so
    the centroids and class weights are those of a single process given every worker's batches in
    rank order, and the labels of an image do not depend on which worker holds it.

    Args:
        batches: Called twice; each call iterates this worker's batches of the epoch again, in the
            same order: (keys, [view 1 map, view 2 map]) with L2-normalised (B, D, h, w) maps.
        num_clusters: K of every head (the first is the main clustering; more are "+H" heads).
        epoch: The epoch (with ``seed`` it chooses the sampled pixels and the initial rows).
        seed: The run's seed.
        iterations: Lloyd iterations of every k-means.
        pixels_per_image: Pixels per image and view in the k-means sample.
        sample_batches: Batches of pass (a) per worker (None: all of them).
        spherical: Cosine k-means and assignment.
        balance: Class weights of the loss (:func:`class_weights`).
        init: Seeding of every k-means (:func:`kmeans`).
        group: Process group (None: the default one, when initialised).

    Returns:
        The :class:`EpochClusters` of this worker.
    """
    started = time.perf_counter()
    samples = _sample_pass(iter(batches()), num_batches=sample_batches, seed=seed, epoch=epoch,
                           pixels_per_image=pixels_per_image)
    centroids: list[list[Tensor]] = []
    objectives: list[list[float]] = []
    for head, k in enumerate(num_clusters):
        head_centroids, head_objectives = [], []
        for view, sample in enumerate(samples):
            generator = torch.Generator().manual_seed(derived_seed(seed, "picie-kmeans", str(epoch), str(head),
                                                                   str(view)))
            found, history = kmeans(sample, k, iterations=iterations, generator=generator, spherical=spherical,
                                    init=init, group=group)
            head_centroids.append(found.cpu())
            head_objectives.append(history[-1] if history else float("nan"))
        centroids.append(head_centroids)
        objectives.append(head_objectives)
    num_sampled = sum(len(sample) for sample in samples)
    del samples
    clustered = time.perf_counter()
    keys, labels, counts = _label_pass(batches(), centroids, spherical=spherical, dtype=label_dtype(num_clusters))
    weights: list[list[Tensor | None]] = []
    for head_counts in counts:
        total = _sum_over_workers(torch.cat(head_counts), group)
        weights.append([class_weights(part, balance) for part in total.split([len(c) for c in head_counts])])
    return EpochClusters(epoch, centroids, weights, keys, labels, objectives,
                         {"kmeans": round(clustered - started, 3), "labels": round(time.perf_counter() - clustered, 3),
                          "sampled_pixels": float(num_sampled)})


__all__ = [
    "ASSIGN_CHUNK_ROWS",
    "BALANCE_MODES",
    "PAPER_LOSS_FACTOR",
    "ClusterStats",
    "ClusterTargets",
    "EpochClusters",
    "all_reduce_stats",
    "assign",
    "assign_labels",
    "class_weights",
    "cluster_epoch",
    "cluster_logits",
    "cluster_stats",
    "clustering_ce",
    "flatten_pixels",
    "init_centroids",
    "init_centroids_global",
    "init_centroids_plusplus",
    "kmeans",
    "label_counts",
    "label_dtype",
    "lloyd",
    "lloyd_update",
    "minibatch_update",
    "normalize",
    "picie_loss",
    "picie_multihead_loss",
    "sample_pixels",
]
