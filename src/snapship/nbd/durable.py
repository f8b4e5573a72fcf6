"""One durable overlay layer: a sparse data file and its map log, in a live export's directory.

Same reading interface as `overlay.Overlay` (segments, pread, changed_ranges), so a frozen
layer can be committed by `commit.OverlaySource`. Writes land in the data file at once; the
map records they make are kept in memory (`pending`) until `flush` makes them durable in the
order docs/nbd.md ("Durable exports") gives: fdatasync the data file, append one sealed batch
of records to the map file, fdatasync the map file. A crash anywhere in between leaves either
the old map (the new data is unreferenced) or the new one, never a map pointing at data that
is not on disk. The map is only changed from the event loop; `pwrite`, `pread` and the blocking
half of `flush` run on I/O threads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from snapship.formats import overlaymap
from snapship.nbd.rangemap import RangeMap
from snapship.types import ByteRange

COMPACT_MIN = 1 << 20
"""A map log shorter than this is never rewritten."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DurableLayer:
    def __init__(self, directory: Path, number: int, size: int, *, create: bool) -> None:
        self.directory = directory
        self.number = number
        self.size = size
        self.data_path = directory / f"layer-{number}.data"
        self.map_path = directory / f"layer-{number}.map"
        self.map = RangeMap()
        self.pending: list[overlaymap.Record] = []
        """Records set since the last flush (the in-memory map already holds them)."""
        self.data_dirty = False
        self.writers = 0
        """Writes under way into this layer (a freeze waits for them)."""
        self.pins = 0
        """Reads under way from its data file (closing waits for them)."""
        self.retired = False
        flags = os.O_RDWR | os.O_CLOEXEC
        if create:
            self.data_fd = os.open(self.data_path, flags | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self.data_fd, size)  # sparse: only what is written takes space
            self.map_fd = os.open(self.map_path, flags | os.O_CREAT | os.O_TRUNC, 0o600)
            self._write_all(overlaymap.encode_header(size))
            os.fdatasync(self.data_fd)
            os.fsync(self.map_fd)
            fsync_dir(directory)
            self.map_length = overlaymap.HEADER_SIZE
            self.batches = 0
        else:
            self.data_fd = os.open(self.data_path, flags)
            self.map_fd = os.open(self.map_path, flags)
            self._replay()

    def _replay(self) -> None:
        with open(self.map_fd, "rb", closefd=False) as f:
            try:
                decoded = overlaymap.decode(f.read())
            except overlaymap.OverlayMapError as e:
                raise overlaymap.OverlayMapError(f"{self.map_path}: {e}") from None
        if decoded.size != self.size:
            raise overlaymap.OverlayMapError(
                f"{self.map_path}: made for {decoded.size} bytes, the export has {self.size}")
        for start, end, state in decoded.records:
            self.map.set(start, end, state)
        if os.fstat(self.map_fd).st_size != decoded.valid_length:
            os.ftruncate(self.map_fd, decoded.valid_length)  # a torn, unacknowledged append
            os.fsync(self.map_fd)
        self.map_length = decoded.valid_length
        self.batches = decoded.batches
        if os.fstat(self.data_fd).st_size != self.size:
            os.ftruncate(self.data_fd, self.size)

    # -- the Overlay interface --------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return len(self.map) > 0

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.data_fd, view, offset)
            view, offset = view[n:], offset + n

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.data_fd, length, offset)
        if len(data) < length:
            raise OSError(f"layer file {self.data_path} ended at {offset + len(data)}")
        return data

    def mark(self, start: int, end: int, state: int) -> None:
        if end > start:
            self.map.set(start, end, state)
            self.pending.append((start, end, state))

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, int | None]]:
        return self.map.segments(start, end)

    def changed_ranges(self) -> list[ByteRange]:
        return [ByteRange(s, e) for s, e, _ in self.map.items()]

    # -- durability -------------------------------------------------------------------------

    @property
    def unflushed(self) -> bool:
        return bool(self.pending) or self.data_dirty

    def take(self) -> tuple[list[overlaymap.Record], bool, list[overlaymap.Record] | None]:
        """On the loop, at the start of a flush: the records and data to make durable, and
        the whole map if the log is due for a rewrite."""
        records, dirty = self.pending, self.data_dirty
        self.pending, self.data_dirty = [], False
        whole = None
        if self.map_length > COMPACT_MIN and (
                self.map_length > 4 * (len(self.map) * overlaymap.RECORD_SIZE + 4096)):
            whole = list(self.map.items())
        return records, dirty, whole

    def give_back(self, records: list[overlaymap.Record], dirty: bool) -> None:
        """On the loop, after a failed flush: those records are still not durable."""
        self.pending = records + self.pending
        self.data_dirty = self.data_dirty or dirty

    def write_durable(self, records: list[overlaymap.Record], dirty: bool,
                      whole: list[overlaymap.Record] | None) -> None:  # fmt: skip
        """Blocking (an I/O thread): data first, then the map, each fdatasync'd. On failure
        the map file is as it was before (a partial append is cut off again)."""
        if dirty:
            os.fdatasync(self.data_fd)
        if whole is not None:
            try:
                self._rewrite(whole)
                return
            except OSError:  # no room for a second copy of the map: append as usual
                pass
        if not records:
            return
        batch = overlaymap.encode_batch(self.batches, records)
        try:
            self._write_all(batch, self.map_length)
            os.fdatasync(self.map_fd)
        except OSError:
            os.ftruncate(self.map_fd, self.map_length)
            raise
        self.map_length += len(batch)
        self.batches += 1

    def _rewrite(self, whole: list[overlaymap.Record]) -> None:
        # The log only grows: now and then the map is written anew as one batch, beside the
        # old file, then renamed over it (atomic; the directory is synced so the rename sticks).
        tmp = self.map_path.with_suffix(".map.new")
        blob = overlaymap.encode(self.size, [whole])
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(blob)
            offset = 0
            while offset < len(view):
                offset += os.pwrite(fd, view[offset:], offset)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.rename(tmp, self.map_path)
        fsync_dir(self.directory)
        os.close(self.map_fd)
        self.map_fd = fd
        self.map_length = len(blob)
        self.batches = 1

    def _write_all(self, data: bytes, offset: int = 0) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.map_fd, view, offset)
            view, offset = view[n:], offset + n

    def close(self) -> None:
        for fd in (self.data_fd, self.map_fd):
            if fd >= 0:
                os.close(fd)
        self.data_fd = self.map_fd = -1

    def remove(self) -> None:
        self.data_path.unlink(missing_ok=True)
        self.map_path.unlink(missing_ok=True)
