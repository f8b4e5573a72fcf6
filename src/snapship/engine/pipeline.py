"""A bounded, ordered parallel map: the one concurrency pattern the engines share.

Workers run the CPU-heavy steps (hash, zstd, AES-GCM: all release the GIL) while the caller's
thread keeps producing input. At most `window` items are in flight, so memory is bounded by the
window times the chunk size, never by the size of the volume.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from snapship.storage.base import Storage

T = TypeVar("T")
R = TypeVar("R")

WINDOW_BYTES = 64 << 20


def default_workers(storage: Storage | None = None) -> int:
    """One worker per CPU; more if the storage says its requests are worth overlapping.

    A backend whose requests wait on a network (S3) declares its `parallelism`: with only
    one worker per CPU, each would sit idle for a round trip on every chunk.
    """
    cpus = max(1, len(os.sched_getaffinity(0)))
    return max(cpus, storage.capabilities.parallelism if storage is not None else 0)


def window_for(workers: int, chunk_size: int) -> int:
    return max(workers + 2, min(4 * workers, WINDOW_BYTES // chunk_size))


def bounded_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int, window: int
) -> Iterator[R]:
    """Yield fn(item) for each item, in input order; the first failure cancels the rest."""
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snapship") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
