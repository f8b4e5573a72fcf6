"""snapship on an S3 repository, end to end through the CLI, against a real SeaweedFS.

Backups, incremental backups, restores, verify, prune and gc through `--repo s3://...`;
then the faults: 5xx bursts, dropped connections and lost answers (from tests/faultproxy.py),
a backup that cannot finish, and the server killed or restarted in the middle of a backup.
Whatever happens, every earlier version restores byte for byte and no object in the bucket is
a partial one.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapship.crypto import ScryptParams
from snapship.repository.repo import Repository
from snapship.storage.s3 import S3Storage
from tests.clihelp import (
    CHUNK,
    PASSPHRASE,
    assert_one_line_error,
    describe,
    ok,
    run_cli,
    sha256_file,
    start_cli,
    write_image,
)
from tests.s3faultproxy import FaultProxy, Rule, puts_under
from tests.seaweed import Bucket, WeedServer, use_endpoint

pytest_plugins = ("tests.s3server",)  # the weed, s3_bucket and proxy fixtures


def make_repo(url: str, encryption: str = "aes-256-gcm") -> str:
    """A repository as `init` makes it, with a cheap KDF (see clihelp.init_repo_fast_kdf)."""
    Repository.create(S3Storage.open(url), encryption=encryption, chunk_size=CHUNK,
                      passphrase=lambda: PASSPHRASE.encode(), kdf=ScryptParams(n=1 << 10))
    return url


def backup(url: str, image: Path, volume: str = "disk", *extra: str) -> dict[str, Any]:
    r = ok(run_cli("backup", "--repo", url, image, "--volume", volume, "--json", *extra))
    info: dict[str, Any] = json.loads(r.stdout)
    return info


def assert_restores(url: str, ref: str, target: Path, sha: str) -> None:
    target.unlink(missing_ok=True)
    ok(run_cli("restore", "--repo", url, ref, target))
    assert sha256_file(target) == sha, f"{ref} did not restore byte-identical"


def assert_verify_ok(url: str, deep: bool = True) -> dict[str, Any]:
    r = ok(run_cli("verify", "--repo", url, "--json", *(["--deep"] if deep else [])))
    report: dict[str, Any] = json.loads(r.stdout)
    assert report["ok"] is True and not report["bad_chunks"], report
    return report


def versions(url: str) -> list[str]:
    r = ok(run_cli("versions", "--repo", url, "--json"))
    return [row["version_id"] for row in json.loads(r.stdout)["versions"]]


def assert_every_object_whole(bucket: Bucket, url: str) -> int:
    """Every chunk object in the bucket (fossils too) decodes and matches its id; returns
    how many there are. Read behind snapship's back, not through any proxy."""
    repo = Repository.open(S3Storage.open(url), lambda: PASSPHRASE.encode())
    prefix = url.split("/", 3)[3] + "/"
    names = [k for k in bucket.keys(prefix) if k[len(prefix):].startswith(("chunks/", "fossils/"))]
    for name in names:
        cid = bytes.fromhex(name.rsplit("/", 1)[1])
        blob = repo.storage.get(name[len(prefix):])
        assert 0 < len(repo.open_chunk(cid, blob)) <= CHUNK  # Corrupt if partial or damaged
    return len(names)


def random_image(path: Path, chunks: int, seed: int, zero: int = 0) -> tuple[bytearray, str]:
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(chunks * CHUNK))
    for i in rng.sample(range(chunks), zero):
        data[i * CHUNK : (i + 1) * CHUNK] = bytes(CHUNK)
    return data, write_image(path, data)


def count_chunks(bucket: Bucket) -> int:
    return len(bucket.keys("repo/chunks/"))


# -- the everyday commands ----------------------------------------------------------------------


def test_init_backup_incremental_restore_verify(s3_bucket: Bucket, tmp_path: Path) -> None:
    url = s3_bucket.url("hosts/db1")
    r = ok(run_cli("init", "--repo", url, "--chunk-size", "64K", "--json"))
    assert json.loads(r.stdout)["repository"] == url
    img = tmp_path / "disk.img"
    data, sha1 = random_image(img, 40, seed=1, zero=8)
    first = backup(url, img)
    assert first["stats"]["chunks_new"] == 32 and first["stats"]["chunks_zero_read"] == 8

    # Day 2: rewrite three ranges and tell snapship which (docs/changed-ranges.md).
    ranges = [(5 * CHUNK + 100, 3000), (17 * CHUNK, 2 * CHUNK), (39 * CHUNK + 7, 1)]
    rng = random.Random(2)
    for off, length in ranges:
        data[off : off + length] = rng.randbytes(length)
    sha2 = write_image(img, data)
    listing = tmp_path / "changed"
    listing.write_text("".join(f"{off} {length}\n" for off, length in ranges))
    second = backup(url, img, "disk", "--changed-ranges", str(listing))
    s = second["stats"]
    assert (s["mode"], s["chunks_read"], s["chunks_new"]) == ("incremental", 4, 4)

    assert versions(url) == [first["version_id"], second["version_id"]]
    assert_restores(url, f"disk@{first['version_id']}", tmp_path / "out.img", sha1)
    assert_restores(url, "disk", tmp_path / "out.img", sha2)
    assert assert_verify_ok(url, deep=False)["versions"] == 2
    assert assert_verify_ok(url)["bytes_checked"] > 0
    ok(run_cli("show", "--repo", url, "disk"))

    keys = s3_bucket.keys()
    assert {"hosts/db1/config", f"hosts/db1/versions/disk/{second['version_id']}"} <= set(keys)
    assert sum(k.startswith("hosts/db1/keys/") for k in keys) == 1
    assert sum(k.startswith("hosts/db1/chunks/") for k in keys) == 36
    assert not any(k.startswith("hosts/db1/locks/") for k in keys)  # every lock was dropped
    assert all(k.startswith("hosts/db1/") for k in keys)


