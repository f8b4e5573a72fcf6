"""Decompression and parser bombs in the repository (issue 10, item 7).

An unencrypted repository only has a checksum, which whoever writes to the storage can
recompute: there, a sealed object is whatever they want it to be. These tests store real bombs
with correct checksums (a zstd frame of 1 GiB of zeros is 32 KB; JSON nested 100,000 levels
deep) and run the real commands against them through the CLI: each fails, or reports that one
object as damaged and goes on, in one line, with its peak memory far below the bomb's size.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
import zstandard

from snapship import crypto
from snapship.formats import envelope
from snapship.formats.constants import (
    FLAG_ZSTD,
    KIND_CHUNK,
    KIND_MANIFEST,
    KIND_REFS,
    MANIFEST_MAGIC,
    OBJECT_MAGIC,
    OBJECT_VERSION,
    REFS_MAGIC,
)
from tests.clihelp import (
    CHUNK,
    Result,
    assert_one_line_error,
    backup,
    copy_repo,
    describe,
    image_bytes,
    init_repo_fast_kdf,
    ok,
    run_cli,
    run_cli_peak_rss,
    sha256_file,
    write_image,
)

BOMB_SIZE = 1 << 30
MAX_RSS = 300 << 20
DEEP = 100_000


@cache
def zstd_frame(prefix: bytes = b"", size: int = BOMB_SIZE) -> bytes:
    """One zstd frame of `prefix` then zeros, `size` bytes in all, its size in its header
    (as snapship writes frames); built by streaming, so the test never holds `size` bytes."""
    obj = zstandard.ZstdCompressor(level=3).compressobj(size=size)
    parts = [obj.compress(prefix)]
    block = bytes(1 << 20)
    left = size - len(prefix)
    while left:
        n = min(left, len(block))
        parts.append(obj.compress(block[:n]))
        left -= n
    parts.append(obj.flush())
    return b"".join(parts)


def seal_compressed(kind: int, name: bytes, frame: bytes) -> bytes:
    """An unencrypted object whose payload is `frame`, flagged zstd, with a correct checksum."""
    header = struct.pack("<4sBBBB", OBJECT_MAGIC, OBJECT_VERSION, kind, FLAG_ZSTD, 0)
    return b"".join((header, frame, crypto.checksum(header, name, frame)))


def index_head(magic: bytes, header: bytes, count: int) -> bytes:
    """The start of a manifest or reference list: prefix, header JSON, count."""
    return struct.pack("<4sHHI", magic, 1, 0, len(header)) + header + struct.pack("<Q", count)


class Repo:
    """disk@v1, disk@v2 and other@v1 in an unencrypted repository; tests bomb a copy."""

    def __init__(self, path: Path, versions: dict[str, str]) -> None:
        self.path = path
        self.versions = versions

    def copy(self, dst: Path) -> Path:
        return copy_repo(self.path, dst)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    work = tmp_path_factory.mktemp("bombs")
    repo = work / "repo"
    init_repo_fast_kdf(repo, "none")
    disk, other = work / "disk.img", work / "other.img"
    data = image_bytes(6 * CHUNK + 100, seed=1, zero_chunks=(2,))
    write_image(disk, data)
    v1 = backup(repo, disk, "disk")
    data[0:10] = b"x" * 10
    write_image(disk, data)
    v2 = backup(repo, disk, "disk")
    write_image(other, image_bytes(3 * CHUNK, seed=2))
    return Repo(repo, {"disk@v1": v1, "disk@v2": v2, "other@v1": backup(repo, other, "other")})


def manifest_header(repo: Path, volume: str, version: str) -> bytes:
    """The header JSON of a real manifest of `repo`, as stored."""
    from snapship.repository.repo import Repository
    from snapship.storage.local import LocalStorage

    r = Repository.open(LocalStorage(str(repo)))
    m = r.load_manifest(volume, version)
    return json.dumps(m.header(), sort_keys=True, separators=(",", ":")).encode()


def run_small(*args: str | Path) -> Result:
    """Run a command and check that its peak memory stayed under MAX_RSS."""
    r, rss = run_cli_peak_rss(*args)
    print(f"peak RSS of {args[0]}: {rss / 2**20:.0f} MiB")
    assert rss < MAX_RSS, f"peak RSS {rss / 2**20:.0f} MiB\n" + describe(r)
    return r


# -- manifests --------------------------------------------------------------------------------

ManifestBomb = Callable[[Path, str, str], bytes]


def zeros_bomb(repo: Path, volume: str, version: str) -> bytes:
    """1 GiB of zeros: no manifest at all, 32 KB stored."""
    return seal_compressed(KIND_MANIFEST, f"versions/{volume}/{version}".encode(), zstd_frame())


def head_bomb(repo: Path, volume: str, version: str) -> bytes:
    """The real manifest's header and count, then zeros up to 1 GiB: only the size the header
    implies tells it from the real one."""
    header = manifest_header(repo, volume, version)
    count = -(-json.loads(header)["size"] // CHUNK)
    return seal_compressed(KIND_MANIFEST, f"versions/{volume}/{version}".encode(),
                           zstd_frame(index_head(MANIFEST_MAGIC, header, count)))


def deep_json_bomb(repo: Path, volume: str, version: str) -> bytes:
    """A well-framed manifest, checksum and all, whose header nests 100,000 levels deep."""
    header = json.loads(manifest_header(repo, volume, version))
    nested = "[" * DEEP + "]" * DEEP
    text = json.dumps(header, sort_keys=True, separators=(",", ":"))[:-1] + f',"x":{nested}}}'
    count = -(-header["size"] // CHUNK)
    # All-zero chunks (zero ids, stored size 0): consistent with the count.
    body = index_head(MANIFEST_MAGIC, text.encode(), count) + bytes(36 * count)
    key = f"versions/{volume}/{version}".encode()
    return bytes(envelope.seal(KIND_MANIFEST, key, body, None))


MANIFEST_BOMBS = {"zeros": zeros_bomb, "header-then-zeros": head_bomb, "deep-json": deep_json_bomb}


def bombed_manifest(base: Repo, tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A copy of the repository whose newest disk version's manifest is a bomb."""
    repo = base.copy(tmp_path / "repo")
    ver = base.versions["disk@v2"]
    (repo / "versions" / "disk" / ver).write_bytes(MANIFEST_BOMBS[kind](repo, "disk", ver))
    return repo, ver


