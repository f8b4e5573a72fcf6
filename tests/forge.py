"""Well-formed repository objects made by hand, for tests that talk to storage directly.

A snapship server checks what a backup token stores (server/validate.py), so tests that put
objects through one must put real ones: sealed chunks under their ids, reference lists and
manifests that decode, locks that parse. `Forge` makes them with a repository's own codecs.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from array import array
from collections.abc import Callable, Iterator

from snapship.engine.backup import BackupSource, Prepare, Prepared
from snapship.formats.manifest import Manifest
from snapship.repository import catalog, layout, locks
from snapship.repository.repo import Repository, new_version_id, now_iso
from snapship.types import ZERO_ID, ByteRange


class Forge:
    def __init__(self, repo: Repository) -> None:
        self.repo = repo

    def chunk(self, data: bytes) -> tuple[str, bytes, bytes]:
        """(key, sealed object, id) of a chunk holding `data`."""
        cid = self.repo.chunk_id(data)
        return layout.chunk_key(cid), bytes(self.repo.seal_chunk(cid, data)), cid

    def version(self, volume: str, chunks: list[bytes]) -> Manifest:
        """A manifest of `chunks` (each a chunk's data, full size but the last)."""
        cs = self.repo.chunk_size
        ids = b"".join(self.repo.chunk_id(c) if any(c) else ZERO_ID for c in chunks)
        sizes = array("I", (len(self.repo.seal_chunk(self.repo.chunk_id(c), c)) if any(c)
                            else 0 for c in chunks))
        size = cs * (len(chunks) - 1) + len(chunks[-1]) if chunks else 0
        return Manifest(volume, new_version_id(), size, cs, now_iso(), "forge", None, ids, sizes,
                        {}, {"mode": "full"})

    def refs(self, m: Manifest, writer: str = "forge") -> tuple[str, bytes]:
        from snapship.formats import refs as refs_codec

        return (layout.refs_key(m.volume, m.version),
                bytes(catalog.seal_refs(refs_codec.from_manifest(m, writer))))

    def manifest(self, m: Manifest) -> tuple[str, bytes]:
        from snapship.formats import envelope
        from snapship.formats import manifest as manifest_codec
        from snapship.formats.constants import KIND_MANIFEST

        key = layout.manifest_key(m.volume, m.version)
        return key, bytes(envelope.seal(KIND_MANIFEST, key.encode(), manifest_codec.encode(m),
                                        self.repo._aead))


def lock_object(session: str, *, kind: str = locks.WRITER, heartbeat: float | None = None,
                machine: str = "elsewhere/boot", pid: int = 4242, command: str = "backup x"
                ) -> tuple[str, bytes]:
    """(key, bytes) of a version-2 lock as another machine's process would store it."""
    key = layout.lock_key(kind, session)
    return key, json.dumps({
        "v": 2, "kind": kind, "session": session, "machine": machine, "pid": pid,
        "pids": {"4026531836": pid}, "pid_start": "12345", "started": "2026-12-01T00:00:00+00:00",
        "heartbeat": time.time() if heartbeat is None else heartbeat, "command": command,
    }).encode()


def random_chunk(size: int) -> bytes:
    return os.urandom(size)


def staged(source: BackupSource, *, before: Callable[[], None] | None = None,
           after: Callable[[], None] | None = None,
           changed: list[ByteRange] | None = None) -> Prepare:
    """A `Prepare` for tests that let another process act at the moments a race would:
    `before()` once the backup is registered and its base loaded, `after()` once its version
    is written but before its registration ends. It reads `source` (only `changed`, if given,
    on top of the base)."""
    from snapship.engine.backup import BackupPlan

    @contextlib.contextmanager
    def prepare(base: Manifest | None) -> Iterator[Prepared]:
        if before is not None:
            before()
        yield source, BackupPlan(changed, "test" if changed is not None else "full read")
        if after is not None:
            after()

    return prepare


def prepare_then(source: BackupSource, before: Callable[[], None]) -> Prepare:
    return staged(source, before=before)
