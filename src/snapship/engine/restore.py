"""The restore engine: one manifest -> a complete image on a file or block device.

Chunks are fetched, decrypted and checked on the worker pool and written with pwrite by the
calling thread; zero chunks become holes in a file and real zeroes on a device. Any chunk that
is missing or fails its check stops the restore with the chunk id, version and offset named.
A file is only put in place of the target once the restore is complete and synced (a failure,
or an exception such as KeyboardInterrupt, leaves an existing file as it was); a device in use
is refused before anything is written (`devices.Target`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from snapship.devices import Target
from snapship.engine.pipeline import bounded_map, default_workers, window_for
from snapship.engine.progress import NoProgress, Progress
from snapship.errors import Corrupt, ObjectNotFound
from snapship.formats.manifest import Manifest
from snapship.repository.repo import Repository
from snapship.types import ZERO_ID


@dataclass(frozen=True)
class RestoreStats:
    size: int
    chunks_written: int
    chunks_zero: int
    duration: float


def run_restore(
    repo: Repository,
    m: Manifest,
    target_path: str,
    *,
    progress: Progress | None = None,
    workers: int | None = None,
) -> RestoreStats:
    started = time.monotonic()
    progress = progress or NoProgress()
    where = f"{m.volume}@{m.version}"
    zero_chunks = 0

    def chunks() -> Iterator[tuple[int, bytes]]:
        nonlocal zero_chunks
        for i in range(m.count):
            cid = m.chunk(i)
            if cid == ZERO_ID:
                zero_chunks += 1
                off, length = m.chunk_span(i)
                target.write_zeroes(off, length)
                progress.advance(length)
            else:
                yield i, cid

    def fetch(item: tuple[int, bytes]) -> tuple[int, bytes]:
        index, cid = item
        off, length = m.chunk_span(index)
        try:
            data = repo.get_chunk(cid)
        except ObjectNotFound:
            raise Corrupt(f"chunk {cid.hex()} of {where} at offset {off} is missing") from None
        except Corrupt as e:
            raise Corrupt(f"{e} ({where}, offset {off})") from None
        if len(data) != length:
            raise Corrupt(
                f"chunk {cid.hex()} of {where} at offset {off} has {len(data)} bytes, "
                f"expected {length}"
            )
        return off, data

    nworkers = workers or default_workers(repo.storage)
    with Target.open(target_path, m.size) as target:  # leaving it uncommitted aborts
        progress.start(m.size)
        try:
            # One writer: concurrent pwrites to one file contend for its inode lock and spin.
            for off, data in bounded_map(fetch, chunks(), nworkers,
                                         window_for(nworkers, m.chunk_size)):
                target.write(off, data)
                progress.advance(len(data))
        finally:
            progress.finish()
        target.commit()
    return RestoreStats(
        size=m.size,
        chunks_written=m.count - zero_chunks,
        chunks_zero=zero_chunks,
        duration=time.monotonic() - started,
    )
