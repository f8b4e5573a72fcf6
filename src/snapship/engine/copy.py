"""Copying versions from one repository to another (`snapship copy`): offsite replication.

A copy is a writer at the destination, under the same protocol as a backup (docs/gc.md,
"Writers"): it registers a writer session before it looks at what the destination has,
asks the destination (`stat`) for every chunk a version uses, never trusting an earlier
version for it, stores what is missing, confirms its lease, and only then writes the version
through `Repository.save_manifest`, the one function that writes a version's objects
(reference list, manifest, and whatever else a version consists of). So the destination's gc
may run meanwhile: it waits for the copy's session or sees its chunks under `chunks/`.

Two modes, chosen by the keys:

- **raw**: both repositories have the same master key (`init --copy-key-from`), or are both
  unencrypted, at the same chunk size. Chunk ids are then the same in both, and a chunk
  object's envelope authenticates only its header and its id (docs/format.md), not the
  repository: the sealed bytes are valid at the destination as they are and travel without
  being decrypted or even decompressed.
- **re-encrypt**: anything else at the same chunk size. Every chunk the destination may
  lack is read and decrypted at the source, gets the destination's id, and is sealed with
  the destination's key. Chunk ids of a version already at both are paired index by index,
  so an incremental copy reads only the chunks it does not know.

Resumable: a version is skipped when the destination has it; chunks a killed copy stored are
found by `stat` and not sent again. Versions keep their ids (and so their order and
`latest`); protection and damage marks are the source's business and are not copied.
"""

from __future__ import annotations

import hmac
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from threading import Lock
from typing import Any

from snapship.engine.pipeline import bounded_map, default_workers, window_for
from snapship.engine.progress import NoProgress, Progress
from snapship.errors import NotFound, UsageError
from snapship.formats.manifest import Manifest
from snapship.repository.locks import LeaseLost
from snapship.repository.repo import Repository
from snapship.repository.session import WriterSession
from snapship.types import ZERO_ID, VersionRef

MAX_RENEWALS = 3
STAT_BATCH = 1000
RAW, REENCRYPT = "raw", "re-encrypt"


@dataclass
class CopyReport:
    source: str
    destination: str
    mode: str
    copied: list[str] = field(default_factory=list)
    """`volume@version` of each version written at the destination, in order."""
    present: list[str] = field(default_factory=list)
    """Versions the destination had already."""
    chunks_sent: int = 0
    bytes_sent: int = 0
    """Stored bytes of the chunks sent (what crossed to the destination's storage)."""
    chunks_present: int = 0
    """Distinct chunks the destination had already (per version copied)."""
    chunks_read: int = 0
    bytes_read: int = 0
    """Stored bytes read from the source."""
    duration: float = 0.0
    _lock: Lock = field(default_factory=Lock, repr=False)

    def count(self, *, sent: int = 0, present: int = 0, read: int = 0) -> None:
        with self._lock:
            if sent:
                self.chunks_sent += 1
                self.bytes_sent += sent
            self.chunks_present += present
            if read:
                self.chunks_read += 1
                self.bytes_read += read

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "destination": self.destination, "mode": self.mode,
                "copied": self.copied, "present": self.present,
                "chunks_sent": self.chunks_sent, "bytes_sent": self.bytes_sent,
                "chunks_present": self.chunks_present, "chunks_read": self.chunks_read,
                "bytes_read": self.bytes_read, "duration": round(self.duration, 3)}


def mode_for(src: Repository, dst: Repository) -> str:
    """RAW when a sealed chunk of `src` is a valid chunk of `dst` under the same id."""
    if src.chunk_size != dst.chunk_size:
        raise UsageError(f"the destination's chunk size ({dst.chunk_size}) is not the source's "
                         f"({src.chunk_size}): create it with `init --chunk-size "
                         f"{src.chunk_size}` (or `init --copy-key-from`)")
    if src.keys is None and dst.keys is None:
        return RAW
    if src.keys is not None and dst.keys is not None and \
            hmac.compare_digest(src.keys.master, dst.keys.master):
        return RAW
    return REENCRYPT