@pytest.mark.parametrize("kind", MANIFEST_BOMBS)
def test_manifest_bomb_versions_lists_it_damaged_and_goes_on(base: Repo, tmp_path: Path,
                                                            kind: str) -> None:
    repo, ver = bombed_manifest(base, tmp_path, kind)
    r = run_small("versions", "--repo", repo, "--json")
    assert r.returncode == 0 and r.stderr == "", describe(r)
    rows = {(row["volume"], row["version_id"]): row
            for row in json.loads(r.stdout)["versions"]}
    assert len(rows) == 3
    error = rows[("disk", ver)]["unreadable"]
    assert f"manifest of disk@{ver}" in error and "\n" not in error
    assert rows[("disk", ver)]["size"] is None and rows[("disk", ver)]["created"]
    for name in ("disk@v1", "other@v1"):
        row = rows[(name.split("@")[0], base.versions[name])]
        assert row["unreadable"] is None and row["size"] > 0, row


@pytest.mark.parametrize("kind", MANIFEST_BOMBS)
@pytest.mark.parametrize("command", ["show", "restore"])
def test_manifest_bomb_show_and_restore_fail_in_one_line(base: Repo, tmp_path: Path, kind: str,
                                                        command: str) -> None:
    repo, ver = bombed_manifest(base, tmp_path, kind)
    target = tmp_path / "restored.img"
    args: list[str | Path] = [command, "--repo", repo, f"disk@{ver}"]
    if command == "restore":
        args.append(target)
    r = run_small(*args)
    assert_one_line_error(r, f"manifest of disk@{ver}", code=1)
    assert not target.exists()


