"""Real ext4 and XFS images for the free-space tests: made by mkfs, filled and partly deleted
through a loop mount (seeded, so a failure reproduces), and the real tools' view of them.

Every loop mount of the host tests is made in a mount namespace of its own (`private_mounts`).
A process that another test starts in a new mount namespace meanwhile (`unshare
--mount-proc`, tests/test_leases.py) would otherwise get a copy of the mount, and keep the file
system alive after `umount` here: its data unwritten, the image read as it was before.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import random
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

from snapship.types import ByteRange


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
_libc = ctypes.CDLL(None, use_errno=True)


def _checked(result: int, what: str) -> None:
    if result != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


@contextlib.contextmanager
def private_mounts() -> Iterator[None]:
    """This thread, and what it starts, in a mount namespace of its own until the block
    ends: mounts made meanwhile exist nowhere else, so an unmount here is the last one."""
    cwd = os.getcwd()
    original = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _checked(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        try:
            # Where / is shared (systemd), a mount made here would propagate back out.
            _checked(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None),
                     "mount --make-rprivate /")
            yield
        finally:
            _checked(_libc.setns(original, CLONE_NEWNS), "setns(CLONE_NEWNS)")
            os.chdir(cwd)  # setns moved this thread to the namespace's root
    finally:
        os.close(original)


@contextlib.contextmanager
def mounted(image: Path, where: Path) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    with private_mounts():
        run("mount", "-o", "loop", str(image), str(where))
        try:
            yield where
        finally:
            run("umount", str(where))


def make_image(path: Path, size_mib: int, mkfs: list[str]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    run(*mkfs, str(path))
    return path


def fill(root: Path, seed: int, files: int, max_kib: int, delete: float) -> None:
    """Write `files` files of random size and content (some in subdirectories), then delete
    a `delete` share of them at random, so free space holds old data."""
    rnd = random.Random(seed)
    names = []
    for i in range(files):
        d = root / f"d{rnd.randrange(4)}"
        d.mkdir(exist_ok=True)
        p = d / f"f{i}"
        p.write_bytes(rnd.randbytes(rnd.randrange(1, max_kib) * 1024))
        names.append(p)
    os.sync()  # the data reaches the disk (no delayed allocation saves it from being written)
    for p in rnd.sample(names, int(len(names) * delete)):
        p.unlink()


def checksums(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def ext4_free_blocks(image: Path) -> tuple[int, set[int]]:
    """Block size and the free blocks, as dumpe2fs lists them."""
    out = run("dumpe2fs", str(image))
    bs = int(re.search(r"^Block size:\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]
    free: set[int] = set()
    for line in re.findall(r"^\s+Free blocks: (.*)$", out, re.M):
        for part in filter(None, (p.strip() for p in line.split(","))):
            lo, _, hi = part.partition("-")
            free.update(range(int(lo), int(hi or lo) + 1))
    return bs, free


def xfs_free_blocks(image: Path) -> tuple[int, set[int], int]:
    """Block size, the free blocks (as byte offset / block size) per xfs_db's by-block
    free-space listing of every AG, and how many of them are on the AG free lists (AGFL):
    `freesp` lists those too, the parser leaves them out (they are reserved for the btrees)."""
    sb = run("xfs_db", "-r", "-c", "sb 0", "-c", "p blocksize agblocks agcount", str(image))
    vals = dict(re.findall(r"^(\w+) = (\d+)$", sb, re.M))
    bs, agblocks, agcount = int(vals["blocksize"]), int(vals["agblocks"]), int(vals["agcount"])
    free: set[int] = set()
    agfl = 0
    for ag in range(agcount):
        agf = run("xfs_db", "-r", "-c", f"agf {ag}", "-c", "p flcount", str(image))
        agfl += int(agf.split("=")[1])
        out = run("xfs_db", "-r", "-c", f"freesp -d -a {ag}", str(image))
        for agno, agbno, length in re.findall(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s*$", out, re.M):
            base = int(agno) * agblocks + int(agbno)
            free.update(range(base, base + int(length)))
    return bs, free, agfl


def blocks_of(ranges: list[ByteRange], bs: int) -> set[int]:
    out: set[int] = set()
    for r in ranges:
        assert r.start % bs == 0 and r.end % bs == 0, r
        out.update(range(r.start // bs, r.end // bs))
    return out
