"""`snapship server --root s3://BUCKET/PREFIX` (issue 15, item 7): stateless servers, one store.

Two client hosts (two CLI processes with two backup tokens) back up through two server
processes into one repository in one SeaweedFS bucket: the second host's identical disk adds
only its version's metadata to the bucket (chunks are shared); gc through one server while
the other serves a backup loses nothing; every version restores byte-identical.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapship.repository import locks
from snapship.server.policy import Role
from snapship.storage.prefixed import PrefixedStorage
from snapship.storage.s3 import S3Storage
from tests.clihelp import Result, describe, image_bytes, sha256_file, write_image
from tests.seaweed import Bucket
from tests.serverproc import (
    ServerProc,
    create_repo_fast_kdf,
    http_storage,
    run_cli_env,
    start_cli_env,
    token_files,
    write_tokens,
)

pytest_plugins = ("tests.s3server",)

MIB = 1 << 20
TOKENS = (("ops", Role.ADMIN, None), ("host1", Role.BACKUP, None),
          ("host2", Role.BACKUP, None), ("restorer", Role.READ, None))


@pytest.fixture
def two_servers(s3_bucket: Bucket, tmp_path: Path
                ) -> Iterator[tuple[ServerProc, ServerProc, dict[str, str], dict[str, Path]]]:
    tokens = write_tokens(tmp_path / "tokens", TOKENS)
    files = token_files(tmp_path / "token-files", tokens)
    root = s3_bucket.url("srv")
    with ServerProc(tmp_path, tmp_path / "tokens", root_url=root) as a, \
            ServerProc(tmp_path, tmp_path / "tokens", root_url=root) as b:
        yield a, b, tokens, files


def cli(*args: str | Path, token: Path) -> Result:
    return run_cli_env(*args, "--token-file", str(token))


def ok_json(*args: str | Path, token: Path) -> dict[str, object]:
    r = run_cli_env(*args, "--json", "--token-file", str(token))
    assert r.returncode == 0, describe(r)
    out: dict[str, object] = json.loads(r.stdout)
    return out


def stored(bucket: Bucket) -> tuple[int, int]:
    """(objects, bytes) of the repository in the bucket, as SeaweedFS lists them."""
    keys = bucket.keys("srv/fleet/")
    return len(keys), sum(keys.values())


def test_two_hosts_two_servers_one_bucket(two_servers: tuple[ServerProc, ServerProc,
                                                             dict[str, str], dict[str, Path]],
                                          s3_bucket: Bucket, tmp_path: Path) -> None:
    a, b, tokens, files = two_servers
    create_repo_fast_kdf(http_storage(a, "fleet", tokens["ops"]))
    url_a, url_b = a.url("fleet"), b.url("fleet")

    # Host 1 through server A; host 2, with the same disk, through server B.
    disk = tmp_path / "disk.img"
    sha_disk = write_image(disk, image_bytes(4 * MIB, seed=1))
    first = ok_json("backup", "--repo", url_a, disk, "--volume", "host1-root",
                    token=files["host1"])
    objects1, bytes1 = stored(s3_bucket)
    assert bytes1 > 4 * MIB
    second = ok_json("backup", "--repo", url_b, disk, "--volume", "host2-root",
                     token=files["host2"])
    objects2, bytes2 = stored(s3_bucket)
    stats2 = second["stats"]
    assert isinstance(stats2, dict)
    assert stats2["chunks_new"] == 0 and stats2["bytes_new_stored"] == 0, stats2
    # Only the version's own objects (manifest, reference list, summary): a few KiB.
    assert bytes2 - bytes1 < 16 * 1024, (bytes1, bytes2)
    assert objects2 - objects1 <= 3, (objects1, objects2)
    print(f"cross-host dedup: host 1 stored {bytes1} bytes in {objects1} objects; host 2's "
          f"identical disk added {bytes2 - bytes1} bytes in {objects2 - objects1} objects")

    # Garbage for gc: a version of host 1 that an admin forgets.
    scratch = tmp_path / "scratch.img"
    write_image(scratch, image_bytes(2 * MIB, seed=2))
    gone = ok_json("backup", "--repo", url_a, scratch, "--volume", "host1-scratch",
                   token=files["host1"])
    r = cli("forget", "--repo", url_a, "--allow-newest",
            f"host1-scratch@{gone['version_id']}", token=files["ops"])
    assert r.returncode == 0, describe(r)

    # Host 1's next backup goes through server B, held to 1 MB/s so that it is surely still
    # running (its writer lock in the bucket) while gc runs through server A.
    changed = image_bytes(4 * MIB, seed=1)
    changed[MIB : 2 * MIB] = image_bytes(MIB, seed=3)
    changed += image_bytes(2 * MIB, seed=4)
    sha_changed = write_image(disk, changed)
    backup = start_cli_env("backup", "--repo", url_b, disk, "--volume", "host1-root",
                           "--json", "--limit-upload", "1M", "--token-file",
                           str(files["host1"]))
    deadline = time.monotonic() + 60
    while not any("/locks/writer-" in k for k in s3_bucket.keys("srv/fleet/locks/")):
        assert backup.poll() is None, backup.communicate()
        assert time.monotonic() < deadline, "the backup never took its writer lock"
        time.sleep(0.05)
    during = ok_json("gc", "--on-server", "--repo", url_a, token=files["ops"])
    assert backup.poll() is None, "the backup ended before gc did: no overlap was shown"
    assert during["waiting_for"], during  # it saw the backup (through the other server)
    out, err = backup.communicate(timeout=120)
    assert backup.returncode == 0, err
    third = json.loads(out)

    after = ok_json("gc", "--on-server", "--repo", url_a, token=files["ops"])
    assert after["finished"] is True and after["chunks_freed"] == 2 * MIB // (64 * 1024), after
    print(f"gc during the backup: {during['fossils_made']} chunks set aside, waiting for "
          f"{during['waiting_for']}; gc after it: {after['chunks_freed']} chunks "
          f"({after['bytes_freed']} bytes) freed")

    # Everything restores byte-identical, through either server.
    for n, (ref, sha, server) in enumerate((
            (f"host1-root@{first['version_id']}", sha_disk, a),
            (f"host2-root@{second['version_id']}", sha_disk, b),
            (f"host1-root@{third['version_id']}", sha_changed, a),
            (f"host1-root@{third['version_id']}", sha_changed, b))):
        out_img = tmp_path / f"restored-{n}.img"
        r = cli("restore", "--repo", server.url("fleet"), ref, out_img,
                token=files["restorer"])
        assert r.returncode == 0, describe(r)
        assert sha256_file(out_img) == sha, ref
    report = ok_json("verify", "--repo", url_b, "--deep", token=files["restorer"])
    assert report["ok"] is True and report["versions"] == 3, report


def test_the_schedule_finds_every_repository_under_the_s3_root(s3_bucket: Bucket,
                                                               tmp_path: Path) -> None:
    """The scheduled verify lists the repositories of the root (names that sort beside each
    other, and an object of no repository's, included); a gc lock taken straight on the
    store stops a gc through the server; a root it cannot use stops the server at once with
    one line."""
    tokens = write_tokens(tmp_path / "tokens", TOKENS)
    files = token_files(tmp_path / "token-files", tokens)
    s3_bucket.server.client().put_object(Bucket=s3_bucket.name, Key="srv/stray", Body=b"x")
    with ServerProc(tmp_path, tmp_path / "tokens", root_url=s3_bucket.url("srv"),
                    extra=["--verify-every", "1s"]) as server:
        for name in ("a", "a-b"):
            create_repo_fast_kdf(http_storage(server, name, tokens["ops"]))
            img = tmp_path / f"{name}.img"
            write_image(img, image_bytes(3 * 64 * 1024, seed=len(name)))
            ok_json("backup", "--repo", server.url(name), img, "--volume", "disk",
                    token=files["host1"])
        for name in ("a", "a-b"):
            server.wait_for_log(f"{name}: scheduled verify (fast): 1 versions, 3 chunks: ok",
                                timeout=30)
        # The gc lock is an object in the store: one taken beside the server (by another
        # server, or a client straight on S3) is honoured by this one.
        direct = PrefixedStorage(S3Storage.open(s3_bucket.url("srv")), "a")
        with locks.Lock(direct, locks.GC, "gc").acquire():
            r = run_cli_env("gc", "--on-server", "--repo", server.url("a"), "--token-file",
                            str(files["ops"]))
        assert r.returncode == 75 and "gc" in r.stderr, describe(r)
    r = run_cli_env("server", "--root", f"s3://no-such-{s3_bucket.name}/srv", "--tokens",
                    str(tmp_path / "tokens"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, describe(r)
    assert "does not exist" in r.stderr, describe(r)
