"""Which training samples each Train worker reads, in which order, every epoch (pure, no Ray).

The reference draws a fresh permutation of the whole training set every epoch
(``DistributedSampler.set_epoch``) and deals it to the ranks. lussray streams tar shards, so a
per-image permutation would mean random reads of single images (or a global shuffle of every
JPEG through the object store each epoch: 140 GB for ImageNet). The plan here permutes at the
granularity of *chunks* instead, then mixes rows within *windows*:

1. **Chunks.** ``lussray prepare`` (and labelgen's pseudo-label shards) record the byte offset of
   every :data:`lussray.data.shards.SAMPLES_PER_CHUNK`-th sample of a shard, so a chunk of 64
   consecutive samples is one byte-range read. Shards written without that index are one chunk each.
2. **Epoch order.** A permutation of all chunks drawn from (seed, stage, epoch): the concatenated
   rows are cut into ``world`` contiguous slices of exactly ``rows_per_worker`` rows (the rows past
   ``world * rows_per_worker`` wait for another epoch), so every rank makes the same number of
   steps. A chunk cut by a slice boundary is read by both ranks, each keeping its rows.
3. **Windows.** Consecutive pieces of a worker's slice are grouped into windows of about
   ``window_rows`` rows; one read task reads a window and permutes its rows (seeded by
   (seed, stage, epoch, rank, window)). A batch then mixes rows of ``window_rows / 64`` chunks from
   anywhere in the dataset, and batch-mates change every epoch.

Cost per epoch at ImageNet scale (1.28M images, 64-sample chunks): a permutation of 20,000 chunk ids
computed by every worker from the seed (microseconds, nothing per image anywhere), every image read
once as part of a ~7 MB range read, at most two chunks per worker per epoch read for a part of their
rows. The mixing is coarser than a per-image permutation: two images of one chunk meet in the same
window every epoch (in different batches unless the window is small).

Resuming at step ``s`` of an epoch skips the first ``s * batch_size_per_worker`` rows of the
worker's slice (:func:`skip_rows`): whole windows are dropped from the plan, the first rows of the
permuted order of a partial one are dropped after reading, so the rest of the epoch is exactly what an
unbroken run would have read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np


#: Tags that keep the generators of the chunk order and of the window permutations apart.
_ORDER_TAG, _WINDOW_TAG = 1, 2


@dataclass(frozen=True)
class Chunk:
    """Consecutive samples of one shard that are one byte range of its tar.

    Attributes:
        path: the shard (local path or URI).
        offset: byte offset of the first member header of the chunk's first sample.
        nbytes: bytes from ``offset`` to the end of the chunk's last member.
        rows: samples in the chunk.
    """

    path: str
    offset: int
    nbytes: int
    rows: int


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` (in tar order) of a chunk."""

    chunk: Chunk
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Window:
    """What one read task reads: pieces whose rows are permuted together.

    Attributes:
        pieces: the pieces, in plan order.
        epoch: the epoch they belong to.
        entropy: seeds the row permutation (:func:`window_order`).
        skip: rows dropped from the start of the permuted order (a resumed epoch).
    """

    pieces: tuple[Piece, ...]
    epoch: int
    entropy: tuple[int, ...]
    skip: int = 0

    @property
    def rows(self) -> int:
        """Rows the window yields (after ``skip``)."""
        return sum(piece.rows for piece in self.pieces) - self.skip


def chunks_of_shard(path: str, record: dict) -> list[Chunk]:
    """The chunks of a shard from its manifest entry (``chunks``: [[offset, nbytes, rows], ...]).

    An entry without a chunk index (shards written before lussray recorded one) is a single chunk.
    """
    index = record.get("chunks")
    if not index:
        return [Chunk(path, 0, int(record["bytes"]), int(record["num_samples"]))]
    return [Chunk(path, int(offset), int(nbytes), int(rows)) for offset, nbytes, rows in index]