def test_prune_and_gc_free_space_and_keep_the_survivors(s3_bucket: Bucket, tmp_path: Path
                                                        ) -> None:
    url = make_repo(s3_bucket.url())
    img = tmp_path / "disk.img"
    rng = random.Random(11)
    data = bytearray(rng.randbytes(32 * CHUNK))
    history = []
    for _ in range(4):
        for i in rng.sample(range(32), 4):
            data[i * CHUNK : (i + 1) * CHUNK] = rng.randbytes(CHUNK)
        sha = write_image(img, data)
        history.append((backup(url, img)["version_id"], sha))
    before = count_chunks(s3_bucket)
    ok(run_cli("prune", "--repo", url, "--keep-last", "2", passphrase=None))
    assert versions(url) == [v for v, _ in history[2:]]
    r = ok(run_cli("gc", "--repo", url, "--json", passphrase=None))
    assert r.stderr == ""  # not even a warning from a connection pool too small for gc
    assert json.loads(r.stdout)["chunks_freed"] == 8
    assert count_chunks(s3_bucket) == before - 8
    assert s3_bucket.keys("repo/fossils/") == {} and s3_bucket.keys("repo/gc/") == {}
    for v, sha in history[2:]:
        assert_restores(url, f"disk@{v}", tmp_path / "out.img", sha)
    assert_verify_ok(url)


def test_gc_beside_a_running_backup_loses_nothing(s3_bucket: Bucket, tmp_path: Path) -> None:
    url = make_repo(s3_bucket.url())
    img = tmp_path / "disk.img"
    _, sha_old = random_image(img, 16, seed=3)
    old = backup(url, img)["version_id"]
    ok(run_cli("forget", "--repo", url, f"disk@{old}", "--allow-newest", passphrase=None))
    big = tmp_path / "big.img"
    _, sha_big = random_image(big, 400, seed=4)
    runner = start_cli("backup", "--repo", url, big, "--volume", "big", "--json")
    while count_chunks(s3_bucket) < 16 + 40 and runner.poll() is None:
        time.sleep(0.05)
    gc = run_cli("gc", "--repo", url, "--json", passphrase=None)
    out, err = runner.communicate(timeout=300)
    assert runner.returncode == 0, err
    assert gc.returncode == 0, describe(gc)
    version = json.loads(out)["version_id"]
    ok(run_cli("gc", "--repo", url, passphrase=None))  # finishes a collection that waited
    assert_restores(url, f"big@{version}", tmp_path / "out.img", sha_big)
    assert_verify_ok(url)
    assert count_chunks(s3_bucket) == 400  # the forgotten version's 16 chunks are gone
    assert sha_old != sha_big


# -- bad locations --------------------------------------------------------------------------------


