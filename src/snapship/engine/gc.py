"""The gc engine: give back the space of chunks no version references, safely beside backups.

Two phases (docs/gc.md): *condemn* sets every unreferenced chunk aside as a fossil and records
which writers were running; *finalize*, once all of those writers have finished, looks at the
references again, puts back every fossil some version now uses, and deletes the rest. A backup
never waits for gc and gc never deletes a chunk a running or just-finished backup relies on.
Works on a bare `Storage`: the reference lists are readable without the repository key.

Memory: the set of referenced chunks holds the first 8 bytes of each id as an int (~60 bytes
per chunk). Two ids sharing those bytes only keep a garbage chunk alive; nothing is ever lost.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from snapship.engine.pipeline import bounded_map
from snapship.errors import Corrupt, FormatError, NotFound, ObjectNotFound, UsageError
from snapship.formats import refs as refs_codec
from snapship.formats.constants import CHUNK_PREFIX, FOSSIL_PREFIX
from snapship.formats.refs import Refs
from snapship.repository import catalog, collection
from snapship.repository import locks as locks_mod
from snapship.repository.collection import CONDEMNED, Collection
from snapship.repository.repo import Repository, chunk_key, parse_chunk_key
from snapship.storage.base import Storage

Warn = Callable[[str], None]
IO_WORKERS = 32
"""Deletes and renames wait on the disk (a discard per unlink here) or the network: many in
flight hide that latency; they cost no CPU."""
TEMP_MAX_AGE = 24 * 3600.0


@runtime_checkable
class LeavesTemporaries(Protocol):
    """A backend whose killed writers can leave partial files behind (the local directory)."""

    def remove_temporaries(self, older_than: float) -> int: ...


@dataclass
class GcReport:
    collection: str = ""
    versions: int = 0
    referenced: int = 0
    chunks: int = 0
    fossils_made: int = 0
    restored: int = 0
    chunks_freed: int = 0
    bytes_freed: int = 0
    refs_dropped: int = 0
    refs_rebuilt: int = 0
    temporaries_removed: int = 0
    waiting_for: list[str] = field(default_factory=list)
    """Writers the collection still waits for; its fossils are freed by a later gc."""
    finished: bool = False


def list_lag(storage: Storage) -> float:
    """Seconds a backend may take to show a new object in listings (0: list-after-write)."""
    return float(getattr(storage, "list_lag", 0.0))


class _Gc:
    def __init__(self, storage: Storage, repo: Repository | None, warn: Warn,
                 report: GcReport, lock: locks_mod.Lock) -> None:
        self.storage = storage
        self.repo = repo
        self.warn = warn
        self.report = report
        self.lock = lock

    @staticmethod
    def io(fn: Callable[[tuple[str, int]], int], items: Iterable[tuple[str, int]]
           ) -> Iterator[int]:
        return bounded_map(fn, items, IO_WORKERS, 4 * IO_WORKERS)

    def live_writers(self) -> set[str]:
        found = locks_mod.list_locks(self.storage, locks_mod.WRITER, self.warn)
        return {i.session for i in locks_mod.clear_stale(self.storage, found, self.warn)}

    def referenced(self) -> set[int]:
        """Chunks some version, or some backup still finishing, uses (as 8-byte keys)."""
        storage = self.storage
        # Writers first: a writer not live now has already written its version, if any, so
        # the version listing that follows sees it.
        writers = self.live_writers()
        versions = set(catalog.list_versions(storage))
        have_refs = set(catalog.list_refs(storage))
        keep: set[int] = set()
        for vol, ver in sorted(have_refs):
            try:
                r = catalog.load_refs(storage, vol, ver)
            except ObjectNotFound:
                continue  # pruned meanwhile
            except Corrupt as e:
                raise Corrupt(f"gc stopped before deleting anything: {e}") from None
            if (vol, ver) not in versions and not self._still_wanted(r, writers):
                storage.delete(catalog.refs_key(vol, ver))
                self.report.refs_dropped += 1
                continue
            keep.update(refs_codec.short_keys(r.ids))
        for vol, ver in sorted(versions - have_refs):
            keep.update(self._rebuild_refs(vol, ver))
        self.report.versions = len(versions)
        self.report.referenced = len(keep)
        return keep

    def _still_wanted(self, r: Refs, writers: set[str]) -> bool:
        """A reference list without a version: its writer may still be about to write the
        manifest. The lock is checked before the manifest, as the writer drops it after."""
        if r.writer in writers:
            return True
        key = locks_mod.lock_key(locks_mod.WRITER, r.writer)
        try:
            if locks_mod.decode_lock(key, self.storage.get(key)).is_alive():
                return True
        except (ObjectNotFound, FormatError, UsageError):
            pass  # gone, or no lock one can trust: its writer (if any) re-checks on waking
        return self.storage.stat(catalog.manifest_key(r.volume, r.version)) is not None

    def _rebuild_refs(self, vol: str, ver: str) -> Iterator[int]:
        # A prune between the two listings removes the manifest, then the list: it is gone.
        if self.storage.stat(catalog.manifest_key(vol, ver)) is None:
            return iter(())
        if self.repo is None:
            raise Corrupt(f"version {vol}@{ver} has no reference list (made by an older "
                          "snapship, or damaged); run gc once with the repository passphrase "
                          "to rebuild it. Nothing was deleted")
        try:
            m = self.repo.load_manifest(vol, ver)
        except NotFound:
            return iter(())
        r = refs_codec.from_manifest(m, "rebuilt-by-gc")
        self.storage.put(catalog.refs_key(vol, ver), catalog.seal_refs(r))
        self.report.refs_rebuilt += 1
        return refs_codec.short_keys(r.ids)

    def condemn(self) -> Collection:
        c = Collection(id=dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S-")
                       + secrets.token_hex(4), started=dt.datetime.now(dt.UTC).isoformat())
        self.report.collection = c.id
        # Recorded before the first chunk moves: a writer starting from now on re-checks the
        # chunks it reuses.
        collection.save(self.storage, c)
        keep = self.referenced()

        def garbage() -> Iterator[tuple[str, int]]:
            # Filtered here, not in the pool: most chunks are live, and a pool task costs
            # more than the test.
            for key, size in self.storage.list(CHUNK_PREFIX):
                self.report.chunks += 1
                cid = parse_chunk_key(key)
                if cid is not None and refs_codec.short_key(cid) not in keep:
                    yield key, size

        def condemn_one(item: tuple[str, int]) -> int:
            key = item[0]
            self.lock.ensure("setting more chunks aside")
            try:
                self.storage.rename(key, FOSSIL_PREFIX + key[len(CHUNK_PREFIX) :])
            except ObjectNotFound:
                return 0
            return 1

        c.fossils = sum(self.io(condemn_one, garbage()))
        self.report.fossils_made = c.fossils
        self.storage.flush()
        time.sleep(list_lag(self.storage))  # a writer lock put before now is listed now
        c.writers = sorted(self.live_writers())
        c.phase = CONDEMNED
        collection.save(self.storage, c)
        return c

    def finalize(self, c: Collection) -> bool:
        """Free the collection's fossils if its writers are done; False if it must wait."""
        self.report.collection = c.id
        live = self.live_writers()
        if c.phase != CONDEMNED:  # condemning was interrupted: whoever runs now may rely on
            c.writers, c.phase = sorted(live), CONDEMNED  # the moved chunks
            collection.save(self.storage, c)
        self.report.waiting_for = [w for w in c.writers if w in live]
        if self.report.waiting_for:
            return False
        time.sleep(list_lag(self.storage))
        keep = self.referenced()

        def settle(item: tuple[str, int]) -> int:
            """Put back a fossil in use (-1), or delete it (its size)."""
            key, size = item
            cid = parse_chunk_key(key)
            if cid is None:
                return 0
            self.lock.ensure("deleting or putting back more fossils")
            if refs_codec.short_key(cid) in keep:
                self._put_back(key, cid)
                return -1
            self.storage.delete(key)
            return size

        for outcome in self.io(settle, self.storage.list(FOSSIL_PREFIX)):
            if outcome < 0:
                self.report.restored += 1
            else:
                self.report.chunks_freed += 1
                self.report.bytes_freed += outcome
        self.storage.flush()
        collection.finish(self.storage)
        self.report.finished = True
        return True


    def _put_back(self, key: str, cid: bytes) -> None:
        """Return a fossil in use to `chunks/`. A chunk stored under its name meanwhile wins
        only if it is proven to be the same object: the same bytes (writers seal a chunk
        deterministically, docs/format.md), or, with the key, a copy that opens and matches its
        id. Anything else is replaced by the fossil: a forged upload must never cost the
        original."""
        live = chunk_key(cid)
        if self.storage.stat(live) is not None:
            try:
                fossil = self.storage.get(key)
                current = self.storage.get(live)
            except ObjectNotFound:
                fossil = current = b""  # one of them moved meanwhile: settle it by the rename
            if fossil and (current == fossil or self._opens(cid, current)):
                self.storage.delete(key)
                return
        try:
            self.storage.rename(key, live)
        except ObjectNotFound:
            # Put back meanwhile: a snapship server does that when a backup uploads it.
            if self.storage.stat(live) is None:
                raise

    def _opens(self, cid: bytes, blob: bytes) -> bool:
        if self.repo is None:
            return False
        try:
            self.repo.open_chunk(cid, blob)
        except Corrupt:
            return False
        return True


def run_gc(storage: Storage, *, repo: Repository | None = None,
           warn: Warn = lambda message: None) -> GcReport:
    """One gc run: finish a pending collection if its writers are done, then start and (with
    no backup running) finish a new one. `repo` (opened with the key) is only needed to
    rebuild missing reference lists."""
    report = GcReport()
    with locks_mod.exclusive(storage, locks_mod.GC, "gc", warn) as lock:
        gc = _Gc(storage, repo, warn, report, lock)
        pending = collection.load(storage)
        if pending is not None and not gc.finalize(pending):
            return report
        gc.finalize(gc.condemn())
        if isinstance(storage, LeavesTemporaries):
            report.temporaries_removed = storage.remove_temporaries(TEMP_MAX_AGE)
        locks_mod.remove_old_tombstones(storage)
    return report
