"""Ranges of a backup source known to read as zeroes, so they need not be read: a file's holes
(SEEK_DATA/SEEK_HOLE) and the free space of a clean ext4 or XFS filesystem on it
(docs/free-space.md); and the record of what was skipped and why (`stats.free_space`).

A chunk entirely inside these ranges is recorded as a zero chunk without being read; the
covered parts of a chunk that is read are zeroed before it is hashed.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from snapship.changes.ranges import coalesce
from snapship.errors import SourceError
from snapship.filesystems.freemap import FreeSpaceError
from snapship.filesystems.probe import probe
from snapship.types import ByteRange

Warn = Callable[[str], None]
QUIET_REASONS = ("no ext4 or XFS filesystem recognised", "too small to hold")
"""Verdicts not worth a warning: most sources without a filesystem were meant that way."""


class Readable(Protocol):
    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


@dataclass
class KnownZero:
    ranges: list[ByteRange]
    """Coalesced, sorted: holes and free space together."""
    record: dict[str, Any] = field(default_factory=dict)
    """What the version records (stats.free_space); the engine adds what it skipped."""

    def __post_init__(self) -> None:
        self._starts = [r.start for r in self.ranges]

    def cover(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) known to be zero, as (offset, end) pairs."""
        out = []
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        while i < len(self.ranges) and self.ranges[i].start < end:
            r = self.ranges[i]
            lo, hi = max(r.start, start), min(r.end, end)
            if lo < hi:
                out.append((lo, hi))
            i += 1
        return out

    def split(self, indices: Sequence[int], chunk_size: int, size: int) -> ChunkSplit:
        """`indices` (chunk numbers, ascending) without the chunks lying wholly inside these
        ranges. Whole runs are cut at once, so a 4 TiB file of holes costs no work per chunk;
        a `range` stays a chain of ranges, never a list of millions of numbers."""
        count = -(-size // chunk_size)
        runs = []
        for r in self.ranges:
            first = -(-r.start // chunk_size)
            last = count if r.end >= size else r.end // chunk_size
            if first < last:
                runs.append(range(first, last))
        if isinstance(indices, range) and indices.step == 1:
            keep: list[range] = []
            out: list[range] = []
            at = indices.start
            for run in runs:
                lo, hi = max(run.start, at), min(run.stop, indices.stop)
                if lo < hi:
                    keep.append(range(at, lo))
                    out.append(range(lo, hi))
                    at = hi
            keep.append(range(at, max(at, indices.stop)))
            kept = [k for k in keep if k]
            return ChunkSplit(itertools.chain.from_iterable(kept), sum(len(k) for k in kept),
                              out, sum(_span_bytes(k, chunk_size, size) for k in out))
        starts = [run.start for run in runs]
        read: list[int] = []
        left: list[int] = []
        for i in indices:
            j = bisect.bisect_right(starts, i) - 1
            (left if j >= 0 and i in runs[j] else read).append(i)
        return ChunkSplit(iter(read), len(read), [range(i, i + 1) for i in left],
                          sum(min(chunk_size, size - i * chunk_size) for i in left))


@dataclass
class ChunkSplit:
    """Chunks to read (and how many), and the runs of chunks left out as known zeroes."""

    read: Iterable[int]
    count: int
    left_out: list[range]
    left_out_bytes: int

    @property
    def skipped(self) -> int:
        return sum(len(r) for r in self.left_out)


def _span_bytes(r: range, chunk_size: int, size: int) -> int:
    """The bytes of the volume chunks `r` cover (the last chunk may be short)."""
    if not r:
        return 0
    return min(r.stop * chunk_size, size) - r.start * chunk_size


def holes_of(source: object, size: int) -> list[ByteRange] | None:
    """The holes of a file source (None if it cannot tell, or is not a file)."""
    data_ranges = getattr(source, "data_ranges", None)
    if data_ranges is None:
        return None
    data = data_ranges()
    if data is None:
        return None
    holes, at = [], 0
    for start, end in data:
        if start > at:
            holes.append(ByteRange(at, start))
        at = max(at, end)
    if at < size:
        holes.append(ByteRange(at, size))
    return holes


def survey(source: Readable, *, skip_free: bool, warn: Warn | None = None) -> KnownZero:
    """What of `source` is known to be zero: its holes, always (they are zeroes by
    definition), and, with `skip_free`, its filesystem's free space if that is clean."""
    size = source.size
    try:
        holes = holes_of(source, size) or []
    except SourceError as e:
        (warn or _ignore)(f"reading holes too: {e}")
        holes = []
    hole_bytes = sum(r.length for r in holes)
    record: dict[str, Any] = {"filesystem": None, "skipped": False,
                              "hole_bytes": hole_bytes, "free_bytes": 0,
                              "metadata_bytes_read": 0}
    if not skip_free:
        record["note"] = "free space is read (--no-skip-free)"
        return KnownZero(coalesce(holes), record)
    metadata = 0

    def read(offset: int, length: int) -> bytes:
        nonlocal metadata
        if offset < 0 or length < 0 or offset + length > size:
            raise FreeSpaceError(f"metadata read [{offset}, {offset + length}) lies beyond "
                                 f"the source ({size} bytes)")
        metadata += length
        return source.read(offset, length)

    fm = probe(read, size)
    record["filesystem"] = fm.filesystem
    record["metadata_bytes_read"] = metadata
    if not fm.clean:
        record["note"] = f"free space is read: {fm.reason}"
        if not fm.reason.startswith(QUIET_REASONS) or fm.filesystem is not None:
            (warn or _ignore)(f"reading free space too: {fm.reason}")
        return KnownZero(coalesce(holes), record)
    record["skipped"] = True
    record["free_bytes"] = fm.free_bytes
    record["note"] = f"free space not read: {fm.reason}"
    return KnownZero(coalesce([*holes, *fm.free]), record)


def _ignore(message: str) -> None:
    pass


def zero_parts(data: bytes | memoryview, offset: int, parts: list[tuple[int, int]]
               ) -> tuple[bytes | memoryview, int]:
    """`data` (read at `offset`) with `parts` zeroed, and how many bytes that zeroed: a
    memoryview (of a buffer the caller owns) is zeroed in place, bytes are copied first."""
    if not parts:
        return data, 0
    buf = data if isinstance(data, memoryview) else bytearray(data)
    zeroed = 0
    for lo, hi in parts:
        buf[lo - offset : hi - offset] = bytes(hi - lo)
        zeroed += hi - lo
    return (buf if isinstance(buf, memoryview) else bytes(buf)), zeroed