def epoch_order(num_chunks: int, seed: int, salt: int, epoch: int) -> np.ndarray:
    """The permutation of chunk indices of one epoch."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, salt, _ORDER_TAG, epoch]))
    return rng.permutation(num_chunks)


def worker_slice(chunks: Sequence[Chunk], order: np.ndarray, rows_per_worker: int, rank: int) -> list[Piece]:
    """Rank ``rank``'s ``rows_per_worker`` rows of the chunks concatenated in ``order``.

    Raises:
        ValueError: when the chunks hold fewer than ``(rank + 1) * rows_per_worker`` rows.
    """
    start, stop = rank * rows_per_worker, (rank + 1) * rows_per_worker
    pieces, position = [], 0
    for index in order:
        chunk = chunks[int(index)]
        first, last = max(start, position), min(stop, position + chunk.rows)
        if first < last:
            pieces.append(Piece(chunk, first - position, last - position))
        position += chunk.rows
        if position >= stop:
            return pieces
    raise ValueError(f"{position} rows cannot give rank {rank} its rows {start}..{stop}")


def group_windows(pieces: Sequence[Piece], window_rows: int, *, epoch: int, entropy: tuple[int, ...]) -> list[Window]:
    """Consecutive pieces grouped into windows of at least ``window_rows`` rows (the last may be smaller)."""
    windows, current, rows = [], [], 0
    for piece in pieces:
        current.append(piece)
        rows += piece.rows
        if rows >= window_rows:
            windows.append(Window(tuple(current), epoch, (*entropy, len(windows))))
            current, rows = [], 0
    if current:
        windows.append(Window(tuple(current), epoch, (*entropy, len(windows))))
    return windows


def skip_rows(windows: Sequence[Window], count: int) -> list[Window]:
    """The windows left after the first ``count`` rows of their permuted orders."""
    left = []
    for window in windows:
        if count >= window.rows:
            count -= window.rows
            continue
        left.append(replace(window, skip=window.skip + count) if count else window)
        count = 0
    return left


def window_order(window: Window) -> np.ndarray:
    """Indices into the window's rows (pieces concatenated in order), permuted, ``skip`` dropped."""
    total = sum(piece.rows for piece in window.pieces)
    rng = np.random.default_rng(np.random.SeedSequence(list(window.entropy)))
    return rng.permutation(total)[window.skip:]


@dataclass(frozen=True)
class EpochPlan:
    """The reading plan of one rank for a range of epochs.

    Attributes:
        chunks: every chunk of the split, in manifest order.
        seed: the run's seed.
        salt: the stage's salt (:func:`stage_salt`).
        world: number of Train workers.
        rows_per_worker: rows every rank reads per epoch (steps per epoch x batch per worker).
        window_rows: rows permuted together by one read task.
    """

    chunks: tuple[Chunk, ...]
    seed: int
    salt: int
    world: int
    rows_per_worker: int
    window_rows: int

    def __post_init__(self) -> None:
        total = sum(chunk.rows for chunk in self.chunks)
        if self.world * self.rows_per_worker > total:
            raise ValueError(f"{self.world} workers x {self.rows_per_worker} rows exceed the {total} rows of the split")

    def windows(self, epoch: int, rank: int) -> list[Window]:
        """Rank ``rank``'s windows of ``epoch``."""
        order = epoch_order(len(self.chunks), self.seed, self.salt, epoch)
        pieces = worker_slice(self.chunks, order, self.rows_per_worker, rank)
        return group_windows(pieces, self.window_rows, epoch=epoch,
                             entropy=(self.seed, self.salt, _WINDOW_TAG, epoch, rank))

    def stream(self, rank: int, first_epoch: int, end_epoch: int, skip: int = 0) -> Iterator[Window]:
        """Rank ``rank``'s windows of epochs ``first_epoch .. end_epoch - 1``, the first ``skip`` rows dropped."""
        for epoch in range(first_epoch, end_epoch):
            windows = self.windows(epoch, rank)
            yield from skip_rows(windows, skip) if epoch == first_epoch and skip else windows
