"""Decoded chunks for the server: fetched on a thread pool, shared, and kept in an LRU.

Fetching a chunk (storage read, AES-GCM, zstd, BLAKE3 re-hash) runs on worker threads (the
libraries release the GIL), so the event loop never waits on storage. Chunks are keyed by
content id: every version, export and connection shares one copy, and however many requests
want a chunk at once, it is fetched once. The LRU is bounded in bytes; replies in flight keep
their own references, so eviction never pulls data from under a reply.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor

Fetch = Callable[[bytes], bytes]


class ChunkCache:
    def __init__(self, fetch: Fetch, pool: Executor, max_bytes: int, max_prefetch: int) -> None:
        self._fetch = fetch
        self._pool = pool
        self.max_bytes = max_bytes
        self.max_prefetch = max_prefetch
        self._lru: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._pending: dict[bytes, asyncio.Future[bytes]] = {}
        self.hits = 0
        self.misses = 0

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def __contains__(self, cid: bytes) -> bool:
        return cid in self._lru or cid in self._pending

    async def get(self, cid: bytes) -> bytes:
        data = self._lru.get(cid)
        if data is not None:
            self._lru.move_to_end(cid)
            self.hits += 1
            return data
        self.misses += 1
        fut = self._pending.get(cid) or self._start(cid)
        # Shielded: one reader giving up (its client left) must not cancel the others' fetch.
        return await asyncio.shield(fut)

    def request(self, cid: bytes) -> None:
        """Start fetching `cid` now unless it is cached or on its way (a reader will `get` it)."""
        if cid not in self:
            self._start(cid)

    def prefetch(self, cid: bytes) -> bool:
        """Start fetching `cid` unless it is cached, on its way, or too much is on its way."""
        if cid in self or len(self._pending) >= self.max_prefetch:
            return False
        self._start(cid)
        return True

    def _start(self, cid: bytes) -> asyncio.Future[bytes]:
        fut = asyncio.get_running_loop().run_in_executor(self._pool, self._fetch, cid)
        self._pending[cid] = fut
        fut.add_done_callback(lambda f: self._landed(cid, f))
        return fut

    def _landed(self, cid: bytes, fut: asyncio.Future[bytes]) -> None:
        self._pending.pop(cid, None)
        # Retrieving the exception here also keeps a failed read-ahead nobody awaits quiet.
        if fut.cancelled() or fut.exception() is not None:
            return
        self._insert(cid, fut.result())

    def _insert(self, cid: bytes, data: bytes) -> None:
        if len(data) > self.max_bytes or cid in self._lru:
            return
        self._lru[cid] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            _, old = self._lru.popitem(last=False)
            self._bytes -= len(old)
