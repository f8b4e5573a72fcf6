"""One durable overlay layer: a sparse data file and its map log, in a live export's directory.

Same reading interface as `overlay.Overlay` (segments, pread, changed_ranges), so a frozen
layer can be committed by `commit.OverlaySource`. Writes land in the data file at once; each
request's map record is appended to the map log (`journal`) before it is answered, with the
boot id, not synced: a killed server's page cache keeps it. A flush makes them durable in the
order docs/nbd.md ("State directory") gives: fdatasync the data file, append a durable mark
naming the last entry it covers, fdatasync the map file. On open, entries a mark covers are
trusted, later ones only if written in the current boot (`boot_id`); the rest is cut off.
The map is only changed from the event loop; `pwrite`, `pread` and the blocking halves of a
flush run on I/O threads.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from snapship.formats import overlaymap
from snapship.nbd.rangemap import RangeMap
from snapship.types import ByteRange

COMPACT_MIN = 1 << 20
"""A map log shorter than this is never rewritten."""
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
TEST_BOOT_ID_ENV = "SNAPSHIP_TEST_BOOT_ID"
"""Test-only: a boot id (a UUID) to use instead of the kernel's, to play a reboot."""


def boot_id() -> bytes:
    """The current boot's id: un-durable map entries of another boot are not trusted."""
    text = os.environ.get(TEST_BOOT_ID_ENV)
    if text is None:
        with open(BOOT_ID_PATH) as f:
            text = f.read()
    return uuid.UUID(text.strip()).bytes


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class FlushTicket:
    """What one flush makes durable, taken on the loop at its start."""

    covers: int
    """The last journal entry appended before the flush began (-1: none)."""
    data_dirty: bool
    whole: list[overlaymap.Record] | None
    """The map as of `covers`, when the log is due for a rewrite."""
    cut: int
    """The log's length at the start: entries after it are copied into a rewritten log."""
    last: int
    """The sequence number of the last entry before `cut`: a rewritten log's base takes it."""
    new_fd: int = -1
    """The rewritten log, synced, not yet renamed over the old one."""
    switched: bool = False


