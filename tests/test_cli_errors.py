"""What a user sees when something is wrong: one `snapship: error:` line, a non-zero exit.

Every test drives the real CLI in a subprocess. Damage tests (flipped bytes, truncated and
deleted objects) work on copies of small repositories built once per module, in both
encryption modes, and check that `restore` names the damaged object (chunk id, version and
offset) and that `verify` reports it with the versions it affects.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapship.repository.repo import Repository
from snapship.storage.local import LocalStorage
from tests.clihelp import (
    CHUNK,
    PASSPHRASE,
    Args,
    assert_json_error,
    assert_one_line_error,
    assert_restores,
    assert_verify_ok,
    backup,
    can_use_loop_devices,
    copy_repo,
    describe,
    image_bytes,
    init_repo,
    init_repo_fast_kdf,
    loop_device,
    ok,
    run_cli,
    sha256,
    sha256_file,
    verify,
    write_image,
)

ENCRYPTIONS = ["aes-256-gcm", "none"]
DISK_SIZE = 32 * CHUNK + 12345  # a partial last chunk
DISK_ZERO_CHUNKS = (3, 7, 8)
SHARED = 5  # a non-zero chunk that disk@v1 and disk@v2 share and `other` does not
V2_ONLY = 10  # a chunk index that disk@v2 rewrote


@dataclass(frozen=True)
class BaseRepo:
    """A pristine repository: disk@v1, disk@v2 (two chunks changed) and other@v1.

    Tests that damage it work on a copy (`BaseRepo.copy`).
    """

    path: Path
    encryption: str
    v1: str
    v2: str
    other: str
    sha: dict[str, str]  # "disk@<v1>" etc. -> SHA-256 of the image
    ids: dict[str, list[bytes]]  # version id -> chunk id of every chunk index

    def copy(self, dst: Path) -> Path:
        return copy_repo(self.path, dst)

    def chunk_path(self, repo: Path, version: str, index: int) -> tuple[str, Path]:
        cid = self.ids[version][index]
        h = cid.hex()
        return h, repo / "chunks" / h[:2] / h


BaseRepoFactory = Callable[[str], BaseRepo]


@pytest.fixture(scope="module")
def base_repo_factory(tmp_path_factory: pytest.TempPathFactory) -> BaseRepoFactory:
    cache: dict[str, BaseRepo] = {}

    def get(encryption: str) -> BaseRepo:
        if encryption not in cache:
            cache[encryption] = _build_base_repo(
                tmp_path_factory.mktemp(f"base-{encryption}"), encryption
            )
        return cache[encryption]

    return get


def _build_base_repo(work: Path, encryption: str) -> BaseRepo:
    repo = work / "repo"
    init_repo_fast_kdf(repo, encryption)
    disk = image_bytes(DISK_SIZE, seed=1, zero_chunks=DISK_ZERO_CHUNKS)
    sha1 = write_image(work / "disk1.img", disk)
    v1 = backup(repo, work / "disk1.img", "disk", "day=1")
    for i in (V2_ONLY, 20):
        disk[i * CHUNK : (i + 1) * CHUNK] = image_bytes(CHUNK, seed=100 + i)
    sha2 = write_image(work / "disk2.img", disk)
    v2 = backup(repo, work / "disk2.img", "disk", "day=2")
    sha3 = write_image(work / "other.img", image_bytes(6 * CHUNK + 1, seed=2))
    other = backup(repo, work / "other.img", "other")

    r = Repository.open(LocalStorage(str(repo)), lambda: PASSPHRASE.encode())
    ids: dict[str, list[bytes]] = {}
    for volume, version in (("disk", v1), ("disk", v2), ("other", other)):
        m = r.load_manifest(volume, version)
        ids[version] = [m.chunk(i) for i in range(m.count)]
    assert ids[v1][SHARED] == ids[v2][SHARED] != bytes(32)
    assert ids[v1][SHARED] not in ids[other]
    assert ids[v2][V2_ONLY] not in ids[v1] and ids[v2][V2_ONLY] not in ids[other]
    return BaseRepo(
        path=repo,
        encryption=encryption,
        v1=v1,
        v2=v2,
        other=other,
        sha={f"disk@{v1}": sha1, f"disk@{v2}": sha2, f"other@{other}": sha3},
        ids=ids,
    )


def flip_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def tree_snapshot(repo: Path) -> dict[str, bytes]:
    """Every file of a repository with its content: to show a failed command changed nothing."""
    return {str(p.relative_to(repo)): p.read_bytes() for p in repo.rglob("*") if p.is_file()}


# -- passphrase, repository, volume and version ------------------------------------------


def test_wrong_passphrase(base_repo_factory: BaseRepoFactory, tmp_path: Path) -> None:
    base = base_repo_factory("aes-256-gcm")
    before = tree_snapshot(base.path)
    commands: list[Args] = [
        ["versions", "--repo", base.path, "--json"],
        ["restore", "--repo", base.path, "disk", tmp_path / "out.img"],
        ["backup", "--repo", base.path, tmp_path / "src.img", "--volume", "disk"],
    ]
    for args in commands:
        (tmp_path / "src.img").write_bytes(b"x" * 1000)
        r = run_cli(*args, passphrase="not the passphrase")
        if "--json" in args:  # the error object (docs/json.md)
            assert_json_error(r, "auth", 1, "wrong passphrase")
        else:
            assert_one_line_error(r, "wrong passphrase", code=1)
        assert r.stdout == ""
    pw_file = tmp_path / "pw"
    pw_file.write_text("also wrong\n")
    r = run_cli("versions", "--repo", base.path, "--passphrase-file", pw_file, passphrase=None)
    assert_one_line_error(r, "wrong passphrase", code=1)
    assert not (tmp_path / "out.img").exists()
    assert tree_snapshot(base.path) == before


def test_missing_passphrase(base_repo_factory: BaseRepoFactory, tmp_path: Path) -> None:
    base = base_repo_factory("aes-256-gcm")
    r = run_cli("versions", "--repo", base.path, passphrase=None)
    assert_one_line_error(r, "passphrase", code=1)
    r = run_cli(
        "versions", "--repo", base.path, "--passphrase-file", tmp_path / "nope", passphrase=None
    )
    assert_one_line_error(r, "cannot read passphrase file", code=2)


@pytest.mark.parametrize("kind", ["nonexistent", "empty-dir"])
def test_missing_repository(tmp_path: Path, kind: str) -> None:
    repo = tmp_path / "repo"
    if kind == "empty-dir":
        repo.mkdir()
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(3 * CHUNK))
    commands: list[Args] = [
        ["versions", "--repo", repo],
        ["show", "--repo", repo, "disk@latest"],
        ["restore", "--repo", repo, "disk", tmp_path / "out.img"],
        ["verify", "--repo", repo],
        ["backup", "--repo", repo, src, "--volume", "disk"],
    ]
    for args in commands:
        r = run_cli(*args)
        assert_one_line_error(r, "no snapship repository at", str(repo), code=1)
    # Nothing was created on the way: not the repository, not the restore target.
    if kind == "empty-dir":
        assert list(repo.iterdir()) == []
    else:
        assert not repo.exists()
    assert not (tmp_path / "out.img").exists()
    r = run_cli("versions")
    assert_one_line_error(r, "no repository given", code=2)


def test_unknown_version_and_volume(base_repo_factory: BaseRepoFactory, tmp_path: Path) -> None:
    base = base_repo_factory("none")
    target = tmp_path / "out.img"
    r = run_cli("restore", "--repo", base.path, "disk@nope", target)
    assert_one_line_error(r, "volume disk has no version nope", code=1)
    r = run_cli("show", "--repo", base.path, "disk@nope", "--json")
    assert_json_error(r, "not-found", 1, "volume disk has no version nope")
    r = run_cli("restore", "--repo", base.path, "nosuchvolume", target)
    assert_one_line_error(r, "volume nosuchvolume has no versions", code=1)
    r = run_cli("show", "--repo", base.path, "nosuchvolume@" + base.v1)
    assert_one_line_error(r, "volume nosuchvolume has no versions", code=1)
    assert not target.exists()
    # A version id of one volume is not a version of another.
    r = run_cli("restore", "--repo", base.path, "other@" + base.v1, target)
    assert_one_line_error(r, "volume other has no version", code=1)


def test_init_on_existing_repository(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(repo, "aes-256-gcm")  # the real thing, with the default scrypt cost
    before = tree_snapshot(repo)
    assert len(before) == 2 and "config" in before
    assert re.fullmatch(r"keys/[0-9a-f]{16}", next(k for k in before if k != "config"))
    for encryption in ENCRYPTIONS:
        r = run_cli("init", "--repo", repo, "--encryption", encryption, "--chunk-size", "64K")
        assert_one_line_error(r, "already exists", str(repo), code=2)
    assert tree_snapshot(repo) == before  # the key and config were not replaced
    assert_one_line_error(
        run_cli("versions", "--repo", repo, passphrase="wrong"), "wrong passphrase", code=1
    )
    assert json.loads(ok(run_cli("versions", "--repo", repo, "--json")).stdout)["versions"] == []


@pytest.mark.parametrize("size", ["3000", "32M", "96K", "0", "32K", "1G", "abc", "64X", ""])
def test_bad_chunk_size(tmp_path: Path, size: str) -> None:
    repo = tmp_path / "repo"
    r = run_cli("init", "--repo", repo, f"--chunk-size={size}")
    assert_one_line_error(r, code=2)
    assert "chunk size" in r.stderr or "not a size" in r.stderr, describe(r)
    assert not (repo / "config").exists()


def test_bad_label(base_repo_factory: BaseRepoFactory, tmp_path: Path) -> None:
    base = base_repo_factory("none")
    before = tree_snapshot(base.path)
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(2 * CHUNK))
    for label in ["novalue", "=value", ""]:
        r = run_cli(
            "backup",
            "--repo",
            base.path,
            src,
            "--volume",
            "disk",
            "--label",
            "ok=1",
            "--label",
            label,
        )
        assert_one_line_error(r, "label", "key=value", code=2)
    assert tree_snapshot(base.path) == before


@pytest.mark.parametrize(
    "name",
    ["bad/name", "../up", ".hidden", "-dash", "has space", "a" * 129, "tab\tname", "uni\u00e9"],
)
def test_invalid_volume_name(base_repo_factory: BaseRepoFactory, tmp_path: Path, name: str) -> None:
    base = base_repo_factory("none")
    before = tree_snapshot(base.path)
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(2 * CHUNK))
    r = run_cli("backup", "--repo", base.path, src, f"--volume={name}")
    assert_one_line_error(r, "invalid volume name", code=2)
    r = run_cli("restore", "--repo", base.path, "--", f"{name}@latest", tmp_path / "out.img")
    assert_one_line_error(r, "invalid volume name", code=2)
    assert tree_snapshot(base.path) == before
    assert not (tmp_path / "out.img").exists()


def test_invalid_volume_name_in_other_commands(base_repo_factory: BaseRepoFactory) -> None:
    base = base_repo_factory("none")
    commands: list[Args] = [
        ["show", "--repo", base.path, "@" + base.v1],
        ["versions", "--repo", base.path, "--volume", "a/b"],
        ["verify", "--repo", base.path, "--volume", "a/b"],
    ]
    for args in commands:
        assert_one_line_error(run_cli(*args), "invalid volume name", code=2)


# -- sources and targets -------------------------------------------------------------------


def _backup_error(repo: Path, source: Path | str, *fragments: str, timeout: float = 60.0) -> None:
    try:
        r = run_cli("backup", "--repo", repo, source, "--volume", "bad", timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"backup of {source} did not fail within {timeout} s (it hangs)")
    assert_one_line_error(r, str(source), *fragments, code=1)
    assert r.stdout == ""


def test_unreadable_source(base_repo_factory: BaseRepoFactory, tmp_path: Path) -> None:
    base = base_repo_factory("none")
    before = tree_snapshot(base.path)
    _backup_error(base.path, tmp_path / "nonexistent.img", "cannot open source", "no such file")
    _backup_error(base.path, tmp_path, "not a regular file or a block device")
    _backup_error(base.path, "/dev/null", "not a regular file or a block device")
    assert tree_snapshot(base.path) == before


def test_fifo_source_is_refused_not_waited_on(
    base_repo_factory: BaseRepoFactory, tmp_path: Path
) -> None:
    """Opening a FIFO for reading blocks until a writer appears: must not hang the backup."""
    base = base_repo_factory("none")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _backup_error(base.path, fifo, "not a regular file or a block device", timeout=4.0)


def test_source_without_read_permission(base_repo_factory: BaseRepoFactory, tmp_path: Path) -> None:
    base = base_repo_factory("none")
    src = tmp_path / "secret.img"
    src.write_bytes(os.urandom(2 * CHUNK))
    src.chmod(0)
    prefix: list[str] = []
    if os.geteuid() == 0:
        # Root reads anything: drop the capabilities that let it ignore file modes.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        caps = "-dac_override,-dac_read_search"
        prefix = [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]
    r = run_cli("backup", "--repo", base.path, src, "--volume", "secret", prefix=prefix)
    assert_one_line_error(r, "cannot open source", str(src), "permission denied", code=1)
    assert not (base.path / "versions" / "secret").exists()


loop_reason = can_use_loop_devices()
needs_loop = pytest.mark.skipif(loop_reason is not None, reason=loop_reason or "")


@needs_loop
def test_restore_to_too_small_block_device(
    base_repo_factory: BaseRepoFactory, tmp_path: Path
) -> None:
    base = base_repo_factory("aes-256-gcm")
    backing = tmp_path / "small.dev"
    backing.write_bytes(b"\xa5" * (1 << 20))
    with loop_device(backing) as dev:
        assert stat.S_ISBLK(os.stat(dev).st_mode)
        r = run_cli("restore", "--repo", base.path, f"disk@{base.v1}", dev)
        assert_one_line_error(r, "too small", str(dev), str(1 << 20), str(DISK_SIZE), code=1)
        assert sha256_file(dev) == sha256(b"\xa5" * (1 << 20)), "the device was written to"


@needs_loop
def test_restore_to_block_device(base_repo_factory: BaseRepoFactory, tmp_path: Path) -> None:
    base = base_repo_factory("aes-256-gcm")
    backing = tmp_path / "big.dev"
    dev_size = 40 * CHUNK
    backing.write_bytes(b"\xa5" * dev_size)  # non-zero everywhere, the zero chunks included
    with loop_device(backing) as dev:
        r = ok(run_cli("restore", "--repo", base.path, f"disk@{base.v1}", dev, "--json"))
        assert '"chunks_zero": 3' in r.stdout
        assert sha256_file(dev, DISK_SIZE) == base.sha[f"disk@{base.v1}"]
        with open(dev, "rb") as f:
            for i in DISK_ZERO_CHUNKS:
                f.seek(i * CHUNK)
                assert f.read(CHUNK) == bytes(CHUNK), f"zero chunk {i} not zeroed on the device"
            # Restore writes the image, not the whole device: the rest is left alone.
            f.seek(DISK_SIZE)
            assert f.read() == b"\xa5" * (dev_size - DISK_SIZE)
        # A restore onto a device that already holds other data gives the same result.
        restore_other = ok(run_cli("restore", "--repo", base.path, f"disk@{base.v2}", dev))
        assert restore_other.returncode == 0
        assert sha256_file(dev, DISK_SIZE) == base.sha[f"disk@{base.v2}"]


# -- damaged objects -----------------------------------------------------------------------


@pytest.mark.parametrize("encryption", ENCRYPTIONS)
@pytest.mark.parametrize("where", ["magic", "flags", "middle", "last"])
def test_flipped_byte_in_chunk(
    base_repo_factory: BaseRepoFactory, tmp_path: Path, encryption: str, where: str
) -> None:
    base = base_repo_factory(encryption)
    repo = base.copy(tmp_path / "repo")
    hexid, path = base.chunk_path(repo, base.v1, SHARED)
    size = path.stat().st_size
    flip_byte(path, {"magic": 0, "flags": 6, "middle": size // 2, "last": size - 1}[where])

    r = run_cli("restore", "--repo", repo, f"disk@{base.v1}", tmp_path / "out.img")
    assert_one_line_error(
        r, f"chunk {hexid}", f"disk@{base.v1}", f"offset {SHARED * CHUNK}", code=1
    )
    code, report = verify(repo, deep=True)
    assert code == 1 and report["ok"] is False
    assert set(report["bad_chunks"]) == {hexid}, report
    assert report["affected_versions"] == {
        f"disk@{base.v1}": [hexid],
        f"disk@{base.v2}": [hexid],
    }, report
    assert report["bad_versions"] == {}
    # The damage is confined: a version without that chunk still restores.
    assert_restores(
        repo, f"other@{base.other}", tmp_path / "other.img", base.sha[f"other@{base.other}"]
    )


@pytest.mark.parametrize("encryption", ENCRYPTIONS)
def test_flipped_byte_in_manifest(
    base_repo_factory: BaseRepoFactory, tmp_path: Path, encryption: str
) -> None:
    base = base_repo_factory(encryption)
    repo = base.copy(tmp_path / "repo")
    path = repo / "versions" / "disk" / base.v2
    flip_byte(path, path.stat().st_size // 2)
    name = f"disk@{base.v2}"

    for ref in (name, "disk"):
        r = run_cli("restore", "--repo", repo, ref, tmp_path / "out.img")
        assert_one_line_error(r, "manifest", name, code=1)
    code, report = verify(repo, deep=True)
    assert code == 1 and report["ok"] is False
    assert set(report["bad_versions"]) == {name}, report
    assert report["versions"] == 2  # the two intact ones were still checked
    assert report["bad_chunks"] == {}
    # `show` reads the version's summary, not its manifest (docs/format.md, "Version
    # summary"; issue 16): a manifest damaged in place, at its recorded size, is found by
    # restore and verify, as above, not by show.
    r = run_cli("show", "--repo", repo, name, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["version_id"] == base.v2, describe(r)
    assert_restores(repo, f"disk@{base.v1}", tmp_path / "v1.img", base.sha[f"disk@{base.v1}"])


@pytest.mark.parametrize("encryption", ENCRYPTIONS)
def test_truncated_chunk(
    base_repo_factory: BaseRepoFactory, tmp_path: Path, encryption: str
) -> None:
    base = base_repo_factory(encryption)
    repo = base.copy(tmp_path / "repo")
    hexid, path = base.chunk_path(repo, base.v1, SHARED)
    os.truncate(path, path.stat().st_size // 2)

    r = run_cli("restore", "--repo", repo, f"disk@{base.v2}", tmp_path / "out.img")
    assert_one_line_error(
        r, f"chunk {hexid}", f"disk@{base.v2}", f"offset {SHARED * CHUNK}", code=1
    )
    for deep in (False, True):
        code, report = verify(repo, deep=deep)
        assert code == 1 and report["ok"] is False, (deep, report)
        assert set(report["bad_chunks"]) == {hexid}, (deep, report)
        assert set(report["affected_versions"]) == {f"disk@{base.v1}", f"disk@{base.v2}"}


@pytest.mark.parametrize("encryption", ENCRYPTIONS)
def test_deleted_chunk(base_repo_factory: BaseRepoFactory, tmp_path: Path, encryption: str) -> None:
    base = base_repo_factory(encryption)
    repo = base.copy(tmp_path / "repo")
    hexid, path = base.chunk_path(repo, base.v2, V2_ONLY)
    path.unlink()

    r = run_cli("restore", "--repo", repo, f"disk@{base.v2}", tmp_path / "out.img")
    assert_one_line_error(
        r, f"chunk {hexid}", f"disk@{base.v2}", f"offset {V2_ONLY * CHUNK}", "missing", code=1
    )
    for deep in (False, True):
        code, report = verify(repo, deep=deep)
        assert code == 1 and report["ok"] is False, (deep, report)
        assert report["bad_chunks"] == {hexid: "missing"}, (deep, report)
        assert report["affected_versions"] == {f"disk@{base.v2}": [hexid]}, (deep, report)
    assert_restores(repo, f"disk@{base.v1}", tmp_path / "v1.img", base.sha[f"disk@{base.v1}"])


@pytest.mark.parametrize("encryption", ENCRYPTIONS)
def test_pristine_base_repository_verifies(
    base_repo_factory: BaseRepoFactory, encryption: str
) -> None:
    """The control for the damage tests: before any damage, verify passes in both modes."""
    base = base_repo_factory(encryption)
    for deep in (False, True):
        report = assert_verify_ok(base.path, deep=deep)
        assert report["versions"] == 3
