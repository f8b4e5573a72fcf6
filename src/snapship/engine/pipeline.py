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


def default_workers(storage: Storage | None = None, *, blocking: bool = False) -> int:
    """One worker per CPU; more if the storage says its requests are worth overlapping.

    A backend whose requests wait on a network (S3) declares its `parallelism`: with only
    one worker per CPU, each would sit idle for a round trip on every chunk. `blocking` says
    each item also waits on the disk (a backup's store fsyncs every object, a restore may
    read a repository that is not cached): then there are two workers per CPU, so that a
    core whose worker waits has another one's zstd to run (docs/perf.md: with one per CPU,
    the backup's workers spent 30% of their time in the store and left a core idle).
    """
    cpus = max(1, len(os.sched_getaffinity(0)))
    per_cpu = 2 if blocking else 1
    return max(per_cpu * cpus, storage.capabilities.parallelism if storage is not None else 0)


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
