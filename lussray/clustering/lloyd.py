"""The k-means step math of label generation, shard by shard: numpy, scipy.sparse, faiss and torch, no Ray.

One Lloyd iteration over points split into blocks (one block per Ray actor) is:

1. every block searches its nearest centroid (faiss flat index: L2, or inner product when
   spherical) and reduces the result to :class:`PartialStats` (per-cluster sums and counts, the
   objective);
2. the driver merges the partials (:func:`merge_stats`) and updates the centroids
   (:func:`update_centroids`): means, empty clusters split as faiss does, L2-normalised when
   spherical.

This reproduces ``faiss.Clustering::train`` (faiss 1.15, ``Clustering.cpp`` and
``impl/ClusteringHelpers.cpp``) on the whole data set; the reference clustering is stage 2.2 of [0]
(``faiss.Clustering``, ``niter=20``, ``nredo=30``, ``max_points_per_centroid=1e7``, L2 index).
Facts of faiss that are reproduced here:

- the initial centroids of redo ``r`` are rows ``rand_perm(n, seed + 1 + r * 15486557)[:k]``
  (:func:`initial_rows`; faiss's own ``rand_perm`` is called, so any faiss version agrees); with
  input centroids every redo starts from the centroids that the previous redo ended with;
- the objective of an iteration is the sum of the distances of the search that starts it (so it
  lags the returned centroids by one update); it is minimised with L2 and maximised with inner
  product (spherical), also when choosing the best redo;
- an empty cluster takes a copy of a donor cluster chosen with probability
  ``(size - 1) / (n - k)`` by a ``std::mt19937(1234)`` walk over the clusters, both copies
  perturbed by ``1 +- 1/1024`` on alternate coordinates, the donor's count halved
  (:func:`split_empty_clusters`).

Deliberate deviations (all far below the 1e-4 tolerance of the equivalence tests): sums are
float32 only within chunks and float64 across them, the objective is summed in float64 (faiss sums
both in float32 over all points), and centroids are ``sum / count`` rather than
``sum * (1 / count)`` in float32. In degenerate cases (many empty clusters, so near-identical
split centroids and distance ties) the different rounding can change the assignment of tied
points and later iterations drift apart; the split itself matches faiss bit for bit. There is no
subsampling (faiss subsamples above ``k * max_points_per_centroid`` points; the reference sets
that limit out of reach).

Where the points live on a device (a k-means actor's GPU), :func:`device_block_stats` runs the
same E-step in torch on it: the points stay there across iterations and only the sums, counts
and objective come back (:mod:`lussray.clustering.kmeans`).

- [0]: PASS / LUSS, Gao et al., 2022, arXiv:2106.03149 (``cluster.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Relative perturbation of a split centroid (faiss: "a bit above machine epsilon for float16").
SPLIT_EPS = np.float32(1.0 / 1024.0)
#: Seed of the generator that faiss restarts at every ``split_clusters`` call.
SPLIT_SEED = 1234
#: Seed stride between redos in faiss (``seed + 1 + redo * 15486557``).
REDO_SEED_STRIDE = 15486557
#: Rows per float32 chunk when reducing a block to per-cluster sums (float64 across chunks).
SUM_CHUNK_ROWS = 16384


@dataclass
class PartialStats:
    """Sufficient statistics of one block of points against K centroids.

    Attributes:
        sums: (K, D) float64, sum of the points assigned to each centroid.
        counts: (K,) int64, number of points assigned to each centroid.
        objective: Sum over the points of the distance to the assigned centroid (squared L2
            distance, or inner product when spherical), float64.
    """

    sums: np.ndarray
    counts: np.ndarray
    objective: float

    @property
    def num_points(self) -> int:
        """Number of points these statistics cover."""
        return int(self.counts.sum())


def flat_index(dim: int, inner_product: bool, use_gpu: bool = False):
    """An exact faiss index for nearest-centroid search (``IndexFlatL2``/``IndexFlatIP``).

    Args:
        dim: Vector dimension D.
        inner_product: Inner-product metric (spherical k-means) instead of squared L2.
        use_gpu: Build ``GpuIndexFlatL2``/``GpuIndexFlatIP`` on device 0 in float32, as the
            reference does; needs a faiss build with GPU support.

    Returns:
        A faiss index; the GPU one holds its ``StandardGpuResources`` in ``index.referenced_objects``.
    """
    import faiss

    if not use_gpu:
        return faiss.IndexFlatIP(dim) if inner_product else faiss.IndexFlatL2(dim)
    resources = faiss.StandardGpuResources()
    config = faiss.GpuIndexFlatConfig()
    config.device = 0
    config.useFloat16 = False
    make = faiss.GpuIndexFlatIP if inner_product else faiss.GpuIndexFlatL2
    index = make(resources, dim, config)
    # The index does not own its resources: keep them alive as faiss's own wrappers do.
    index.referenced_objects = [*getattr(index, "referenced_objects", []), resources]
    return index


def nearest_centroids(index, points: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every point (faiss search with k=1).

    Args:
        index: An empty-able flat index from :func:`flat_index` (its content is replaced).
        points: (n, D) float32, C-contiguous.
        centroids: (K, D) float32.

    Returns:
        ``(distances, ids)``: (n,) float32 squared L2 distances (or inner products) and (n,) int64
        centroid ids.
    """
    index.reset()
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    distances, ids = index.search(points, 1)
    return distances[:, 0], ids[:, 0]


