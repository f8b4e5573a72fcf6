"""The gc engine: give back the space of chunks no version references, safely beside backups.

Two phases (docs/gc.md): *condemn* sets every unreferenced chunk aside as a fossil and records
which writers were running; *finalize*, once all of those writers have finished, looks at the
references again, puts back every fossil some version now uses, and deletes the rest. A backup
never waits for gc and gc never deletes a chunk a running or just-finished backup relies on.
Works on a `Catalog` (no key): the reference lists are readable without the repository key.

Memory: the set of referenced chunks holds the first 8 bytes of each id as an int (~60 bytes
per chunk). Two ids sharing those bytes only keep a garbage chunk alive; nothing is ever lost.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from snapship.engine.pipeline import bounded_map
from snapship.errors import Corrupt, NotFound, ObjectNotFound
from snapship.formats import refs as refs_codec
from snapship.formats.refs import Refs
from snapship.repository import locks as locks_mod
from snapship.repository.catalog import Catalog
from snapship.repository.collection import CONDEMNED, Collection
from snapship.repository.repo import Repository
from snapship.units import human_bytes

Warn = Callable[[str], None]
IO_WORKERS = 32
"""Deletes and renames wait on the disk (a discard per unlink here) or the network: many in
flight hide that latency; they cost no CPU."""
TEMP_MAX_AGE = 24 * 3600.0


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


def describe(r: dict[str, Any], where: str = "gc") -> list[str]:
    """A gc report (`GcReport` as JSON, wherever gc ran) for people: the lines to print."""
    lines = []
    if r["waiting_for"]:
        lines.append(f"{where}: collection {r['collection']} waits for "
                     f"{len(r['waiting_for'])} running backup(s) "
                     f"({', '.join(r['waiting_for'])}); run gc again after they finish")
    lines.append(f"{where}: {r['versions']} versions reference {r['referenced']} chunks; "
                 f"freed {r['chunks_freed']} chunks ({human_bytes(r['bytes_freed'])})"
                 + (f"; {r['restored']} set-aside chunks were in use again and were put back"
                    if r["restored"] else "")
                 + (f"; {r['fossils_made']} chunks set aside for the next run"
                    if not r["finished"] else ""))
    return lines


class _Gc:
    def __init__(self, catalog: Catalog, repo: Repository | None, warn: Warn,
                 report: GcReport, lock: locks_mod.Lock) -> None:
        self.catalog = catalog
        self.repo = repo
        self.warn = warn
        self.report = report
        self.lock = lock
        self.list_lag = catalog.storage.capabilities.list_lag

    @staticmethod
    def io(fn: Callable[[tuple[bytes, int]], int], items: Iterable[tuple[bytes, int]]
           ) -> Iterator[int]:
        return bounded_map(fn, items, IO_WORKERS, 4 * IO_WORKERS)

    def live_writers(self) -> set[str]:
        found = self.catalog.list_locks(locks_mod.WRITER, self.warn)
        return {i.session for i in self.catalog.clear_stale(found, self.warn)}

    def referenced(self) -> set[int]:
        """Chunks some version, or some backup still finishing, uses (as 8-byte keys)."""
        catalog = self.catalog
        # Writers first: a writer not live now has already written its version, if any, so
        # the version listing that follows sees it.
        writers = self.live_writers()
        versions = set(catalog.versions())
        have_refs = set(catalog.refs_listed())
        keep: set[int] = set()
        for vol, ver in sorted(have_refs):
            try:
                r = catalog.load_refs(vol, ver)
            except ObjectNotFound:
                continue  # pruned meanwhile
            except Corrupt as e:
                raise Corrupt(f"gc stopped before deleting anything: {e}") from None
            if (vol, ver) not in versions and not self._still_wanted(r, writers):
                catalog.delete_refs(vol, ver)
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
        # Gone, or no lock one can trust: its writer (if any) re-checks on waking.
        info = self.catalog.lock_info(locks_mod.WRITER, r.writer)
        if info is not None and info.is_alive():
            return True
        return self.catalog.has_manifest(r.volume, r.version)

    def _rebuild_refs(self, vol: str, ver: str) -> Iterator[int]:
        # A prune between the two listings removes the manifest, then the list: it is gone.
        if not self.catalog.has_manifest(vol, ver):
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
        self.catalog.put_refs(r)
        self.report.refs_rebuilt += 1
        return refs_codec.short_keys(r.ids)

    def condemn(self) -> Collection:
        c = Collection(id=dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S-")
                       + secrets.token_hex(4), started=dt.datetime.now(dt.UTC).isoformat())
        self.report.collection = c.id
        # Recorded before the first chunk moves: a writer starting from now on re-checks the
        # chunks it reuses.
        self.catalog.save_collection(c)
        keep = self.referenced()

        def garbage() -> Iterator[tuple[bytes, int]]:
            # Filtered here, not in the pool: most chunks are live, and a pool task costs
            # more than the test.
            for cid, size in self.catalog.chunks():
                self.report.chunks += 1
                if refs_codec.short_key(cid) not in keep:
                    yield cid, size

        def condemn_one(item: tuple[bytes, int]) -> int:
            self.lock.ensure("setting more chunks aside")
            return int(self.catalog.condemn(item[0]))

        c.fossils = sum(self.io(condemn_one, garbage()))
        self.report.fossils_made = c.fossils
        self.catalog.flush()
        time.sleep(self.list_lag)  # a writer lock put before now is listed now
        c.writers = sorted(self.live_writers())
        c.phase = CONDEMNED
        self.catalog.save_collection(c)
        return c

    def finalize(self, c: Collection) -> bool:
        """Free the collection's fossils if its writers are done; False if it must wait."""
        self.report.collection = c.id
        live = self.live_writers()
        if c.phase != CONDEMNED:  # condemning was interrupted: whoever runs now may rely on
            c.writers, c.phase = sorted(live), CONDEMNED  # the moved chunks
            self.catalog.save_collection(c)
        self.report.waiting_for = [w for w in c.writers if w in live]
        if self.report.waiting_for:
            return False
        time.sleep(self.list_lag)
        keep = self.referenced()

        def settle(item: tuple[bytes, int]) -> int:
            """Put back a fossil in use (-1), or delete it (its size)."""
            cid, size = item
            self.lock.ensure("deleting or putting back more fossils")
            if refs_codec.short_key(cid) in keep:
                self._put_back(cid)
                return -1
            self.catalog.delete_fossil(cid)
            return size

        for outcome in self.io(settle, self.catalog.fossils()):
            if outcome < 0:
                self.report.restored += 1
            else:
                self.report.chunks_freed += 1
                self.report.bytes_freed += outcome
        self.catalog.flush()
        self.catalog.finish_collection()
        self.report.finished = True
        return True

    def _put_back(self, cid: bytes) -> None:
        """Return a fossil in use to `chunks/`. A chunk stored under its name meanwhile wins
        only if it is proven to be the same object: the same bytes (writers seal a chunk
        deterministically, docs/format.md), or, with the key, a copy that opens and matches its
        id. Anything else is replaced by the fossil: a forged upload must never cost the
        original."""
        if self.catalog.chunk_size_of(cid) is not None:
            try:
                fossil = self.catalog.fossil_blob(cid)
                current = self.catalog.live_chunk_blob(cid)
            except ObjectNotFound:
                fossil = current = b""  # one of them moved meanwhile: settle it by the rename
            if fossil and (current == fossil or self._opens(cid, current)):
                self.catalog.delete_fossil(cid)
                return
        self.catalog.fossil_back(cid)

    def _opens(self, cid: bytes, blob: bytes) -> bool:
        if self.repo is None:
            return False
        try:
            self.repo.open_chunk(cid, blob)
        except Corrupt:
            return False
        return True


def run_gc(catalog: Catalog, *, repo: Repository | None = None,
           warn: Warn = lambda message: None) -> GcReport:
    """One gc run: finish a pending collection if its writers are done, then start and (with
    no backup running) finish a new one. `repo` (opened with the key) is only needed to
    rebuild missing reference lists."""
    report = GcReport()
    with catalog.exclusive(locks_mod.GC, "gc", warn) as lock:
        gc = _Gc(catalog, repo, warn, report, lock)
        pending = catalog.collection()
        if pending is not None and not gc.finalize(pending):
            return report
        gc.finalize(gc.condemn())
        report.temporaries_removed = catalog.remove_temporaries(TEMP_MAX_AGE)
        catalog.remove_old_tombstones()
    return report
