"""Sharded k-means over Ray actors: no process holds all the embeddings.

Label generation clusters one embedding per training image (ImageNet-S919: about 1.2M x 2048
float32, 9.8 GB) into K categories, as stage 2.2 of PASS [0] does with ``faiss.Clustering`` on one
GPU. Here each :class:`EmbeddingShard` actor loads a contiguous, size-balanced group of the
embedding parquet files and answers "assign to these centroids" with per-cluster sums, counts and
the objective (:mod:`lussray.clustering.lloyd`); the driver runs the Lloyd iterations and the redos
and only ever holds K x D numbers. The result equals ``faiss.Kmeans`` in one process on the
concatenated files (same seed, or same ``init_centroids``, ``max_points_per_centroid`` out of
reach) up to float rounding; see :mod:`lussray.clustering.lloyd` for the faiss facts reproduced and
the deviations.

Each actor keeps its rows where it searches them for the whole run: on its GPU when it has one
(torch GEMM search and float64 per-cluster sums on the device; only centroids in, sums, counts
and the objective out), else in host memory with faiss's BLAS search. An actor that dies (its
process killed, its node gone) is rebuilt from its files and its unanswered call sent again
(:class:`ShardActors`), so the result is that of an unbroken run.

Parquet contract (written by ``lussray.stages.labelgen``): a string column ``key`` and a column
``embedding`` of ``fixed_size_list<float32>[D]`` (or ``list<float32>``), one file per input shard.

Run (from label generation, or directly)::

    python -c "import ray; from lussray.clustering.kmeans import sharded_kmeans; ray.init();
    print(sharded_kmeans(['run/labelgen/embeddings/train-000000.parquet'], 50))"

- [0]: PASS / LUSS, Gao et al., 2022, arXiv:2106.03149 (``cluster.py``).
"""

from __future__ import annotations

import itertools
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lussray import storage
from lussray.clustering import lloyd
from lussray.errors import UserError

#: The reference normalises embeddings as x / (||x|| + 1e-8).
ROW_NORM_EPS = 1e-8
#: faiss warns below this many points per centroid (``min_points_per_centroid``).
MIN_POINTS_PER_CENTROID = 39
#: CPU flags that OpenBLAS's SkylakeX kernels need.
AVX512_FLAGS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
#: Times one k-means actor is rebuilt from its files after it died before k-means gives up.
MAX_REBUILDS = 3
#: Search engines of the actors (:func:`resolve_engine`).
ENGINES = ("auto", "faiss", "torch")


@dataclass
class KMeansResult:
    """Outcome of :func:`sharded_kmeans`.

    Attributes:
        centroids: (K, D) float32 centroids of the best redo (unit rows when spherical).
        objective: Final objective of the best redo (faiss's ``obj[-1]``): the sum of squared L2
            distances (or of inner products when spherical) of the last iteration's assignment.
        iteration_objectives: Objective of every iteration of the best redo.
        num_points: Number of embeddings clustered.
        dim: Embedding dimension D.
        seconds: Wall time, loading included.
        peak_rss_mb_per_actor: Peak resident memory of each actor process, MB.
        iteration_seconds: Wall time of every iteration of the best redo.
        rebuilds: Actors rebuilt from their files after they died (:class:`ShardActors`).
    """

    centroids: np.ndarray
    objective: float
    iteration_objectives: list[float]
    num_points: int
    dim: int
    seconds: float
    peak_rss_mb_per_actor: list[float] = field(default_factory=list)
    iteration_seconds: list[float] = field(default_factory=list)
    rebuilds: int = 0


