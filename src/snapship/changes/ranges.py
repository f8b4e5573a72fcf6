"""Byte ranges of changes and the chunk indices they touch (pure functions)."""

from __future__ import annotations

from collections.abc import Iterable

from snapship.errors import UsageError
from snapship.types import ByteRange


def coalesce(ranges: Iterable[ByteRange]) -> list[ByteRange]:
    """Sort, drop empty ranges and merge overlapping or touching ones."""
    out: list[ByteRange] = []
    for r in sorted(r for r in ranges if r.length):
        if out and r.start <= out[-1].end:
            if r.end > out[-1].end:
                out[-1] = ByteRange(out[-1].start, r.end)
        else:
            out.append(r)
    return out


def touched_chunks(ranges: Iterable[ByteRange], chunk_size: int, size: int) -> list[int]:
    """Sorted indices of the chunks that any range overlaps; ranges must lie inside the volume."""
    indices: set[int] = set()
    for r in coalesce(ranges):
        if r.end > size:
            raise UsageError(f"changed range [{r.start}, {r.end}) lies beyond the volume ({size})")
        indices.update(range(r.start // chunk_size, (r.end - 1) // chunk_size + 1))
    return sorted(indices)
