"""Replication (issue 15, item 3): `snapship copy` between repositories of every kind, in both
key modes (`init --copy-key-from`: raw chunks; else re-encrypted), resumable, beside the
destination's gc, with only a backup token at the destination."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from snapship.crypto import ScryptParams
from snapship.errors import PermissionDenied
from snapship.repository.repo import Repository
from snapship.storage.base import Storage
from snapship.storage.local import LocalStorage
from snapship.storage.s3 import S3Storage
from tests.clihelp import (
    CHUNK,
    CLI,
    PASSPHRASE,
    Result,
    cli_env,
    describe,
    image_bytes,
    init_repo_fast_kdf,
    ok,
    remember_repository,
    run_cli,
    sha256_file,
    wait_for,
    write_image,
)
from tests.seaweed import Bucket
from tests.serverproc import http_storage, running_server, token_files

pytest_plugins = ("tests.s3server",)  # the weed and s3_bucket fixtures


def cli(*args: Any, env: dict[str, str] | None = None, passphrase: str | None = PASSPHRASE
        ) -> Result:
    full = cli_env(passphrase)
    full.update(env or {})
    return subprocess.run([*CLI, *map(str, args)], env=full, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600, check=False)


def copy(src: Any, dst: Any, *refs: str, env: dict[str, str] | None = None,
         extra: tuple[Any, ...] = ()) -> dict[str, Any]:
    r = cli("copy", "--from", src, "--to", dst, *refs, *extra, "--json", env=env)
    obj: dict[str, Any] = json.loads(ok(r).stdout)
    return obj


def versions(repo: Any, env: dict[str, str] | None = None) -> list[str]:
    r = cli("versions", "--repo", repo, "--json", env=env)
    return [row["ref"] for row in json.loads(ok(r).stdout)["versions"]]


def source_repo(tmp: Path) -> tuple[Path, dict[str, str]]:
    """A local repository with two volumes, three versions: ref -> sha256 of its image."""
    repo = tmp / "src"
    init_repo_fast_kdf(repo)
    shas: dict[str, str] = {}
    img = tmp / "disk.img"
    data = image_bytes(24 * CHUNK, seed=1, zero_chunks=(5, 6))
    for step in range(2):
        if step:
            data[2 * CHUNK : 4 * CHUNK] = image_bytes(2 * CHUNK, seed=9)
        sha = write_image(img, data)
        made = json.loads(ok(run_cli("backup", "--repo", repo, img, "--volume", "disk",
                                     "--json")).stdout)
        shas[f"disk@{made['version_id']}"] = sha
    other = tmp / "other.img"
    sha = write_image(other, image_bytes(7 * CHUNK + 100, seed=2))
    made = json.loads(ok(run_cli("backup", "--repo", repo, other, "--volume", "other",
                                 "--json")).stdout)
    shas[f"other@{made['version_id']}"] = sha
    return repo, shas


def assert_restores_all(repo: Any, shas: dict[str, str], tmp: Path,
                        env: dict[str, str] | None = None) -> None:
    assert sorted(versions(repo, env)) == sorted(shas)
    for ref, sha in shas.items():
        out = tmp / "restored.img"
        out.unlink(missing_ok=True)
        ok(cli("restore", "--repo", repo, ref, out, "-q", env=env))
        assert sha256_file(out) == sha, ref


def init(repo: Any, *extra: Any, env: dict[str, str] | None = None) -> None:
    ok(cli("init", "--repo", repo, "--chunk-size", "64K", *extra, "-q", env=env))


def create_fast(storage: Storage, key_from: Storage | None) -> None:
    """As `init` (with `--copy-key-from` when `key_from`), with a cheap scrypt cost, so the
    many commands of a test do not each pay the real one (`init --copy-key-from` itself runs
    for real in the local tests)."""
    master = None
    if key_from is not None:
        keys = Repository.open(key_from, lambda: PASSPHRASE.encode()).keys
        assert keys is not None
        master = keys.master
    remember_repository(Repository.create(storage, chunk_size=CHUNK, kdf=ScryptParams(n=1 << 10),
                                          passphrase=lambda: PASSPHRASE.encode(),
                                          master=master))


# -- local to local ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["raw", "re-encrypt"])
def test_local_to_local(tmp_path: Path, mode: str) -> None:
    src, shas = source_repo(tmp_path)
    dst = tmp_path / "dst"
    init(dst, *(("--copy-key-from", src) if mode == "raw" else ()))
    one = sorted(shas)[0]
    first = copy(src, dst, one)  # one version first: then the rest
    assert first["copied"] == [one] and first["mode"] == mode
    rest = copy(src, dst)
    assert sorted(rest["copied"]) == sorted(set(shas) - {one}) and rest["present"] == [one]
    # The second version of disk shares all but two chunks with the first: not sent again.
    assert rest["chunks_present"] >= 20, rest
    assert_restores_all(dst, shas, tmp_path)
    again = copy(src, dst)
    assert again["copied"] == [] and again["chunks_sent"] == 0 and again["bytes_sent"] == 0
    assert sorted(again["present"]) == sorted(shas)
    ok(cli("verify", "--repo", dst, "--deep", "-q"))
    if mode == "raw":  # the very bytes of the source
        for path in (src / "chunks").glob("*/*"):
            assert (dst / "chunks" / path.parent.name / path.name).read_bytes() == \
                path.read_bytes()
    else:
        assert not set(p.name for p in (src / "chunks").glob("*/*")) & \
            set(p.name for p in (dst / "chunks").glob("*/*"))


def test_copy_refuses_what_cannot_work(tmp_path: Path) -> None:
    src, _ = source_repo(tmp_path)
    other = tmp_path / "big-chunks"
    ok(cli("init", "--repo", other, "--chunk-size", "128K", "-q"))
    r = cli("copy", "--from", src, "--to", other)
    assert r.returncode == 2 and "chunk size" in r.stderr, describe(r)
    r = cli("copy", "--from", src, "--to", src)
    assert r.returncode == 2 and "same repository" in r.stderr, describe(r)
    r = cli("copy", "--from", src, "--to", other, "nosuch")
    assert r.returncode == 1 and "nosuch" in r.stderr, describe(r)
    plain = tmp_path / "plain"
    ok(cli("init", "--repo", plain, "--encryption", "none", "-q"))
    r = cli("init", "--repo", tmp_path / "x", "--copy-key-from", plain)
    assert r.returncode == 2 and "no key to share" in r.stderr, describe(r)


# -- local -> server -> S3, both modes --------------------------------------------------------


@pytest.mark.parametrize("mode", ["raw", "re-encrypt"])
def test_local_to_server_to_s3(tmp_path: Path, s3_bucket: Bucket, mode: str) -> None:
    src, shas = source_repo(tmp_path)
    with running_server(tmp_path / "srv") as (server, tokens):
        files = token_files(tmp_path / "tokens", tokens)
        url = server.url("offsite")
        backup_env = {"SNAPSHIP_TOKEN": tokens["db1-backup"]}
        # Everything at the server with a backup token: init, copy.
        at_server = http_storage(server, "offsite", tokens["db1-backup"])
        create_fast(at_server, LocalStorage(str(src)) if mode == "raw" else None)
        first = copy(src, url, env=backup_env)
        assert first["mode"] == mode and sorted(first["copied"]) == sorted(shas)
        assert copy(src, url, env=backup_env)["chunks_sent"] == 0
        assert_restores_all(url, shas, tmp_path, env=backup_env)

        # The copying host's token cannot delete what it copied.
        ref = sorted(shas)[0]
        r = cli("forget", "--repo", url, ref, "--allow-newest", env=backup_env)
        assert r.returncode != 0 and "needs an admin token" in r.stderr, describe(r)
        raw = http_storage(server, "offsite", tokens["db1-backup"])
        vol, ver = ref.split("@")
        with pytest.raises(PermissionDenied):
            raw.delete(f"versions/{vol}/{ver}")
        _, newer = sorted(shas)[1].split("@")  # disk's other version: a valid manifest
        with pytest.raises(PermissionDenied):
            raw.put(f"versions/{vol}/{ver}", raw.get(f"versions/{vol}/{newer}"))
        raw.close()
        r = cli("gc", "--repo", url, "--on-server", env=backup_env)
        assert r.returncode != 0, describe(r)
        assert sorted(versions(url, backup_env)) == sorted(shas)

        # Server -> S3: the source's token from --from-token-file.
        s3 = s3_bucket.url("offsite")
        from_token = ("--from-token-file", files["restorer"])
        create_fast(S3Storage.open(s3), at_server if mode == "raw" else None)
        second = copy(url, s3, extra=from_token)
        assert second["mode"] == mode and sorted(second["copied"]) == sorted(shas)
        assert copy(url, s3, extra=from_token)["chunks_sent"] == 0
        at_server.close()
    assert_restores_all(s3, shas, tmp_path)


# -- killed, and beside gc ---------------------------------------------------------------------


def big_source(tmp: Path, chunks: int) -> tuple[Path, str]:
    repo = tmp / "src"
    init_repo_fast_kdf(repo)
    img = tmp / "big.img"
    sha = write_image(img, image_bytes(chunks * CHUNK, seed=11))
    ok(run_cli("backup", "--repo", repo, img, "--volume", "big", "-q"))
    return repo, sha


def chunk_count(root: Path) -> int:
    """Chunk objects stored (not the partial files of uploads in flight)."""
    return sum(1 for p in root.glob("chunks/*/*") if not p.name.startswith(".tmp"))


def test_a_killed_copy_sends_only_the_rest(tmp_path: Path) -> None:
    total = 64
    src, sha = big_source(tmp_path, total)
    with running_server(tmp_path / "srv") as (server, tokens):
        url = server.url("offsite")
        env = {"SNAPSHIP_TOKEN": tokens["db1-backup"]}
        init(url, env=env)
        full = cli_env()
        full.update(env)
        # 64 KiB chunks at 256K: four a second, so it is caught mid-way.
        proc = subprocess.Popen([*CLI, "copy", "--from", str(src), "--to", url,
                                 "--limit-upload", "256K", "-q"], env=full,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        at = server.root / "offsite"
        try:
            wait_for(lambda: chunk_count(at) >= 8, "the copy to send 8 chunks")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        there = chunk_count(at)
        assert 8 <= there < total, there
        assert versions(url, env) == []
        rerun = copy(src, url, env=env)
        assert rerun["chunks_sent"] == total - there, (rerun, there)
        assert rerun["chunks_present"] == there
        (ref,) = versions(src)
        assert_restores_all(url, {ref: sha}, tmp_path, env=env)


def test_gc_at_the_destination_during_a_copy_loses_nothing(tmp_path: Path) -> None:
    src, sha = big_source(tmp_path, 48)
    with running_server(tmp_path / "srv") as (server, tokens):
        url = server.url("offsite")
        init(url, env={"SNAPSHIP_TOKEN": tokens["db1-backup"]})
        full = cli_env()
        full["SNAPSHIP_TOKEN"] = tokens["db1-backup"]
        proc = subprocess.Popen([*CLI, "copy", "--from", str(src), "--to", url,
                                 "--limit-upload", "384K", "-q"], env=full,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        admin = {"SNAPSHIP_TOKEN": tokens["ops"]}
        runs: list[dict[str, Any]] = []
        try:
            wait_for(lambda: chunk_count(server.root / "offsite") >= 4, "the copy to start")
            while proc.poll() is None:
                # The copy's chunks are not referenced by any version yet: gc sets them
                # aside, and must wait for the copy's writer session before dropping any.
                r = cli("gc", "--repo", url, "--on-server", "--json", env=admin)
                assert r.returncode == 0, describe(r)
                runs.append(json.loads(r.stdout))
        finally:
            if proc.poll() is None:
                proc.kill()
            _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        # gc did set the copy's chunks aside, and waited for its session to put them back.
        assert sum(g["fossils_made"] for g in runs) > 0 and any(g["waiting_for"] for g in runs)
        final = json.loads(ok(cli("gc", "--repo", url, "--on-server", "--json",
                                  env=admin)).stdout)
        assert final["finished"] and final["chunks_freed"] == 0, final
        assert sum(g["restored"] for g in [*runs, final]) > 0
        ok(cli("verify", "--repo", url, "--deep", "-q", env=admin))
        (ver,) = versions(url, admin)
        out = tmp_path / "out.img"
        ok(cli("restore", "--repo", url, ver, out, env=admin))
        assert sha256_file(out) == sha