def block_stats(points: np.ndarray, ids: np.ndarray, distances: np.ndarray, k: int) -> PartialStats:
    """Per-cluster sums and counts, and the objective, of one block of assigned points.

    Sums are float32 within chunks of ``SUM_CHUNK_ROWS`` rows (a sparse one-hot product, about a
    hundredth of the search time) and float64 across chunks, so their rounding error is that of
    chunk-sized sums, not of faiss's float32 sum over all points.

    Args:
        points: (n, D) float32.
        ids: (n,) int64 centroid ids in [0, K).
        distances: (n,) distances to the assigned centroids.
        k: Number of centroids K.

    Returns:
        The block's :class:`PartialStats` (sums in float64).
    """
    from scipy import sparse

    sums = np.zeros((k, points.shape[1]), np.float64)
    for start in range(0, len(points), SUM_CHUNK_ROWS):
        chunk_ids = ids[start : start + SUM_CHUNK_ROWS]
        rows = np.arange(len(chunk_ids))
        one_hot = sparse.csr_matrix((np.ones(len(chunk_ids), points.dtype), (chunk_ids, rows)),
                                    shape=(k, len(chunk_ids)))
        sums += one_hot @ points[start : start + SUM_CHUNK_ROWS]
    counts = np.bincount(ids, minlength=k).astype(np.int64)
    return PartialStats(sums, counts, float(np.sum(distances, dtype=np.float64)))


def device_assign(points, centroids, inner_product: bool, chunk: int = SUM_CHUNK_ROWS):
    """Nearest centroid of every point, computed with torch where the points live (GPU or CPU).

    The torch twin of :func:`nearest_centroids` for points kept on a device across iterations:
    one GEMM per chunk of ``chunk`` rows, squared L2 distances as ``|x|^2 - 2 x.c + |c|^2``
    clamped at 0 (faiss's ``exhaustive_L2sqr_blas``), or inner products when ``inner_product``.
    TF32 stays off (torch's default), so the GEMM is float32 as faiss's.

    Args:
        points: (n, D) float32 torch tensor.
        centroids: (K, D) float32 torch tensor on the same device.
        inner_product: maximise inner products (spherical) instead of minimising L2.
        chunk: rows per GEMM.

    Returns:
        ``(distances, ids)``: (n,) float32 and (n,) int64 torch tensors on the points' device.
    """
    import torch

    distances = torch.empty(len(points), dtype=torch.float32, device=points.device)
    ids = torch.empty(len(points), dtype=torch.int64, device=points.device)
    for start, _, best, nearest in _device_chunks(points, centroids, inner_product, chunk):
        distances[start : start + len(best)] = best
        ids[start : start + len(best)] = nearest
    return distances, ids


