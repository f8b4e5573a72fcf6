"""Restore safety, restores to a pipe and differential restores (issue 12, items 2 and 4).

Every test drives the real CLI in a subprocess; block devices are real loop devices on the
host (a signature found by the real blkid, writes counted by the kernel's own statistics).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clihelp import (
    CHUNK,
    CLI,
    assert_json_error,
    assert_one_line_error,
    backup,
    can_use_loop_devices,
    cli_env,
    describe,
    image_bytes,
    init_repo_fast_kdf,
    loop_device,
    ok,
    run_cli,
    sha256,
    sha256_file,
    write_image,
)

CHUNKS = 24
IMAGE_SIZE = CHUNKS * CHUNK
MARK = b"SNAPSHIP INCOMPLETE RESTORE\n"


def _sbin(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


loop_reason = can_use_loop_devices()
for _tool in ("mkfs.ext4", "blkid"):
    if loop_reason is None and _sbin(_tool) is None:
        loop_reason = f"{_tool} is not installed"
needs_loop = pytest.mark.skipif(loop_reason is not None, reason=loop_reason or "")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str, bytes]:
    """An encrypted repository with one version of `disk`: (repo, version, sha, image)."""
    work = tmp_path_factory.mktemp("restore-modes")
    repo = work / "repo"
    init_repo_fast_kdf(repo)
    data = bytes(image_bytes(IMAGE_SIZE, seed=11, zero_chunks=(3, 4, 17)))
    sha = write_image(work / "disk.img", data)
    return repo, backup(repo, work / "disk.img", "disk"), sha, data


def restore_json(*args: str | Path) -> dict[str, object]:
    r = ok(run_cli("restore", *args, "--json"))
    out: dict[str, object] = json.loads(r.stdout)
    return out


def backing_file(path: Path, size: int, fill: bytes = b"\x5a") -> Path:
    path.write_bytes(fill * size)
    return path


def sectors_written(dev: Path) -> int:
    """The kernel's count of 512-byte sectors written to a block device (field 7 of stat)."""
    return int((Path("/sys/block") / dev.name / "stat").read_text().split()[6])


# -- safety on devices -----------------------------------------------------------------------


@needs_loop
def test_a_device_with_a_file_system_needs_force(repo: tuple[Path, str, str, bytes],
                                                 tmp_path: Path) -> None:
    repo_path, version, sha, _data = repo
    backing = backing_file(tmp_path / "fs.dev", IMAGE_SIZE, b"\0")
    with loop_device(backing) as dev:
        subprocess.run([_sbin("mkfs.ext4") or "mkfs.ext4", "-q", "-F", str(dev)], check=True,
                       timeout=120)
        before = sha256_file(dev)
        r = run_cli("restore", "--repo", repo_path, f"disk@{version}", dev)
        assert_one_line_error(r, str(dev), "ext4 file system", "--force", "nothing was written",
                              code=1)
        assert sha256_file(dev) == before, "the device was written to"
        ok(run_cli("restore", "--repo", repo_path, f"disk@{version}", dev, "--force"))
        assert sha256_file(dev) == sha