@pytest.mark.parametrize("kind", MANIFEST_BOMBS)
def test_manifest_bomb_verify_reports_it_and_checks_the_rest(base: Repo, tmp_path: Path,
                                                            kind: str) -> None:
    repo, ver = bombed_manifest(base, tmp_path, kind)
    r = run_small("verify", "--repo", repo, "--json", "--deep")
    assert r.returncode == 1 and r.stderr == "", describe(r)
    report = json.loads(r.stdout)
    assert list(report["bad_versions"]) == [f"disk@{ver}"]
    assert report["versions"] == 2 and not report["bad_chunks"], report


@pytest.mark.parametrize("kind", MANIFEST_BOMBS)
def test_manifest_bomb_backup_skips_it_as_its_base(base: Repo, tmp_path: Path,
                                                   kind: str) -> None:
    """A bombed newest version must not stop every later backup of the volume (issue 10,
    item 6): the backup says so in one warning and builds on the newest readable version."""
    repo, ver = bombed_manifest(base, tmp_path, kind)
    before = sorted(p.name for p in (repo / "versions" / "disk").iterdir())
    image = tmp_path / "disk.img"
    sha = write_image(image, image_bytes(6 * CHUNK, seed=3))
    r = run_small("backup", "--repo", repo, image, "--volume", "disk", "--json")
    assert r.returncode == 0, describe(r)
    # (The base repository was backed up from another file: that is said too.)
    warning, = (line for line in r.stderr.strip().splitlines()
                if "was last backed up from" not in line)
    assert warning.startswith("snapship: warning: ") and f"manifest of disk@{ver}" in warning
    new = json.loads(r.stdout)["version_id"]
    assert new > ver
    assert sorted(p.name for p in (repo / "versions" / "disk").iterdir()) == sorted(
        [*before, new])
    assert not list(repo.glob("locks/writer-*")), "the writer lock was left behind"
    restored = tmp_path / "restored.img"
    assert run_small("restore", "--repo", repo, f"disk@{new}", restored).returncode == 0
    assert sha256_file(restored) == sha


@pytest.mark.parametrize("kind", MANIFEST_BOMBS)
def test_manifest_bomb_gc_rebuilding_its_references_stops_deleting_nothing(
        base: Repo, tmp_path: Path, kind: str) -> None:
    repo, ver = bombed_manifest(base, tmp_path, kind)
    (repo / "refs" / "disk" / ver).unlink()  # gc must read the manifest to rebuild the list
    chunks = sorted(p.name for p in (repo / "chunks").glob("*/*"))
    r = run_small("gc", "--repo", repo)
    assert_one_line_error(r, f"manifest of disk@{ver}", code=1)
    assert sorted(p.name for p in (repo / "chunks").glob("*/*")) == chunks


# -- reference lists --------------------------------------------------------------------------


def refs_bombs() -> dict[str, Callable[[str], bytes]]:
    def consistent(ver: str) -> bytes:
        """A head whose count matches 1 GiB exactly: only the stored size bounds it."""
        header = json.dumps({"volume": "disk", "version": ver, "writer": "w"}).encode()
        count = (BOMB_SIZE - 20 - len(header)) // 36
        head = index_head(REFS_MAGIC, header, count)
        return zstd_frame(head, len(head) + 36 * count)

    return {"zeros": lambda ver: zstd_frame(), "consistent-header": consistent}


@pytest.mark.parametrize("kind", ["zeros", "consistent-header"])
@pytest.mark.parametrize("command", ["gc", "prune"])
def test_refs_bomb_gc_and_prune_stop_in_one_line(base: Repo, tmp_path: Path, kind: str,
                                                 command: str) -> None:
    repo = base.copy(tmp_path / "repo")
    ver = base.versions["disk@v1"]
    key = f"refs/disk/{ver}"
    (repo / key).write_bytes(seal_compressed(KIND_REFS, key.encode(), refs_bombs()[kind](ver)))
    chunks = sorted(p.name for p in (repo / "chunks").glob("*/*"))
    args = ["gc"] if command == "gc" else ["prune", "--keep-last", "1"]
    r = run_small(*args, "--repo", repo)
    assert_one_line_error(r, f"reference list of disk@{ver}", code=1)
    assert sorted(p.name for p in (repo / "chunks").glob("*/*")) == chunks
    assert sorted(p.name for p in (repo / "versions" / "disk").iterdir()) == sorted(
        [base.versions["disk@v1"], base.versions["disk@v2"]])