class DurableLayer:
    def __init__(self, directory: Path, number: int, size: int, *, create: bool) -> None:
        self.directory = directory
        self.number = number
        self.size = size
        self.data_path = directory / f"layer-{number}.data"
        self.map_path = directory / f"layer-{number}.map"
        self.map = RangeMap()
        self.boot = boot_id()
        self.next_seq = 0
        self.journaled = -1
        """The last journal entry of the map log (-1: none)."""
        self.durable_seq = -1
        """The last entry of the map log on stable storage."""
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
            self.dropped = 0
        else:
            self.data_fd = os.open(self.data_path, flags)
            self.map_fd = os.open(self.map_path, flags)
            self._replay()

    def _replay(self) -> None:
        with open(self.map_fd, "rb", closefd=False) as f:
            try:
                decoded = overlaymap.decode(f.read(), self.boot)
            except overlaymap.OverlayMapError as e:
                raise overlaymap.OverlayMapError(f"{self.map_path}: {e}") from None
        if decoded.size != self.size:
            raise overlaymap.OverlayMapError(
                f"{self.map_path}: made for {decoded.size} bytes, the export has {self.size}")
        for start, end, state in decoded.records:
            self.map.set(start, end, state)
        self.dropped = decoded.dropped
        if os.fstat(self.data_fd).st_size != self.size:
            os.ftruncate(self.data_fd, self.size)
        if decoded.rewrite:
            # Entries dropped before a durable mark (which cutting would lose), or a version 1
            # file: make the data stable, then write what is kept anew as one durable base
            # (atomically: a crash keeps the old file).
            os.fdatasync(self.data_fd)
            fd = self._base_file(list(self.map.items()), 0)
            self._install(fd)
            self.next_seq, self.journaled, self.durable_seq = 1, 0, 0
            return
        if os.fstat(self.map_fd).st_size != decoded.kept_length:
            os.ftruncate(self.map_fd, decoded.kept_length)  # a torn, unacknowledged append
            os.fsync(self.map_fd)
        self.map_length = decoded.kept_length
        self.next_seq, self.durable_seq = decoded.next_seq, decoded.durable_seq
        self.journaled = decoded.next_seq - 1 if decoded.undurable else decoded.durable_seq
        # A killed server's entries, kept: their data may be in the page cache only
        self.data_dirty = decoded.undurable

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

    def journal(self, start: int, end: int, state: int) -> None:
        """On the loop, once a request's data is in the data file and before it is answered:
        append its record to the log (in the page cache), then set it in the map. If the
        append fails (a full disk), the map is unchanged and the error raised."""
        if end <= start:
            return
        entry = overlaymap.encode_journal(self.next_seq, self.boot, [(start, end, state)])
        self._append(entry)
        self.journaled = self.next_seq
        self.next_seq += 1
        self.map.set(start, end, state)

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, int | None]]:
        return self.map.segments(start, end)

    def changed_ranges(self) -> list[ByteRange]:
        return [ByteRange(s, e) for s, e, _ in self.map.items()]

    # -- durability -------------------------------------------------------------------------

    @property
    def unflushed(self) -> bool:
        return self.journaled > self.durable_seq or self.data_dirty

    def begin_flush(self) -> FlushTicket:
        """On the loop, at the start of a flush: what it will make durable."""
        ticket = FlushTicket(self.journaled, self.data_dirty, None, self.map_length,
                             self.next_seq - 1)
        self.data_dirty = False
        if self.map_length > COMPACT_MIN and (
                self.map_length > 4 * (len(self.map) * overlaymap.RECORD_SIZE + 4096)):
            ticket.whole = list(self.map.items())
        return ticket

    def sync_data(self, ticket: FlushTicket) -> None:
        """Blocking (an I/O thread): the data of every covered entry to stable storage, and
        the rewritten log made beside the old one if one is due."""
        if ticket.data_dirty:
            os.fdatasync(self.data_fd)
        if ticket.whole is not None:
            with contextlib.suppress(OSError):  # no room for a second copy: mark as usual
                ticket.new_fd = self._base_file(ticket.whole, ticket.last)

    def seal(self, ticket: FlushTicket) -> None:
        """On the loop, after `sync_data`: the rewritten log takes the old one's place (with
        the entries appended meanwhile), or a durable mark naming the covered entries is
        appended."""
        if ticket.new_fd >= 0:
            fd, ticket.new_fd = ticket.new_fd, -1
            tail = os.pread(self.map_fd, self.map_length - ticket.cut, ticket.cut)
            try:
                length = os.fstat(fd).st_size
                _pwrite_all(fd, tail, length)
                os.rename(self._new_path, self.map_path)
            except OSError:
                os.close(fd)
                self._new_path.unlink(missing_ok=True)
            else:
                os.close(self.map_fd)
                self.map_fd = fd
                self.map_length = length + len(tail)
                ticket.switched = True
                return
        if ticket.covers > self.durable_seq:
            self._append(overlaymap.encode_durable(self.next_seq, ticket.covers))
            self.next_seq += 1

    def sync_map(self, ticket: FlushTicket) -> None:
        """Blocking (an I/O thread), after `seal`: the mark (or the rename) made stable."""
        if ticket.switched:
            fsync_dir(self.directory)
        if ticket.covers > self.durable_seq or ticket.switched:
            os.fdatasync(self.map_fd)

    def end_flush(self, ticket: FlushTicket, ok: bool) -> None:
        """On the loop: the flush is done (`ok`) or failed (its data is still not durable)."""
        if ticket.new_fd >= 0:
            os.close(ticket.new_fd)
            self._new_path.unlink(missing_ok=True)
        if ok:
            self.durable_seq = max(self.durable_seq, ticket.covers)
        else:
            self.data_dirty = self.data_dirty or ticket.data_dirty

    def flush_blocking(self) -> None:
        """A whole flush from one thread (tests, tools: nothing else uses the layer)."""
        ticket = self.begin_flush()
        ok = False
        try:
            self.sync_data(ticket)
            self.seal(ticket)
            self.sync_map(ticket)
            ok = True
        finally:
            self.end_flush(ticket, ok)

    @property
    def _new_path(self) -> Path:
        return self.map_path.with_suffix(".map.new")

    def _base_file(self, whole: list[overlaymap.Record], seq: int) -> int:
        """A new log beside the old one, holding `whole` as its base entry, synced."""
        tmp = self._new_path
        blob = overlaymap.encode_header(self.size) + overlaymap.encode_base(max(seq, 0), whole)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _pwrite_all(fd, blob, 0)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return fd

    def _install(self, fd: int) -> None:
        """Blocking: the new log replaces the old one (atomic rename; directory synced)."""
        os.rename(self._new_path, self.map_path)
        fsync_dir(self.directory)
        os.close(self.map_fd)
        self.map_fd = fd
        self.map_length = os.fstat(fd).st_size

    def _append(self, entry: bytes) -> None:
        try:
            _pwrite_all(self.map_fd, entry, self.map_length)
        except OSError:
            # cut a partial entry off again, so the next one follows the last whole one
            os.ftruncate(self.map_fd, self.map_length)
            raise
        self.map_length += len(entry)

    def _write_all(self, data: bytes, offset: int = 0) -> None:
        _pwrite_all(self.map_fd, data, offset)

    def close(self) -> None:
        for fd in (self.data_fd, self.map_fd):
            if fd >= 0:
                os.close(fd)
        self.data_fd = self.map_fd = -1

    def remove(self) -> None:
        self.data_path.unlink(missing_ok=True)
        self.map_path.unlink(missing_ok=True)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
