"""The restore engine: one manifest -> a complete image on a file, a block device or a pipe.

Chunks are fetched, decrypted and checked on the worker pool and written by the calling thread,
in order, with O_DIRECT from reused aligned buffers where the target takes it (no page cache to
fill on the way, nothing left for the final fsync to write back); zero chunks become holes in a
new file and real zeroes on a device or a pipe. Any chunk that is missing or fails its check
stops the restore with the chunk id, version and offset named. A new file is only put in place
of the target once the restore is complete and synced (a failure, or an exception such as
KeyboardInterrupt, leaves an existing file as it was); a device in use, or one carrying a file
system unless forced, is refused before anything is written (`devices.Target`).

What is written in place (a device; any differential restore) has its first chunk written
last: it is first blanked with a marker (`devices.INCOMPLETE_MARK`) and synced, then the rest
is written and synced, then the first chunk. A restore stopped in between leaves a target
that no file system driver recognises, and says (through `warn`) that it is incomplete.

A differential restore (`differential=True`) first reads the target and hashes each chunk
with the repository's chunk-id function; only the chunks whose id differs from the version's
are fetched and written.
"""

from __future__ import annotations

import mmap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from snapship.devices import STDOUT, Target, aligned_buffer
from snapship.engine.compare import compare
from snapship.engine.pipeline import bounded_map, default_workers, window_for
from snapship.engine.progress import NoProgress, Progress
from snapship.errors import Corrupt, ObjectNotFound
from snapship.formats.manifest import Manifest
from snapship.repository.repo import Repository
from snapship.types import ZERO_ID

Warn = Callable[[str], None]


@dataclass(frozen=True)
class RestoreStats:
    size: int
    chunks_written: int
    """Non-zero chunks written (fetched from the repository)."""
    chunks_zero: int
    """Zero chunks restored: written as zeroes, or left as holes in a new file."""
    duration: float
    mode: str = "full"
    chunks: int = 0
    chunks_compared: int = 0
    """Chunks of the target read and hashed (differential restores)."""
    bytes_fetched: int = 0
    """Stored (compressed, sealed) bytes fetched from the repository."""


def _ignore(_message: str) -> None:
    pass


Choose = Callable[[Target, Progress, int], list[int]]
"""Given the opened target, which chunk indices a restore in place writes (ascending)."""


def run_restore(
    repo: Repository,
    m: Manifest,
    target_path: str,
    *,
    progress: Progress | None = None,
    workers: int | None = None,
    force: bool = False,
    differential: bool = False,
    fresh: bool = False,
    choose: Choose | None = None,
    mode: str = "full",
    warn: Warn = _ignore,
) -> RestoreStats:
    """Restore `m` onto `target_path` (STDOUT for standard output). `force` skips the
    signature check of a device; `fresh` says the device was made for this restore (no check,
    no warning that it is larger: its tail past the version is zeroed instead).

    `differential` updates an existing target in place, writing the chunks whose id differs;
    `choose` (reported as `mode`) does the same with the chunks it names, once the target is
    open (so a device is held exclusively while they are worked out)."""
    started = time.monotonic()
    progress = progress or NoProgress()
    nworkers = workers or default_workers(repo.storage, blocking=True)
    compared = 0
    if target_path == STDOUT:
        target = Target.stdout()
    elif differential or choose is not None:
        target = Target.open_existing(target_path, m.size, warn=warn)
    else:
        target = Target.open(target_path, m.size, force=force or fresh,
                             warn=_ignore if fresh else warn)
    with target:  # leaving it uncommitted aborts
        first: bytes | None = None
        todo: Sequence[int]
        if choose is not None:
            todo = choose(target, progress, nworkers)
        elif differential and not target.stream:
            found = compare(repo, m, target.read, m.size, progress, nworkers)
            todo, first, compared = found.differing, found.first, found.compared
            mode = "differential"
        else:
            # Into a new file the zero chunks are holes already: only data chunks are visited,
            # so a sparse 4 TiB version costs work for its data alone.
            todo = list(m.nonzero_indices()) if target.reads_zero else range(m.count)
        writer = _Writer(repo, m, target, progress, nworkers)
        if choose is None and not differential:
            writer.zero_chunks = m.count - len(todo)
        try:
            writer.write(todo, first)
        except BaseException:
            if writer.marked:
                warn(f"target {target.path} is incomplete: the restore of {m.volume}@"
                     f"{m.version} stopped, and its first chunk is left blank (a "
                     f"'SNAPSHIP INCOMPLETE RESTORE' marker) so that it does not mount; "
                     "restore it again")
            raise
        if fresh and target.size is not None and target.size > m.size:
            target.write_zeroes(m.size, target.size - m.size)
        target.commit()
    return RestoreStats(
        size=m.size,
        chunks_written=writer.data_chunks,
        chunks_zero=writer.zero_chunks,
        duration=time.monotonic() - started,
        mode=mode,
        chunks=m.count,
        chunks_compared=compared,
        bytes_fetched=writer.bytes_fetched,
    )