def embedding_matrix(column: pa.ChunkedArray | pa.Array, where: str) -> np.ndarray:
    """An (n, D) float32 C-contiguous matrix from a fixed-size or variable list column.

    Args:
        column: The embedding column.
        where: What to name in error messages (file and column).

    Raises:
        UserError: Not a list of floats, null rows, or rows of different lengths.
    """
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    kind = array.type
    if not (pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        raise UserError(f"{where}: expected a list<float32> column, found {kind}")
    if not pa.types.is_floating(kind.value_type):
        raise UserError(f"{where}: expected float values, found {kind.value_type}")
    if array.null_count:
        raise UserError(f"{where}: {array.null_count} null embeddings")
    if pa.types.is_fixed_size_list(kind):
        dim = kind.list_size
    else:
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        dim = int(lengths[0]) if len(lengths) else 0
        if len(lengths) and (lengths != dim).any():
            raise UserError(f"{where}: embeddings of different lengths ({int(lengths.min())}..{int(lengths.max())})")
    values = array.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values.reshape(len(array), dim), dtype=np.float32)


def openblas_env(cpuinfo: str = "/proc/cpuinfo") -> dict[str, str]:
    """``{"OPENBLAS_CORETYPE": "SkylakeX"}`` on an AVX-512 CPU when the variable is unset, else ``{}``.

    The faiss-cpu wheel (1.15.1) bundles OpenBLAS 0.3.15, which does not recognise recent Xeons
    (Sapphire Rapids) and falls back to its SSE3 "Prescott" kernels: the flat-index search then
    runs at about 20 GFLOP/s per core instead of about 100 (tools/bench_kmeans.py). OpenBLAS
    reads the variable when it is loaded, i.e. on ``import faiss``.
    """
    if "OPENBLAS_CORETYPE" in os.environ:
        return {}
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return {}
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    return {"OPENBLAS_CORETYPE": "SkylakeX"} if AVX512_FLAGS <= flags else {}


def _read_table(path: str, column: str) -> pa.Table:
    """The ``key`` (when present) and ``column`` columns of one parquet file."""
    fs, inner = storage.filesystem(path)
    try:
        names = pq.read_schema(inner, filesystem=fs).names
    except (OSError, pa.ArrowException) as error:
        raise UserError(f"cannot read embedding file {path}: {error}") from error
    if column not in names:
        raise UserError(f"embedding file {path} has no column {column!r} (columns: {', '.join(names)})")
    return pq.read_table(inner, filesystem=fs, columns=[name for name in ("key", column) if name in names])


def _read_block(path: str, column: str) -> tuple[pa.Array, np.ndarray]:
    """Keys (``<path>#<row>`` without a ``key`` column) and (n, D) float32 embeddings of one file."""
    table = _read_table(path, column)
    embeddings = embedding_matrix(table.column(column), f"{path} column {column!r}")
    if "key" in table.column_names:
        return table.column("key").combine_chunks(), embeddings
    return pa.array([f"{path}#{row}" for row in range(table.num_rows)], pa.string()), embeddings


def read_embeddings_parquet(path: str, column: str = "embedding") -> tuple[list[str], np.ndarray]:
    """Keys and (n, D) float32 embeddings of one parquet file (local path or s3:// gs:// URI).

    Raises:
        UserError: Unreadable file, missing column or malformed embeddings (names the file).
    """
    keys, embeddings = _read_block(path, column)
    return keys.to_pylist(), embeddings


def group_files(sizes: list[int], num_groups: int) -> list[range]:
    """Split files into at most ``num_groups`` contiguous groups of about equal total size.

    Args:
        sizes: Size of every file (bytes; all zero means "equal").
        num_groups: Wanted number of groups (fewer when there are fewer files).

    Returns:
        Non-empty, contiguous ranges of file indices that cover all files in order.
    """
    num_groups = max(1, min(num_groups, len(sizes)))
    weights = np.asarray(sizes, np.float64) if sum(sizes) > 0 else np.ones(len(sizes))
    cumulative = np.cumsum(weights)
    bounds = [0]
    for group in range(1, num_groups):
        end = int(np.argmin(np.abs(cumulative - cumulative[-1] * group / num_groups))) + 1
        bounds.append(min(max(end, bounds[-1] + 1), len(sizes) - (num_groups - group)))
    bounds.append(len(sizes))
    return [range(start, end) for start, end in itertools.pairwise(bounds)]


