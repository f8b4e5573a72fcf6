"""prune, gc and verify of repositories on a snapship server: from a client with an admin
token, on the server itself (--on-server: no key, nothing crosses the network), and on the
server's schedule; a backup token may do none of them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clihelp import (
    CHUNK,
    Result,
    assert_one_line_error,
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


def cli(*args: str | Path, token: Path) -> Result:
    return run_cli_env(*args, "--token-file", token)


def ok(r: Result) -> Result:
    assert r.returncode == 0, describe(r)
    return r


def backups(server: ServerProc, files: dict[str, Path], repo: str, tmp: Path, n: int,
            encryption: str = "aes-256-gcm") -> tuple[list[str], str]:
    """`n` backups of images that share nothing; (version ids, SHA-256 of the last image)."""
    create_repo_fast_kdf(http_storage(server, repo, files["db1-backup"].read_text().strip()),
                         encryption)
    img = tmp / f"{repo}.img"
    versions, sha = [], ""
    for i in range(n):
        sha = write_image(img, image_bytes(24 * CHUNK, seed=100 + i))
        r = ok(cli("backup", "--repo", server.url(repo), img, "--volume", "disk", "--json",
                   token=files["db1-backup"]))
        versions.append(json.loads(r.stdout)["version_id"])
    return versions, sha


def test_prune_and_gc_from_a_client_and_on_the_server(served: Served, tmp_path: Path) -> None:
    server, _tokens, files = served
    url = server.url("db")
    versions, sha = backups(server, files, "db", tmp_path, 3)
    root = server.root / "db"
    assert len(chunk_files(root)) == 3 * 24

    # A backup token can neither forget versions nor collect garbage.
    assert_one_line_error(cli("prune", "--repo", url, "--keep-last", "1",
                              token=files["db1-backup"]),
                          "token db1-backup may only add backups; prune (like forget, protect "
                          "and unprotect) needs an admin token")
    assert_one_line_error(cli("gc", "--repo", url, "--on-server", token=files["db1-backup"]),
                          "token db1-backup may only add backups; gc on the server needs an "
                          "admin token")
    assert len(chunk_files(root)) == 3 * 24

    ok(cli("prune", "--repo", url, "--keep-last", "2", token=files["ops"]))
    r = ok(cli("gc", "--repo", url, "--json", token=files["ops"]))  # client-side, over HTTP
    assert json.loads(r.stdout)["chunks_freed"] == 24
    assert len(chunk_files(root)) == 2 * 24

    ok(cli("prune", "--repo", url, "--keep-last", "1", token=files["ops"]))
    r = ok(cli("gc", "--repo", url, "--on-server", token=files["ops"]))
    assert "gc on the server: 1 versions reference 24 chunks; freed 24 chunks" in r.stdout
    server.wait_for_log("maintenance: gc of db finished")
    assert len(chunk_files(root)) == 24
    out = tmp_path / "restored.img"
    ok(cli("restore", "--repo", url, f"disk@{versions[-1]}", out, token=files["restorer"]))
    assert sha256_file(out) == sha
    r = ok(cli("verify", "--repo", url, "--deep", "--on-server", "--json", token=files["ops"]))
    report = json.loads(r.stdout)
    assert (report["ok"], report["versions"], report["chunks"]) == (True, 1, 24)
    assert report["content_checked"] is False  # encrypted: the server has no key


@pytest.mark.parametrize("encryption", ["aes-256-gcm", "none"])
def test_verify_on_the_server_finds_damage_and_marks_it(served: Served, tmp_path: Path,
                                                        encryption: str) -> None:
    server, _tokens, files = served
    url = server.url("dmg")
    backups(server, files, "dmg", tmp_path, 1, encryption)
    chunks = chunk_files(server.root / "dmg")
    truncated, flipped, bad_header = chunks[0], chunks[1], chunks[2]
    truncated.write_bytes(truncated.read_bytes()[:-5])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 1  # same size: only a content check sees it
    flipped.write_bytes(data)
    data = bytearray(bad_header.read_bytes())
    data[0:4] = b"XXXX"
    bad_header.write_bytes(data)

    fast = cli("verify", "--repo", url, "--on-server", "--json", token=files["ops"])
    assert fast.returncode == 1, describe(fast)
    assert set(json.loads(fast.stdout)["bad_chunks"]) == {truncated.name}
    deep = cli("verify", "--repo", url, "--on-server", "--deep", token=files["ops"])
    assert deep.returncode == 1
    expected = {truncated.name, bad_header.name} | ({flipped.name} if encryption == "none"
                                                    else set())
    found = {line.split()[2].rstrip(":") for line in deep.stdout.splitlines()
             if line.startswith("BAD chunk")}
    assert found == expected, deep.stdout
    assert "FAILED" in deep.stdout
    # The version is marked damaged for every client to see.
    r = cli("versions", "--repo", url, token=files["restorer"])
    assert r.returncode == 0 and "DAMAGED" in r.stdout, describe(r)  # listed, not an error
    assert_one_line_error(cli("verify", "--repo", url, "--on-server", token=files["restorer"]),
                          "token restorer may only read; verify on the server needs an "
                          "admin token")
    assert_one_line_error(cli("verify", "--repo", server.root / "dmg", "--on-server",
                              token=files["ops"]), "--on-server needs a repository on a "
                          "snapship server")


def test_the_server_runs_gc_and_verify_on_its_schedule(tmp_path: Path) -> None:
    with running_server(tmp_path / "srv", extra=["--gc-every", "1s", "--verify-every", "1s"]
                        ) as (server, tokens):
        files = token_files(tmp_path / "tokens", tokens)
        versions, _sha = backups(server, files, "sched", tmp_path, 2)
        ok(cli("forget", "--repo", server.url("sched"), f"disk@{versions[0]}",
               token=files["ops"]))
        line = server.wait_for_log("sched: scheduled gc: 1 versions reference 24 chunks; freed "
                                   "24 chunks", timeout=30)
        assert "waiting" not in line
        server.wait_for_log("sched: scheduled verify (fast): 1 versions, 24 chunks: ok",
                            timeout=30)
        assert len(chunk_files(server.root / "sched")) == 24


def test_bad_schedule_is_a_usage_error() -> None:
    r = run_cli_env("server", "--root", "/", "--tokens", "/dev/null", "--gc-every", "5m")
    assert_one_line_error(r, "--gc-every", "90s, 6h or 7d", code=2)


def test_verify_with_a_read_token_reports_damage_and_warns_it_cannot_mark(
    served: Served, tmp_path: Path
) -> None:
    server, _tokens, files = served
    backups(server, files, "ro", tmp_path, 1)
    victim = chunk_files(server.root / "ro")[0]
    victim.write_bytes(victim.read_bytes()[:-1])  # truncated: even the fast verify sees it
    r = cli("verify", "--repo", server.url("ro"), token=files["restorer"])
    assert r.returncode == 1, describe(r)
    assert f"BAD chunk {victim.name}" in r.stdout and "marked damaged" not in r.stdout
    assert r.stderr.startswith("snapship: warning: damage marks not updated:"), describe(r)
    assert "restorer" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (server.root / "ro" / "damaged").exists()