def device_block_stats(points, centroids, inner_product: bool, chunk: int = SUM_CHUNK_ROWS) -> PartialStats:
    """One E-step where the points live: :func:`device_assign` reduced to :class:`PartialStats`.

    Per-cluster sums are ``index_add_`` in float64 on the device (exact to float64 rounding,
    whatever the order of the GPU's atomic adds), counts a ``bincount``; only the (K, D) sums, the
    K counts and the objective leave the device. Equals :func:`block_stats` after
    :func:`nearest_centroids` up to float rounding (and the side of exact distance ties).

    Args:
        points: (n, D) float32 torch tensor.
        centroids: (K, D) float32 torch tensor on the same device.
        inner_product: spherical k-means (inner-product search).
        chunk: rows per GEMM and per float64 copy (bounds the device memory of one step).

    Returns:
        The block's statistics as numpy (sums float64).
    """
    import torch

    k, dim = centroids.shape
    sums = torch.zeros(k, dim, dtype=torch.float64, device=points.device)
    counts = torch.zeros(k, dtype=torch.int64, device=points.device)
    objective = torch.zeros((), dtype=torch.float64, device=points.device)
    for _, x, best, nearest in _device_chunks(points, centroids, inner_product, chunk):
        sums.index_add_(0, nearest, x.double())
        counts += torch.bincount(nearest, minlength=k)
        objective += best.double().sum()
    return PartialStats(sums.cpu().numpy(), counts.cpu().numpy(), float(objective))


def _device_chunks(points, centroids, inner_product: bool, chunk: int):
    """``(start, rows, best distance, nearest id)`` per chunk of ``chunk`` rows (torch)."""
    import torch

    c_squared = (centroids * centroids).sum(1)
    for start in range(0, len(points), chunk):
        x = points[start : start + chunk]
        if inner_product:
            best, nearest = (x @ centroids.t()).max(1)
        else:
            best, nearest = torch.addmm(c_squared, x, centroids.t(), alpha=-2.0).min(1)
            best = (best + (x * x).sum(1)).clamp_(min=0)
        yield start, x, best, nearest


def merge_stats(parts: list[PartialStats]) -> PartialStats:
    """Sum the partial statistics of disjoint blocks (equals the statistics of their union)."""
    if not parts:
        raise ValueError("merge_stats needs at least one PartialStats")
    sums, counts = parts[0].sums.copy(), parts[0].counts.copy()
    for part in parts[1:]:  # in place: no (num_parts, K, D) stack
        sums += part.sums
        counts += part.counts
    return PartialStats(sums, counts, float(sum(part.objective for part in parts)))


def normalize_rows(x: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """Rows divided by their L2 norm (+ ``eps``), in float32; all-zero rows stay zero.

    ``eps=0`` is faiss's ``fvec_renorm_L2`` (spherical centroids); the reference divides the
    embeddings by ``norm + 1e-8``.
    """
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True) + np.float32(eps)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def update_centroids(stats: PartialStats, spherical: bool) -> tuple[np.ndarray, int]:
    """The M-step: centroids from merged statistics, empty clusters split, spherical projection.

    Args:
        stats: Statistics of all points (:func:`merge_stats` of every block).
        spherical: L2-normalise the centroids after the update (faiss ``spherical=True``).

    Returns:
        ``(centroids, num_splits)``: (K, D) float32 centroids and the number of empty clusters that
        were re-seeded.
    """
    counts = stats.counts.astype(np.float32)  # faiss keeps counts as float ("hassign")
    centroids = np.zeros(stats.sums.shape, np.float32)
    filled = stats.counts > 0
    centroids[filled] = stats.sums[filled] / stats.counts[filled, None]
    num_splits = split_empty_clusters(centroids, counts, stats.num_points)
    if spherical:
        centroids = normalize_rows(centroids)
    return centroids, num_splits


