"""The backup engine: source (+ optional change set and base version) -> new manifest.

A full backup reads every chunk. An incremental one is given the byte ranges that changed since
`base` and reads only the chunks they touch, taking every other chunk id from `base`. Either
way each chunk read is zero-tested, hashed, looked up, and only if the repository lacks it,
compressed, encrypted and stored, on a worker pool with a bounded window. The manifest is
written last, so an interrupted backup leaves no version behind, only unreferenced chunks.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import operator
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from snapship.changes.ranges import touched_chunks
from snapship.devices import aligned_buffer
from snapship.engine.known_zero import ChunkSplit, KnownZero, zero_parts
from snapship.engine.pipeline import bounded_map, default_workers, window_for
from snapship.engine.progress import NoProgress, Progress
from snapship.errors import Corrupt, UsageError
from snapship.formats.manifest import Manifest, check_name, chunk_count
from snapship.repository.locks import LeaseLost
from snapship.repository.repo import Repository, new_version_id, now_iso
from snapship.repository.session import WriterSession
from snapship.types import ZERO_ID, ByteRange

ZERO, KNOWN, DUPLICATE, EXISTING, NEW = range(5)
MAX_RENEWALS = 2
"""How often a backup registers again after losing its lease before it gives up."""
Warn = Callable[[str], None]


@dataclass(frozen=True)
class _Result:
    index: int
    cid: bytes
    outcome: int
    raw: int
    stored: int | None
    """Size of the chunk's object; None for an in-run duplicate, whose first copy knows it."""


