"""gc (engine/gc.py) against the protocol of docs/gc.md, one interleaving at a time.

Each test drives a backup and a gc in one process, in the exact order that would be a race
between two processes, and checks that every version still restores from `chunks/` (or from
a fossil while its collection waits) and that garbage really goes.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapship.devices import Source
from snapship.engine.backup import run_backup
from snapship.engine.gc import run_gc
from snapship.engine.prune import forget_versions
from snapship.engine.restore import run_restore
from snapship.engine.verify import run_verify
from snapship.errors import Busy, Corrupt
from snapship.formats.constants import ENCRYPTION_AES_GCM
from snapship.formats.manifest import Manifest
from snapship.repository import collection, layout, locks
from snapship.repository.catalog import Catalog
from snapship.repository.layout import COLLECTION_KEY, chunk_key
from snapship.repository.repo import Repository
from snapship.storage.local import LocalStorage
from snapship.types import ByteRange
from tests.conftest import CHUNK, make_repo
from tests.forge import staged

NCHUNKS = 32


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return make_repo(LocalStorage(str(tmp_path / "repo")), ENCRYPTION_AES_GCM)


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def backup(repo: Repository, path: Path, volume: str = "disk", **kw: object) -> str:
    with Source(str(path)) as src:
        return run_backup(repo, src, volume, workers=2, **kw).version  # type: ignore[arg-type]


def restores_to(repo: Repository, volume: str, version: str, expected: bytes, tmp: Path) -> bool:
    out = tmp / f"restore-{version}.img"
    run_restore(repo, repo.load_manifest(volume, version), str(out))
    return out.read_bytes() == expected


def writer(repo: Repository) -> str:
    """The session of the one backup registered now."""
    (lock,) = repo.catalog.list_locks("writer")
    return lock.session


def objects(repo: Repository, prefix: str) -> set[str]:
    return {k for k, _ in repo.storage.list(prefix)}


def test_gc_frees_exactly_what_no_version_uses(repo: Repository, tmp_path: Path) -> None:
    rng = random.Random(1)
    img = tmp_path / "disk.img"
    first = rng.randbytes(NCHUNKS * CHUNK)
    write(img, first)
    v1 = backup(repo, img)
    second = bytearray(first)
    second[: 8 * CHUNK] = rng.randbytes(8 * CHUNK)
    write(img, bytes(second))
    v2 = backup(repo, img)
    before = objects(repo, "chunks/")
    only_v1 = {chunk_key(repo.chunk_id(first[i * CHUNK : (i + 1) * CHUNK])) for i in range(8)}
    freed_bytes = sum(repo.storage.stat(k) or 0 for k in only_v1)

    assert run_gc(repo.catalog).chunks_freed == 0  # nothing to free yet
    assert objects(repo, "chunks/") == before
    forget_versions(repo.catalog, [("disk", v1)])
    r = run_gc(repo.catalog)
    assert (r.chunks_freed, r.bytes_freed, r.finished) == (8, freed_bytes, True)
    assert objects(repo, "chunks/") == before - only_v1
    assert objects(repo, "fossils/") == set() and repo.storage.stat(COLLECTION_KEY) is None
    assert restores_to(repo, "disk", v2, bytes(second), tmp_path)
    assert run_verify(repo.catalog, repo, deep=True).ok


def test_gc_waits_for_a_backup_that_relies_on_condemned_chunks(
    repo: Repository, tmp_path: Path
) -> None:
    """The backup loaded its base, then the base was forgotten and gc set its chunks aside:
    the collection must wait for the backup and then put the chunks back."""
    rng = random.Random(2)
    img = tmp_path / "disk.img"
    data = bytearray(rng.randbytes(NCHUNKS * CHUNK))
    write(img, bytes(data))
    v1 = backup(repo, img)
    data[:10] = b"x" * 10
    write(img, bytes(data))

    def before() -> None:
        forget_versions(repo.catalog, [("disk", v1)], allow_newest=True)
        r = run_gc(repo.catalog)
        assert r.waiting_for == [writer(repo)] and not r.finished
        assert r.fossils_made == NCHUNKS and objects(repo, "chunks/") == set()

    def after() -> None:
        # Written while the collection waits: it reads its chunks from the fossils.
        (vol, v2), = repo.list_versions("disk")
        assert restores_to(repo, vol, v2, bytes(data), tmp_path)
        assert run_gc(repo.catalog).waiting_for == [writer(repo)]  # still alive

    with Source(str(img)) as src:
        v2 = run_backup(repo, staged(src, before=before, after=after,
                                     changed=[ByteRange(0, 10)]), "disk", workers=2).version
    r = run_gc(repo.catalog)
    assert r.finished and r.restored == NCHUNKS - 1 and r.chunks_freed == 1
    assert objects(repo, "fossils/") == set()
    assert restores_to(repo, "disk", v2, bytes(data), tmp_path)
    assert run_verify(repo.catalog, repo, deep=True).ok


def test_backup_starting_while_a_collection_waits_stores_fossils_again(
    repo: Repository, tmp_path: Path
) -> None:
    """A base written beside a waiting collection uses fossils; a backup that starts from it
    while the collection is pending re-checks and re-stores them from its source."""
    rng = random.Random(3)
    img = tmp_path / "disk.img"
    data = bytearray(rng.randbytes(NCHUNKS * CHUNK))
    write(img, bytes(data))
    v1 = backup(repo, img)
    img3 = tmp_path / "disk3.img"
    data[5 * CHUNK : 5 * CHUNK + 3] = b"abc"
    write(img3, bytes(data))
    done: list[Manifest] = []

    def before() -> None:  # the first backup, A, keeps the collection waiting
        forget_versions(repo.catalog, [("disk", v1)], allow_newest=True)
        assert not run_gc(repo.catalog).finished

    def after() -> None:  # A wrote v2 over fossils; B starts on top of it, A still running
        assert repo.catalog.collection() is not None
        with Source(str(img3)) as src3:
            m3 = run_backup(repo, src3, "disk", workers=2,
                            changed=[ByteRange(5 * CHUNK, 5 * CHUNK + 3)])
        # Every chunk v3 uses is under chunks/ again, whatever gc does with the fossils.
        assert m3.stats["chunks_new"] == NCHUNKS
        for cid in m3.unique_chunks():
            assert repo.storage.stat(chunk_key(cid)) is not None
        done.append(m3)

    with Source(str(img)) as src:
        run_backup(repo, staged(src, before=before, after=after, changed=[]), "disk")
    (m3,) = done
    r = run_gc(repo.catalog)
    assert r.finished and objects(repo, "fossils/") == set()
    assert restores_to(repo, "disk", m3.version, bytes(data), tmp_path)
    assert run_verify(repo.catalog, repo, deep=True).ok


def test_chunk_found_by_stat_while_condemning_is_put_back(
    repo: Repository, tmp_path: Path
) -> None:
    """Another volume's backup finds an unreferenced chunk by stat just before gc moves it."""
    rng = random.Random(4)
    shared = rng.randbytes(4 * CHUNK)
    img = tmp_path / "a.img"
    write(img, shared)
    va = backup(repo, img, "a")
    forget_versions(repo.catalog, [("a", va)], allow_newest=True)
    imgb = tmp_path / "b.img"
    write(imgb, shared)

    def after() -> None:  # gc while b is still registered: it sees b's refs, keeps all
        assert run_gc(repo.catalog).chunks_freed == 0

    with Source(str(imgb)) as src:  # finds every chunk existing, stores nothing
        mb = run_backup(repo, staged(src, after=after), "b", workers=2)
    assert mb.stats["chunks_existing"] == 4
    assert restores_to(repo, "b", mb.version, shared, tmp_path)


