"""The seeded per-epoch reading plan: slices, windows, skips (lussray.data.epoch_plan)."""

import numpy as np
import pytest

from lussray.data.epoch_plan import (
    Chunk,
    EpochPlan,
    chunks_of_shard,
    epoch_order,
    group_windows,
    skip_rows,
    window_order,
    worker_slice,
)


def _chunks(sizes):
    return tuple(Chunk(f"shard-{i // 3}.tar", 1000 * i, 999, rows) for i, rows in enumerate(sizes))


def _rows(window):
    """(chunk path, offset, row) of the window's rows in the order a read task yields them."""
    flat = [(p.chunk.path, p.chunk.offset, row) for p in window.pieces for row in range(p.start, p.stop)]
    return [flat[i] for i in window_order(window)]


def _epoch_rows(plan, epoch, rank):
    return [row for window in plan.windows(epoch, rank) for row in _rows(window)]


CHUNKS = _chunks([64, 64, 64, 17, 64, 64, 5, 64, 30])  # 436 rows, shards of unequal chunks


@pytest.mark.parametrize("world, rows", [(1, 436), (2, 218), (3, 145), (4, 109)])
def test_every_rank_gets_exactly_its_rows_and_no_row_twice(world, rows):
    plan = EpochPlan(CHUNKS, seed=3, salt=7, world=world, rows_per_worker=rows, window_rows=100)
    seen = [_epoch_rows(plan, 0, rank) for rank in range(world)]
    assert all(len(part) == rows for part in seen)
    union = [row for part in seen for row in part]
    assert len(set(union)) == len(union) == world * rows


def test_the_slices_cut_the_permuted_concatenation():
    order = epoch_order(len(CHUNKS), 0, 0, 0)
    flat = [(CHUNKS[i].offset, row) for i in order for row in range(CHUNKS[i].rows)]
    for rank in range(3):
        pieces = worker_slice(CHUNKS, order, 140, rank)
        assert [(p.chunk.offset, r) for p in pieces for r in range(p.start, p.stop)] == flat[140 * rank:140 * (rank + 1)]


def test_same_seed_same_plan_other_seed_or_epoch_another():
    plan = EpochPlan(CHUNKS, seed=3, salt=7, world=2, rows_per_worker=218, window_rows=100)
    assert _epoch_rows(plan, 1, 0) == _epoch_rows(EpochPlan(CHUNKS, 3, 7, 2, 218, 100), 1, 0)
    assert _epoch_rows(plan, 1, 0) != _epoch_rows(plan, 2, 0)
    assert _epoch_rows(plan, 1, 0) != _epoch_rows(EpochPlan(CHUNKS, 4, 7, 2, 218, 100), 1, 0)
    assert _epoch_rows(plan, 1, 0) != _epoch_rows(EpochPlan(CHUNKS, 3, 8, 2, 218, 100), 1, 0)  # another stage


def test_batch_mates_change_between_epochs():
    plan = EpochPlan(CHUNKS, seed=0, salt=0, world=1, rows_per_worker=436, window_rows=200)
    first, second = _epoch_rows(plan, 0, 0), _epoch_rows(plan, 1, 0)
    pairs = lambda rows: {frozenset(rows[i:i + 2]) for i in range(0, len(rows), 2)}  # noqa: E731
    assert len(pairs(first) & pairs(second)) < 0.2 * len(pairs(first))


def test_windows_hold_at_least_window_rows_but_the_last():
    pieces = worker_slice(CHUNKS, np.arange(len(CHUNKS)), 436, 0)
    windows = group_windows(pieces, 100, epoch=0, entropy=(1,))
    assert [w.rows for w in windows] == [128, 145, 133, 30]
    assert len({w.entropy for w in windows}) == len(windows)


@pytest.mark.parametrize("skip", [0, 1, 99, 128, 129, 300, 429])
def test_skipping_rows_gives_the_tail_of_the_unskipped_order(skip):
    plan = EpochPlan(CHUNKS, seed=5, salt=1, world=1, rows_per_worker=430, window_rows=100)
    whole = _epoch_rows(plan, 2, 0)
    skipped = [row for w in skip_rows(plan.windows(2, 0), skip) for row in _rows(w)]
    assert skipped == whole[skip:]


def test_stream_skips_only_in_its_first_epoch():
    plan = EpochPlan(CHUNKS, seed=5, salt=1, world=2, rows_per_worker=200, window_rows=64)
    rows = [row for w in plan.stream(1, 3, 5, skip=70) for row in _rows(w)]
    assert rows == _epoch_rows(plan, 3, 1)[70:] + _epoch_rows(plan, 4, 1)


def test_too_many_rows_are_refused():
    with pytest.raises(ValueError, match="exceed"):
        EpochPlan(CHUNKS, 0, 0, world=2, rows_per_worker=219, window_rows=10)


def test_a_shard_without_chunk_index_is_one_chunk():
    record = {"name": "a.tar", "num_samples": 10, "bytes": 5120, "sha256": "x"}
    assert chunks_of_shard("d/a.tar", record) == [Chunk("d/a.tar", 0, 5120, 10)]
    indexed = {**record, "chunks": [[0, 3000, 6], [3000, 1100, 4]]}
    assert chunks_of_shard("d/a.tar", indexed) == [Chunk("d/a.tar", 0, 3000, 6), Chunk("d/a.tar", 3000, 1100, 4)]
