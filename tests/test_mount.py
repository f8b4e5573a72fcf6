"""`snapship mount` / `umount` on this host: nbdfuse and a loop device, for real.

The host has no nbd module, so the mount goes through nbdfuse (a FUSE file) and a loop
device; the VM test (tests/vm/test_vm_mount.py) covers the kernel's NBD client. After every
umount, and after a SIGKILL of the mount process followed by umount, nothing may remain: no
mount on the directory, no FUSE mount, no loop device on the FUSE file, no state record, no
nbdfuse process, no runtime directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from snapship import attach
from tests.clihelp import (
    CLI,
    cli_env,
    describe,
    init_repo_fast_kdf,
    ok,
    run_cli,
    state_dir,
    wait_for,
)

MiB = 1 << 20


def make_ext4(path: Path, size: int, files: dict[str, bytes]) -> None:
    """An ext4 image holding `files`, made without mounting (mkfs.ext4 -d)."""
    content = path.parent / f"{path.name}.d"
    content.mkdir()
    for name, data in files.items():
        (content / name).write_bytes(data)
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(path)], check=True)


def make_disk(path: Path, partitions: list[tuple[int, Path | None, int]]) -> None:
    """An MBR disk image: (start sector, content or None, size in sectors) per partition."""
    size = max(start + sectors for start, _, sectors in partitions) * 512 + MiB
    mbr = bytearray(512)
    for i, (start, _, sectors) in enumerate(partitions):
        mbr[446 + 16 * i : 462 + 16 * i] = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83,
                                                       b"\xff\xff\xff", start, sectors)
    mbr[510:512] = b"\x55\xaa"
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(mbr)
        for start, content, _ in partitions:
            if content is not None:
                f.seek(start * 512)
                f.write(content.read_bytes())


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    tmp = tmp_path_factory.mktemp("mount")
    repo = tmp / "repo"
    init_repo_fast_kdf(repo)
    files = {"file": os.urandom(3 * MiB + 123), "small.txt": b"hello\n"}
    fs = tmp / "fs.img"
    make_ext4(fs, 24 * MiB, files)
    ok(run_cli("backup", "--repo", repo, fs, "--volume", "fs"))
    disk = tmp / "disk.img"
    make_disk(disk, [(2048, None, 2048), (8192, fs, 24 * MiB // 512)])
    ok(run_cli("backup", "--repo", repo, disk, "--volume", "disk"))
    return repo, files


def mount(repo: Path, ref: str, directory: Path, *extra: str) -> dict[str, Any]:
    r = ok(run_cli("mount", "--repo", repo, ref, directory, "--json", *extra))
    report: dict[str, Any] = json.loads(r.stdout)
    return report


def record_of(directory: Path) -> dict[str, Any]:
    files = list((state_dir() / "mounts").glob("*.json"))
    records = [json.loads(f.read_text()) for f in files]
    mine: list[dict[str, Any]] = [r for r in records
                                  if r["directory"] == str(directory.resolve())]
    assert len(mine) == 1, records
    return mine[0]


def assert_nothing_left(record: dict[str, Any]) -> None:
    directory = record["directory"]
    assert attach.mounted_at(directory) is None
    assert not [m for m in attach.mounts() if m.target.startswith(record["runtime_dir"])]
    assert not os.path.exists(record["runtime_dir"])
    # No loop device on the FUSE file (its path cannot be stat'ed any more: compare names).
    loops = subprocess.run(["losetup", "--list", "--noheadings", "--output", "BACK-FILE"],
                           capture_output=True, text=True, check=True).stdout
    assert record["runtime_dir"] not in loops, loops
    if record.get("fuse_pid"):
        # A process just ended may still wait for init to reap it: gone or a zombie.
        wait_for(lambda: not attach.alive(record["fuse_pid"], record["fuse_start"]),
                 "nbdfuse's exit", 10)
    assert not attach.alive(record["pid"], record["pid_start"])
    assert not [r for r in (state_dir() / "mounts").glob("*.json")
                if json.loads(r.read_text())["directory"] == directory]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_mount_reads_a_file_and_umount_leaves_nothing(
        repo: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:  # fmt: skip
    path, files = repo
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    report = mount(path, "fs", mnt)
    assert report["client"] == "fuse" and report["filesystem"] == "ext4"
    assert report["writable"] is False and report["partition"] is None
    record = record_of(mnt)
    entry = attach.mounted_at(str(mnt))
    assert entry is not None and entry.source.startswith("/dev/loop")
    assert sha((mnt / "file").read_bytes()) == sha(files["file"])
    assert (mnt / "small.txt").read_bytes() == b"hello\n"
    with pytest.raises(OSError):  # read-only
        (mnt / "new").write_bytes(b"x")
    # A second mount on the same directory is refused while the first one stands.
    again = run_cli("mount", "--repo", path, "fs", mnt)
    assert again.returncode == 2 and "snapship umount" in again.stderr, describe(again)
    r = ok(run_cli("umount", mnt, "--json"))
    out = json.loads(r.stdout)
    assert out["command"] == "umount" and out["mount_process"] == "stopped"
    assert_nothing_left(record)


def test_a_partition_after_sigkill_is_torn_down_by_umount(
        repo: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:  # fmt: skip
    path, files = repo
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    report = mount(path, "disk", mnt, "--partition", "2")
    assert report["partition"] == 2 and report["filesystem"] == "ext4"
    assert sha((mnt / "file").read_bytes()) == sha(files["file"])
    record = record_of(mnt)
    os.kill(report["pid"], signal.SIGKILL)
    wait_for(lambda: not attach.alive(record["pid"], record["pid_start"]), "the kill", 10)
    assert attach.mounted_at(str(mnt)) is not None  # what the killed process left
    r = ok(run_cli("umount", mnt, "--json"))
    assert json.loads(r.stdout)["mount_process"] == "gone"
    assert_nothing_left(record)


def test_a_foreground_mount_ends_on_ctrl_c(
        repo: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:  # fmt: skip
    path, files = repo
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([*CLI, "mount", "--repo", str(path), "fs", str(mnt),
                             "--foreground", "--writable", "--json"], env=cli_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        report = json.loads(proc.stdout.readline())
        assert report["writable"] is True and report["pid"] == proc.pid
        record = record_of(mnt)
        (mnt / "new").write_bytes(b"written into the overlay")
        assert sha((mnt / "file").read_bytes()) == sha(files["file"])
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            run_cli("umount", mnt)
    assert proc.returncode in (0, 130), proc.stderr.read() if proc.stderr else ""
    assert_nothing_left(record)
    # The version never changed: mounted again, it holds no "new".
    mount(path, "fs", mnt)
    try:
        assert not (mnt / "new").exists()
    finally:
        ok(run_cli("umount", mnt))


def test_bad_requests_are_one_line_errors_and_attach_nothing(
        repo: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:  # fmt: skip
    path, _ = repo
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cases: list[tuple[list[str | Path], int, str]] = [
        (["mount", "--repo", path, "fs", tmp_path / "nodir"], 2, "is not a directory"),
        (["mount", "--repo", path, "disk", mnt], 2, "give --partition N"),
        (["mount", "--repo", path, "disk", mnt, "--partition", "5"], 2,
         "no partition 5 (partitions: 1, 2)"),
        (["mount", "--repo", path, "nosuch", mnt], 1, "nosuch"),
        (["umount", mnt], 1, "is not a snapship mount"),
    ]
    for argv, code, text in cases:
        r = run_cli(*argv)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == code and len(lines) == 1 and text in lines[0], describe(r)
        assert attach.mounted_at(str(mnt)) is None
    assert not list((state_dir() / "mounts").glob("*.json")) or all(
        json.loads(f.read_text())["directory"] != str(mnt) for f in
        (state_dir() / "mounts").glob("*.json"))
