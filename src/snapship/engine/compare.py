"""Comparing a version with a live copy by chunk id: which chunks of a file or device differ.

The copy is read chunk by chunk and each chunk hashed with the repository's chunk-id function
(an all-zero chunk is `ZERO_ID`, as a backup records it), on the worker pool; nothing is
fetched from the repository. A differential restore writes the differing chunks; `verify
--against` lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from snapship.engine.pipeline import bounded_map, window_for
from snapship.engine.progress import Progress
from snapship.formats.manifest import Manifest
from snapship.repository.repo import Repository
from snapship.types import ZERO_ID

Read = Callable[[int, int], bytes]
"""(offset, length) -> exactly that many bytes of the copy."""


@dataclass
class Comparison:
    differing: list[int] = field(default_factory=list)
    """Indices of the chunks whose content differs from the version's, ascending."""
    compared: int = 0
    """Chunks read and hashed (those past the copy's end differ without being read)."""
    first: bytes | None = None
    """The copy's first chunk as read (kept for a restore that blanks it as a guard)."""


def compare(repo: Repository, m: Manifest, read: Read, available: int, progress: Progress,
            workers: int) -> Comparison:
    """Compare the first `m.size` bytes of a copy holding `available` bytes with `m`."""

    def one(index: int) -> tuple[int, bytes | None, bool, bool]:
        off, length = m.chunk_span(index)
        if off + length > available:
            return index, None, True, False
        data = read(off, length)
        cid = ZERO_ID if data.count(0) == length else repo.chunk_id(data)
        return index, data if index == 0 else None, cid != m.chunk(index), True

    out = Comparison()
    progress.start(m.size)
    try:
        for index, data, differs, was_read in bounded_map(one, range(m.count), workers,
                                                          window_for(workers, m.chunk_size)):
            if data is not None:
                out.first = data
            if differs:
                out.differing.append(index)
            out.compared += was_read
            progress.advance(m.chunk_span(index)[1])
    finally:
        progress.finish()
    return out


def runs(indices: list[int]) -> list[tuple[int, int]]:
    """Ascending indices as (first, count) runs of consecutive ones."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out