class _Buffers:
    """Page-aligned chunk buffers for O_DIRECT writes, reused: no page of them is faulted in
    and zeroed more than once. At most the pipeline's window (plus the one being written) is
    out at a time, so that bounds how many are ever made."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return aligned_buffer(self.size)

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            self._free.append(buf)


Fetched = bytes | tuple[mmap.mmap, int] | None
"""A chunk's data; in an aligned buffer (with its length) for O_DIRECT; None for zeroes."""


class _Writer:
    """Fetches and writes the chosen chunks of a version, first chunk last when in place.

    The workers fetch, decrypt, decompress and check each chunk and, when the target takes
    O_DIRECT, copy it into an aligned buffer (one memcpy, on the worker: the caller's thread
    only issues the writes, which release the GIL)."""

    def __init__(self, repo: Repository, m: Manifest, target: Target, progress: Progress,
                 nworkers: int) -> None:
        self.repo, self.m, self.target, self.progress = repo, m, target, progress
        self.nworkers = nworkers
        self.data_chunks = self.zero_chunks = self.bytes_fetched = 0
        self.marked = False
        self.buffers = _Buffers(m.chunk_size) if target.use_direct() else None

    def fetch(self, index: int) -> tuple[int, Fetched]:
        index, data = self._fetch(index)
        if data is None or self.buffers is None:
            return index, data
        buf = self.buffers.take()
        buf[: len(data)] = data
        return index, (buf, len(data))

    def _fetch(self, index: int) -> tuple[int, bytes | None]:
        m = self.m
        cid = m.chunk(index)
        if cid == ZERO_ID:
            return index, None
        off, length = m.chunk_span(index)
        where = f"{m.volume}@{m.version}"
        try:
            data = self.repo.get_chunk(cid)
        except ObjectNotFound:
            raise Corrupt(f"chunk {cid.hex()} of {where} at offset {off} is missing") from None
        except Corrupt as e:
            raise Corrupt(f"{e} ({where}, offset {off})") from None
        if len(data) != length:
            raise Corrupt(
                f"chunk {cid.hex()} of {where} at offset {off} has {len(data)} bytes, "
                f"expected {length}"
            )
        return index, data

    def put(self, index: int, data: Fetched) -> None:
        off, length = self.m.chunk_span(index)
        if data is None:
            self.zero_chunks += 1
            self.target.write_zeroes(off, length, always=self.target.in_place)
        else:
            self.data_chunks += 1
            self.bytes_fetched += self.m.sizes[index]
            if isinstance(data, tuple):
                buf, n = data
                self.target.write_buffer(off, buf, n)
                assert self.buffers is not None
                self.buffers.give(buf)
            else:
                self.target.write(off, data)
        self.progress.advance(length)

    def write(self, todo: Sequence[int], first: bytes | None) -> None:
        """Write chunks `todo` (ascending); `first` is the target's first chunk as it was
        (differential), put back if chunk 0 needs no change but was blanked."""
        t = self.target
        guard = t.in_place and bool(todo)
        rest: Iterator[int] = (i for i in todo if not (guard and i == 0))
        self.progress.start(sum(self.m.chunk_span(i)[1] for i in todo))
        try:
            if guard:
                if todo[0] != 0 and first is None:
                    first = t.read(*self.m.chunk_span(0))  # to put back, unchanged
                t.mark_incomplete(self.m.chunk_span(0)[1], f"{self.m.volume}@{self.m.version}")
                self.marked = True
            for index, data in bounded_map(self.fetch, rest, self.nworkers,
                                           window_for(self.nworkers, self.m.chunk_size)):
                self.put(index, data)
            if guard:
                t.sync()  # everything else is durable before the first chunk says "done"
                if todo[0] == 0:
                    self.put(*self.fetch(0))
                else:
                    assert first is not None
                    t.write(0, first)
                self.marked = False
        finally:
            self.progress.finish()