def copy_versions(src: Repository, dst: Repository, versions: Sequence[tuple[str, str]], *,
                  progress: Progress | None = None, warn: Callable[[str], None] | None = None,
                  workers: int = 0) -> CopyReport:
    """Copy `versions` (volume, version) of `src` that `dst` lacks, oldest first."""
    started = time.monotonic()
    report = CopyReport(src.storage.describe(), dst.storage.describe(), mode_for(src, dst))
    todo = []
    for vol, ver in versions:
        if dst.catalog.has_manifest(vol, ver):
            report.present.append(f"{vol}@{ver}")
        else:
            todo.append((vol, ver))
    if todo:
        nworkers = workers or max(default_workers(src.storage), default_workers(dst.storage))
        copier = _Copier(src, dst, report, nworkers, progress or NoProgress(), warn)
        what = todo[0][0] if len({v for v, _ in todo}) == 1 else f"{len(todo)} versions"
        # One writer session for the whole copy, taken before anything is asked of the
        # destination: a gc that starts later waits for it (docs/gc.md, "Writers").
        with dst.writer(f"copy {what}") as session:
            for vol, ver in todo:
                try:
                    m = src.load_manifest(vol, ver)
                except NotFound:
                    continue  # forgotten at the source meanwhile
                copier.copy(m, session)
                report.copied.append(f"{vol}@{ver}")
    report.duration = time.monotonic() - started
    return report


