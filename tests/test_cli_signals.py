"""Issue 11, item 1: SIGTERM (what systemd and `timeout` send) stops every command as SIGINT
does: the command unwinds (locks released), says so in one line and exits 143; what a backup
had stored is kept, and its rerun sends only what is missing.

Each test drives the real CLI: a backup on a local directory and one through a `snapship
server`, caught once it has stored some chunks; a backup whose server has died, so that its
workers are deep in retries when SIGTERM comes (the exit must not wait out the retry time);
and the servers' own graceful stop on SIGHUP, which joined SIGTERM and SIGINT.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from tests.clihelp import (
    CHUNK,
    describe,
    image_bytes,
    init_repo_fast_kdf,
    new_chunks,
    ok,
    run_cli,
    start_cli,
    wait_for,
    write_image,
)
from tests.serverproc import (
    create_repo_fast_kdf,
    http_storage,
    run_cli_env,
    running_server,
    start_cli_env,
    token_files,
)

STOP_GRACE = 5.0  # as in snapship.cli.signals (checked below)
CHUNKS = 640  # 40 MiB of 64K chunks: a few seconds of work, long enough to be caught
CAUGHT_AFTER = 40


def chunk_names(repo: Path) -> set[str]:
    return {p.name for p in (repo / "chunks").glob("*/*") if not p.name.startswith(".tmp-")}


def terminate_when_stored(proc: subprocess.Popen[str], repo: Path, after: int
                          ) -> subprocess.CompletedProcess[str]:
    """SIGTERM `proc` once `after` chunks are stored under `repo` (stopped first, so the
    signal lands while it is mid-way), and wait for it."""
    try:
        wait_for(lambda: proc.poll() is not None or new_chunks(repo, set()) >= after,
                 "the backup to store some chunks")
        assert proc.poll() is None, "the backup finished before it could be stopped"
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_terminated(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 143, describe(r)
    assert r.stderr == "snapship: terminated\n", describe(r)
    assert r.stdout == "", describe(r)


def assert_rerun_sends_only_what_is_missing(stats: dict[str, int], stored: int) -> None:
    assert 0 < stored < CHUNKS
    assert stats["chunks_existing"] == stored, stats
    assert stats["chunks_new"] == CHUNKS - stored, stats
    assert stats["chunks_known"] == 0 and stats["chunks_zero_read"] == 0, stats


def test_sigterm_mid_backup_keeps_what_was_stored_and_leaves_no_lock(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo_fast_kdf(repo)
    img = tmp_path / "disk.img"
    write_image(img, image_bytes(CHUNKS * CHUNK, seed=11))

    r = terminate_when_stored(start_cli("backup", "--repo", repo, img, "--volume", "disk"),
                              repo, CAUGHT_AFTER)
    assert_terminated(r)
    assert sorted((repo / "locks").rglob("*")) == [], "a lock was left behind"
    stored = len(chunk_names(repo))
    assert [p for p in (repo / "chunks").rglob(".tmp-*")] == []
    assert json.loads(ok(run_cli("versions", "--repo", repo, "--json")).stdout)["versions"] == []

    rerun = json.loads(ok(run_cli("backup", "--repo", repo, img, "--volume", "disk",
                                  "--json")).stdout)
    assert_rerun_sends_only_what_is_missing(rerun["stats"], stored)
    assert len(chunk_names(repo)) == CHUNKS


def test_sigterm_mid_backup_through_a_server(tmp_path: Path) -> None:
    with running_server(tmp_path / "srv") as (server, tokens):
        files = token_files(tmp_path / "tokens", tokens)
        create_repo_fast_kdf(http_storage(server, "db1", tokens["ops"]))
        repo_dir = server.root / "db1"
        img = tmp_path / "disk.img"
        write_image(img, image_bytes(CHUNKS * CHUNK, seed=12))
        url = server.url("db1")
        token = ["--token-file", str(files["db1-backup"])]

        r = terminate_when_stored(start_cli_env("backup", "--repo", url, img, "--volume",
                                                "disk", *token), repo_dir, CAUGHT_AFTER)
        assert_terminated(r)
        assert sorted((repo_dir / "locks").rglob("*")) == [], "a lock was left behind"
        locks = run_cli_env("locks", "--repo", url, "--json", *token)
        assert locks.returncode == 0 and json.loads(locks.stdout)["locks"] == [], describe(locks)
        stored = len(chunk_names(repo_dir))

        rerun = run_cli_env("backup", "--repo", url, img, "--volume", "disk", "--json", *token)
        assert rerun.returncode == 0 and rerun.stderr == "", describe(rerun)
        assert_rerun_sends_only_what_is_missing(json.loads(rerun.stdout)["stats"], stored)


def test_sigterm_does_not_wait_out_the_retries_of_a_dead_server(tmp_path: Path) -> None:
    """The server dies mid-backup: the workers retry (for up to 10 minutes here). SIGTERM
    must end the backup within STOP_GRACE and a little, not after the retry time."""
    with running_server(tmp_path / "srv") as (server, tokens):
        files = token_files(tmp_path / "tokens", tokens)
        create_repo_fast_kdf(http_storage(server, "db1", tokens["ops"]))
        img = tmp_path / "disk.img"
        write_image(img, image_bytes(CHUNKS * CHUNK, seed=13))
        proc = start_cli_env("backup", "--repo", server.url("db1"), img, "--volume", "disk",
                             "--token-file", str(files["db1-backup"]),
                             env={"SNAPSHIP_RETRY_TIME": "600"})
        try:
            wait_for(lambda: proc.poll() is not None
                     or new_chunks(server.root / "db1", set()) >= CAUGHT_AFTER,
                     "the backup to store some chunks")
            server.kill()
            time.sleep(1.5)  # every worker is now retrying a refused connection
            assert proc.poll() is None, "the backup gave up by itself"
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=120)
            took = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert proc.returncode == 143, describe(r)
    assert err.strip().splitlines()[-1] == "snapship: terminated", describe(r)
    assert "Traceback" not in err, describe(r)
    assert took < STOP_GRACE + 10, f"took {took:.1f} s to stop\n{describe(r)}"


def test_server_stops_gracefully_on_sighup(tmp_path: Path) -> None:
    with running_server(tmp_path / "srv") as (server, tokens):
        http_storage(server, "x", tokens["ops"]).put("config", b"{}")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        assert server.proc.wait(timeout=40) == 0
        server.wait_for_log("SIGHUP: finishing running requests")
        server.wait_for_log("stopped")


def test_stop_grace_is_what_the_test_assumes() -> None:
    from snapship.cli import signals

    assert signals.STOP_GRACE == STOP_GRACE
