"""Restoring onto something that already holds data (issue 10, item 4).

A block device that is mounted or otherwise in use is refused before anything is written. A
file is written under a temporary name beside the target and renamed over it only once the
restore is complete and synced: a failed or interrupted restore leaves an existing file as it
was, and no temporary file behind. Every test drives the real CLI in a subprocess.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clihelp import (
    CHUNK,
    assert_one_line_error,
    backup,
    can_use_loop_devices,
    describe,
    image_bytes,
    init_repo_fast_kdf,
    loop_device,
    ok,
    run_cli,
    sha256,
    sha256_file,
    start_cli,
    write_image,
)
from tests.fsimages import private_mounts

IMAGE_SIZE = 24 * CHUNK + 999


def restore_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".snapship-restore-" in p.name)


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str, bytes]:
    """An encrypted repository with one version of `disk`: (repo, version, sha, image)."""
    work = tmp_path_factory.mktemp("restore-target")
    repo = work / "repo"
    init_repo_fast_kdf(repo)
    data = bytes(image_bytes(IMAGE_SIZE, seed=7, zero_chunks=(2, 3)))
    sha = write_image(work / "disk.img", data)
    return repo, backup(repo, work / "disk.img", "disk"), sha, data


# -- block devices ---------------------------------------------------------------------------

def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _sbin(tool: str) -> str:
    found = _which(tool)
    assert found is not None
    return found


loop_reason = can_use_loop_devices()
for tool in ("mkfs.ext4", "e2fsck", "mount", "umount"):
    if loop_reason is None and _which(tool) is None:
        loop_reason = f"{tool} is not installed"
needs_loop = pytest.mark.skipif(loop_reason is not None, reason=loop_reason or "")


@contextlib.contextmanager
def mounted(dev: Path, mnt: Path) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    with private_mounts():  # tests/fsimages.py says why
        subprocess.run([_sbin("mount"), str(dev), str(mnt)], check=True, timeout=60)
        try:
            yield mnt
        finally:
            subprocess.run([_sbin("umount"), str(mnt)], check=False, timeout=60)


@needs_loop
def test_restore_onto_a_mounted_file_system_is_refused(
    small_repo: tuple[Path, str, str, bytes], tmp_path: Path
) -> None:
    repo, version, _sha, _data = small_repo
    backing = tmp_path / "fs.dev"
    backing.write_bytes(b"")
    os.truncate(backing, 16 << 20)
    payload = os.urandom(300_000)
    with loop_device(backing) as dev:
        subprocess.run([_sbin("mkfs.ext4"), "-q", "-F", str(dev)], check=True, timeout=120)
        with mounted(dev, tmp_path / "mnt") as mnt:
            (mnt / "precious.bin").write_bytes(payload)
            os.sync()
            r = run_cli("restore", "--repo", repo, f"disk@{version}", dev)
            assert_one_line_error(r, str(dev), "mounted", str(mnt), code=1)
            assert r.stdout == ""
            assert (mnt / "precious.bin").read_bytes() == payload
        # The file system is whole: a forced check finds nothing to fix...
        fsck = subprocess.run([_sbin("e2fsck"), "-f", "-n", str(dev)], capture_output=True,
                              text=True, timeout=120, check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        # ...and it mounts again with its file intact.
        with mounted(dev, tmp_path / "mnt") as mnt:
            assert (mnt / "precious.bin").read_bytes() == payload


@needs_loop
def test_restore_onto_a_device_held_open_exclusively_is_refused(
    small_repo: tuple[Path, str, str, bytes], tmp_path: Path
) -> None:
    """Not mounted, but claimed (as device-mapper, md or another program would): nothing is
    written, byte for byte."""
    repo, version, _sha, _data = small_repo
    backing = tmp_path / "held.dev"
    backing.write_bytes(b"\x5a" * (2 << 20))
    with loop_device(backing) as dev:
        holder = subprocess.Popen(
            [sys.executable, "-c", "import os, sys; os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL); "
             "print('held', flush=True); sys.stdin.read()", str(dev)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            r = run_cli("restore", "--repo", repo, f"disk@{version}", dev)
            assert_one_line_error(r, str(dev), "in use", code=1)
        finally:
            holder.communicate("", timeout=30)
        assert sha256_file(dev) == sha256(b"\x5a" * (2 << 20)), "the device was written to"
        # Once released, the same restore goes through.
        ok(run_cli("restore", "--repo", repo, f"disk@{version}", dev))
        assert sha256_file(dev, IMAGE_SIZE) == small_repo[2]


# -- files ------------------------------------------------------------------------------------


def test_failed_restore_leaves_an_existing_file_byte_identical(
    small_repo: tuple[Path, str, str, bytes], tmp_path: Path
) -> None:
    repo_src, version, _sha, _data = small_repo
    repo = tmp_path / "repo"
    shutil.copytree(repo_src, repo)
    chunk = sorted((repo / "chunks").glob("*/*"))[0]
    chunk.unlink()
    work = tmp_path / "work"
    work.mkdir()
    target = work / "precious.img"
    original = os.urandom(3 * IMAGE_SIZE)  # longer than the image, non-zero everywhere
    target.write_bytes(original)
    target.chmod(0o640)
    before = os.stat(target)

    r = run_cli("restore", "--repo", repo, f"disk@{version}", target)
    assert_one_line_error(r, f"chunk {chunk.name}", "missing", code=1)
    assert target.read_bytes() == original, "the existing file was changed"
    after = os.stat(target)
    assert (after.st_ino, stat.S_IMODE(after.st_mode)) == (before.st_ino, 0o640)
    assert sorted(p.name for p in work.iterdir()) == ["precious.img"], "a temporary file is left"


def test_successful_restore_replaces_an_existing_file(
    small_repo: tuple[Path, str, str, bytes], tmp_path: Path
) -> None:
    repo, version, sha, _data = small_repo
    target = tmp_path / "disk.img"
    original = b"\xff" * (IMAGE_SIZE + 5 * CHUNK)
    target.write_bytes(original)
    target.chmod(0o604)
    with open(target, "rb") as reader:  # someone reading the old image during the restore
        r = ok(run_cli("restore", "--repo", repo, f"disk@{version}", target))
        assert str(target) in r.stdout
        assert sha256_file(target) == sha
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o604, "permission bits not kept"
        # The old file was replaced, not rewritten under the reader: it still reads whole.
        assert reader.read() == original
    assert restore_leftovers(tmp_path) == []
    # Zero chunks are still holes.
    assert os.stat(target).st_blocks * 512 <= (IMAGE_SIZE // CHUNK - 1) * CHUNK


def test_restore_to_a_new_file_is_private(
    small_repo: tuple[Path, str, str, bytes], tmp_path: Path
) -> None:
    repo, version, sha, _data = small_repo
    target = tmp_path / "new.img"
    ok(run_cli("restore", "--repo", repo, f"disk@{version}", target))
    assert sha256_file(target) == sha
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert restore_leftovers(tmp_path) == []


def test_restore_through_a_symlink_replaces_the_file_it_names(
    small_repo: tuple[Path, str, str, bytes], tmp_path: Path
) -> None:
    repo, version, sha, _data = small_repo
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "disk.img"
    real.write_bytes(b"old")
    link = tmp_path / "link.img"
    link.symlink_to(real)
    ok(run_cli("restore", "--repo", repo, f"disk@{version}", link))
    assert link.is_symlink() and sha256_file(real) == sha
    assert restore_leftovers(tmp_path / "real") == [] and restore_leftovers(tmp_path) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_restore_leaves_an_existing_file_and_no_temporary(
    tmp_path: Path, signum: int
) -> None:
    repo = tmp_path / "repo"
    init_repo_fast_kdf(repo)
    size = 48 << 20  # long enough to be caught in the middle
    write_image(tmp_path / "big.img", image_bytes(size, seed=3))
    version = backup(repo, tmp_path / "big.img", "big")
    work = tmp_path / "work"
    work.mkdir()
    target = work / "big.img"
    original = os.urandom(1 << 20)
    target.write_bytes(original)

    proc = start_cli("restore", "--repo", repo, f"big@{version}", target)
    try:
        deadline = time.monotonic() + 60
        # Catch it once it has begun writing (a temporary file, or the target itself changed).
        while not restore_leftovers(work) and os.stat(target).st_size == len(original):
            assert proc.poll() is None, "restore ended before it could be interrupted"
            assert time.monotonic() < deadline, "restore never started writing"
            time.sleep(0.001)
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(signum)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert proc.returncode == 128 + signum, describe(result)
    said = "terminated" if signum == signal.SIGTERM else "interrupted"
    assert err.strip() == f"snapship: {said}", describe(result)
    assert target.read_bytes() == original
    assert sorted(p.name for p in work.iterdir()) == ["big.img"], "a temporary file is left"
