"""Bandwidth limits: a wrapper backend that holds uploads and downloads to a byte rate.

`RateLimitedStorage` wraps any backend (the CLI wraps every one it builds when
`--limit-upload` / `--limit-download` is given), as `RetryingStorage` does for retries. What
is counted is the objects' bytes: the data of every `put`, the result of every `get`. Keys,
listings, stat answers and protocol overhead are not (they are a few hundred bytes per
object; a 1 MiB chunk's headers are well under 1% of it). One `TokenBucket` per direction is
shared by every thread, so a backup's parallel workers together stay under the limit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator

from snapship.storage.base import CreateFn, Storage, StorageDefaults, creator

BURST_SECONDS = 0.25
"""How much an idle connection may send at once: a quarter second's worth of the rate, so a
transfer's average over a few seconds is within a few percent of the limit."""


class TokenBucket:
    """A token bucket of `rate` bytes per second, allowed into debt.

    `take(n)` reserves `n` bytes at once (under the lock) and then sleeps, outside the lock,
    until the bucket would have refilled the debt; a thread that comes later finds the
    debt its predecessors left and waits behind them. So the rate holds whatever the object
    size (an object larger than the burst just waits longer) and however many threads share
    the bucket. It starts empty: the first bytes are paced too."""

    def __init__(self, rate: float, burst: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError("a rate must be above zero")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate * BURST_SECONDS)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = 0.0
        self._last = clock()

    def take(self, n: int) -> float:
        """Account for `n` bytes, waiting as long as the rate requires; returns the wait."""
        if n <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


class RateLimitedStorage(StorageDefaults):
    """Any backend, its object bytes held to `upload` and `download` (None: no limit).

    An upload waits before it is sent (the bytes go out at the rate on average); a download
    is counted once it has arrived, and the caller then waits, which holds back the next
    request of that thread: over many objects the rate holds just the same."""

    def __init__(self, inner: Storage, *, upload: TokenBucket | None = None,
                 download: TokenBucket | None = None) -> None:
        self.inner = inner
        self.upload = upload
        self.download = download
        self.capabilities = inner.capabilities

    def put(self, key: str, data: bytes | bytearray) -> None:
        if self.upload is not None:
            self.upload.take(len(data))
        self.inner.put(key, data)

    def creator(self) -> CreateFn | None:
        inner = creator(self.inner)
        if inner is None:
            return None

        def create(key: str, data: bytes | bytearray) -> bool:
            if self.upload is not None:
                self.upload.take(len(data))
            return inner(key, data)

        return create

    def get(self, key: str) -> bytes:
        data = self.inner.get(key)
        if self.download is not None:
            self.download.take(len(data))
        return data

    def stat(self, key: str) -> int | None:
        return self.inner.stat(key)

    def stat_many(self, keys: Iterable[str]) -> dict[str, int | None]:
        return self.inner.stat_many(keys)

    def list(self, prefix: str, after: str | None = None) -> Iterator[tuple[str, int]]:
        return self.inner.list(prefix, after)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def rename(self, src: str, dst: str) -> None:
        self.inner.rename(src, dst)

    def flush(self) -> None:
        self.inner.flush()

    def remove_temporaries(self, older_than: float) -> int:
        return self.inner.remove_temporaries(older_than)

    def describe(self) -> str:
        return self.inner.describe()


def limited(storage: Storage, upload: float | None, download: float | None) -> Storage:
    """`storage` under these limits (bytes per second; None or 0: none), or itself."""
    if not upload and not download:
        return storage
    return RateLimitedStorage(storage, upload=TokenBucket(upload) if upload else None,
                              download=TokenBucket(download) if download else None)
