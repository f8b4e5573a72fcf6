"""What a connection reads and writes: one version's chunks, with an overlay on top if writable.

`VersionImage` indexes a manifest once (runs of zero and data chunks) for reads and block
status. `ExportSession` is one connection's view of an export: reads assemble pieces from the
chunk cache (awaited, never blocking the loop), the overlay file (on the I/O pool) and zero
runs; sequential readers get the next chunks fetched ahead; writes go only to the overlay.
"""

from __future__ import annotations

import asyncio
import errno
from bisect import bisect_right
from collections.abc import Awaitable, Iterator
from concurrent.futures import Executor
from typing import Protocol

from snapship.errors import SnapshipError
from snapship.formats.manifest import Manifest
from snapship.nbd import protocol as p
from snapship.nbd.chunkcache import ChunkCache
from snapship.nbd.overlay import (
    DATA_STATES,
    FROZEN,
    WRITTEN,
    ZERO,
    ZERO_ALLOCATED,
    PieceSource,
)
from snapship.types import ZERO_ID

Piece = tuple[int, int, bytes | memoryview | None]
"""(offset, length, data): data None means `length` zero bytes."""


class OverlayView(Protocol):
    """What a connection writes into and reads through: an `overlay.Overlay`, or a live export
    (`nbd.live.LiveExport`) whose layers survive restarts and whose base moves on at each
    checkpoint."""

    size: int

    @property
    def base(self) -> VersionImage | None:
        """The version under the overlay when it is not the one the connection opened."""

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, int | None]]: ...
    def source_for(self, state: int) -> PieceSource: ...
    def mark(self, start: int, end: int, state: int) -> None: ...
    async def write(self, io: Executor, offset: int, data: bytes) -> None: ...
    async def flush(self) -> None: ...


MAX_EXTENTS = 8192
"""Descriptors per block-status reply; a client asks again from where the reply ended."""

_STATE_FLAGS = {WRITTEN: 0, FROZEN: 0, ZERO: p.STATE_HOLE | p.STATE_ZERO,
                ZERO_ALLOCATED: p.STATE_ZERO}


