"""`cow export`: a dm-snapshot COW store that turns a device holding version NEW into a view
of version OLD.

For every chunk where the two manifests differ, both chunks are fetched and compared in COW
chunk units; each unit that differs becomes an exception whose data is OLD's content. A
`snapshot` target over a device holding NEW with this store then reads exactly as OLD:
point-in-time rollback views with nothing but dmsetup on the restore side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from snapship.changes.cow import SECTOR, iter_store
from snapship.engine.pipeline import bounded_map, default_workers, window_for
from snapship.errors import UsageError
from snapship.formats.manifest import Manifest
from snapship.repository.repo import Repository
from snapship.types import ZERO_ID

MIN_COW_CHUNK = 4096


@dataclass
class CowExportStats:
    chunk_size: int
    exceptions: int = 0
    store_bytes: int = 0
    repository_chunks_compared: int = 0


def export_cow(
    repo: Repository,
    new: Manifest,
    old: Manifest,
    write: Callable[[bytes], object],
    cow_chunk_size: int = 64 * 1024,
    workers: int | None = None,
) -> CowExportStats:
    c = cow_chunk_size
    if c < MIN_COW_CHUNK or c & (c - 1) or c > new.chunk_size:
        raise UsageError(
            f"COW chunk size {c} must be a power of two from 4096 to the repository's chunk size"
        )
    if new.size != old.size:
        raise UsageError(
            f"{new.volume}@{new.version} has {new.size} bytes and {old.volume}@{old.version} "
            f"{old.size}: a snapshot of one cannot show the other"
        )
    stats = CowExportStats(chunk_size=c)
    differing = [i for i in range(new.count) if new.chunk(i) != old.chunk(i)]
    stats.repository_chunks_compared = len(differing)

    def load(m: Manifest, i: int) -> bytes:
        cid = m.chunk(i)
        return bytes(m.chunk_span(i)[1]) if cid == ZERO_ID else repo.get_chunk(cid)

    def fetch(i: int) -> tuple[int, bytes, bytes]:
        return i, load(new, i), load(old, i)

    def exceptions() -> Iterator[tuple[int, bytes]]:
        nworkers = workers or default_workers(repo.storage)
        window = window_for(nworkers, new.chunk_size)
        for i, a, b in bounded_map(fetch, differing, nworkers, window):
            base = i * new.chunk_size
            for off in range(0, len(b), c):
                if a[off : off + c] != b[off : off + c]:
                    stats.exceptions += 1
                    yield (base + off) // c, b[off : off + c]

    for piece in iter_store(c // SECTOR, exceptions()):
        write(piece)
        stats.store_bytes += len(piece)
    return stats
