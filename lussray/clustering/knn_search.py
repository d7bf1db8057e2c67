"""Exact top-k inner-product search over embedding files spread across Ray actors.

STEGO's KNN pairs (seed-methods.md 2.3) come from a cosine top-30 of every image-level feature
against all others. The reference computes the full (N, N) similarity in 16 chunks with
``torch.topk`` in one process holding all features (its ``precompute_knns.py``, which users see
run out of memory). Here the features stay where the sharded k-means keeps them: each
:class:`~lussray.clustering.kmeans.EmbeddingShard` actor loads a contiguous, size-balanced group
of the files. The driver walks the files in order in blocks of ``block_size`` rows; a block's rows
are fetched from the actor that owns them and sent (one object in the object store) to every
actor, each returns the top-k of its own rows (:meth:`EmbeddingShard.top_k`), and the driver
merges the A lists of k per query (:func:`merge_top_k`). No process ever holds more than one
actor's share of the features plus a few blocks; the driver holds a few (block, A * k) results.

Ties are broken by the smaller global row index, so the result does not depend on the number of
actors; ``merge_top_k`` equals a brute-force ``argsort`` of the full similarity row up to float
rounding of the scores.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from lussray import storage
from lussray.clustering.kmeans import EmbeddingShard, _get, group_files
from lussray.errors import UserError


def merge_top_k(scores: list[np.ndarray], rows: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The overall top-k of per-actor top-k lists (global row indices), best first, ties to the smaller row.

    Args:
        scores: one (q, k_a) float32 array per actor.
        rows: the matching (q, k_a) int64 global row indices.
        k: neighbours kept.

    Returns:
        (q, min(k, sum k_a)) scores and rows.
    """
    all_scores, all_rows = np.concatenate(scores, axis=1), np.concatenate(rows, axis=1)
    order = np.lexsort((all_rows, -all_scores), axis=1)[:, :k]  # last key primary: score desc, then row asc
    return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_rows, order, axis=1)


@dataclass
class FileNeighbours:
    """The neighbours of one file's rows (``rows[i]`` are global indices over the files in order)."""

    file_index: int
    scores: np.ndarray
    rows: np.ndarray


@dataclass
class SearchStats:
    """Counts, time and memory of a :func:`sharded_top_k` search."""

    num_points: int = 0
    dim: int = 0
    actors: int = 0
    seconds: float = 0.0
    peak_rss_mb_per_actor: list[float] | None = None


def _start(paths: list[str], num_actors: int, cpus_per_actor: float, gpus_per_actor: float, key: str) -> list:
    """One search actor per contiguous, size-balanced group of the files, once the cluster can hold them."""
    import ray

    from lussray.stages import ray_cluster

    sizes = []
    for path in paths:
        size = storage.file_size(path)
        if size is None:
            raise UserError(f"feature file not found: {path}")
        sizes.append(size)
    groups = group_files(sizes, num_actors)
    ray_cluster.require(ray_cluster.Demand(
        "KNN search actors", len(groups), cpus_per_actor, gpus_per_actor, f"{key}.search_actors",
        f"{key}.cpus_per_actor", f"{key}.search_gpus_per_actor"), ray_cluster.current_config())
    remote = ray.remote(EmbeddingShard).options(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)
    return [remote.remote([paths[i] for i in group], "embedding", True, True, gpus_per_actor > 0,
                          max(1, int(cpus_per_actor)))
            for group in groups]