class _SplitStream:
    """``faiss::RandomGenerator(1234).rand_float()``: a ``std::mt19937`` word / 2^32 in float32."""

    def __init__(self, block: int) -> None:
        # numpy's legacy seeding of MT19937 with an integer is std::mt19937's init_genrand.
        self._state = np.random.RandomState(SPLIT_SEED)
        self._block = max(block, 64)
        self._buffer = np.empty(0, np.float32)
        self._position = 0

    def peek(self, count: int) -> np.ndarray:
        """The next ``count`` draws without consuming them."""
        while len(self._buffer) - self._position < count:
            words = self._state.randint(0, 2**32, size=self._block, dtype=np.uint32)
            draws = words.astype(np.float32) / np.float32(2.0**32)  # float(mt.max()) == 2^32
            self._buffer = np.concatenate([self._buffer[self._position :], draws])
            self._position = 0
        return self._buffer[self._position : self._position + count]

    def consume(self, count: int) -> None:
        """Advance past ``count`` draws."""
        self._position += count


def _pick_donor(counts: np.ndarray, num_points: int, stream: _SplitStream) -> int:
    """faiss's donor walk: clusters 0, 1, ... cyclically, stop when a draw < (size - 1) / (n - k)."""
    k = len(counts)
    p = ((counts.astype(np.float64) - 1.0) / np.float64(np.float32(num_points - k))).astype(np.float32)
    max_tries = 10 * k  # faiss >= 1.14 falls back to the largest cluster after 10 k failures
    for _ in range(0, max_tries, k):
        hits = np.flatnonzero(stream.peek(k) < p)
        if len(hits):
            stream.consume(int(hits[0]) + 1)
            return int(hits[0])
        stream.consume(k)
    return int(np.argmax(counts))


def split_empty_clusters(centroids: np.ndarray, counts: np.ndarray, num_points: int) -> int:
    """Re-seed every empty cluster by splitting a populated one, in place (faiss ``split_clusters``).

    For each empty cluster ``ci`` (in order) a donor ``cj`` is drawn with probability proportional
    to ``counts[cj] - 1``; ``ci`` gets a copy of the donor's centroid, then both are perturbed
    symmetrically: even coordinates ``ci *= 1 + eps``, ``cj *= 1 - eps``, odd coordinates the
    other way round (eps = 1/1024); the donor's count is split evenly.

    Args:
        centroids: (K, D) float32, modified in place.
        counts: (K,) float32 cluster sizes, modified in place (faiss's float ``hassign``).
        num_points: Total number of points n (> K).

    Returns:
        The number of splits.
    """
    empty = np.flatnonzero(counts == 0)
    if len(empty) == 0:
        return 0
    if num_points <= len(counts):
        raise ValueError(f"cannot split clusters: {num_points} points for {len(counts)} clusters")
    up = np.ones(centroids.shape[1], np.float32) + SPLIT_EPS  # even coordinates of the copy
    down = np.ones(centroids.shape[1], np.float32) - SPLIT_EPS
    up[1::2], down[1::2] = down[1::2].copy(), up[1::2].copy()
    stream = _SplitStream(len(counts))
    for ci in empty:
        cj = _pick_donor(counts, num_points, stream)
        centroids[ci] = centroids[cj] * up
        centroids[cj] = centroids[cj] * down
        counts[ci] = counts[cj] / np.float32(2)
        counts[cj] -= counts[ci]
    return len(empty)


def initial_rows(num_points: int, k: int, seed: int, redo: int) -> np.ndarray:
    """Global row indices of the initial centroids of one redo, as faiss samples them.

    faiss takes the first ``k`` entries of ``rand_perm(n, seed + 1 + redo * 15486557)``; calling
    faiss's ``rand_perm`` keeps this exact across faiss versions (it holds n int32 on the driver).

    Args:
        num_points: Number of points n (< 2^31).
        k: Number of centroids K (<= n).
        seed: The k-means seed.
        redo: Index of the redo, from 0.

    Returns:
        (K,) int64 row indices into the concatenation of all blocks.
    """
    import faiss

    perm = np.empty(num_points, np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), num_points, seed + 1 + redo * REDO_SEED_STRIDE)
    return perm[:k].astype(np.int64)


def is_better(objective: float, best: float | None, spherical: bool) -> bool:
    """Whether a redo's final objective beats the best so far (max for inner product, else min)."""
    if best is None:
        return True
    return objective > best if spherical else objective < best
