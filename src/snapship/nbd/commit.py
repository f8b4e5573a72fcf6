"""Storing an overlay as a new version: the served version with the overlay's changes on top.

The backup engine does the work: an incremental backup whose base is the served version and
whose change set is every range the overlay wrote, zeroed or trimmed, read through
`OverlaySource`. Unchanged chunks keep their ids; changed ones are deduplicated like any
backup's. Blocking: the server runs it on a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Protocol

from snapship.engine.backup import BackupPlan, Prepared, run_backup
from snapship.formats.manifest import Manifest
from snapship.nbd.overlay import WRITTEN
from snapship.repository.repo import Repository
from snapship.types import ZERO_ID, ByteRange

CHANGE_SOURCE = "nbd overlay"
log = logging.getLogger("snapship.nbd")


class Committable(Protocol):
    """An overlay that no longer changes: an `Overlay` detached, or a live export's frozen
    layer."""

    size: int

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, int | None]]: ...
    def pread(self, offset: int, length: int) -> bytes: ...
    def changed_ranges(self) -> list[ByteRange]: ...


class OverlaySource:
    """A read-only view of `base` with `overlay` on top, with the interface of a backup
    source. The overlay must not change while it is read (the server detaches it first)."""

    def __init__(self, repo: Repository, base: Manifest, overlay: Committable) -> None:
        if overlay.size != base.size:
            raise ValueError(f"overlay of {overlay.size} bytes over a {base.size}-byte version")
        self.repo = repo
        self.base = base
        # Its own reference: an incremental backup takes `base.ids` over (engine/backup.py).
        self._ids = base.ids
        self.overlay = overlay
        self.size = base.size
        self.path = f"nbd overlay over {base.volume}@{base.version}"
        self._last: tuple[int, bytes] | None = None

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        for s, e, state in self.overlay.segments(offset, offset + length):
            if state == WRITTEN:
                out[s - offset : e - offset] = self.overlay.pread(s, e - s)
            elif state is None:
                self._read_base(s, e, out, offset)
            # zeroed or trimmed: already zero
        return bytes(out)

    def _read_base(self, start: int, end: int, out: bytearray, origin: int) -> None:
        cs = self.base.chunk_size
        for index in range(start // cs, (end - 1) // cs + 1):
            cid = self._ids[index * 32 : index * 32 + 32]
            if cid == ZERO_ID:
                continue
            a, b = max(start, index * cs), min(end, (index + 1) * cs)
            data = self._chunk(index, cid)
            out[a - origin : b - origin] = data[a - index * cs : b - index * cs]

    def _chunk(self, index: int, cid: bytes) -> bytes:
        # The engine reads chunk by chunk in order: one remembered chunk serves its pieces.
        if self._last is None or self._last[0] != index:
            self._last = (index, self.repo.get_chunk(cid))
        return self._last[1]


def commit_overlay(
    repo: Repository, volume: str, version: str, overlay: Committable,
    labels: dict[str, str], command: str = "nbd commit"
) -> Manifest:
    """Store `overlay` over `volume@version` as a new version whose parent is that version."""

    # A writer like any backup (docs/gc.md): the engine opens its session before the served
    # version is loaded as its base, so gc keeps every chunk the new version takes from it.
    @contextlib.contextmanager
    def prepare(base: Manifest | None) -> Iterator[Prepared]:
        assert base is not None
        yield (OverlaySource(repo, base, overlay),
               BackupPlan(changed=overlay.changed_ranges(), change_source=CHANGE_SOURCE))

    return run_backup(repo, prepare, volume, base_version=version,
                      command=f"{command} {volume}", labels=labels,
                      source_desc=f"nbd overlay over {volume}@{version}", warn=log.warning)
