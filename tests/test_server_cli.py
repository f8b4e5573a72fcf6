"""The command line against a real `snapship server`: init, backup, incremental backup,
restore and verify through http://127.0.0.1, with the least-privileged token for each job."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clihelp import (
    CHUNK,
    Result,
    assert_one_line_error,
    check_every_chunk_file_decodes,
    chunk_files,
    describe,
    image_bytes,
    sha256_file,
    write_image,
)
from tests.serverproc import (
    ServerProc,
    create_repo_fast_kdf,
    http_storage,
    run_cli_env,
    running_server,
    token_files,
)

Served = tuple[ServerProc, dict[str, str], dict[str, Path]]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with running_server(tmp_path / "srv") as (server, tokens):
        yield server, tokens, token_files(tmp_path / "tokens", tokens)


def cli(*args: str | Path, token: Path | None = None, env: dict[str, str] | None = None
        ) -> Result:
    extra = ["--token-file", str(token)] if token else []
    return run_cli_env(*args, *extra, env=env)


def ok_json(*args: str | Path, token: Path | None = None) -> dict[str, object]:
    r = run_cli_env(*args, "--json", *(["--token-file", str(token)] if token else []))
    assert r.returncode == 0 and r.stderr == "", describe(r)
    out: dict[str, object] = json.loads(r.stdout)
    return out


def test_backup_incremental_restore_verify_through_the_server(served: Served,
                                                              tmp_path: Path) -> None:
    server, tokens, files = served
    url = server.url("db1")
    r = cli("init", "--repo", url, "--chunk-size", "64K", token=files["db1-backup"])
    assert r.returncode == 0 and url in r.stdout, describe(r)
    rng = random.Random(7)
    size = 96 * CHUNK + 1234  # a short last chunk
    data = image_bytes(size, seed=7, zero_chunks=range(0, 96, 5))
    data[CHUNK : 2 * CHUNK] = data[3 * CHUNK : 4 * CHUNK]  # an in-image duplicate
    img = tmp_path / "disk.img"
    sha1 = write_image(img, data)
    first = ok_json("backup", "--repo", url, img, "--volume", "disk", token=files["db1-backup"])
    stats = first["stats"]
    assert isinstance(stats, dict)
    assert stats["chunks_new"] == 97 - 20 - 1  # neither zero chunks nor the copy are stored
    assert stats["chunks_zero_read"] == 20

    # Day 2: a few ranges change; the change list says which.
    ranges = []
    for _ in range(6):
        start = rng.randrange(size - 5000)
        data[start : start + 4000] = rng.randbytes(4000)
        ranges.append(f"{start} 4000\n")
    sha2 = write_image(img, data)
    listing = tmp_path / "ranges"
    listing.write_text("".join(ranges))
    second = ok_json("backup", "--repo", url, img, "--volume", "disk", "--changed-ranges",
                     listing, token=files["db1-backup"])
    stats2 = second["stats"]
    assert isinstance(stats2, dict)
    assert stats2["mode"] == "incremental" and 0 < stats2["chunks_read"] <= 12

    # Restores and verify need only a read token.
    for version, sha in ((first["version_id"], sha1), (second["version_id"], sha2)):
        out_img = tmp_path / f"restored-{version}.img"
        r = cli("restore", "--repo", url, f"disk@{version}", out_img, token=files["restorer"])
        assert r.returncode == 0, describe(r)
        assert sha256_file(out_img) == sha
    report = ok_json("verify", "--repo", url, "--deep", token=files["restorer"])
    assert report["ok"] is True and report["versions"] == 2
    rows = run_cli_env("versions", "--repo", url, "--json",
                       env={"SNAPSHIP_TOKEN": tokens["restorer"]})
    assert [r["version_id"] for r in json.loads(rows.stdout)["versions"]] == [first["version_id"],
                                                              second["version_id"]]
    # What the server holds is an ordinary local repository, complete and whole.
    local = ok_json("verify", "--repo", server.root / "db1", "--deep")
    assert local["ok"] is True and local["versions"] == 2
    check_every_chunk_file_decodes(server.root / "db1")


def test_backup_token_cannot_repair_a_damaged_chunk_but_admin_can(served: Served,
                                                                   tmp_path: Path) -> None:
    server, _tokens, files = served
    url = server.url("db2")
    create_repo_fast_kdf(http_storage(server, "db2", _tokens["db1-backup"]))
    img = tmp_path / "disk.img"
    sha = write_image(img, image_bytes(8 * CHUNK, seed=3))
    ok_json("backup", "--repo", url, img, "--volume", "disk", token=files["db1-backup"])
    victim = chunk_files(server.root / "db2")[0]
    victim.write_bytes(victim.read_bytes()[:-1])  # damaged on the server's disk
    r = cli("backup", "--repo", url, img, "--volume", "disk2", token=files["db1-backup"])
    line = assert_one_line_error(r, url, "db1-backup", "may not overwrite", victim.name)
    assert "exists with other content" in line
    server.wait_for_log(f"key chunks/{victim.name[:2]}/{victim.name}")
    again = ok_json("backup", "--repo", url, img, "--volume", "disk2", token=files["ops"])
    assert again["stats"]["chunks_new"] == 1  # type: ignore[index]
    restored = tmp_path / "restored.img"
    assert cli("restore", "--repo", url, "disk2", restored, token=files["restorer"]
               ).returncode == 0
    assert sha256_file(restored) == sha


def test_tokens_made_by_the_cli_work_once_the_server_sees_the_file(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    r = cli("token", "first", "--role", "admin", "--tokens", tokens_file)
    assert r.returncode == 0, describe(r)
    first = r.stdout.strip()
    assert oct(tokens_file.stat().st_mode & 0o777) == "0o600"
    assert first not in tokens_file.read_text()  # only its hash is kept
    assert_one_line_error(cli("token", "first", "--role", "read", "--tokens", tokens_file),
                          "already has a token named 'first'", code=2)
    with ServerProc(tmp_path / "root", tokens_file) as server:
        assert http_storage(server, "r", first).whoami() == ("first", "admin")
        r = run_cli_env("token", "later", "--role", "read", "--repos", "r", "--tokens",
                        tokens_file, "--json")
        later = json.loads(r.stdout)["token"]
        deadline = time.monotonic() + 10
        while True:  # the server re-reads the file within about a second
            try:
                assert http_storage(server, "r", later).whoami() == ("later", "read")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        # A broken edit is refused and the tokens in force stay.
        tokens_file.write_text(tokens_file.read_text() + "broken line\n")
        os.utime(tokens_file, (time.time() + 5, time.time() + 5))
        time.sleep(1.1)  # the file is looked at again, on a request, after a second
        assert http_storage(server, "r", later).whoami() == ("later", "read")
        assert "line 5: expected 'NAME ROLE REPOSITORIES" in server.wait_for_log(
            "keeping the previous tokens")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["versions", "--repo", "http://192.0.2.1:8420/x"], ["unencrypted", "https://"]),
        (["versions", "--repo", "https://u:p@127.0.0.1:1/x"], ["credentials"]),
        (["versions", "--repo", "http://127.0.0.1:1/"], ["names no repository"]),
        (["versions", "--repo", "http://127.0.0.1:1/bad name"], ["invalid repository name"]),
        (["versions", "--repo", "ftp://127.0.0.1/x"], ["unsupported repository location"]),
        (["versions", "--repo", "http://127.0.0.1:1/x", "--token-file", "/nonexistent"],
         ["cannot read token file"]),
        (["server", "--root", "/nonexistent", "--tokens", "/dev/null"], ["not a directory"]),
        (["server", "--root", "/", "--tokens", "/nonexistent"], ["cannot read token file"]),
        (["server", "--root", "/", "--tokens", "/dev/null", "--listen", "0.0.0.0:0"],
         ["without TLS"]),
        (["server", "--root", "/", "--tokens", "/dev/null", "--listen", "nowhere"],
         ["HOST:PORT"]),
        (["server", "--root", "/", "--tokens", "/dev/null", "--tls-cert", "c"],
         ["--tls-key"]),
    ],
)
def test_bad_remote_options_are_one_line_errors(args: list[str], fragments: list[str]) -> None:
    r = run_cli_env(*args)
    assert_one_line_error(r, *fragments, code=2)


def test_unreachable_server_fails_cleanly_after_the_retry_time(tmp_path: Path) -> None:
    started = time.monotonic()
    r = run_cli_env("versions", "--repo", "http://127.0.0.1:9/x",
                    env={"SNAPSHIP_RETRY_TIME": "1.5", "SNAPSHIP_TOKEN": "x" * 20})
    elapsed = time.monotonic() - started
    assert_one_line_error(r, "http://127.0.0.1:9/x", "get config", "connection refused",
                          "gave up after")
    assert 1.5 <= elapsed < 15


def test_server_stops_on_sigterm_after_finishing_requests(served: Served) -> None:
    server, tokens, _files = served
    s = http_storage(server, "x", tokens["ops"])
    s.put("config", b"{}")
    assert server.stop() == 0
    assert "stopped" in server.log()
    assert check_stopped(server)


def check_stopped(server: ServerProc) -> bool:
    assert server.proc is not None
    return server.proc.poll() == 0
