"""Issue 10, items 1 and 2: a backup whose lock another process could take for abandoned.

Both attacks are reproduced with real processes. (1) A backup that looks like another
machine's (its own UTS namespace, another hostname) is SIGSTOPped past the stale limit; gc
removes its lock as stale and deletes the chunks it had stored and the ones it had found by
`stat`. On SIGCONT it must notice that its lease was broken, re-check every chunk and store
the missing ones again, so its version restores byte for byte. (2) A backup in its own PID
namespace (pid 1 there, as in any container) is paused while gc runs on the host: gc must
not judge a pid from another namespace, so it waits for the backup instead of collecting.

The limits are shortened with SNAPSHIP_TEST_STALE_AFTER (docs/gc.md), in every process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.clihelp import (
    CHUNK,
    CLI,
    PID_NAMESPACE,
    assert_restores,
    assert_verify_ok,
    backup,
    child_pid,
    chunk_files,
    cli_env,
    describe,
    init_repo_fast_kdf,
    new_chunks,
    ok,
    run_cli,
    wait_for,
    write_image,
)

STALE = 4.0


def env_with(stale: float | None) -> dict[str, str]:
    env = cli_env()
    if stale is not None:
        env["SNAPSHIP_TEST_STALE_AFTER"] = str(stale)
    return env


def setup_repo(tmp_path: Path, rng: random.Random) -> tuple[Path, Path, str]:
    """A repository whose only version was forgotten (its chunks are garbage that a new backup
    finds by stat), and an image made of those chunks followed by as many new ones."""
    repo = tmp_path / "repo"
    init_repo_fast_kdf(repo)
    old = bytes(rng.randbytes(512 * CHUNK))
    old_img = tmp_path / "old.img"
    write_image(old_img, old)
    version = backup(repo, old_img, "old")
    ok(run_cli("forget", "--repo", repo, f"old@{version}", "--allow-newest"))
    img = tmp_path / "disk.img"
    sha = write_image(img, old + rng.randbytes(1536 * CHUNK))
    return repo, img, sha


def unshare_available(*flags: str) -> str | None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare"
    r = subprocess.run(["unshare", *flags, "true"], capture_output=True, check=False)
    return None if r.returncode == 0 else f"unshare {' '.join(flags)}: {r.stderr.decode()}"


def test_backup_paused_past_its_lease_re_checks_and_restores(tmp_path: Path) -> None:
    reason = unshare_available("-u")
    assert reason is None, reason
    repo, img, sha = setup_repo(tmp_path, random.Random(101))
    before = {p.name for p in chunk_files(repo)}
    # Another machine, as far as gc can tell: its lock is judged by the heartbeat alone.
    proc = subprocess.Popen(
        ["unshare", "-u", "sh", "-c", 'hostname elsewhere && exec "$@"', "sh", *CLI, "backup",
         "--repo", str(repo), str(img), "--volume", "disk", "--json"],
        env=env_with(STALE), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        # Stop it once it has found the reused chunks by stat and stored some new ones.
        wait_for(lambda: proc.poll() is not None or new_chunks(repo, before) >= 32,
                 "the backup to get past the reused chunks")
        assert proc.poll() is None, "the backup finished before it could be paused"
        proc.send_signal(signal.SIGSTOP)
        stored = {p.name for p in chunk_files(repo)} - before
        assert stored, "the backup stored nothing before it was paused"
        time.sleep(STALE + 0.5)  # the pause under test: longer than the stale limit
        gc = ok(run_cli_env("gc", "--repo", repo, "--json", stale=STALE))
        assert "removed the stale writer lock" in gc.stderr, describe(gc)
        report = json.loads(gc.stdout)
        assert report["finished"] and report["chunks_freed"] >= len(stored), report
        assert not (stored & {p.name for p in chunk_files(repo)}), "gc kept what it freed"
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"exit {proc.returncode}: {err}"
    assert "registering again and re-checking every chunk" in err, err
    version = json.loads(out)["version_id"]
    assert_restores(repo, f"disk@{version}", tmp_path / "restored.img", sha)
    assert_verify_ok(repo, deep=True)


def test_backup_in_its_own_pid_namespace_is_not_taken_for_dead(tmp_path: Path) -> None:
    reason = unshare_available("-p", "-f", "--mount-proc")
    assert reason is None, reason
    repo, img, sha = setup_repo(tmp_path, random.Random(102))
    before = {p.name for p in chunk_files(repo)}
    proc = subprocess.Popen(
        [*PID_NAMESPACE, *CLI, "backup", "--repo", str(repo), str(img), "--volume", "disk",
         "--json"],
        env=env_with(None), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        inner = child_pid(proc.pid)  # pid 1 in its namespace; this is its pid out here
        wait_for(lambda: proc.poll() is not None or new_chunks(repo, before) >= 32,
                 "the backup to get past the reused chunks")
        assert proc.poll() is None, "the backup finished before it could be paused"
        os.kill(inner, signal.SIGSTOP)  # hold it still while gc runs beside it
        locks = json.loads(ok(run_cli("locks", "--repo", repo, "--json")).stdout)["locks"]
        assert [(lk["kind"], lk["pid"], lk["alive"]) for lk in locks] == [("writer", 1, True)]
        stored = {p.name for p in chunk_files(repo)} - before
        gc = ok(run_cli("gc", "--repo", repo, "--json"))
        assert "stale" not in gc.stderr, describe(gc)
        report = json.loads(gc.stdout)
        assert not report["finished"] and report["waiting_for"], report  # it waits
        assert report["chunks_freed"] == 0, report
        os.kill(inner, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"exit {proc.returncode}: {err}"
    assert stored, "the backup stored nothing before gc ran"
    version = json.loads(out)["version_id"]
    assert_restores(repo, f"disk@{version}", tmp_path / "restored.img", sha)
    report = json.loads(ok(run_cli("gc", "--repo", repo, "--json")).stdout)
    assert report["finished"] and report["restored"] >= len(stored), report
    assert_restores(repo, f"disk@{version}", tmp_path / "restored.img", sha)
    assert_verify_ok(repo, deep=True)


def run_cli_env(*args: str | os.PathLike[str], stale: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], env=env_with(stale), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("where", ["heartbeat thread", "commit"])
def test_a_lease_lost_is_never_silently_renewed(tmp_path: Path, where: str) -> None:
    """In-process: a lock removed under a writer is not put back by its heartbeat, and a
    version is not written on a lease that lapsed."""
    from snapship.repository import locks
    from snapship.repository.repo import Repository
    from snapship.storage.local import LocalStorage
    from tests.clihelp import PASSPHRASE

    repo_dir = tmp_path / "repo"
    init_repo_fast_kdf(repo_dir)
    repo = Repository.open(LocalStorage(str(repo_dir)), lambda: PASSPHRASE.encode())
    with repo.writer("backup test") as session:
        key = session.lock.key
        info = locks.decode_lock(key, repo.storage.get(key))
        locks.remove_lock(repo.storage, info, "test")
        if where == "heartbeat thread":
            session.lock.beat()
        assert not session.confirm()
        assert repo.storage.stat(key) is None, "the heartbeat put a removed lock back"
        assert "removed" in session.lapse()
        session.renew()
        assert session.confirm() and session.lock.key != key


def test_gc_paused_past_its_lease_stops_before_deleting_more(tmp_path: Path) -> None:
    """A gc is a lock holder too: paused past its lease (another gc may have taken over
    meanwhile), it must not go on moving or deleting on what it decided before the pause."""
    rng = random.Random(103)
    repo = tmp_path / "repo"
    init_repo_fast_kdf(repo)
    img = tmp_path / "disk.img"
    keep_sha = ""
    for _i in range(2):  # the first version's 2048 chunks become garbage
        keep_sha = write_image(img, rng.randbytes(2048 * CHUNK))
        version = backup(repo, img, "disk")
    ok(run_cli("prune", "--repo", repo, "--keep-last", "1"))
    proc = subprocess.Popen([*CLI, "gc", "--repo", str(repo), "--json"], env=env_with(STALE),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    fossils = repo / "fossils"
    try:
        wait_for(lambda: proc.poll() is not None or sum(1 for _ in fossils.glob("*/*")) > 50,
                 "gc to start setting chunks aside")
        assert proc.poll() is None, "gc finished before it could be paused"
        proc.send_signal(signal.SIGSTOP)
        time.sleep(STALE * 2 / 3 + 0.5)  # past its lease
        moved = sum(1 for _ in fossils.glob("*/*"))
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, f"exit {proc.returncode}: {out} {err}"
    assert "gc lost its lock" in err and "run it again" in err, err
    # At most what was already in flight moved after the pause.
    assert sum(1 for _ in fossils.glob("*/*")) <= moved + 64
    report = json.loads(ok(run_cli("gc", "--repo", repo, "--json")).stdout)
    assert report["finished"], report
    assert_restores(repo, f"disk@{version}", tmp_path / "restored.img", keep_sha)
    assert_verify_ok(repo, deep=True)


def test_a_lease_lost_while_the_version_is_written_is_made_whole(tmp_path: Path) -> None:
    """The window after the last check: the lock is taken (and a chunk deleted, and the
    reference list dropped, as a gc that took the writer for gone would) while the manifest
    is being stored. The check after the manifest notices, and the backup puts back what is
    missing under a new registration. A storage wrapper injects that moment, which a real
    process cannot hit on demand."""
    from snapship.devices import Source
    from snapship.engine.backup import run_backup
    from snapship.engine.restore import run_restore
    from snapship.repository import layout, locks
    from snapship.repository.repo import Repository
    from snapship.storage.local import LocalStorage
    from tests.clihelp import PASSPHRASE, sha256_file

    class GcStrikes(LocalStorage):
        struck = False

        def put(self, key: str, data: bytes | bytearray) -> None:
            super().put(key, data)
            if key.startswith("versions/") and not self.struck:
                self.struck = True
                (writer,) = locks.list_locks(self, "writer")
                locks.remove_lock(self, writer, "test")
                victim = next(k for k, _ in self.list("chunks/"))
                self.delete(victim)
                self.delete(layout.refs_key(*key.split("/")[1:]))

    repo_dir = tmp_path / "repo"
    init_repo_fast_kdf(repo_dir)
    storage = GcStrikes(str(repo_dir))
    repo = Repository.open(storage, lambda: PASSPHRASE.encode())
    img = tmp_path / "disk.img"
    sha = write_image(img, random.Random(104).randbytes(64 * CHUNK))
    warnings: list[str] = []
    with Source(str(img)) as source:
        m = run_backup(repo, source, "disk", workers=2, warn=warnings.append)
    assert len(warnings) == 1 and "which was written meanwhile" in warnings[0], warnings
    assert storage.struck and storage.stat(layout.refs_key("disk", m.version)) is not None
    out = tmp_path / "restored.img"
    run_restore(repo, repo.load_manifest("disk", m.version), str(out))
    assert sha256_file(out) == sha
