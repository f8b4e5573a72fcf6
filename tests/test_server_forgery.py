"""Issue 10, items 3 and 6: what a stolen `backup` token must not be able to do.

Each attack is made as described, through a real server: (3) while a collection waits for a
backup, the token lists `fossils/` and puts forged bytes of the same size under each fossil's
chunk name (new keys, which create-only alone would allow), hoping gc then trusts them and
drops the originals; (6) it deletes or replaces another client's writer lock, plants a lock
whose heartbeat lies in the far future, and puts junk locks, reference lists and manifests
that would make gc, `locks`, backups and restores fail. Every version must still restore
byte for byte, and what was forged must be refused or isolated.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snapship.errors import PermissionDenied, SetAside, StorageError
from snapship.formats import envelope
from snapship.formats.constants import KIND_REFS
from tests.clihelp import (
    CHUNK,
    CLI,
    Result,
    cli_env,
    describe,
    image_bytes,
    new_chunks,
    sha256_file,
    wait_for,
    write_image,
)
from tests.forge import lock_object, prepare_then
from tests.serverproc import (
    ServerProc,
    create_repo_fast_kdf,
    http_storage,
    run_cli_env,
    running_server,
    token_files,
)

Served = tuple[ServerProc, dict[str, str], dict[str, Path]]
STALE = 3.0


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    # The server's own gc judges locks with the shortened limits too.
    with running_server(tmp_path / "srv",
                        env={"SNAPSHIP_TEST_STALE_AFTER": str(STALE)}) as (server, tokens):
        yield server, tokens, token_files(tmp_path / "tokens", tokens)


def cli(*args: str | Path, token: Path) -> Result:
    return run_cli_env(*args, "--token-file", token,
                       env={"SNAPSHIP_TEST_STALE_AFTER": str(STALE)})


def ok(r: Result) -> Result:
    assert r.returncode == 0, describe(r)
    return r


def start_backup(server: ServerProc, files: dict[str, Path], repo: str, img: Path
                 ) -> subprocess.Popen[str]:
    env = {**cli_env(), "SNAPSHIP_TEST_STALE_AFTER": str(STALE)}
    return subprocess.Popen([*CLI, "backup", "--repo", server.url(repo), str(img), "--volume",
                             "disk", "--json", "--token-file", str(files["db1-backup"])],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def paused_backup(server: ServerProc, files: dict[str, Path], repo: str, img: Path,
                  after: int) -> subprocess.Popen[str]:
    """A backup stopped (SIGSTOP) once it has stored `after` new chunks."""
    before = {p.name for p in (server.root / repo / "chunks").glob("*/*")}
    proc = start_backup(server, files, repo, img)
    wait_for(lambda: proc.poll() is not None
             or new_chunks(server.root / repo, before) >= after, "the backup to make progress")
    assert proc.poll() is None, "the backup finished before it could be paused"
    proc.send_signal(signal.SIGSTOP)
    return proc


def backup(server: ServerProc, files: dict[str, Path], repo: str, img: Path) -> str:
    r = ok(cli("backup", "--repo", server.url(repo), img, "--volume", "disk", "--json",
               token=files["db1-backup"]))
    version: str = json.loads(r.stdout)["version_id"]
    return version


def finish(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {err}"
    version: str = json.loads(out)["version_id"]
    return version


def restores(server: ServerProc, files: dict[str, Path], repo: str, ref: str, target: Path,
             sha: str) -> None:
    ok(cli("restore", "--repo", server.url(repo), ref, target, token=files["restorer"]))
    assert sha256_file(target) == sha


def gc_on_server(server: ServerProc, files: dict[str, Path], repo: str) -> dict[str, object]:
    report: dict[str, object] = json.loads(ok(cli("gc", "--repo", server.url(repo),
                                                  "--on-server", "--json",
                                                  token=files["ops"])).stdout)
    return report


def forged_like(size: int) -> bytes:
    """Random bytes behind a well-formed encrypted chunk header: all a server can check."""
    return b"SNPO\x01\x01\x02\x00" + os.urandom(size - 8)


def test_forged_chunks_under_fossil_names_cannot_make_gc_drop_them(served: Served,
                                                                   tmp_path: Path) -> None:
    server, tokens, files = served
    create_repo_fast_kdf(http_storage(server, "db", tokens["db1-backup"]))
    img = tmp_path / "disk.img"
    sha = write_image(img, image_bytes(1024 * CHUNK, seed=7))
    proc = paused_backup(server, files, "db", img, after=256)
    try:
        # gc sets aside the chunks the paused backup stored (nothing references them yet)
        # and waits for it.
        first = gc_on_server(server, files, "db")
        assert first["waiting_for"] and int(first["fossils_made"]) > 0, first  # type: ignore[call-overload]
        attacker = http_storage(server, "db", tokens["db1-backup-2"])
        fossils = list(attacker.list("fossils/"))
        assert len(fossils) == first["fossils_made"]
        refused = 0
        for key, size in fossils:
            with pytest.raises(SetAside):
                attacker.put("chunks/" + key[len("fossils/") :], forged_like(size))
            refused += 1
        assert refused == len(fossils)
        server.wait_for_log("gc set aside a copy with other content")
        version = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    last = gc_on_server(server, files, "db")
    # Every original came back, none replaced by a forgery: gc puts the fossils back, or, when
    # a loaded machine kept the backup stopped past its lease (STALE is short here), the
    # backup's re-check already re-sent them (the server takes only the fossil's own bytes).
    restored = last["restored"]
    assert last["finished"] and isinstance(restored, int) and restored <= len(fossils), last
    assert list(attacker.list("fossils/")) == []
    live = {key.rsplit("/", 1)[1] for key, _size in attacker.list("chunks/")}
    assert {key.rsplit("/", 1)[1] for key, _size in fossils} <= live
    restores(server, files, "db", f"disk@{version}", tmp_path / "restored.img", sha)
    deep = json.loads(ok(cli("verify", "--repo", server.url("db"), "--deep", "--json",
                             token=files["ops"])).stdout)
    assert deep["ok"] and not deep["bad_chunks"], deep


def test_the_same_bytes_bring_a_fossil_back(served: Served, tmp_path: Path) -> None:
    """A backup that stores a chunk gc has set aside sends the same bytes (chunks are sealed
    deterministically): the server puts the fossil back instead of refusing it."""
    from snapship.devices import Source
    from snapship.engine.backup import run_backup
    from snapship.repository.repo import Repository
    from tests.clihelp import PASSPHRASE

    server, tokens, files = served
    create_repo_fast_kdf(http_storage(server, "db", tokens["db1-backup"]))
    img = tmp_path / "disk.img"
    sha = write_image(img, image_bytes(64 * CHUNK, seed=8))
    v1 = backup(server, files, "db", img)
    ok(cli("forget", "--repo", server.url("db"), f"disk@{v1}", "--allow-newest",
           token=files["ops"]))
    repo = Repository.open(http_storage(server, "db", tokens["db1-backup"]),
                           lambda: PASSPHRASE.encode())
    def gc_now() -> None:  # sets all 64 aside, and waits for the writer
        (writer,) = repo.catalog.list_locks("writer")
        first = gc_on_server(server, files, "db")
        assert first["fossils_made"] == 64 and first["waiting_for"] == [writer.session], first

    with Source(str(img)) as source:
        m = run_backup(repo, prepare_then(source, gc_now), "disk", workers=2)
    assert m.stats["chunks_new"] == 64  # each stored again, and each came back as its fossil
    storage = http_storage(server, "db", tokens["ops"])
    assert list(storage.list("fossils/")) == []
    assert len(list(storage.list("chunks/"))) == 64
    last = gc_on_server(server, files, "db")
    assert last["finished"] and last["restored"] == 0, last
    restores(server, files, "db", f"disk@{m.version}", tmp_path / "r.img", sha)


def test_a_backup_token_cannot_touch_another_clients_lock(served: Served,
                                                          tmp_path: Path) -> None:
    server, tokens, files = served
    create_repo_fast_kdf(http_storage(server, "db", tokens["db1-backup"]))
    img = tmp_path / "disk.img"
    sha = write_image(img, image_bytes(256 * CHUNK, seed=9))
    proc = paused_backup(server, files, "db", img, after=32)
    try:
        attacker = http_storage(server, "db", tokens["db1-backup-2"])
        (key, _size), = list(attacker.list("locks/writer-"))
        lock = attacker.get(key)
        assert json.loads(lock)["owner"] == "db1-backup"
        attempts: list[Callable[[], None]] = [lambda: attacker.delete(key),
                                              lambda: attacker.put(key, lock)]
        for attempt in attempts:
            with pytest.raises(PermissionDenied, match="token db1-backup's lock"):
                attempt()
        server.wait_for_log(f"may not delete {key}")
        version = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert gc_on_server(server, files, "db")["finished"]
    restores(server, files, "db", f"disk@{version}", tmp_path / "restored.img", sha)


def test_a_planted_lock_goes_stale_by_the_servers_clock(served: Served) -> None:
    """A lock whose heartbeat is far in the future would make every gc wait forever: the
    server refuses an impossible time, stamps any other with its own clock, and so the lock
    goes stale once its owner stops refreshing it."""
    server, tokens, files = served
    create_repo_fast_kdf(http_storage(server, "db", tokens["db1-backup"]))
    attacker = http_storage(server, "db", tokens["db1-backup-2"])
    key, blob = lock_object("20261201T000000-000000000001", heartbeat=1e18)
    with pytest.raises(StorageError, match="not a time"):
        attacker.put(key, blob)
    key, blob = lock_object("20261201T000000-000000000002", heartbeat=time.time() + 1e10)
    attacker.put(key, blob)
    assert abs(json.loads(attacker.get(key))["heartbeat"] - time.time()) < 60
    report = gc_on_server(server, files, "db")
    assert report["waiting_for"] == ["20261201T000000-000000000002"], report  # live, for now
    time.sleep(STALE + 0.5)  # the planted lock's owner never refreshes it
    report = gc_on_server(server, files, "db")
    assert report["finished"] and not report["waiting_for"], report
    assert any("removed the stale writer lock" in w for w in report["warnings"]), report  # type: ignore[attr-defined]
    assert attacker.stat(key) is None
    locks = json.loads(ok(cli("locks", "--repo", server.url("db"), "--json",
                              token=files["ops"])).stdout)["locks"]
    assert locks == []


def junk_objects() -> dict[str, bytes]:
    """Objects a backup token might put to break others; every one must be refused."""
    deep = b"[" * 100_000 + b"]" * 100_000
    ref = "refs/disk/20261201-000000.000-abcd"
    return {
        "locks/writer-20261201T000000-000000000003": b"not json",
        "locks/writer-20261201T000000-000000000004": deep,
        "locks/writer-20261201T000000-000000000005": lock_object("someone-else")[1],
        ref: bytes(envelope.seal(KIND_REFS, ref.encode(), b"SNPR junk", None, 0)),
        "refs/disk/20261201-000000.000-abce": os.urandom(200),
        "versions/disk/20261201-000000.000-abcf": forged_like(300),  # no reference list
        "versions/disk/99991231-235959.999-ffff": forged_like(300),  # sorts last forever
        "versions/disk/not-a-version-id": forged_like(300),
        "summaries/disk/20261201-000000.000-abd0": b"SNPO\x01\x04\x02\x00" + os.urandom(300),
        "summaries/disk/not-a-version-id": b"SNPO\x01\x04\x02\x00" + os.urandom(300),
        "chunks/ab/" + "cd" * 32: forged_like(300),  # the wrong fan-out directory
        "chunks/ab/" + "ab" * 32: b"SNPO\x01\x02\x02\x00" + os.urandom(300),  # a manifest
        "chunks/ab/" + "ab" * 31 + "ac": forged_like(20),  # too short to be a chunk
        "chunks/ab/" + "ab" * 31 + "ad": forged_like(CHUNK + 100),  # too long
        "config": deep,
    }


def test_junk_from_a_backup_token_is_refused_and_breaks_nothing(served: Served,
                                                                tmp_path: Path) -> None:
    server, tokens, files = served
    create_repo_fast_kdf(http_storage(server, "db", tokens["db1-backup"]))
    img = tmp_path / "disk.img"
    sha = write_image(img, image_bytes(32 * CHUNK, seed=10))
    v1 = backup(server, files, "db", img)
    attacker = http_storage(server, "db", tokens["db1-backup-2"])
    for key, data in junk_objects().items():
        with pytest.raises((StorageError, PermissionDenied)) as exc:
            attacker.put(key, data)
        assert "\n" not in str(exc.value)
        assert attacker.stat(key) is None or key == "config", key
    # What `versions` shows cannot be replaced: neither by another kind of object, nor by a
    # summary sealed without the key.
    rows = json.loads(ok(cli("versions", "--repo", server.url("db"), "--json",
                             token=files["db1-backup"])).stdout)["versions"]
    for forged in (forged_like(300), b"SNPO\x01\x04\x02\x00" + os.urandom(300)):
        with pytest.raises((StorageError, PermissionDenied)):
            attacker.put(f"summaries/disk/{v1}", forged)
    assert json.loads(ok(cli("versions", "--repo", server.url("db"), "--json",
                             token=files["db1-backup"])).stdout)["versions"] == rows
    # Everything still works.
    assert json.loads(ok(cli("locks", "--repo", server.url("db"), "--json",
                             token=files["ops"])).stdout)["locks"] == []
    assert gc_on_server(server, files, "db")["finished"]
    write_image(img, image_bytes(32 * CHUNK, seed=11))
    v2 = backup(server, files, "db", img)
    restores(server, files, "db", f"disk@{v2}", tmp_path / "r2.img", sha256_file(img))
    restores(server, files, "db", f"disk@{v1}", tmp_path / "r1.img", sha)
