"""The copy-on-write overlay of a writable export: written data in a sparse local file, and a
map of which byte ranges were written, zeroed or trimmed.

The file is anonymous (unlinked at birth), so nothing is left behind when the server exits in
any way. Reads of a range the map does not cover go to the served version; the served
version itself is never touched. `pwrite`/`pread` block and may run on any thread; the map is
only changed from one thread (the event loop), after the data it describes is in the file.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import Executor
from typing import Protocol

from snapship.nbd.rangemap import RangeMap
from snapship.types import ByteRange

WRITTEN = 1
"""The overlay file holds the data."""
ZERO = 2
"""Reads as zeroes and counts as a hole (TRIM, or WRITE_ZEROES allowed to punch)."""
ZERO_ALLOCATED = 3
"""Reads as zeroes, allocated (WRITE_ZEROES with NBD_CMD_FLAG_NO_HOLE)."""
FROZEN = 4
"""Written, and held by a live export's frozen layer (only ever in reads, never stored)."""
DATA_STATES = frozenset({WRITTEN, FROZEN})


class PieceSource(Protocol):
    """Where the data of a written piece is read from; pinned while a read is under way."""

    def pread(self, offset: int, length: int) -> bytes: ...
    def unpin(self) -> None: ...


class Overlay:
    def __init__(self, size: int, directory: str | None = None) -> None:
        self.size = size
        fd, path = tempfile.mkstemp(dir=directory, prefix="snapship-nbd-overlay-")
        os.unlink(path)
        self.fd = fd
        os.ftruncate(fd, size)  # sparse: only what is written takes space
        self.map = RangeMap()

    base: None = None  # a plain overlay lies on the version the connection opened

    @property
    def dirty(self) -> bool:
        return len(self.map) > 0

    async def write(self, io: Executor, offset: int, data: bytes) -> None:
        await asyncio.get_running_loop().run_in_executor(io, self.pwrite, offset, data)
        # Marked only once the data is in the file: a read never sees the mark without it.
        self.mark(offset, offset + len(data), WRITTEN)

    async def flush(self) -> None:
        """Nothing to make durable: this overlay lives as long as the server process, and a
        commit writes the repository in its own crash-safe order."""

    def source_for(self, state: int) -> PieceSource:
        return self

    def unpin(self) -> None:
        pass

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # the file has the export's size: this cannot be short
            raise OSError(f"overlay file ended at {offset + len(data)}")
        return data

    def mark(self, start: int, end: int, state: int) -> None:
        self.map.set(start, end, state)

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, int | None]]:
        """(start, end, state) pieces of [start, end); None where the served version shows."""
        return self.map.segments(start, end)

    def changed_ranges(self) -> list[ByteRange]:
        """Every range written, zeroed or trimmed: what a commit must read."""
        return [ByteRange(s, e) for s, e, _ in self.map.items()]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