@needs_loop
def test_a_partition_table_needs_force_too(repo: tuple[Path, str, str, bytes],
                                           tmp_path: Path) -> None:
    repo_path, version, sha, _data = repo
    backing = backing_file(tmp_path / "pt.dev", IMAGE_SIZE, b"\0")
    mbr = bytearray(512)
    # One Linux partition from sector 2048... of the small disk: sector 64, 512 sectors.
    mbr[446:462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (64).to_bytes(4, "little") + \
        (512).to_bytes(4, "little")
    mbr[510:512] = b"\x55\xaa"
    with open(backing, "r+b") as f:
        f.write(mbr)
    with loop_device(backing) as dev:
        r = run_cli("restore", "--repo", repo_path, f"disk@{version}", dev)
        assert_one_line_error(r, "dos partition table", "--force", code=1)
        ok(run_cli("restore", "--repo", repo_path, f"disk@{version}", dev, "--force"))
        assert sha256_file(dev) == sha


@needs_loop
def test_force_never_overrides_a_busy_device(repo: tuple[Path, str, str, bytes],
                                             tmp_path: Path) -> None:
    repo_path, version, _sha, _data = repo
    backing = backing_file(tmp_path / "held.dev", IMAGE_SIZE)
    with loop_device(backing) as dev:
        holder = subprocess.Popen(
            [sys.executable, "-c", "import os, sys; os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL); "
             "print('held', flush=True); sys.stdin.read()", str(dev)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            r = run_cli("restore", "--repo", repo_path, f"disk@{version}", dev, "--force")
            assert_one_line_error(r, str(dev), "in use", code=1)
        finally:
            holder.communicate("", timeout=30)
        assert sha256_file(dev) == sha256(b"\x5a" * IMAGE_SIZE), "the device was written to"


@needs_loop
def test_a_larger_device_is_warned_about(repo: tuple[Path, str, str, bytes],
                                         tmp_path: Path) -> None:
    repo_path, version, sha, _data = repo
    backing = backing_file(tmp_path / "big.dev", IMAGE_SIZE + 8 * CHUNK)
    with loop_device(backing) as dev:
        r = ok(run_cli("restore", "--repo", repo_path, f"disk@{version}", dev))
        assert "larger than the version" in r.stderr and f"last {8 * CHUNK} bytes" in r.stderr
        assert sha256_file(dev, IMAGE_SIZE) == sha
        with open(dev, "rb") as f:
            f.seek(IMAGE_SIZE)
            assert f.read() == b"\x5a" * 8 * CHUNK


@needs_loop
def test_an_interrupted_device_restore_is_incomplete_and_does_not_mount(
    repo: tuple[Path, str, str, bytes], tmp_path: Path
) -> None:
    """A missing chunk stops the restore: the first chunk holds only the marker (no
    signature, so the old file system is gone and nothing half-written mounts), and the
    command says the device is incomplete. Restoring again needs no --force."""
    repo_path, version, sha, _data = repo
    broken = tmp_path / "repo"
    shutil.copytree(repo_path, broken)
    for p in (broken / "chunks").glob("*/*"):
        p.unlink()
    backing = backing_file(tmp_path / "fs.dev", IMAGE_SIZE, b"\0")
    with loop_device(backing) as dev:
        subprocess.run([_sbin("mkfs.ext4") or "mkfs.ext4", "-q", "-F", str(dev)], check=True,
                       timeout=120)
        r = run_cli("restore", "--repo", broken, f"disk@{version}", dev, "--force")
        assert r.returncode == 1, describe(r)
        assert "is missing" in r.stderr
        assert f"target {dev} is incomplete" in r.stderr
        with open(dev, "rb") as f:
            head = f.read(CHUNK)
        assert head.startswith(MARK) and head.rstrip(b"\0").endswith(f"@{version}\n".encode())
        probe = subprocess.run([_sbin("blkid") or "blkid", "-p", str(dev)],
                               capture_output=True, check=False, timeout=60)
        assert probe.returncode == 2, "a signature is left on the incomplete device"
        # Again, from the whole repository: no --force needed, and the image is whole.
        ok(run_cli("restore", "--repo", repo_path, f"disk@{version}", dev))
        assert sha256_file(dev) == sha


# -- standard output ---------------------------------------------------------------------------


def test_restore_to_stdout_writes_the_image_with_its_zeroes(
    repo: tuple[Path, str, str, bytes], tmp_path: Path
) -> None:
    repo_path, version, sha, data = repo
    out = tmp_path / "piped.img"
    with open(out, "wb") as f:
        p = subprocess.run([*CLI, "restore", "--repo", str(repo_path), f"disk@{version}", "-"],
                           stdout=f, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                           env=cli_env(), timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    assert sha256_file(out) == sha
    assert os.stat(out).st_blocks * 512 >= len(data), "zero chunks were not written"
    assert b"restored disk@" in p.stderr  # the report for people went to stderr
    r = run_cli("restore", "--repo", repo_path, "disk", "-", "--json")
    assert_json_error(r, "usage", 2, "--json cannot go with -")


def test_restore_to_a_closed_pipe_fails_in_one_line(repo: tuple[Path, str, str, bytes]) -> None:
    repo_path, version, _sha, _data = repo
    p = subprocess.run(f"{' '.join(CLI)} restore --repo {repo_path} disk@{version} - | head -c 10"
                       " >/dev/null; exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                       capture_output=True, text=True, env=cli_env(), timeout=120, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert "cannot write to standard output" in lines[0]


# -- differential -------------------------------------------------------------------------------


def _copy_differing(data: bytes, path: Path, chunks: dict[int, bytes]) -> None:
    img = bytearray(data)
    for i, fill in chunks.items():
        img[i * CHUNK : (i + 1) * CHUNK] = fill * CHUNK
    path.write_bytes(img)


def test_differential_restore_of_a_file_fetches_and_writes_only_what_differs(
    repo: tuple[Path, str, str, bytes], tmp_path: Path
) -> None:
    repo_path, version, sha, data = repo
    copy = tmp_path / "copy.img"
    # Chunk 5 and 9 differ; chunk 17 (zero in the version) holds data; 3 is zero already.
    _copy_differing(data, copy, {5: b"\x01", 9: b"\x02", 17: b"\x03"})
    ino = os.stat(copy).st_ino
    out = restore_json("--repo", repo_path, "--differential", f"disk@{version}", copy)
    assert sha256_file(copy) == sha
    assert os.stat(copy).st_ino == ino, "a differential restore updates the file in place"
    assert (out["mode"], out["chunks"], out["chunks_compared"]) == ("differential", CHUNKS,
                                                                    CHUNKS)
    assert (out["chunks_fetched"], out["chunks_written"], out["chunks_zero"]) == (2, 2, 1)
    assert isinstance(out["bytes_fetched"], int) and 0 < out["bytes_fetched"] < 3 * CHUNK
    # Identical now: nothing to fetch or write.
    again = restore_json("--repo", repo_path, "--differential", f"disk@{version}", copy)
    assert (again["chunks_fetched"], again["chunks_zero"], again["bytes_fetched"]) == (0, 0, 0)
    text = ok(run_cli("restore", "--repo", repo_path, "--differential", "disk", copy)).stdout
    assert "compared 24 of 24 chunks; fetched 0" in text


def test_differential_restore_cuts_or_extends_a_file_to_the_version(
    repo: tuple[Path, str, str, bytes], tmp_path: Path
) -> None:
    repo_path, version, sha, data = repo
    longer = tmp_path / "longer.img"
    longer.write_bytes(data + b"\x07" * (3 * CHUNK))
    ok(run_cli("restore", "--repo", repo_path, "--differential", f"disk@{version}", longer))
    assert sha256_file(longer) == sha
    shorter = tmp_path / "shorter.img"
    shorter.write_bytes(data[: 10 * CHUNK])
    out = restore_json("--repo", repo_path, "--differential", f"disk@{version}", shorter)
    assert sha256_file(shorter) == sha
    assert out["chunks_written"] == CHUNKS - 10 - 1  # chunk 17 is zero: already a hole


def test_differential_restore_needs_an_existing_target(repo: tuple[Path, str, str, bytes],
                                                       tmp_path: Path) -> None:
    repo_path, version, _sha, _data = repo
    r = run_cli("restore", "--repo", repo_path, "--differential", f"disk@{version}",
                tmp_path / "nothing.img")
    assert_one_line_error(r, "does not exist", "without --differential", code=1)
    r = run_cli("restore", "--repo", repo_path, "--differential", "disk", "-")
    assert_one_line_error(r, "--differential", code=2)


@needs_loop
def test_differential_restore_of_a_device_writes_only_the_differing_chunks(
    repo: tuple[Path, str, str, bytes], tmp_path: Path
) -> None:
    """Counted by the kernel: the loop device sees the two differing chunks written, plus the
    guard on the first chunk (blanked, then put back), and nothing else."""
    repo_path, version, sha, data = repo
    backing = tmp_path / "copy.dev"
    _copy_differing(data, backing, {6: b"\x01", 20: b"\x02"})
    with loop_device(backing) as dev:
        before = sectors_written(dev)
        out = restore_json("--repo", repo_path, "--differential", f"disk@{version}", dev)
        written = (sectors_written(dev) - before) * 512
        assert sha256_file(dev) == sha
        assert (out["chunks_fetched"], out["chunks_written"], out["chunks_zero"]) == (2, 2, 0)
        assert written == 2 * CHUNK + 2 * CHUNK, f"{written} bytes written"
        # Nothing differs: nothing at all is written.
        before = sectors_written(dev)
        restore_json("--repo", repo_path, "--differential", f"disk@{version}", dev)
        assert sectors_written(dev) == before


# -- verify --against ----------------------------------------------------------------------------


def test_verify_against_a_copy_lists_the_differing_chunks(
    repo: tuple[Path, str, str, bytes], tmp_path: Path
) -> None:
    repo_path, version, _sha, data = repo
    same = tmp_path / "same.img"
    same.write_bytes(data)
    r = ok(run_cli("verify", "--repo", repo_path, f"disk@{version}", "--against", same))
    assert f"all {CHUNKS} chunks match" in r.stdout
    copy = tmp_path / "copy.img"
    # 3 is a zero chunk of the version: data there differs too.
    _copy_differing(data, copy, {2: b"\x01", 3: b"\x02", 10: b"\x03", 11: b"\x04", 12: b"\x05"})
    chunk_dirs = sorted(p.name for p in (repo_path / "chunks").iterdir())
    r = run_cli("verify", "--repo", repo_path, f"disk@{version}", "--against", copy, "--json")
    assert r.returncode == 1, describe(r)
    out = json.loads(r.stdout)
    assert (out["ok"], out["chunks_compared"], out["chunks_differing"]) == (False, CHUNKS, 5)
    assert [(d["first"], d["count"], d["offset"], d["length"]) for d in out["differing"]] == \
        [(2, 2, 2 * CHUNK, 2 * CHUNK), (10, 3, 10 * CHUNK, 3 * CHUNK)]
    assert sorted(p.name for p in (repo_path / "chunks").iterdir()) == chunk_dirs
    text = run_cli("verify", "--repo", repo_path, f"disk@{version}", "--against", copy).stdout
    assert "5 of 24 chunks differ" in text and "chunks 10-12: offset" in text
    short = tmp_path / "short.img"
    short.write_bytes(data[: 20 * CHUNK + 5])
    r = run_cli("verify", "--repo", repo_path, f"disk@{version}", "--against", short, "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["chunks_compared"] == 20
    assert [(d["first"], d["count"]) for d in out["differing"]] == [(20, 4)]


def test_verify_against_usage(repo: tuple[Path, str, str, bytes], tmp_path: Path) -> None:
    repo_path, _version, _sha, _data = repo
    assert_one_line_error(run_cli("verify", "--repo", repo_path, "disk"), "--against", code=2)
    assert_one_line_error(run_cli("verify", "--repo", repo_path, "--against", "x.img"),
                          "needs the version", code=2)
    assert_one_line_error(run_cli("verify", "--repo", repo_path, "disk", "--against", "x.img",
                                  "--deep"), "--deep does not go with --against", code=2)
    assert_one_line_error(run_cli("verify", "--repo", repo_path, "disk", "--against",
                                  tmp_path / "none.img"), "cannot open source", code=1)


# -- usage of the LVM options ------------------------------------------------------------------


def test_lvm_options_need_an_lvm_target(repo: tuple[Path, str, str, bytes], tmp_path: Path
                                        ) -> None:
    repo_path, version, _sha, _data = repo
    target = tmp_path / "x.img"
    for extra, needle in ((["--rollback"], "need the target to be lvm:VG/LV"),
                          (["--thin-pool", "pool"], "need the target to be lvm:VG/LV"),
                          (["--pv", "/dev/vdb"], "need the target to be lvm:VG/LV")):
        r = run_cli("restore", "--repo", repo_path, f"disk@{version}", target, *extra)
        assert_one_line_error(r, needle, code=2)
    r = run_cli("restore", "--repo", repo_path, "--rollback", "--differential",
                f"disk@{version}", "lvm:vg/lv")
    assert_one_line_error(r, "--rollback does not go with --differential", code=2)
    assert not target.exists()