class BackupSource(Protocol):
    """What a backup reads: `snapship.devices.Source`, or a view such as an NBD overlay.

    A source that can also read into a caller's buffer from several threads at once (a
    pread of a file or a device: `snapship.devices.Source.read_into`) has a `read_into`
    method: the engine then reads on its workers, each into a page-aligned buffer of its own.
    Any other source is read on the caller's thread, one chunk at a time, in order.
    """

    @property
    def size(self) -> int: ...

    @property
    def path(self) -> str: ...

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`."""
        ...


@dataclass(frozen=True)
class BackupPlan:
    """What to read: all chunks (the base only used for dedup), or only those `changed`
    touches (on top of the base)."""

    changed: Sequence[ByteRange] | None = None
    change_source: str = "full read"
    """Where `changed` came from (a COW table, thin_delta, a file), recorded in the stats."""
    fallback: str | None = None
    """Why change tracking was not used, when it was wanted; recorded in the stats."""
    labels: dict[str, str] = field(default_factory=dict)
    """Labels the preparation adds to the version (e.g. the snapshot it read)."""
    known_zero: KnownZero | None = None
    """Ranges known to read as zeroes (holes, free space): not read, zeroed where read."""
    stats: dict[str, Any] = field(default_factory=dict)
    """Statistics of the preparation's own (the tracking snapshot's: `snapshot`), added to the
    version's."""


Prepared = tuple[BackupSource, BackupPlan]
Prepare = Callable[[Manifest | None], AbstractContextManager[Prepared]]
"""Given the base version (None if the volume has none), the source to read and the plan:
called once the backup is registered and its base loaded, so nothing can be read from the
base before gc knows about the backup (docs/gc.md, "Writers"). An incremental takes the base's
`ids` and `sizes` over as the new version's: a source that reads the base must hold its own
references to them, taken here."""


def chunks_to_read(plan: BackupPlan, base: Manifest | None, size: int, chunk_size: int
                   ) -> list[int] | None:
    """Indices an incremental run must read, or None for a full read."""
    if plan.changed is None:
        return None
    if base is None:
        raise UsageError("a change set needs an earlier version of the volume to apply to")
    if base.chunk_size != chunk_size:
        raise UsageError("the base version has a different chunk size")
    wanted = set(touched_chunks(plan.changed, chunk_size, size))
    if size != base.size:
        # Chunks past the shorter end, and a partial last chunk, are not in the base as-is.
        wanted.update(range(min(size, base.size) // chunk_size, chunk_count(size, chunk_size)))
    return sorted(wanted)


def run_backup(
    repo: Repository,
    source: BackupSource | Prepare,
    volume: str,
    *,
    changed: Sequence[ByteRange] | None = None,
    change_source: str = "full read",
    base_version: str | None = None,
    command: str | None = None,
    source_desc: str | None = None,
    labels: dict[str, str] | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
    warn: Warn | None = None,
) -> Manifest:
    """Back up a new version of `volume`: register the backup, load its base (the newest
    readable version of the volume, or `base_version`), then read `source` (with `changed`:
    only what those ranges touch) or, for a `Prepare`, what it gives for that base."""
    check_name("volume", volume)
    with repo.writer(command or f"backup {volume}") as session:
        base = (repo.load_manifest(volume, base_version) if base_version is not None
                else repo.latest_manifest(volume, warn))
        prepare: Prepare = source if callable(source) else _plain(source, changed, change_source)
        with prepare(base) as (src, plan):
            return _backup(repo, session, src, volume, base, plan, source_desc=source_desc,
                           labels={**(labels or {}), **plan.labels}, progress=progress,
                           workers=workers, warn=warn)


def _plain(source: BackupSource, changed: Sequence[ByteRange] | None, change_source: str
           ) -> Prepare:
    @contextlib.contextmanager
    def prepare(base: Manifest | None) -> Iterator[Prepared]:
        yield source, BackupPlan(changed, change_source)

    return prepare


def _backup(
    repo: Repository,
    session: WriterSession,
    source: BackupSource,
    volume: str,
    base: Manifest | None,
    plan: BackupPlan,
    *,
    source_desc: str | None,
    labels: dict[str, str],
    progress: Progress | None,
    workers: int | None,
    warn: Warn | None,
) -> Manifest:
    check_name("volume", volume)
    started = time.monotonic()
    cs = repo.chunk_size
    size = source.size
    count = chunk_count(size, cs)
    to_read = chunks_to_read(plan, base, size, cs)
    # A chunk equal to the base's chunk at the same index is known to exist: unchanged data
    # costs no storage lookup, and this needs no memory beyond the base manifest itself.
    base_ids = base.ids if base is not None else b""
    base_sizes = base.sizes if base is not None else array("I")
    if to_read is not None:
        assert base is not None
        shared = min(count, base.count)
        # An incremental compares only the chunks it reads with the base; the base's lists
        # themselves become the new version's, taken over (nothing reads `base.ids` or
        # `base.sizes` after this): a 4 TiB volume's 128 MiB of ids are not held twice.
        base_at = {i: (base_ids[i * 32 : i * 32 + 32], base_sizes[i])
                   for i in to_read if i < shared}
        if shared == count == base.count:
            initial, sizes = base.ids, base.sizes
            base.ids, base.sizes = b"", array("I")
        else:
            initial = base.ids[: shared * 32] + bytes(32 * (count - shared))
            sizes = base.sizes[:shared]
            sizes.frombytes(bytes(4 * (count - shared)))
        base_ids, base_sizes = b"", array("I")
        ids = _IdList(initial)
        del initial
    else:
        ids = _IdList(bytes(count * 32))
        sizes = array("I", bytes(4 * count))

    def in_base(index: int) -> tuple[bytes, int]:
        """The base's id and stored size at `index` (an empty id where it has none)."""
        if to_read is not None:
            return base_at.get(index, (b"", 0))
        return base_ids[index * 32 : index * 32 + 32], (
            base_sizes[index] if index < len(base_sizes) else 0)
    indices = range(count) if to_read is None else to_read
    kz = plan.known_zero
    # Chunks wholly known to be zero (holes, free space) are zero in `ids` and `sizes`
    # already: they are left out before the pipeline, whole runs at a time.
    split = (kz.split(indices, cs, size) if kz is not None
             else ChunkSplit(indices, len(indices), [], 0))
    if to_read is not None:  # a full read's ids and sizes are all zero to begin with
        for run in split.left_out:
            ids[run.start * 32 : run.stop * 32] = bytes(32 * len(run))
            for i in run:
                sizes[i] = 0
    progress = progress or NoProgress()
    progress.start(sum(min(cs, size - i * cs) for i in indices) if to_read is not None else size)
    progress.advance(split.left_out_bytes)

    # Chunks a verify found damaged are stored again when met, never trusted.
    damaged = {bytes.fromhex(c) for mark in repo.catalog.damaged().values()
               for c in mark.chunks}
    # A bytearray: comparing one with a memoryview (a chunk read into a worker's buffer) is
    # a memcmp, where bytes == memoryview compares byte by byte, a thousand times slower.
    zero_full = bytearray(cs)
    claimed: set[bytes] = set()
    stored_sizes: dict[bytes, int] = {}
    lock = threading.Lock()

    zeroed = 0  # bytes zeroed in chunks read

    read_into: Callable[[mmap.mmap, int, int], memoryview] | None = getattr(
        source, "read_into", None)
    buffers = threading.local()

    def read_chunk(index: int) -> bytes | memoryview:
        """The chunk's data, with what is known to be zero in it zeroed: on a worker, in that
        worker's buffer, valid until its next read (nothing keeps it past `process`)."""
        nonlocal zeroed
        off = index * cs
        n = min(cs, size - off)
        parts = kz.cover(off, off + n) if kz is not None else []
        if read_into is not None:
            buffer = getattr(buffers, "buffer", None)
            if buffer is None:
                buffer = buffers.buffer = aligned_buffer(cs)
            data: bytes | memoryview = read_into(buffer, off, n)
        else:
            data = source.read(off, n)
        data, z = zero_parts(data, off, parts)
        if z:
            with lock:
                zeroed += z
        return data

    def reads() -> Iterator[tuple[int, bytes | memoryview]]:
        """(index, data) read on this thread, in order: for a source that cannot be read
        from several threads at once."""
        for i in split.read:
            yield i, read_chunk(i)

    def process(item: tuple[int, bytes | memoryview] | int) -> _Result:
        # A bare index: the worker reads the chunk itself (pread releases the GIL), so reads
        # run on every core instead of one at a time on the caller's thread (docs/perf.md).
        index, data = (item, read_chunk(item)) if isinstance(item, int) else item
        n = len(data)
        if operator.eq(zero_full if n == cs else bytearray(n), data):
            return _Result(index, ZERO_ID, ZERO, n, 0)
        cid = repo.chunk_id(data)
        base_id, base_size = in_base(index)
        if base_id == cid and cid not in damaged:
            return _Result(index, cid, KNOWN, n, base_size)
        with lock:
            if cid in claimed:
                return _Result(index, cid, DUPLICATE, n, None)
            claimed.add(cid)
        existing = repo.stat_chunk(cid)
        blob = repo.seal_chunk(cid, data)
        # The sealed size is deterministic: an object of another size under this name is
        # damaged (or left by a crash of another tool) and is replaced, never trusted.
        if existing == len(blob) and cid not in damaged:
            stored_sizes[cid] = existing
            return _Result(index, cid, EXISTING, n, existing)
        stored = repo.put_chunk(cid, blob)
        stored_sizes[cid] = stored
        return _Result(index, cid, NEW, n, stored)

    nworkers = workers or default_workers(repo.storage, blocking=True)
    counts = [0] * 5
    bytes_read = new_raw = new_stored = 0
    duplicates: list[_Result] = []
    known: list[_Result] = []
    items: Iterable[tuple[int, bytes | memoryview] | int] = (
        split.read if read_into is not None else reads())
    for r in bounded_map(process, items, nworkers, window_for(nworkers, cs)):
        ids[r.index * 32 : r.index * 32 + 32] = r.cid
        counts[r.outcome] += 1
        bytes_read += r.raw
        if r.stored is None:
            duplicates.append(r)
        else:
            sizes[r.index] = r.stored
        if r.outcome == KNOWN:
            known.append(r)
        if r.outcome == NEW:
            new_raw += r.raw
            new_stored += r.stored or 0
        progress.advance(r.raw)
    progress.finish()
    for r in duplicates:  # every worker has finished: the first copy's size is known now
        sizes[r.index] = stored_sizes[r.cid]
    if session.collection_at_start is not None:
        # A collection had set chunks aside before this backup began, so a chunk taken from
        # the base without asking storage may be a fossil by now (docs/gc.md, "Writers").
        # A full read stored or zeroed every chunk itself; an incremental reuses the rest.
        read = set(indices) if to_read is not None else None
        reused = [] if read is None else [i for i in range(count)
                                          if i not in read and sizes[i]]
        reused += [r.index for r in known]
        restored = _restore_missing(repo, source, reused, ids, sizes, nworkers, kz)
        counts[NEW] += restored

    # The new id must sort after every existing version of the volume, so `latest` is this one.
    existing = [v for _, v in repo.list_versions(volume)]
    version = new_version_id(max(existing) if existing else None)

    def manifest() -> Manifest:
        return Manifest(
            volume=volume,
            version=version,
            size=size,
            chunk_size=cs,
            created=now_iso(),
            source=source_desc or source.path,
            parent=base.version if base is not None else None,
            ids=ids.value(),
            sizes=sizes,
            labels=labels,
            stats={
                "mode": "full" if to_read is None else "incremental",
                "change_source": plan.change_source,
                **({"fallback": plan.fallback} if plan.fallback else {}),
                "bytes_read": bytes_read,
                "chunks_read": split.count,
                "chunks_zero_read": counts[ZERO],
                "chunks_known": counts[KNOWN] + counts[DUPLICATE],
                "chunks_existing": counts[EXISTING],
                "chunks_new": counts[NEW],
                "bytes_new": new_raw,
                "bytes_new_stored": new_stored,
                "workers": nworkers,
                "duration": round(time.monotonic() - started, 3),
                **({"free_space": {**kz.record, "chunks_skipped": split.skipped,
                                   "bytes_skipped": split.left_out_bytes,
                                   "bytes_zeroed": zeroed}}
                   if kz is not None else {}),
                **plan.stats,
            },
        )

    def recheck(when: str) -> None:
        """After a lost lease: register again, then check every chunk the version uses and
        store again from the source any that storage no longer has (docs/gc.md, "Leases")."""
        (warn or _ignore)(f"{session.command}: {session.lapse()}; registering again and "
                          f"re-checking every chunk {when}")
        session.renew()
        used = [i for i in range(count) if sizes[i]]
        counts[NEW] += _restore_missing(repo, source, used, ids, sizes, nworkers, kz)

    for attempt in range(MAX_RENEWALS + 1):
        if session.confirm():
            break
        if attempt == MAX_RENEWALS:
            raise LeaseLost(f"{session.command}: lost its lock {attempt + 1} times in a row "
                            f"({session.lapse()}); no version was written")
        recheck("before writing the version")
    m = manifest()
    repo.save_manifest(m, session)
    for attempt in range(MAX_RENEWALS + 1):
        if session.confirm():
            return m
        if attempt == MAX_RENEWALS:
            break
        # The lease lapsed while the version was being written: it is visible, and gc may
        # have removed what it relies on meanwhile. Make it whole under a new registration.
        written = ids.value()
        recheck(f"of {volume}@{version}, which was written meanwhile")
        if ids.value() != written:
            raise Corrupt(f"{volume}@{version} may be incomplete: a chunk gc removed while "
                          f"this backup was paused no longer matches the source {m.source}; "
                          "run `snapship verify`, and back up again")
        if not repo.has_refs(m):  # gc drops a reference list whose writer it took for gone
            repo.put_refs(m, session)
        repo.storage.flush()
    raise LeaseLost(f"{session.command}: lost its lock {MAX_RENEWALS + 1} times in a row "
                    f"({session.lapse()}) after writing {volume}@{version}: run "
                    "`snapship verify` before relying on it")


def _ignore(message: str) -> None:
    pass


class _IdList:
    """A version's chunk ids, assembled in place. `value` hands them over as `bytes` without
    a copy (`BytesIO.getvalue` returns its own buffer while nothing else holds it; a later
    write copies first): a 4 TiB volume's 128 MiB of ids are held once, not as a bytearray
    and then again as bytes."""

    def __init__(self, initial: bytes) -> None:
        # Given the only reference to `initial`, BytesIO writes into it in place.
        self._buf = io.BytesIO(initial)

    def __getitem__(self, at: slice) -> bytes:
        self._buf.seek(at.start)
        return self._buf.read(at.stop - at.start)

    def __setitem__(self, at: slice, cid: bytes) -> None:
        if len(cid) != at.stop - at.start:
            raise ValueError("an id list entry must keep its length")
        self._buf.seek(at.start)
        self._buf.write(cid)

    def value(self) -> bytes:
        return self._buf.getvalue()


def _restore_missing(repo: Repository, source: BackupSource, indices: Sequence[int], ids: _IdList,
                     sizes: array[int], nworkers: int, kz: KnownZero | None = None) -> int:
    """Re-store, from the source, reused chunks that storage no longer has under their name;
    returns how many. The source still holds that data: those chunks are unchanged."""
    cs = repo.chunk_size
    by_id: dict[bytes, list[int]] = {}
    for i in indices:
        by_id.setdefault(bytes(ids[i * 32 : i * 32 + 32]), []).append(i)

    def check(item: tuple[bytes, list[int]]) -> list[tuple[int, bytes, int]]:
        cid, where = item
        if repo.stat_chunk(cid) == sizes[where[0]]:
            return []
        out = []
        for i in where:
            off, n = i * cs, min(cs, source.size - i * cs)
            data, _ = zero_parts(source.read(off, n), off, kz.cover(off, off + n) if kz else [])
            new_id = repo.chunk_id(data)
            blob = repo.seal_chunk(new_id, data)
            stored = repo.put_chunk(new_id, blob)
            out.append((i, new_id, stored))
            if new_id == cid:  # the usual case: one copy serves every index that uses it
                out += [(j, cid, stored) for j in where if j != i]
                break
        return out

    restored = 0
    for result in bounded_map(check, by_id.items(), nworkers, window_for(nworkers, cs)):
        for i, new_id, stored in result:
            ids[i * 32 : i * 32 + 32] = new_id
            sizes[i] = stored
        restored += bool(result)
    return restored