def resolve_engine(engine: str, use_gpu: bool) -> str:
    """The search engine of a k-means actor: ``torch`` on a GPU, ``faiss`` on the CPU, unless named.

    Raises:
        UserError: an engine not in :data:`ENGINES`.
    """
    if engine not in ENGINES:
        raise UserError(f"k-means engine {engine!r} is not one of {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    return "torch" if use_gpu else "faiss"


class EmbeddingShard:
    """Holds one group of embedding files and computes k-means statistics over them.

    Used as a Ray actor by :func:`sharded_kmeans`; also usable in-process. The rows are loaded
    once and stay where they are searched: with the ``torch`` engine on a GPU they are copied to
    the device file by file while loading (no second host copy) and every iteration runs there
    (:func:`lussray.clustering.lloyd.device_block_stats`), so only the centroids come in and the
    per-cluster sums, counts and objective go out. With ``faiss`` (the CPU default, its BLAS
    search being the fastest CPU path measured) they stay in host memory.

    Args:
        paths: Parquet files of this shard, in order.
        column: Embedding column name.
        normalize_rows: L2-normalise every row (x / (||x|| + 1e-8)) as the reference does.
        inner_product: Search by inner product (spherical k-means) instead of L2.
        use_gpu: The actor owns a GPU: the rows live and are searched on it.
        threads: CPU threads of the search (faiss OpenMP, or torch intra-op).
        engine: ``auto`` (torch on a GPU, faiss on the CPU), ``faiss`` (a faiss GPU index when
            ``use_gpu``; the rows stay on the host) or ``torch`` (on the CPU too, e.g. in tests).
    """

    def __init__(self, paths: list[str], column: str, normalize_rows: bool, inner_product: bool,
                 use_gpu: bool, threads: int, engine: str = "auto") -> None:
        self._engine = resolve_engine(engine, use_gpu)
        if self._engine == "faiss":
            if "faiss" not in sys.modules:  # decided on the actor's own node, before OpenBLAS loads
                os.environ.update(openblas_env())
            import faiss

            faiss.omp_set_num_threads(max(1, threads))
            self._device = None
        else:
            import torch

            torch.set_num_threads(max(1, threads))
            self._device = torch.device("cuda" if use_gpu else "cpu")
        self._paths, self._column, self._normalize = list(paths), column, normalize_rows
        self._inner_product, self._use_gpu = inner_product, use_gpu
        self._points = np.zeros((0, 0), np.float32)  # numpy (faiss), or a torch tensor on self._device
        self._keys: list[pa.Array] = []
        self._index = None

    def load(self) -> dict:
        """Read all files; returns ``{"rows", "dim", "path"}`` (dim None when there are no rows).

        Raises:
            UserError: Unreadable file, missing column, malformed or non-finite embeddings, or a
                dimension that differs from the shard's first file (names the file).
        """
        expected = [self._num_rows(path) for path in self._paths]
        offset, dim, dim_path = 0, None, None
        for path, rows in zip(self._paths, expected):
            keys, block = _read_block(path, self._column)
            if len(block) != rows:
                raise UserError(f"embedding file {path} changed while being read ({rows} -> {len(block)} rows)")
            if rows == 0:
                continue
            if dim is None:  # the shard's array is allocated once: no concatenation copy
                dim, dim_path = block.shape[1], path
                self._points = self._allocate(sum(expected), dim)
            elif block.shape[1] != dim:
                raise UserError(f"embedding dimension {block.shape[1]} in {path} differs from {dim} in {dim_path}")
            if not np.isfinite(block).all():
                raise UserError(f"embedding file {path} contains NaN or infinite values")
            block = lloyd.normalize_rows(block, ROW_NORM_EPS) if self._normalize else block
            self._points[offset : offset + rows] = block if self._device is None else _torch_rows(block)
            self._keys.append(keys)
            offset += rows
        self._points = self._points[:offset]
        return {"rows": offset, "dim": dim, "path": dim_path}

    def _allocate(self, rows: int, dim: int):
        """The (rows, D) float32 array of the shard: numpy, or a torch tensor on the actor's device."""
        if self._device is None:
            return np.empty((rows, dim), np.float32)
        import torch

        return torch.empty((rows, dim), dtype=torch.float32, device=self._device)

    @staticmethod
    def _num_rows(path: str) -> int:
        fs, inner = storage.filesystem(path)
        try:
            return pq.read_metadata(inner, filesystem=fs).num_rows
        except (OSError, pa.ArrowException) as error:
            raise UserError(f"cannot read embedding file {path}: {error}") from error

    def num_rows(self) -> int:
        """Number of embeddings held."""
        return len(self._points)

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Copies of the (preprocessed) embeddings at local row ``indices``: (len, D) float32."""
        if self._device is None:
            return self._points[np.asarray(indices, np.int64)]
        return self._points[_torch_rows(np.asarray(indices, np.int64)).to(self._device)].cpu().numpy()

    def _centroids(self, centroids: np.ndarray):
        """``centroids`` on the actor's device (torch engine)."""
        return _torch_rows(np.ascontiguousarray(centroids, dtype=np.float32)).to(self._device)

    def _search(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._device is not None:
            distances, ids = lloyd.device_assign(self._points, self._centroids(centroids), self._inner_product)
            return distances.cpu().numpy(), ids.cpu().numpy()
        if self._index is None:
            self._index = lloyd.flat_index(self._points.shape[1], self._inner_product, self._use_gpu)
        return lloyd.nearest_centroids(self._index, self._points, centroids)

    def partial_stats(self, centroids: np.ndarray) -> lloyd.PartialStats:
        """Sums, counts and objective of this shard's rows against ``centroids`` (K, D)."""
        if self._device is not None:  # computed where the rows live; K x D numbers come back
            return lloyd.device_block_stats(self._points, self._centroids(centroids), self._inner_product)
        distances, ids = self._search(centroids)
        return lloyd.block_stats(self._points, ids, distances, len(centroids))

    def assign(self, centroids: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Keys, nearest-centroid ids (int64) and distances (float32) of this shard's rows."""
        distances, ids = self._search(centroids)
        keys = pa.concat_arrays(self._keys).to_pylist() if self._keys else []
        return keys, ids, distances

    def peak_rss_mb(self) -> float:
        """Peak resident memory of this process, MB (Linux reports KiB)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    # -- nearest-neighbour search (lussray.clustering.knn_search) --------------------------------

    def file_rows(self) -> list[tuple[str, int]]:
        """``(path, rows)`` of this shard's files, in the order of its rows."""
        return [(path, self._num_rows(path)) for path in self._paths]

    def top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` rows of this shard with the largest inner product with each query, best first.

        Exact search: ``faiss.knn`` over the rows in place on the CPU (no index copy), a faiss GPU
        flat index when the actor owns a GPU, or a chunked matmul + ``topk`` when the rows are a
        torch tensor.

        Args:
            queries: (q, D) float32.
            k: neighbours wanted (at most the shard's rows are returned).

        Returns:
            ``(scores, rows)``: (q, k') float32 inner products and (q, k') int64 local row indices,
            k' = min(k, rows of the shard).
        """
        k = min(int(k), len(self._points))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not isinstance(self._points, np.ndarray):  # rows held as a torch tensor
            return _torch_top_k(self._points, queries, k)
        if self._use_gpu:
            if getattr(self, "_knn_index", None) is None:
                self._knn_index = lloyd.flat_index(self._points.shape[1], True, True)
                self._knn_index.add(self._points)
            scores, rows = self._knn_index.search(queries, k)
            return scores, rows.astype(np.int64)
        import faiss

        scores, rows = faiss.knn(queries, self._points, k, metric=faiss.METRIC_INNER_PRODUCT)
        return scores, rows.astype(np.int64)


def _torch_top_k(points, queries: np.ndarray, k: int, chunk_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product top-k of numpy ``queries`` among torch ``points`` (on their device), in query chunks."""
    import torch

    scores, rows = [], []
    for start in range(0, len(queries), chunk_rows):
        block = torch.from_numpy(queries[start:start + chunk_rows]).to(points.device)
        top = (block @ points.T).topk(k, dim=1)
        scores.append(top.values.float().cpu().numpy())
        rows.append(top.indices.cpu().numpy().astype(np.int64))
    return np.concatenate(scores), np.concatenate(rows)


def _torch_rows(array: np.ndarray):
    """A torch view of a numpy array (no copy)."""
    import torch

    return torch.from_numpy(array)


class _ActorDied(Exception):
    """A k-means actor is gone: its process or its node died (the message says how)."""


def _get(refs, timeout_s: float | None = None, files: str = "", *, deaths: bool = False):
    """``ray.get`` with a timeout; a remote :class:`UserError` comes back as itself (message only).

    Any other error of the actors (one died, a timeout) becomes one UserError line naming ``files``;
    with ``deaths`` an actor's death raises :class:`_ActorDied` instead (the caller rebuilds it).
    """
    import ray

    from lussray.stages.ray_cluster import current_config

    timeout_s = current_config().get_timeout_s if timeout_s is None else timeout_s
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, UserError):
            raise UserError(str(error.cause.args[0]) if error.cause.args else "") from None
        raise UserError(f"k-means actors{files}: {type(error.cause).__name__}: "
                        f"{(str(error.cause).strip().splitlines() or [''])[0]}") from None
    except ray.exceptions.GetTimeoutError:
        raise UserError(f"k-means actors{files} did not answer within ray.get_timeout_s={timeout_s:g} s") from None
    except ray.exceptions.RayActorError as error:
        first = (str(error).strip().splitlines() or [""])[0]
        if deaths:
            raise _ActorDied(f"{type(error).__name__}: {first}") from None
        raise UserError(f"k-means actors{files}: {type(error).__name__}: {first}") from None
    except ray.exceptions.RayError as error:
        first = (str(error).strip().splitlines() or [""])[0]
        raise UserError(f"k-means actors{files}: {type(error).__name__}: {first}") from None


class ShardActors:
    """The k-means actors, the files each one holds, and the rebuild of one that died.

    An actor whose process or node dies (a SIGKILL, the OOM killer, a preempted node) is replaced
    by a new one that loads the same files again, and the call it did not answer is sent again to
    the new one. Its statistics are a function of its files and the centroids only, so a run with
    rebuilds gives the result of an unbroken run. Each actor is rebuilt at most
    :data:`MAX_REBUILDS` times; then k-means fails naming its files.

    Args:
        groups: the files of each actor, in order.
        start: starts the actor of one group (not yet loaded).
    """

    def __init__(self, groups: list[list[str]], start: Callable[[list[str]], Any]) -> None:
        self.groups, self._start = groups, start
        self.actors = [start(group) for group in groups]
        self.rows: list[int] | None = None  # rows of each actor, known after the first load
        self.rebuilds = [0] * len(groups)

    def call(self, method: str, *args: Any, per_actor: Callable[[int], tuple] | None = None,
             files: str = "") -> list:
        """``method(*args)`` (or ``method(*per_actor(i))``) on every actor at once; their results in order."""
        arguments = [per_actor(i) if per_actor else args for i in range(len(self.actors))]
        refs = [getattr(actor, method).remote(*values) for actor, values in zip(self.actors, arguments)]
        return [self._result(i, ref, method, arguments[i], files) for i, ref in enumerate(refs)]

    def load(self, files: str = "") -> list[dict]:
        """Every actor reads its files (:meth:`EmbeddingShard.load`); their infos."""
        infos = self.call("load", files=files)
        self.rows = [info["rows"] for info in infos]
        return infos

    def kill(self) -> None:
        """End every actor (their memory is freed at once)."""
        for actor in self.actors:
            _kill(actor)

    def _result(self, i: int, ref: Any, method: str, args: tuple, files: str) -> Any:
        while True:
            try:
                return _get(ref, files=files, deaths=True)
            except _ActorDied as death:
                ref = self._rebuild(i, str(death), method, args)

    def _rebuild(self, i: int, why: str, method: str, args: tuple) -> Any:
        """A new actor for group ``i``, loaded when the call is not the load itself; the call sent to it."""
        group = self.groups[i]
        where = f"{len(group)} file{'s' if len(group) > 1 else ''} from {os.path.basename(group[0])}"
        self.rebuilds[i] += 1
        if self.rebuilds[i] > MAX_REBUILDS:
            raise UserError(f"k-means actor {i} ({where}) died {self.rebuilds[i]} times; the last time: {why}")
        print(f"[kmeans] actor {i} ({where}) died during {method} ({why}): rebuilding it from its files",
              flush=True)
        _kill(self.actors[i])
        self.actors[i] = self._start(group)
        if method != "load":
            info = self._result(i, self.actors[i].load.remote(), "load", (), "")
            if self.rows is not None and info["rows"] != self.rows[i]:
                raise UserError(f"k-means actor {i}: its files ({where}) now hold {info['rows']} rows, "
                                f"{self.rows[i]} before it died: the embeddings changed during k-means")
        return getattr(self.actors[i], method).remote(*args)


def _kill(actor: Any) -> None:
    import ray

    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001 - already gone with its node: nothing left to free
        pass


def _shard_actors(paths: list[str], num_actors: int, column: str, normalize_rows: bool, spherical: bool,
                  gpus_per_actor: float, cpus_per_actor: float, keys: str = "labelgen",
                  engine: str = "auto") -> ShardActors:
    """One actor per contiguous, size-balanced group of files, once the cluster can hold them all."""
    import ray

    from lussray.stages import ray_cluster

    sizes = []
    for path in paths:
        size = storage.file_size(path)
        if size is None:
            raise UserError(f"embedding file not found: {path}")
        sizes.append(size)
    groups = [[paths[i] for i in group] for group in group_files(sizes, num_actors)]
    resolve_engine(engine, gpus_per_actor > 0)  # a bad name fails here, not in every actor
    # every actor holds its part of the embeddings for the whole run: all must be placed at once
    ray_cluster.require(ray_cluster.Demand(
        "k-means actors", len(groups), cpus_per_actor, gpus_per_actor, f"{keys}.kmeans_actors",
        f"{keys}.kmeans_cpus_per_actor", f"{keys}.gpus_per_actor"), ray_cluster.current_config())
    remote = ray.remote(EmbeddingShard).options(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)
    return ShardActors(groups, lambda group: remote.remote(
        group, column, normalize_rows, spherical, gpus_per_actor > 0, max(1, int(cpus_per_actor)), engine))


def _start_shards(paths: list[str], num_actors: int, column: str, normalize_rows: bool, spherical: bool,
                  gpus_per_actor: float, cpus_per_actor: float, keys: str = "labelgen", engine: str = "auto") -> list:
    """The actors of :func:`_shard_actors` as a plain list (no rebuilds)."""
    return _shard_actors(paths, num_actors, column, normalize_rows, spherical, gpus_per_actor, cpus_per_actor,
                         keys, engine).actors


def _check_shards(infos: list[dict], k: int) -> tuple[int, int]:
    """Total rows and the common dimension of the loaded shards."""
    dims = [(info["dim"], info["path"]) for info in infos if info["dim"] is not None]
    if not dims:
        raise UserError("k-means: the embedding files hold no rows")
    for dim, path in dims[1:]:
        if dim != dims[0][0]:
            raise UserError(f"embedding dimension {dim} in {path} differs from {dims[0][0]} in {dims[0][1]}")
    num_points = sum(info["rows"] for info in infos)
    if k > num_points:
        raise UserError(f"k-means: K={k} clusters but only {num_points} embeddings")
    if num_points < MIN_POINTS_PER_CENTROID * k:
        print(f"[kmeans] WARNING clustering {num_points} points to {k} centroids: "
              f"faiss advises at least {MIN_POINTS_PER_CENTROID * k}", flush=True)
    return num_points, dims[0][0]


def _gather_rows(actors: ShardActors, counts: list[int], indices: np.ndarray) -> np.ndarray:
    """Rows at global ``indices`` (over the concatenation of the shards, in order)."""
    starts = np.concatenate([[0], np.cumsum(counts)])
    owner = np.searchsorted(starts, indices, side="right") - 1
    wanted = [np.flatnonzero(owner == a) for a in range(len(counts))]
    parts = actors.call("rows", per_actor=lambda a: (indices[wanted[a]] - starts[a],))
    out = np.empty((len(indices), parts[0].shape[1]), np.float32)
    for w, part in zip(wanted, parts):
        out[w] = part
    return out


def _check_init(init_centroids: np.ndarray, k: int, dim: int) -> np.ndarray:
    """``init_centroids`` as (K, D) float32, or a UserError."""
    centroids = np.ascontiguousarray(init_centroids, dtype=np.float32)
    if centroids.shape != (k, dim):
        raise UserError(f"init_centroids has shape {centroids.shape}, expected ({k}, {dim})")
    if not np.isfinite(centroids).all():
        raise UserError("init_centroids contains NaN or infinite values")
    return centroids


def _lloyd(actors: ShardActors, centroids: np.ndarray, niter: int, spherical: bool, label: str,
           log_every: int) -> tuple[np.ndarray, list[float], list[float]]:
    """``niter`` Lloyd iterations from ``centroids``: final centroids, objectives, seconds."""
    import ray

    objectives, seconds = [], []
    for iteration in range(niter):
        started = time.perf_counter()
        shared = ray.put(centroids)  # one copy in the object store for all actors
        stats = lloyd.merge_stats(actors.call("partial_stats", shared))
        centroids, num_splits = lloyd.update_centroids(stats, spherical)
        objectives.append(stats.objective)
        seconds.append(time.perf_counter() - started)
        if log_every > 0 and ((iteration + 1) % log_every == 0 or iteration + 1 == niter):
            print(f"[kmeans] {label} iter {iteration + 1}/{niter} objective={stats.objective:.6g} "
                  f"splits={num_splits} ({seconds[-1]:.2f} s)", flush=True)
    return centroids, objectives, seconds


def _best_of_redos(actors: ShardActors, counts: list[int], k: int, dim: int, *, niter: int, nredo: int, seed: int,
                   spherical: bool, init_centroids: np.ndarray | None,
                   log_every: int) -> tuple[np.ndarray, list[float], list[float]]:
    """All redos; the centroids, iteration objectives and seconds of the best one (faiss's rule)."""
    num_points = sum(counts)
    if num_points == k:  # faiss: the training set is the answer, one zero-objective iteration
        return _gather_rows(actors, counts, np.arange(k)), [0.0], [0.0]
    centroids = None if init_centroids is None else _check_init(init_centroids, k, dim)
    best = None
    for redo in range(nredo):
        # With input centroids faiss starts every redo from where the previous one ended.
        if init_centroids is None:
            centroids = _gather_rows(actors, counts, lloyd.initial_rows(num_points, k, seed, redo))
        if spherical:
            centroids = lloyd.normalize_rows(centroids)
        centroids, objectives, seconds = _lloyd(actors, centroids, niter, spherical,
                                                f"redo {redo + 1}/{nredo}", log_every)
        if lloyd.is_better(objectives[-1], best[1][-1] if best else None, spherical):
            best = (centroids, objectives, seconds)
    return best


def _check_args(paths: list[str], k: int, niter: int, nredo: int, num_actors: int) -> None:
    """Refuse an empty file list and non-positive counts."""
    if not paths:
        raise UserError("k-means: no embedding files given")
    if k < 1 or niter < 1 or nredo < 1 or num_actors < 1:
        raise UserError(f"k-means: k, niter, nredo and num_actors must be >= 1 "
                        f"(got k={k}, niter={niter}, nredo={nredo}, num_actors={num_actors})")


def sharded_kmeans(paths: list[str], k: int, *, num_actors: int = 2, niter: int = 20, nredo: int = 1,
                   seed: int = 1234, spherical: bool = False, normalize_rows: bool = True,
                   gpus_per_actor: float = 0.0, cpus_per_actor: float = 1.0, column: str = "embedding",
                   init_centroids: np.ndarray | None = None, log_every: int = 1,
                   engine: str = "auto") -> KMeansResult:
    """k-means of the embeddings in ``paths`` with the data spread over Ray actors.

    Equals ``faiss.Kmeans(d, k, niter=niter, nredo=nredo, seed=seed, spherical=spherical,
    max_points_per_centroid=<large>).train(x, init_centroids=init_centroids)`` on ``x``, the rows
    of all files in order (normalised when ``normalize_rows``), up to float rounding. As in faiss,
    with ``init_centroids`` every redo after the first continues from the previous redo's centroids.

    Args:
        paths: Embedding parquet files (local paths or s3:// gs:// URIs).
        k: Number of clusters K.
        num_actors: Actors holding the data (fewer when there are fewer files).
        niter: Lloyd iterations per redo.
        nredo: Restarts; the one with the best final objective is kept.
        seed: Seed of the initial centroid sampling (faiss's).
        spherical: Unit-norm centroids and inner-product search; the objective is maximised.
        normalize_rows: L2-normalise embeddings (x / (||x|| + 1e-8)) on load, as the reference.
        gpus_per_actor: GPUs per actor; > 0 keeps each actor's rows on its GPU and runs every
            iteration there (engine ``auto``).
        cpus_per_actor: CPUs per actor (also its search thread count, at least 1).
        column: Embedding column name.
        init_centroids: (K, D) initial centroids instead of sampled rows.
        log_every: Print a progress line every this many iterations (0: never).
        engine: The actors' search (:class:`EmbeddingShard`): ``auto`` (torch on a GPU, faiss on
            the CPU), ``faiss`` or ``torch``.

    Returns:
        The :class:`KMeansResult` of the best redo.

    Raises:
        UserError: No files, a missing file or column, inconsistent dimensions, non-finite values,
            K larger than the number of embeddings, bad ``init_centroids``, or an actor that
            died more than :data:`MAX_REBUILDS` times (one that dies is rebuilt from its files).
    """
    started = time.perf_counter()
    paths = [str(path) for path in paths]
    _check_args(paths, k, niter, nredo, num_actors)
    actors = _shard_actors(paths, num_actors, column, normalize_rows, spherical, gpus_per_actor, cpus_per_actor,
                           engine=engine)
    try:
        infos = actors.load(files=f" loading {len(paths)} files in {os.path.dirname(paths[0]) or '.'}")
        num_points, dim = _check_shards(infos, k)
        counts = [info["rows"] for info in infos]
        print(f"[kmeans] {num_points} points x {dim} dims -> K={k}, {len(counts)} actors, "
              f"{'spherical' if spherical else 'L2'}, niter={niter}, nredo={nredo}, seed={seed}", flush=True)
        centroids, objectives, seconds = _best_of_redos(
            actors, counts, k, dim, niter=niter, nredo=nredo, seed=seed, spherical=spherical,
            init_centroids=init_centroids, log_every=log_every)
        peaks = actors.call("peak_rss_mb")
    finally:
        actors.kill()
    return KMeansResult(centroids=centroids, objective=float(objectives[-1]),
                        iteration_objectives=[float(v) for v in objectives], num_points=num_points, dim=dim,
                        seconds=time.perf_counter() - started, peak_rss_mb_per_actor=list(peaks),
                        iteration_seconds=seconds, rebuilds=sum(actors.rebuilds))