def test_bad_locations_are_one_line_errors(s3_bucket: Bucket, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert_one_line_error(run_cli("versions", "--repo", "s3://ab"), "bucket name", code=2)
    assert_one_line_error(run_cli("versions", "--repo", "s3://bucket/a//b"), "prefix", code=2)
    assert_one_line_error(run_cli("versions", "--repo", s3_bucket.url("nothing")),
                          f"no snapship repository at s3://{s3_bucket.name}/nothing")
    assert_one_line_error(run_cli("versions", "--repo", "s3://no-such-bucket-x/r"),
                          "bucket no-such-bucket-x does not exist")
    url = make_repo(s3_bucket.url())
    assert_one_line_error(run_cli("init", "--repo", url, "--encryption", "none"),
                          "already exists", code=2)
    use_endpoint(monkeypatch, "http://127.0.0.1:9", max_attempts=2)
    line = assert_one_line_error(run_cli("versions", "--repo", url), f"cannot read {url}/config")
    assert "127.0.0.1:9" in line and "gave up after 2 attempts" in line


# -- faults ---------------------------------------------------------------------------------------


def test_backup_rides_out_5xx_bursts_dropped_uploads_and_lost_answers(
        s3_bucket: Bucket, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = make_repo(s3_bucket.url())
    img = tmp_path / "disk.img"
    _, sha = random_image(img, 96, seed=5, zero=6)
    for rule in (
        Rule("status", skip=10, count=3),
        Rule("status", status=500, code="InternalError", skip=40, count=5),
        Rule("drop_upload", match=puts_under("/chunks/"), after=CHUNK // 2, skip=5, count=3),
        Rule("drop_response", match=puts_under("/chunks/"), skip=20, count=2),
        Rule("status", code="SlowDown", match=lambda m, p: m == "HEAD", skip=30, count=4),
    ):
        proxy.add(rule)
    use_endpoint(monkeypatch, proxy.endpoint)
    info = backup(url, img)
    assert info["stats"]["chunks_new"] == 90
    assert proxy.injected == {"status": 12, "drop_upload": 3, "drop_response": 2}
    use_endpoint(monkeypatch, s3_bucket.endpoint)
    assert_restores(url, "disk", tmp_path / "out.img", sha)
    assert assert_every_object_whole(s3_bucket, url) == 90
    assert_verify_ok(url)


def test_a_backup_that_cannot_finish_fails_cleanly_and_loses_nothing(
        s3_bucket: Bucket, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = make_repo(s3_bucket.url())
    img = tmp_path / "disk.img"
    data, sha1 = random_image(img, 48, seed=6)
    v1 = backup(url, img)["version_id"]
    rng = random.Random(7)
    for i in range(0, 48, 2):  # day 2: half the chunks change
        data[i * CHUNK : (i + 1) * CHUNK] = rng.randbytes(CHUNK)
    sha2 = write_image(img, data)

    # Every chunk upload after the first 10 is cut off half-way, and so is every retry.
    proxy.add(Rule("drop_upload", match=puts_under("/chunks/"), after=CHUNK // 3, skip=10,
                   count=None))
    use_endpoint(monkeypatch, proxy.endpoint, max_attempts=2)
    r = run_cli("backup", "--repo", url, img, "--volume", "disk")
    line = assert_one_line_error(r, f"cannot write {url}/chunks/", "gave up after 2 attempts")
    assert r.returncode == 1 and "Traceback" not in r.stderr, line

    use_endpoint(monkeypatch, s3_bucket.endpoint)
    assert versions(url) == [v1]
    stored = assert_every_object_whole(s3_bucket, url)  # nothing half-written is visible
    assert 48 + 10 <= stored < 48 + 24
    assert_restores(url, f"disk@{v1}", tmp_path / "out.img", sha1)
    assert_verify_ok(url)
    again = backup(url, img)  # the next run reuses what the failed one stored
    assert again["stats"]["chunks_existing"] == stored - 48
    assert again["stats"]["chunks_new"] == 24 - (stored - 48)
    assert_restores(url, "disk", tmp_path / "out.img", sha2)


@pytest.fixture
def own_weed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WeedServer]:
    """A server of its own, for a test that kills and restarts it."""
    server = WeedServer(tmp_path / "weed-data")
    server.start()
    use_endpoint(monkeypatch, server.endpoint)
    try:
        yield server
    finally:
        server.kill()


def _wait_for_chunks(bucket: Bucket, at_least: int, runner: Any) -> None:
    deadline = time.monotonic() + 120
    while count_chunks(bucket) < at_least:
        assert runner.poll() is None, "the backup ended before the server could be stopped"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_server_killed_mid_backup_then_the_next_backup_resumes(
        own_weed: WeedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = Bucket(own_weed, own_weed.new_bucket())
    url = make_repo(bucket.url())
    img = tmp_path / "disk.img"
    _, sha = random_image(img, 512, seed=8)

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")  # give up quickly once the server is gone
    runner = start_cli("backup", "--repo", url, img, "--volume", "disk")
    _wait_for_chunks(bucket, 60, runner)
    own_weed.kill()  # a crash: SIGKILL in the middle of uploads
    _out, err = runner.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert runner.returncode == 1 and len(lines) == 1, err
    assert lines[0].startswith("snapship: error: cannot ") and url in lines[0], err

    own_weed.restart()
    assert versions(url) == []
    stored = assert_every_object_whole(bucket, url)
    assert stored >= 60
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    info = backup(url, img)
    assert info["stats"]["chunks_existing"] == stored  # nothing stored is sent again
    assert info["stats"]["chunks_new"] == 512 - stored
    assert_restores(url, "disk", tmp_path / "out.img", sha)
    assert_verify_ok(url)


def test_a_backup_rides_out_a_server_restart(
        own_weed: WeedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = Bucket(own_weed, own_weed.new_bucket())
    url = make_repo(bucket.url())
    img = tmp_path / "disk.img"
    _, sha = random_image(img, 512, seed=9)
    # Retries must outlast the restart (several seconds), however the jitter falls.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "40")
    runner = start_cli("backup", "--repo", url, img, "--volume", "disk", "--json")
    _wait_for_chunks(bucket, 60, runner)
    own_weed.restart()
    out, err = runner.communicate(timeout=300)
    assert runner.returncode == 0, err
    info = json.loads(out)
    assert info["stats"]["chunks_new"] + info["stats"]["chunks_existing"] == 512
    assert_restores(url, "disk", tmp_path / "out.img", sha)
    assert assert_every_object_whole(bucket, url) == 512
    assert_verify_ok(url)