class _Copier:
    def __init__(self, src: Repository, dst: Repository, report: CopyReport, workers: int,
                 progress: Progress, warn: Callable[[str], None] | None) -> None:
        self.src, self.dst, self.report = src, dst, report
        self.raw = report.mode == RAW
        self.workers = workers
        self.window = window_for(workers, src.chunk_size)
        self.progress = progress
        self.warn = warn or (lambda _m: None)
        self.ids: dict[bytes, tuple[bytes, int]] = {}
        """Re-encrypt mode: source id -> (destination id, its stored size), as far as known."""
        self._paired: set[str] = set()

    # -- what the destination has -----------------------------------------------------------

    def _sizes_at_destination(self, cids: list[bytes]) -> dict[bytes, int | None]:
        out: dict[bytes, int | None] = {}
        for i in range(0, len(cids), STAT_BATCH):
            out.update(self.dst.catalog.chunk_sizes(cids[i : i + STAT_BATCH]))
        return out

    def _pair_with_destination(self, m: Manifest) -> None:
        """Learn source -> destination ids from the newest version of the volume that both
        have (same version id, so the same volume data, chunk for chunk)."""
        if self.raw or m.volume in self._paired:
            return
        self._paired.add(m.volume)
        at_dst = {v for _, v in self.dst.list_versions(m.volume)}
        for _vol, ver in reversed(self.src.list_versions(m.volume)):
            if ver not in at_dst:
                continue
            try:
                a, b = self.src.load_manifest(m.volume, ver), self.dst.load_manifest(m.volume,
                                                                                    ver)
            except NotFound:
                continue
            if a.count == b.count:
                for i in range(a.count):
                    if a.sizes[i]:
                        self.ids[a.chunk(i)] = (b.chunk(i), b.sizes[i])
            return

    # -- moving chunks ----------------------------------------------------------------------

    def _send_raw(self, cid: bytes, size: int) -> tuple[bytes, int]:
        blob = self.src.catalog.chunk_blob(cid)
        self.report.count(read=len(blob))
        stored = self.dst.put_chunk(cid, blob)
        self.report.count(sent=stored)
        return cid, stored

    def _reencrypt(self, cid: bytes, known: int | None) -> tuple[bytes, int]:
        """The chunk `cid` of the source at the destination: (its id there, stored size).
        `known`: the destination's stored size for the id already paired (None: unknown)."""
        blob = self.src.catalog.chunk_blob(cid)
        self.report.count(read=len(blob))
        data = self.src.open_chunk(cid, blob)
        new_id = self.dst.chunk_id(data)
        sealed = self.dst.seal_chunk(new_id, data)
        have = known if known is not None else self.dst.stat_chunk(new_id)
        if have == len(sealed):
            self.report.count(present=1)
            return new_id, have
        stored = self.dst.put_chunk(new_id, sealed)
        self.report.count(sent=stored)
        return new_id, stored

    def _bring(self, chunks: dict[bytes, int]) -> dict[bytes, tuple[bytes, int]]:
        """Make every source chunk in `chunks` (id -> stored size at the source) present at
        the destination; returns where each one is there. Asks the destination about each
        (batched); sends only what it lacks."""
        where: dict[bytes, tuple[bytes, int]] = {}
        todo: list[tuple[bytes, int | None]] = []
        if self.raw:
            have = self._sizes_at_destination(list(chunks))
            for cid, size in chunks.items():
                if have[cid] == size:
                    where[cid] = (cid, size)
                    self.report.count(present=1)
                    self.progress.advance(size)
                else:
                    todo.append((cid, size))
        else:
            paired = [c for c in chunks if c in self.ids]
            have = self._sizes_at_destination([self.ids[c][0] for c in paired])
            for cid in chunks:
                if cid in self.ids and have[self.ids[cid][0]] == self.ids[cid][1]:
                    where[cid] = self.ids[cid]
                    self.report.count(present=1)
                    self.progress.advance(chunks[cid])
                else:
                    todo.append((cid, None))

        def move(item: tuple[bytes, int | None]) -> tuple[bytes, tuple[bytes, int]]:
            cid, size = item
            if self.raw:
                assert size is not None
                return cid, self._send_raw(cid, size)
            return cid, self._reencrypt(cid, None)

        for cid, placed in bounded_map(move, todo, self.workers, self.window):
            where[cid] = placed
            self.ids[cid] = placed
            self.progress.advance(chunks[cid])
        return where

    # -- one version ------------------------------------------------------------------------

    def copy(self, m: Manifest, session: WriterSession) -> None:
        self._pair_with_destination(m)
        chunks = m.unique_chunks()
        self.progress.start(sum(chunks.values()))
        where = self._bring(chunks)
        self.progress.finish()
        out = self._translated(m, where)
        for attempt in range(MAX_RENEWALS + 1):
            if session.confirm():
                break
            if attempt == MAX_RENEWALS:
                raise LeaseLost(f"{session.command}: lost its lock {attempt + 1} times in a "
                                f"row ({session.lapse()}); {m.volume}@{m.version} was not "
                                "written")
            self._recheck(session, chunks, "before writing the version")
        self.dst.save_manifest(out, session)
        for attempt in range(MAX_RENEWALS + 1):
            if session.confirm():
                return
            if attempt == MAX_RENEWALS:
                break
            # Written, but gc may have taken the lease for abandoned meanwhile: make the
            # version whole under a new registration (as a backup does, docs/gc.md).
            self._recheck(session, chunks, f"of {m.volume}@{m.version}, written meanwhile")
            if not self.dst.has_refs(out):
                self.dst.put_refs(out, session)
            self.dst.storage.flush()
        raise LeaseLost(f"{session.command}: lost its lock {MAX_RENEWALS + 1} times in a row "
                        f"({session.lapse()}) after writing {m.volume}@{m.version}: run "
                        "`snapship verify` at the destination before relying on it")

    def _recheck(self, session: WriterSession, chunks: dict[bytes, int], when: str) -> None:
        self.warn(f"{session.command}: {session.lapse()}; registering again and re-checking "
                  f"every chunk {when}")
        session.renew()
        self._bring(chunks)

    def _translated(self, m: Manifest, where: dict[bytes, tuple[bytes, int]]) -> Manifest:
        if self.raw:
            return m
        ids = bytearray(m.ids)
        sizes = array(m.sizes.typecode, m.sizes)
        for i in range(m.count):
            cid = m.chunk(i)
            if cid != ZERO_ID:
                new_id, size = where[cid]
                ids[i * len(cid) : (i + 1) * len(cid)] = new_id
                sizes[i] = size
        return replace(m, ids=bytes(ids), sizes=sizes)


def versions_to_copy(src: Repository, refs: Sequence[tuple[str, str | None]]
                     ) -> Iterator[tuple[str, str]]:
    """(volume, version) for each `VOLUME` (all its versions) or `VOLUME@VERSION` asked for;
    every version of every volume when nothing is; oldest first within a volume."""
    if not refs:
        yield from src.list_versions()
        return
    seen: set[tuple[str, str]] = set()
    for vol, ver in refs:
        picked = src.list_versions(vol) if ver is None else [src.resolve(VersionRef(vol, ver))]
        if not picked:
            raise NotFound(f"volume {vol} has no versions in {src.storage.describe()}")
        for pair in picked:
            if pair not in seen:
                seen.add(pair)
                yield pair