class RequestFailed(Exception):
    """A request could not be carried out: answered with `error` (an NBD errno)."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error


class VersionImage:
    """One version, immutable: its manifest plus the runs of zero and data chunks."""

    def __init__(self, m: Manifest) -> None:
        self.manifest = m
        self.volume = m.volume
        self.version = m.version
        self.name = f"{m.volume}@{m.version}"
        self.size = m.size
        self.chunk_size = m.chunk_size
        self.count = m.count
        run_starts: list[int] = []
        run_zero: list[bool] = []
        ids = m.ids
        previous: bool | None = None
        for i in range(m.count):
            zero = ids[i * 32 : i * 32 + 32] == ZERO_ID
            if zero is not previous:
                run_starts.append(i)
                run_zero.append(zero)
                previous = zero
        self._run_starts = run_starts
        self._run_zero = run_zero

    def chunk_id(self, index: int) -> bytes | None:
        cid = self.manifest.ids[index * 32 : index * 32 + 32]
        return None if cid == ZERO_ID else cid

    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """(start, end, all zero) runs covering [start, end), clipped to it."""
        cs = self.chunk_size
        starts = self._run_starts
        k = bisect_right(starts, start // cs) - 1
        pos = start
        while pos < end and 0 <= k < len(starts):
            stop = min(end, starts[k + 1] * cs if k + 1 < len(starts) else self.size)
            yield pos, stop, self._run_zero[k]
            pos, k = stop, k + 1


class ExportSession:
    """One connection's handle on an export; `overlay` None means read-only."""

    def __init__(
        self,
        image: VersionImage,
        cache: ChunkCache,
        io_pool: Executor,
        overlay: OverlayView | None = None,
        readahead_chunks: int = 8,
    ) -> None:
        self._image = image
        self.cache = cache
        self.overlay = overlay
        self._io = io_pool
        self.readahead_chunks = readahead_chunks
        self._next_offset = -1
        self.wrote = False

    @property
    def image(self) -> VersionImage:
        """The version under the overlay: a live export's moves on at each checkpoint."""
        base = self.overlay.base if self.overlay is not None else None
        return base or self._image

    # -- reads ----------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> list[Piece]:
        """The pieces of [offset, offset + length), in order, none of them empty (each becomes
        a reply chunk, and the protocol wants every chunk to cover at least one byte); no
        pieces for a length of 0."""
        if length == 0:
            return []
        end = offset + length
        segments: list[tuple[int, int, int | None]]
        if self.overlay is None:
            segments = [(offset, end, None)]
        else:
            segments = list(self.overlay.segments(offset, end))
        pieces: list[Piece | None] = []
        waits: list[tuple[int, Awaitable[Piece]]] = []
        for s, e, state in segments:
            if state is None:
                self._base_pieces(s, e, pieces, waits)
            elif state in DATA_STATES:
                assert self.overlay is not None
                # Pinned now, while the map said so: a checkpoint may retire the layer later.
                source = self.overlay.source_for(state)
                waits.append((len(pieces), self._overlay_piece(source, s, e)))
                pieces.append(None)
            else:
                pieces.append((s, e - s, None))
        if offset == self._next_offset:
            self._read_ahead(end)
        self._next_offset = end
        if len(waits) == 1:
            slot, wait = waits[0]
            pieces[slot] = await wait
        elif waits:
            done = await asyncio.gather(*(w for _, w in waits))
            for (slot, _), piece in zip(waits, done, strict=True):
                pieces[slot] = piece
        return _merge_zeroes(pieces)

    def _base_pieces(
        self, start: int, end: int, pieces: list[Piece | None],
        waits: list[tuple[int, Awaitable[Piece]]],
    ) -> None:  # fmt: skip
        cs = self.image.chunk_size
        for index in range(start // cs, (end - 1) // cs + 1):
            a, b = max(start, index * cs), min(end, (index + 1) * cs)
            cid = self.image.chunk_id(index)
            if cid is None:
                pieces.append((a, b - a, None))
            else:
                # Submitted now, in order, so read-ahead queued next never delays it.
                self.cache.request(cid)
                waits.append((len(pieces), self._chunk_piece(index, cid, a, b)))
                pieces.append(None)

    async def _chunk_piece(self, index: int, cid: bytes, a: int, b: int) -> Piece:
        cs = self.image.chunk_size
        data = await self._chunk(index, cid)
        return a, b - a, memoryview(data)[a - index * cs : b - index * cs]

    async def _chunk(self, index: int, cid: bytes) -> bytes:
        offset = index * self.image.chunk_size
        try:
            data = await self.cache.get(cid)
        except SnapshipError as e:
            raise RequestFailed(
                p.EIO, f"chunk {cid.hex()} of {self.image.name} at offset {offset}: {e}"
            ) from None
        expected = min(self.image.chunk_size, self.image.size - offset)
        if len(data) != expected:
            raise RequestFailed(
                p.EIO, f"chunk {cid.hex()} of {self.image.name} at offset {offset} has "
                f"{len(data)} bytes, expected {expected}",
            )
        return data

    async def _overlay_piece(self, source: PieceSource, start: int, end: int) -> Piece:
        loop = asyncio.get_running_loop()
        try:
            data = await loop.run_in_executor(self._io, source.pread, start, end - start)
        except OSError as e:
            raise RequestFailed(p.EIO, f"cannot read the overlay at {start}: {e}") from None
        finally:
            source.unpin()
        return start, end - start, data

    def _read_ahead(self, end: int) -> None:
        """A sequential reader will want the next chunks: start fetching them now."""
        first = end // self.image.chunk_size
        for index in range(first, min(self.image.count, first + self.readahead_chunks)):
            cid = self.image.chunk_id(index)
            if cid is not None:
                self.cache.prefetch(cid)

    async def cache_range(self, offset: int, length: int) -> None:
        """NBD_CMD_CACHE: fetch the range's chunks into the cache (as much as fits)."""
        cs = self.image.chunk_size
        budget = self.cache.max_bytes // 2
        batch: list[Awaitable[bytes]] = []
        for index in range(offset // cs, (offset + length - 1) // cs + 1 if length else 0):
            cid = self.image.chunk_id(index)
            if cid is None:
                continue
            budget -= cs
            if budget < 0:
                break
            batch.append(self._chunk(index, cid))
            if len(batch) >= 8:
                await asyncio.gather(*batch)
                batch = []
        if batch:
            await asyncio.gather(*batch)

    # -- block status ---------------------------------------------------------------------

    def block_status(self, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
        """base:allocation descriptors (length, flags) from `offset`, at most `length` long."""
        end = min(offset + length, self.image.size)
        extents: list[tuple[int, int]] = []
        limit = 1 if one else MAX_EXTENTS

        def add(n: int, flags: int) -> bool:
            if extents and extents[-1][1] == flags:
                extents[-1] = (extents[-1][0] + n, flags)
            elif len(extents) >= limit:
                return False
            else:
                extents.append((n, flags))
            return True

        segments = [(offset, end, None)] if self.overlay is None else self.overlay.segments(
            offset, end)
        for s, e, state in segments:
            if state is not None:
                if not add(e - s, _STATE_FLAGS[state]):
                    return extents
                continue
            for a, b, zero in self.image.runs(s, e):
                if not add(b - a, p.STATE_HOLE | p.STATE_ZERO if zero else 0):
                    return extents
        return extents

    # -- writes (overlay only) ------------------------------------------------------------

    def _writable(self) -> OverlayView:
        if self.overlay is None:
            raise RequestFailed(p.EPERM, "the export is read-only")
        return self.overlay

    # A zero-length write, zeroing or trim changes nothing: it does not make the connection
    # a writer (one that leaves without NBD_CMD_DISC would stop the overlay's commit).

    async def write(self, offset: int, data: bytes) -> None:
        overlay = self._writable()
        if not data:
            return
        try:
            await overlay.write(self._io, offset, data)
        except OSError as e:
            raise _failed(e, f"cannot write the overlay at {offset}") from None
        self.wrote = True

    async def flush(self) -> None:
        """FLUSH, and FUA after a write: every write acknowledged so far made durable."""
        if self.overlay is None:
            return
        try:
            await self.overlay.flush()
        except OSError as e:
            raise _failed(e, "cannot make the overlay durable") from None

    def write_zeroes(self, offset: int, length: int, no_hole: bool) -> None:
        overlay = self._writable()
        if length:
            try:  # a live export appends the mark to its map log: that can fail
                overlay.mark(offset, offset + length, ZERO_ALLOCATED if no_hole else ZERO)
            except OSError as e:
                raise _failed(e, f"cannot zero the overlay at {offset}") from None
            self.wrote = True

    def trim(self, offset: int, length: int) -> None:
        # Trimmed ranges read as zeroes from then on: the served version's holes do the same.
        overlay = self._writable()
        if length:
            try:
                overlay.mark(offset, offset + length, ZERO)
            except OSError as e:
                raise _failed(e, f"cannot trim the overlay at {offset}") from None
            self.wrote = True


def _failed(e: OSError, what: str) -> RequestFailed:
    full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return RequestFailed(p.ENOSPC if full else p.EIO, f"{what}: {e.strerror or e}")


def _merge_zeroes(pieces: list[Piece | None]) -> list[Piece]:
    out: list[Piece] = []
    for piece in pieces:
        assert piece is not None
        if piece[2] is None and out and out[-1][2] is None:
            prev = out[-1]
            out[-1] = (prev[0], prev[1] + piece[1], None)
        else:
            out.append(piece)
    return out