# -- chunks -----------------------------------------------------------------------------------


def test_chunk_bomb_restore_fails_and_verify_reports_it(base: Repo, tmp_path: Path) -> None:
    repo = base.copy(tmp_path / "repo")
    path = sorted((repo / "chunks").glob("*/*"))[0]
    cid = bytes.fromhex(path.name)
    # Padded to the chunk's stored size, so that only reading it finds it is not the chunk.
    frame = zstd_frame()
    frame += bytes(path.stat().st_size - len(seal_compressed(KIND_CHUNK, cid, frame)))
    path.write_bytes(seal_compressed(KIND_CHUNK, cid, frame))
    r = run_small("verify", "--repo", repo, "--json", "--deep")
    assert r.returncode == 1, describe(r)
    report = json.loads(r.stdout)
    assert "declares" in report["bad_chunks"][path.name], report
    assert report["versions"] == 3
    affected = sorted(report["affected_versions"])
    assert affected
    r = run_small("restore", "--repo", repo, affected[0], tmp_path / "out.img")
    assert_one_line_error(r, f"chunk {path.name}", code=1)


def test_pristine_bomb_repository_is_fine(base: Repo) -> None:
    ok(run_cli("verify", "--repo", base.path, "--deep"))


# -- deep JSON elsewhere ----------------------------------------------------------------------


def deep_object(levels: int = DEEP) -> bytes:
    return ('{"chunks":' + "[" * levels + "]" * levels + ',"deep":true}').encode()


def test_deep_json_damage_marker_marks_the_version_damaged(base: Repo, tmp_path: Path) -> None:
    repo = base.copy(tmp_path / "repo")
    ver = base.versions["disk@v1"]
    (repo / "damaged" / "disk").mkdir(parents=True)
    (repo / "damaged" / "disk" / ver).write_bytes(deep_object())
    r = run_small("versions", "--repo", repo)
    assert r.returncode == 0 and r.stderr == "", describe(r)
    damaged = [line for line in r.stdout.splitlines() if "DAMAGED" in line]
    assert len(damaged) == 1 and damaged[0].startswith(f"disk@{ver}  "), describe(r)
    assert "a deep verify marked it" in damaged[0], describe(r)


def test_deep_json_config_is_one_line(base: Repo, tmp_path: Path) -> None:
    repo = base.copy(tmp_path / "repo")
    (repo / "config").write_bytes(deep_object(20_000))  # 40 KB
    assert_one_line_error(run_small("versions", "--repo", repo), "repository config",
                          "nested", code=1)


def test_server_answers_a_deep_missing_request_with_400(tmp_path: Path) -> None:
    import http.client

    from snapship.formats import http_api as api
    from tests.serverproc import create_repo_fast_kdf, http_storage, running_server

    with running_server(tmp_path) as (server, tokens):
        create_repo_fast_kdf(http_storage(server, "db", tokens["ops"]), "none")
        body = ('{"keys":' + "[" * DEEP + "]" * DEEP + "}").encode()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", f"{api.repo_path('', 'db')}/{api.MISSING}", body,
                     {"Authorization": f"Bearer {tokens['db1-backup']}",
                      api.API_HEADER: str(api.API_VERSION), "Content-Type": api.JSON_TYPE})
        resp = conn.getresponse()
        reply = resp.read()
        conn.close()
        assert resp.status == 400, (resp.status, reply, server.log())
        err = api.decode_error(reply)
        assert err is not None and err[0] == api.BAD_REQUEST and "nested" in err[1], reply
        assert "Traceback" not in server.log(), server.log()
