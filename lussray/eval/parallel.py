"""An ordered, bounded parallel map over images with ``multiprocessing`` (no Ray).

The evaluator's work is per image and independent; each worker returns small statistics. Unlike
``Pool.imap``, which pulls its whole input at once, at most ``max_pending`` chunks are in flight,
so inputs that carry arrays (the tau sweep's label maps) keep memory bounded.

This module is pure: no Ray, no torch.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from itertools import islice
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """One worker per core the process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _run_chunk(fn: Callable[[T], R], chunk: list[T]) -> list[R]:
    return [fn(item) for item in chunk]


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int = 1,
    chunk_size: int = 8,
    max_pending: int | None = None,
) -> Iterator[R]:
    """Yield ``fn(item)`` for every item, in order, computed by ``workers`` processes.

    Args:
        fn: a picklable callable (module-level function or ``functools.partial`` of one).
        items: any iterable; read lazily, ``chunk_size`` items per task.
        workers: processes; 1 runs everything in this process.
        chunk_size: items per task (amortises the inter-process round trip).
        max_pending: tasks in flight at most (default 2 per worker).
    """
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    max_pending = max_pending or 2 * workers
    # spawn: safe when the caller has threads (Ray drivers, loggers), identical on every platform.
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes=workers) as pool:
        pending: deque = deque()
        for chunk in _chunks(items, chunk_size):
            pending.append(pool.apply_async(_run_chunk, (fn, chunk)))
            if len(pending) >= max_pending:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()
