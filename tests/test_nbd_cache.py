"""The server's chunk cache and read path: one fetch per chunk however many readers wait,
an LRU bounded in bytes, read-ahead for sequential readers, and replies out of order."""

from __future__ import annotations

import asyncio
import threading
from array import array
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from snapship.formats.manifest import Manifest
from snapship.nbd import protocol as p
from snapship.nbd.chunkcache import ChunkCache
from snapship.nbd.exports import ExportSession, VersionImage
from tests.nbdhelp import CHUNK, RawClient, image_data, make_test_repo, serve


class Fetches:
    """A chunk source that counts fetches and can be held back (a slow storage)."""

    def __init__(self) -> None:
        self.count: Counter[bytes] = Counter()
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()

    size = 992

    def __call__(self, cid: bytes) -> bytes:
        self.gate.wait(10)
        with self.lock:
            self.count[cid] += 1
        return (cid * (self.size // len(cid) + 1))[: self.size]


def test_one_fetch_per_chunk_and_a_bounded_lru() -> None:
    async def main() -> None:
        fetches = Fetches()
        with ThreadPoolExecutor(2) as pool:
            cache = ChunkCache(fetches, pool, max_bytes=3 * 992, max_prefetch=2)
            fetches.gate.clear()
            waiting = [asyncio.ensure_future(cache.get(b"a" * 32)) for _ in range(20)]
            await asyncio.sleep(0.05)
            fetches.gate.set()
            assert {len(d) for d in await asyncio.gather(*waiting)} == {992}
            assert fetches.count[b"a" * 32] == 1
            for c in b"bcd":
                await cache.get(bytes([c]) * 32)
            assert cache.cached_bytes == 3 * 992  # "a" was evicted, the newest three stay
            assert b"a" * 32 not in cache and b"d" * 32 in cache
            await cache.get(b"b" * 32)
            assert fetches.count[b"b" * 32] == 1
            fetches.gate.clear()
            assert cache.prefetch(b"x" * 32) and cache.prefetch(b"y" * 32)
            assert not cache.prefetch(b"z" * 32)  # two on their way: that is the limit
            fetches.gate.set()
            await cache.get(b"x" * 32)
            await asyncio.sleep(0.05)
            assert fetches.count[b"x" * 32] == 1 and fetches.count[b"z" * 32] == 0

    asyncio.run(main())


def test_a_hole_is_answered_before_a_slower_read(tmp_path: Path) -> None:
    data = bytearray(image_data(4 << 20, 41))
    data[3 << 20 :] = bytes(1 << 20)  # the last MiB is a hole
    tr = make_test_repo(tmp_path, [("disk", bytes(data))])
    with serve(tr.path, log_dir=tmp_path) as server:
        c = RawClient(server.port)
        c.greet()
        c.go("disk", structured=True)
        first_data = next(off for off in range(0, 3 << 20, CHUNK)
                          if data[off : off + CHUNK].count(0) < CHUNK)
        # Sent together: a read that needs a chunk fetched and decoded, then one of a hole.
        c.sock.sendall(p.encode_request(p.Request(0, p.CMD_READ, 1, first_data, CHUNK))
                       + p.encode_request(p.Request(0, p.CMD_READ, 2, 3 << 20, CHUNK)))
        order = [c.structured_reply()[0] for _ in range(2)]
        assert order == [2, 1]
        c.request(p.CMD_DISC)
        c.close()


def test_sequential_reads_are_fetched_ahead() -> None:
    cs = 1 << 16
    ids = b"".join(bytes([i + 1]) * 32 for i in range(16))
    image = VersionImage(Manifest("v", "1", 16 * cs, cs, "", "", None, ids,
                                  array("I", [1] * 16)))  # fmt: skip
    fetches = Fetches()
    fetches.size = cs

    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            cache = ChunkCache(fetches, pool, max_bytes=64 * cs, max_prefetch=8)
            session = ExportSession(image, cache, pool, readahead_chunks=3)
            await session.read(0, 4096)
            await session.read(4096, 4096)  # sequential: chunks 0..2 are wanted next
            await session.read(10 * cs, 100)  # a jump: nothing is fetched ahead of it
            await asyncio.sleep(0.2)

    asyncio.run(main())
    assert sorted(fetches.count) == [bytes([i + 1]) * 32 for i in (0, 1, 2, 10)]
    assert set(fetches.count.values()) == {1}