def sharded_top_k(paths: list[str], k: int, *, num_actors: int = 2, block_size: int = 4096,
                  blocks_in_flight: int = 2, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
                  query_files: set[int] | None = None, stats: SearchStats | None = None,
                  config_key: str = "knn") -> Iterator[FileNeighbours]:
    """Top-k neighbours (inner product of the L2-normalised rows) of every row, file by file.

    Args:
        paths: feature parquet files (``key`` and ``embedding`` columns), in the global order.
        k: neighbours per row, the row itself included (at most the number of rows).
        num_actors: actors holding the rows (fewer when there are fewer files).
        block_size: query rows sent to the actors at once.
        blocks_in_flight: blocks searched ahead while the driver merges.
        cpus_per_actor: CPUs per actor (its faiss threads).
        gpus_per_actor: GPUs per actor (a faiss GPU index).
        query_files: indices of the files whose rows are queried (default: all); the others are
            searched among but get no result (a resumed stage).
        stats: filled with counts, time and the actors' peak memory.
        config_key: the config section named in resource errors.

    Yields:
        One :class:`FileNeighbours` per queried file, in file order.

    Raises:
        UserError: unreadable files, inconsistent dimensions, no rows.
    """
    import ray

    started = time.perf_counter()
    stats = stats if stats is not None else SearchStats()
    actors = _start([str(p) for p in paths], num_actors, cpus_per_actor, gpus_per_actor, config_key)
    try:
        infos = _get([actor.load.remote() for actor in actors], files=f" loading {len(paths)} feature files")
        dims = {info["dim"] for info in infos if info["dim"] is not None}
        if not dims:
            raise UserError("KNN search: the feature files hold no rows")
        if len(dims) > 1:
            raise UserError(f"KNN search: feature files of different dimensions {sorted(dims)}")
        layout = _get([actor.file_rows.remote() for actor in actors])
        stats.num_points, stats.dim, stats.actors = sum(i["rows"] for i in infos), dims.pop(), len(actors)
        yield from _search(actors, layout, k, block_size, blocks_in_flight, query_files)
        stats.peak_rss_mb_per_actor = list(_get([actor.peak_rss_mb.remote() for actor in actors]))
    finally:
        for actor in actors:
            ray.kill(actor)
        stats.seconds = time.perf_counter() - started


def _search(actors: list, layout: list[list[tuple[str, int]]], k: int, block_size: int, blocks_in_flight: int,
            query_files: set[int] | None) -> Iterator[FileNeighbours]:
    """Each queried file's rows, block by block, against every actor; the merged results file by file."""
    current, parts = None, []
    for file_index, scores, rows in _merged_blocks(actors, layout, k, block_size, blocks_in_flight, query_files):
        if current is not None and file_index != current:
            yield _joined(current, parts)
            parts = []
        current = file_index
        parts.append((scores, rows))
    if current is not None:
        yield _joined(current, parts)


def _merged_blocks(actors: list, layout: list[list[tuple[str, int]]], k: int, block_size: int,
                   blocks_in_flight: int, query_files: set[int] | None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(file index, scores, global rows) of every query block in order, ``blocks_in_flight`` searched ahead."""
    actor_starts = np.concatenate([[0], np.cumsum([sum(rows for _, rows in files) for files in layout])])
    pending: deque = deque()
    for file_index, owner, start, end in _blocks(layout, block_size, query_files):
        queries = actors[owner].rows.remote(np.arange(start, end))  # an object-store reference: never on the driver
        pending.append((file_index, [actor.top_k.remote(queries, k) for actor in actors]))
        if len(pending) >= blocks_in_flight:
            yield _merge(*pending.popleft(), actor_starts, k)
    while pending:
        yield _merge(*pending.popleft(), actor_starts, k)


def _blocks(layout: list[list[tuple[str, int]]], block_size: int,
            query_files: set[int] | None) -> Iterator[tuple[int, int, int, int]]:
    """(file index, owner actor, local start row, local end row) of every query block, in file order."""
    file_index = 0
    for owner, files in enumerate(layout):
        local = 0
        for _, rows in files:
            if query_files is None or file_index in query_files:
                for start in range(local, local + rows, block_size):
                    yield file_index, owner, start, min(start + block_size, local + rows)
            local += rows
            file_index += 1


def _merge(file_index: int, refs: list, actor_starts: np.ndarray, k: int) -> tuple[int, np.ndarray, np.ndarray]:
    results = _get(refs)
    scores, rows = merge_top_k([r[0] for r in results], [r[1] + actor_starts[a] for a, r in enumerate(results)], k)
    return file_index, scores, rows


def _joined(file_index: int, parts: list[tuple[np.ndarray, np.ndarray]]) -> FileNeighbours:
    return FileNeighbours(file_index, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


__all__ = ["FileNeighbours", "SearchStats", "merge_top_k", "sharded_top_k"]
