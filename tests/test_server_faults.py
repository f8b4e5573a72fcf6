"""Faults between client and server: connections cut mid-upload, bursts of 5xx, the server
killed and restarted mid-backup, the server gone for good.

Each time the backup either succeeds (after retries) or fails with one line; every version
that exists restores byte-identical; no partial object is ever visible under a real name;
and a backup run again after a failure does not send again what was already stored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapship.storage.local import TMP_PREFIX
from tests.clihelp import (
    CHUNK,
    assert_one_line_error,
    check_every_chunk_file_decodes,
    chunk_files,
    describe,
    image_bytes,
    sha256_file,
    write_image,
)
from tests.faultproxy import FaultProxy
from tests.serverproc import (
    ServerProc,
    create_repo_fast_kdf,
    http_storage,
    run_cli_env,
    running_server,
    start_cli_env,
)

Served = tuple[ServerProc, dict[str, str]]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with running_server(tmp_path / "srv") as running:
        server, tokens = running
        create_repo_fast_kdf(http_storage(server, "db", tokens["db1-backup"]))
        yield running


def env_for(token: str, retry_time: float = 60.0) -> dict[str, str]:
    return {"SNAPSHIP_TOKEN": token, "SNAPSHIP_RETRY_TIME": str(retry_time)}


def backup(url: str, img: Path, env: dict[str, str], volume: str = "disk") -> dict[str, object]:
    r = run_cli_env("backup", "--repo", url, img, "--volume", volume, "--json", env=env)
    assert r.returncode == 0, describe(r)
    out: dict[str, object] = json.loads(r.stdout)
    return out


def stats(report: dict[str, object]) -> dict[str, int]:
    s = report["stats"]
    assert isinstance(s, dict)
    return s


def assert_restores(url: str, version: str, token: str, target: Path, sha: str) -> None:
    r = run_cli_env("restore", "--repo", url, f"disk@{version}", target, env=env_for(token))
    assert r.returncode == 0, describe(r)
    assert sha256_file(target) == sha, f"disk@{version} did not restore byte-identical"


def assert_repository_whole(server: ServerProc, token: str, repo: str = "db") -> None:
    """Temporary files (left by a killed server) are never listed, every chunk file is
    complete, and verify --deep passes."""
    root = server.root / repo
    listed = dict(http_storage(server, repo, token).list(""))
    assert listed and not [k for k in listed if TMP_PREFIX in k]
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*")
               if p.is_file() and not p.name.startswith(TMP_PREFIX)}
    assert set(listed) == on_disk
    check_every_chunk_file_decodes(root)
    r = run_cli_env("verify", "--repo", root, "--deep", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True, describe(r)


def test_connections_cut_mid_upload_and_mid_download(served: Served, tmp_path: Path) -> None:
    server, tokens = served
    img = tmp_path / "disk.img"
    sha = write_image(img, image_bytes(256 * CHUNK, seed=21, zero_chunks=range(0, 256, 9)))
    with FaultProxy(server.port, seed=5, drop_between=(200_000, 1_500_000), max_drops=40
                    ) as proxy:
        report = backup(proxy.url("db"), img, env_for(tokens["db1-backup"]))
        assert proxy.faults.drops >= 5, proxy.faults
        drops_up = proxy.faults.drops
        assert stats(report)["chunks_new"] == 256 - 29
        # No upload was cut short on the server's side into a visible object.
        assert not [p for p in (server.root / "db").rglob(f"{TMP_PREFIX}*")]
        version = str(report["version_id"])
        assert_restores(proxy.url("db"), version, tokens["restorer"], tmp_path / "out.img", sha)
        assert proxy.faults.drops > drops_up  # the restore was cut too, and rode through it
    assert_repository_whole(server, tokens["restorer"])


def test_bursts_of_503_are_ridden_out(served: Served, tmp_path: Path) -> None:
    server, tokens = served
    img = tmp_path / "disk.img"
    sha = write_image(img, image_bytes(192 * CHUNK, seed=22))
    with FaultProxy(server.port, burst_every=1_500_000, burst_size=4) as proxy:
        report = backup(proxy.url("db"), img, env_for(tokens["db1-backup"]))
        errors_up = proxy.faults.errors
        assert errors_up >= 12, proxy.faults
        assert_restores(proxy.url("db"), str(report["version_id"]), tokens["restorer"],
                        tmp_path / "out.img", sha)
        assert proxy.faults.errors > errors_up
    assert_repository_whole(server, tokens["restorer"])


def test_a_server_that_only_answers_503_fails_the_backup_in_one_line(
        served: Served, tmp_path: Path) -> None:
    server, tokens = served
    img = tmp_path / "disk.img"
    sha = write_image(img, image_bytes(64 * CHUNK, seed=23))
    first = backup(server.url("db"), img, env_for(tokens["db1-backup"]))
    write_image(img, image_bytes(64 * CHUNK, seed=24))
    with FaultProxy(server.port, burst_every=1, burst_size=1_000_000) as proxy:
        proxy.faults.errors = 0
        r = run_cli_env("backup", "--repo", proxy.url("db"), img, "--volume", "disk",
                        env=env_for(tokens["db1-backup"], retry_time=1.5))
        assert_one_line_error(r, proxy.url("db"), "gave up after", "503")
    assert_restores(server.url("db"), str(first["version_id"]), tokens["restorer"],
                    tmp_path / "out.img", sha)
    assert_repository_whole(server, tokens["restorer"])


def wait_for_chunks(root: Path, at_least: int, proc: object, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = len(chunk_files(root))
        if n >= at_least:
            return n
        time.sleep(0.005)
    raise AssertionError(f"the backup stored fewer than {at_least} chunks in {timeout} s")


def test_server_killed_and_restarted_mid_backup(served: Served, tmp_path: Path) -> None:
    server, tokens = served
    img = tmp_path / "disk.img"
    sha0 = write_image(img, image_bytes(64 * CHUNK, seed=30))
    v0 = backup(server.url("db"), img, env_for(tokens["db1-backup"]))
    sha1 = write_image(img, image_bytes(1024 * CHUNK, seed=31))
    before = len(chunk_files(server.root / "db"))
    proc = start_cli_env("backup", "--repo", server.url("db"), img, "--volume", "disk",
                         "--json", env=env_for(tokens["db1-backup"]))
    try:
        wait_for_chunks(server.root / "db", before + 60, proc)
        server.kill()
        assert proc.poll() is None, "the backup finished before the server was killed"
        time.sleep(1.0)
        server.restart()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    v1 = json.loads(out)
    assert stats(v1)["chunks_new"] + stats(v1)["chunks_existing"] == 1024
    assert_restores(server.url("db"), str(v0["version_id"]), tokens["restorer"],
                    tmp_path / "v0.img", sha0)
    assert_restores(server.url("db"), v1["version_id"], tokens["restorer"], tmp_path / "v1.img",
                    sha1)
    assert_repository_whole(server, tokens["restorer"])


def test_server_gone_fails_cleanly_and_the_rerun_sends_only_what_is_missing(
        served: Served, tmp_path: Path) -> None:
    server, tokens = served
    img = tmp_path / "disk.img"
    sha0 = write_image(img, image_bytes(64 * CHUNK, seed=40))
    v0 = backup(server.url("db"), img, env_for(tokens["db1-backup"]))
    sha1 = write_image(img, image_bytes(1024 * CHUNK, seed=41))
    before = len(chunk_files(server.root / "db"))
    proc = start_cli_env("backup", "--repo", server.url("db"), img, "--volume", "disk",
                         env=env_for(tokens["db1-backup"], retry_time=2.0))
    try:
        wait_for_chunks(server.root / "db", before + 100, proc)
        server.kill()
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stored = len(chunk_files(server.root / "db")) - before
    assert 100 <= stored < 1024
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, err
    assert lines[0].startswith("snapship: error: " + server.url("db")), err
    assert "gave up after" in lines[0] and "Traceback" not in err
    assert "locks/" not in lines[0], "the failed chunk upload must be reported, not the lock"

    server.restart()
    assert_restores(server.url("db"), str(v0["version_id"]), tokens["restorer"],
                    tmp_path / "v0.img", sha0)
    v1 = backup(server.url("db"), img, env_for(tokens["db1-backup"]))
    s = stats(v1)
    assert s["chunks_existing"] == stored  # nothing stored is sent again
    assert s["chunks_new"] == 1024 - stored
    assert_restores(server.url("db"), str(v1["version_id"]), tokens["restorer"],
                    tmp_path / "v1.img", sha1)
    assert_repository_whole(server, tokens["restorer"])