def test_reference_list_of_a_dead_writer_is_dropped(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    data = random.Random(5).randbytes(4 * CHUNK)
    write(img, data)
    v1 = backup(repo, img)
    refs = repo.catalog.load_refs("disk", v1)
    # As left by a backup killed between its reference list and its manifest:
    repo.storage.delete(layout.manifest_key("disk", v1))
    r = run_gc(repo.catalog)
    assert r.refs_dropped == 1 and r.chunks_freed == refs.count
    assert objects(repo, "refs/") == set() and objects(repo, "chunks/") == set()


def test_missing_reference_list_stops_keyless_gc_and_is_rebuilt_with_the_key(
    repo: Repository, tmp_path: Path
) -> None:
    img = tmp_path / "disk.img"
    data = random.Random(6).randbytes(4 * CHUNK)
    write(img, data)
    v1 = backup(repo, img)
    repo.storage.delete(layout.refs_key("disk", v1))  # as in a repository of snapship 0.1
    repo.storage.put("chunks/00/" + "00" * 32, b"garbage")
    before = objects(repo, "chunks/")
    with pytest.raises(Corrupt, match=r"no reference list.*passphrase"):
        run_gc(repo.catalog)
    assert objects(repo, "chunks/") == before and objects(repo, "fossils/") == set()
    r = run_gc(repo.catalog, repo=repo)
    assert r.refs_rebuilt == 1 and r.chunks_freed == 1
    assert repo.catalog.load_refs("disk", v1).count == 4
    assert restores_to(repo, "disk", v1, data, tmp_path)


def test_damaged_reference_list_stops_gc(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    write(img, random.Random(7).randbytes(4 * CHUNK))
    v1 = backup(repo, img)
    key = layout.refs_key("disk", v1)
    blob = bytearray(repo.storage.get(key))
    blob[40] ^= 1
    repo.storage.put(key, bytes(blob))
    with pytest.raises(Corrupt, match="gc stopped before deleting anything"):
        run_gc(repo.catalog)
    assert len(objects(repo, "chunks/")) == 4


def _fake_lock(repo: Repository, kind: str, pid: int, machine: str | None = None,
               heartbeat: float | None = None) -> str:
    session = f"20260101T000000-{pid:012x}"
    key = layout.lock_key(kind, session)
    repo.storage.put(key, json.dumps({
        "v": 1, "kind": kind, "session": session, "machine": machine or locks.MACHINE,
        "pid": pid, "pid_start": "1", "started": "2026-01-01T00:00:00+00:00",
        "heartbeat": heartbeat if heartbeat is not None else 0.0, "command": f"{kind} test",
    }).encode())
    return key


def test_stale_locks_are_cleared_with_a_message(repo: Repository) -> None:
    dead = _fake_lock(repo, locks.GC, 4_000_000)  # no such pid on this machine
    remote = _fake_lock(repo, locks.WRITER, 7, machine="elsewhere/boot", heartbeat=0.0)
    messages: list[str] = []
    run_gc(repo.catalog, warn=messages.append)
    assert repo.storage.stat(dead) is None and repo.storage.stat(remote) is None
    assert any("stale gc lock of gc test (pid 4000000" in m and "gone" in m for m in messages)
    assert any("stale writer lock" in m for m in messages)


def test_a_live_gc_makes_a_second_one_busy(repo: Repository) -> None:
    with (locks.Lock(repo.storage, locks.GC, "gc elsewhere").acquire(),
          pytest.raises(Busy, match="gc is already running: gc elsewhere")):
        run_gc(repo.catalog)
    assert run_gc(repo.catalog).finished


def test_a_remote_writer_with_a_fresh_heartbeat_is_waited_for(repo: Repository) -> None:
    key = _fake_lock(repo, locks.WRITER, 7, machine="elsewhere/boot", heartbeat=time.time())
    repo.storage.put("chunks/00/" + "00" * 32, b"garbage")
    r = run_gc(repo.catalog)
    assert not r.finished and r.waiting_for == [key.split("writer-", 1)[1]]
    assert objects(repo, "fossils/") == {"fossils/00/" + "00" * 32}
    repo.storage.delete(key)
    assert run_gc(repo.catalog).chunks_freed == 1


def test_an_interrupted_condemn_step_is_finished_by_the_next_run(
    repo: Repository, tmp_path: Path
) -> None:
    img = tmp_path / "disk.img"
    data = random.Random(8).randbytes(8 * CHUNK)
    write(img, data)
    v1 = backup(repo, img)
    garbage = ["chunks/00/" + "00" * 32, "chunks/ff/" + "ff" * 32]
    for k in garbage:
        repo.storage.put(k, b"garbage")
    # As left by a gc killed mid-way: state stored, one live chunk and one garbage chunk moved.
    collection.save(repo.storage, collection.Collection("killed", "2026-01-01T00:00:00"))
    live = sorted(objects(repo, "chunks/") - set(garbage))[0]
    repo.storage.rename(live, live.replace("chunks/", "fossils/", 1))
    repo.storage.rename(garbage[0], garbage[0].replace("chunks/", "fossils/", 1))
    assert restores_to(repo, "disk", v1, data, tmp_path)  # readers fall back to the fossil
    r = run_gc(repo.catalog)
    assert r.finished and r.chunks_freed == 2 and r.restored == 1
    assert objects(repo, "fossils/") == set() and live in objects(repo, "chunks/")
    assert restores_to(repo, "disk", v1, data, tmp_path)


def test_partial_files_older_than_a_day_are_removed(repo: Repository) -> None:
    assert isinstance(repo.storage, LocalStorage)
    root = Path(repo.storage.root)
    (root / "chunks" / "ab").mkdir(parents=True)
    old, new = root / "chunks/ab/.tmp-old", root / "chunks/ab/.tmp-new"
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    os.utime(old, (0, 0))
    assert run_gc(repo.catalog).temporaries_removed == 1
    assert not old.exists() and new.exists()


class _PruneBetweenListings(LocalStorage):
    """Forgets a version (as a concurrent prune would) right when gc lists reference lists,
    after it has listed the versions."""

    victim: tuple[str, str] | None = None

    def list(self, prefix: str, after: str | None = None) -> Iterator[tuple[str, int]]:
        if prefix == "refs/" and self.victim is not None:
            Catalog(self).delete_version(*self.victim)
            self.victim = None
        return super().list(prefix, after)


def test_a_prune_between_gcs_listings_is_not_mistaken_for_damage(
    repo: Repository, tmp_path: Path
) -> None:
    img = tmp_path / "disk.img"
    rng = random.Random(9)
    write(img, rng.randbytes(4 * CHUNK))
    v1 = backup(repo, img)
    write(img, rng.randbytes(4 * CHUNK))
    v2 = backup(repo, img)
    racing = _PruneBetweenListings(repo.storage.root)  # type: ignore[attr-defined]
    racing.victim = ("disk", v1)
    r = run_gc(Catalog(racing))  # keyless: a missing list would stop it
    assert r.finished and r.chunks_freed == 4
    assert repo.list_versions() == [("disk", v2)]


def _condemned_version(repo: Repository, tmp_path: Path) -> tuple[str, bytes, bytes]:
    """A version whose chunks a waiting collection has set aside (its writer was live when gc
    condemned them): (version, image, id of one of its chunks)."""
    img = tmp_path / "disk.img"
    data = random.Random(21).randbytes(4 * CHUNK)
    write(img, data)
    def before() -> None:
        with Source(str(img)) as first:  # its chunks stored, nothing referencing them yet
            for i in range(4):
                piece = first.read(i * CHUNK, CHUNK)
                cid = repo.chunk_id(piece)
                repo.put_chunk(cid, repo.seal_chunk(cid, piece))
        assert not run_gc(repo.catalog).finished  # sets them aside, waits for the writer
        assert len(objects(repo, "fossils/")) == 4

    with Source(str(img)) as src:
        version = run_backup(repo, staged(src, before=before), "disk", workers=2).version
    return version, data, repo.chunk_id(data[:CHUNK])


def test_a_forged_copy_beside_a_fossil_never_costs_the_original(repo: Repository,
                                                                tmp_path: Path) -> None:
    """Issue 10 item 3, without a server: bytes of the right size under a fossil's chunk name
    are not proof that they are the chunk. gc (without the key) puts the fossil back over
    them; nothing is lost."""
    version, data, cid = _condemned_version(repo, tmp_path)
    key = chunk_key(cid)
    original = repo.storage.get("fossils/" + key[len("chunks/") :])
    assert repo.storage.get(key) == original  # stored again by the backup: the same bytes
    forged = original[:8] + os.urandom(len(original) - 8)
    repo.storage.put(key, forged)
    r = run_gc(repo.catalog)
    assert r.finished and r.restored >= 1, r
    assert repo.storage.get(key) == original
    assert restores_to(repo, "disk", version, data, tmp_path)
    assert run_verify(repo.catalog, repo, deep=True).ok


def test_the_same_bytes_beside_a_fossil_let_gc_drop_the_fossil(repo: Repository,
                                                              tmp_path: Path) -> None:
    version, data, cid = _condemned_version(repo, tmp_path)
    fossil = "fossils/" + chunk_key(cid)[len("chunks/") :]
    assert repo.storage.get(chunk_key(cid)) == repo.storage.get(fossil)  # sealed alike
    assert run_gc(repo.catalog).finished
    assert objects(repo, "fossils/") == set()
    assert restores_to(repo, "disk", version, data, tmp_path)


def test_chunks_are_sealed_deterministically(repo: Repository) -> None:
    """The same chunk sealed twice is the same object: what lets a server (or a keyless gc)
    tell a genuine second copy from a forged one by its bytes."""
    data = random.Random(22).randbytes(CHUNK)
    cid = repo.chunk_id(data)
    assert repo.seal_chunk(cid, data) == repo.seal_chunk(cid, data)
    other = bytearray(data)
    other[0] ^= 1
    a, b = repo.seal_chunk(cid, data), repo.seal_chunk(repo.chunk_id(bytes(other)), bytes(other))
    assert a[8:20] != b[8:20]  # another chunk, another nonce
    assert repo.open_chunk(cid, bytes(a)) == data


def test_unreadable_locks_are_ignored_and_cleared(repo: Repository, tmp_path: Path) -> None:
    """Issue 10 item 6, readers: one junk object in locks/ must not stop gc, `locks` or a
    backup; gc removes it (leaving a tombstone) and says so."""
    junk = {"locks/writer-20260101T000000-00000000000a": b"not json",
            "locks/writer-20260101T000000-00000000000b": b"[" * 100_000,
            "locks/gc-20260101T000000-00000000000c": b'{"v": 1}'}
    for key, data in junk.items():
        repo.storage.put(key, data)
    img = tmp_path / "disk.img"
    data = random.Random(23).randbytes(4 * CHUNK)
    write(img, data)
    v1 = backup(repo, img)
    messages: list[str] = []
    assert run_gc(repo.catalog, warn=messages.append).finished
    assert all(repo.storage.stat(k) is None for k in junk)
    assert sum("not a lock this snapship can trust" in m for m in messages) == 3, messages
    assert {k for k, _ in repo.storage.list("locks/stale/")} == {
        "locks/stale/" + k[len("locks/"):] for k in junk}
    assert restores_to(repo, "disk", v1, data, tmp_path)


def test_a_damaged_newest_version_does_not_stop_later_backups(repo: Repository,
                                                             tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    data = bytearray(random.Random(24).randbytes(4 * CHUNK))
    write(img, bytes(data))
    v1 = backup(repo, img)
    data[:10] = b"x" * 10
    write(img, bytes(data))
    v2 = backup(repo, img)
    key = layout.manifest_key("disk", v2)
    blob = bytearray(repo.storage.get(key))
    blob[-1] ^= 1
    repo.storage.put(key, bytes(blob))
    messages: list[str] = []
    base = repo.latest_manifest("disk", messages.append)
    assert base is not None and base.version == v1
    assert len(messages) == 1 and v2 in messages[0], messages
    with pytest.raises(Corrupt):
        repo.latest_manifest("disk")
    with Source(str(img)) as src:
        m = run_backup(repo, src, "disk", workers=2, warn=messages.append)
    assert m.version > v2 and m.parent == v1 and len(messages) == 2
    assert restores_to(repo, "disk", m.version, bytes(data), tmp_path)
