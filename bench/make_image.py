#!/usr/bin/env python3
"""Build the benchmark disk images: ``day1.img`` and ``day2.img`` (about 1% changed).

``day1.img`` is a sparse ext4 image, about 60% full: part of this machine's /usr, 8 random
files, a subtree stored twice more, a few log files. ``day2.img`` is a copy of it, mounted and
changed the way a day of use changes a disk: files patched in place, logs appended, packages
"upgraded" (rewritten whole), files created and deleted, random files partly rewritten.

The file choices and generated contents are seeded; ext4's UUID, hash seed and mkfs time are
fixed. Inode ctimes and the kernel's block allocation are not under our control, so two builds
may differ in a few metadata blocks. Needs root (loop mounts). Existing images are reused
unless ``--rebuild``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10
BLOCK = 4 * KiB
REFERENCE_SIZE = 4 * GiB
FS_UUID = "5a9b5a9b-0000-4000-8000-00000000be4c"
DEFAULT_WORKDIR = Path("/var/tmp/snapship-bench")
REPO_ROOT = Path(__file__).resolve().parent.parent
USR_BYTES = 1.4 * GiB  # of /usr in a 4 GiB image; everything scales with the image size
_WORDS_A = ("started", "stopped", "request", "served", "cache", "miss", "retry", "job", "done")
_WORDS_B = ("failed", "warning", "error", "info", "disk", "block", "sync", "flush", "commit")
LOG_WORDS = _WORDS_A + _WORDS_B


@dataclass
class ImageStats:
    """Figures printed after a build and kept next to the images."""

    size: int
    seed: int
    used_bytes_day1: int
    used_bytes_day2: int
    changed_4k_blocks: int
    changed_bytes_4k: int
    changed_bytes_64k: int
    changed_bytes_1m: int
    changed_bytes_4m: int
    zero_4m_blocks_day1: int
    total_4m_blocks: int


@dataclass
class ImageSet:
    directory: Path
    day1: Path
    day2: Path
    stats: ImageStats


def parse_size(text: str) -> int:
    """Parse ``4G``, ``1G``, ``512M``, ``65536`` into bytes (binary units)."""
    units = {"K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def size_label(size: int) -> str:
    return f"{size // GiB}G" if size % GiB == 0 else f"{size // MiB}M"


def run(*cmd: str, env: dict[str, str] | None = None) -> None:
    subprocess.run(cmd, check=True, env=env)


@contextmanager
def mounted(image: Path, mountpoint: Path) -> Iterator[Path]:
    """Loop-mount an ext4 image read-write; unmount (and free the loop device) afterwards."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    # noinit_itable: no background zeroing of inode tables (it would write during day 2)
    run("mount", "-o", "loop,noinit_itable", str(image), str(mountpoint))
    try:
        yield mountpoint
    finally:
        run("sync")
        run("umount", str(mountpoint))


def used_bytes(mountpoint: Path) -> int:
    st = os.statvfs(mountpoint)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def log_lines(rng: random.Random, nbytes: int, start: int = 0) -> bytes:
    """Syslog-like text, roughly ``nbytes`` long."""
    out: list[str] = []
    total = 0
    t = 1_700_000_000 + start
    while total < nbytes:
        t += rng.randint(0, 30)
        words = " ".join(rng.choices(LOG_WORDS, k=rng.randint(3, 12)))
        line = (
            f"{t} host{rng.randint(1, 4)} svc[{rng.randint(100, 40000)}]: {words} "
            f"id={rng.getrandbits(48):012x} ms={rng.randint(0, 5000)}\n"
        )
        out.append(line)
        total += len(line)
    return "".join(out).encode()


def usr_files(budget: int) -> tuple[list[str], int]:
    """Paths under /usr (relative, sorted walk, dirs before their files) up to ``budget`` bytes.

    Whole subtrees are taken in order; files larger than 64 MiB are skipped (one giant file
    would dominate a small image).
    """
    chosen: list[str] = []
    total = 0
    for root, dirs, files in os.walk("/usr"):
        dirs.sort()
        rel_root = os.path.relpath(root, "/")
        chosen.append(rel_root)
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if st.st_size > 64 * MiB:
                continue
            chosen.append(os.path.join(rel_root, name))
            total += st.st_size
            if total >= budget:
                return chosen, total
    return chosen, total


def copy_list(paths: list[str], src_root: str, dst_root: Path) -> None:
    """Copy a list of paths (files, symlinks, dirs without recursion) with tar."""
    listing = "\0".join(paths).encode() + b"\0"
    pack = subprocess.Popen(
        ["tar", "-C", src_root, "--no-recursion", "--null", "-T", "-", "-cf", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    unpack = subprocess.Popen(["tar", "-C", str(dst_root), "-xf", "-"], stdin=pack.stdout)
    assert pack.stdin is not None and pack.stdout is not None
    pack.stdin.write(listing)
    pack.stdin.close()
    pack.stdout.close()
    if unpack.wait() != 0 or pack.wait() > 1:  # tar exits 1 for "file changed as we read it"
        raise RuntimeError("copying /usr into the image failed")


def populate_day1(root: Path, size: int, rng: random.Random) -> None:
    f = size / REFERENCE_SIZE
    print(f"  copying up to {USR_BYTES * f / GiB:.2f} GiB of /usr ...", flush=True)
    paths, total = usr_files(int(USR_BYTES * f))
    copy_list(paths, "/", root)
    shortfall = int(USR_BYTES * f) - total
    if shortfall > 0:  # small /usr: fill with generated text rather than duplicates
        print(f"  /usr is short by {shortfall / MiB:.0f} MiB, generating text files", flush=True)
        filler = root / "srv" / "filler"
        filler.mkdir(parents=True)
        for i in range(0, shortfall, 4 * MiB):
            (filler / f"part{i // (4 * MiB):05d}.txt").write_bytes(log_lines(rng, 4 * MiB, i))

    print("  writing 8 random files ...", flush=True)
    data = root / "data"
    data.mkdir()
    for i in range(8):
        (data / f"random{i}.bin").write_bytes(rng.randbytes(int(64 * MiB * f)))

    # a subtree of the copied /usr stored twice more (e.g. a vendored tree, a second checkout)
    dup_src = pick_subtree(root / "usr", int(200 * MiB * f))
    print(f"  duplicating {dup_src.relative_to(root)} twice ...", flush=True)
    for copy in ("copy-a", "copy-b"):
        shutil.copytree(dup_src, root / "dups" / copy, symlinks=True)
    # and a few single files copied elsewhere
    singles = root / "dups" / "files"
    singles.mkdir()
    for i, src in enumerate(rng.sample(regular_files(root / "usr", 4 * KiB), 40)):
        shutil.copyfile(src, singles / f"{i:02d}-{src.name}")

    logs = root / "var" / "log" / "app"
    logs.mkdir(parents=True)
    for i in range(30):
        (logs / f"service{i:02d}.log").write_bytes(log_lines(rng, int(100 * KiB * f) + 1, i))


def tree_size(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def pick_subtree(usr: Path, target: int) -> Path:
    """The directory whose size is closest to ``target`` (searched two levels deep)."""
    candidates = [d for d in usr.iterdir() if d.is_dir()]
    candidates += [d for c in list(candidates) for d in c.iterdir() if d.is_dir()]
    return min(sorted(candidates), key=lambda d: abs(tree_size(d) - target))


def regular_files(root: Path, min_size: int) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and p.stat().st_size >= min_size
    )


def hot_directories(usr: Path, rng: random.Random, count: int) -> list[list[Path]]:
    """``count`` directories with at least 10 files of 16 KiB..2 MiB each (their files)."""
    by_dir: dict[Path, list[Path]] = {}
    for path in regular_files(usr, 16 * KiB):
        if path.stat().st_size <= 2 * MiB:
            by_dir.setdefault(path.parent, []).append(path)
    candidates = sorted(d for d, files in by_dir.items() if len(files) >= 10)
    return [by_dir[d] for d in rng.sample(candidates, count)]


def change_day2(root: Path, size: int, rng: random.Random) -> None:
    """About 1% of the data blocks, changed in clustered, realistic ways.

    Real activity is clustered: a few packages upgraded or patched, a few logs, a few
    database pages, one directory of new work, one subtree removed.
    """
    f = size / REFERENCE_SIZE

    def scaled(n: float) -> int:
        return max(1, round(n * f))

    hot = hot_directories(root / "usr", rng, 4)
    # 1. random files partly rewritten (a database's pages, a VM disk's blocks)
    for path in rng.sample(sorted((root / "data").iterdir()), 3):
        with path.open("r+b") as fh:
            length = path.stat().st_size
            for _ in range(3):
                n = max(BLOCK, int(rng.randint(512 * KiB, 2 * MiB) * f) // BLOCK * BLOCK)
                fh.seek(rng.randrange(0, length - n, BLOCK))
                fh.write(rng.randbytes(n))
    # 2. files patched in place (small edits somewhere in the middle), in two hot dirs
    for path in rng.sample(hot[0] + hot[1], min(len(hot[0] + hot[1]), scaled(60))):
        length = path.stat().st_size
        n = min(length, rng.randint(4 * KiB, 64 * KiB))
        with path.open("r+b") as fh:
            fh.seek(rng.randrange(0, length - n + 1))
            fh.write(rng.randbytes(n))
    # ... and a few scattered ones (a config here, a binary there)
    for path in rng.sample(regular_files(root / "usr", 64 * KiB), scaled(15)):
        n = rng.randint(16 * KiB, 64 * KiB)
        with path.open("r+b") as fh:
            fh.seek(rng.randrange(0, path.stat().st_size - n + 1))
            fh.write(rng.randbytes(n))
    # 3. logs appended
    for i, path in enumerate(sorted((root / "var" / "log" / "app").iterdir())):
        with path.open("ab") as log:
            log.write(log_lines(rng, int(200 * KiB * f), 10_000 + i))
    # 4. "package upgrade": files of two hot dirs replaced whole (new file + rename),
    #    one 64-byte edit per 2 KiB
    for path in hot[2] + hot[3]:
        content = bytearray(path.read_bytes())
        for _ in range(max(1, len(content) // 2048)):
            pos = rng.randrange(len(content))
            content[pos : pos + 64] = rng.randbytes(len(content[pos : pos + 64]))
        tmp = path.with_name(path.name + ".dpkg-new")
        tmp.write_bytes(bytes(content))
        tmp.replace(path)
    # 5. a subtree removed (a package uninstalled): metadata changes only
    level2 = sorted(
        d
        for top in (root / "usr").iterdir()
        if top.is_dir()
        for d in top.iterdir()
        if d.is_dir() and not d.is_symlink()
    )
    hot_dirs = {files[0].parent for files in hot}
    shutil.rmtree(
        rng.choice(
            [
                d
                for d in level2
                if 1 * MiB <= tree_size(d) <= 20 * MiB and not any(d in h.parents for h in hot_dirs)
            ]
        )
    )
    # 6. new files: copies of existing files plus new text and binary data
    new = root / "home" / "user" / "work"
    new.mkdir(parents=True)
    copies = regular_files(root / "dups" / "files", 0)
    for i, src in enumerate(rng.sample(copies, min(len(copies), scaled(20)))):
        shutil.copyfile(src, new / f"{i:03d}-{src.name}")
    (new / "notes.txt").write_bytes(log_lines(rng, int(4 * MiB * f), 99))
    (new / "archive.bin").write_bytes(rng.randbytes(int(12 * MiB * f)))


def compare(day1: Path, day2: Path) -> dict[str, int]:
    """Changed 4 KiB blocks, and changed bytes counted at coarser granularities."""
    chunk = 4 * MiB
    changed: dict[int, set[int]] = {64 * KiB: set(), MiB: set(), 4 * MiB: set()}
    changed_4k = zero_4m = blocks = 0
    zero = bytes(chunk)
    with day1.open("rb") as a, day2.open("rb") as b:
        offset = 0
        while True:
            x, y = a.read(chunk), b.read(chunk)
            if not x and not y:
                break
            blocks += 1
            zero_4m += x == zero
            if x != y:
                if len(x) != len(y):
                    raise RuntimeError("images differ in size")
                mx, my = memoryview(x), memoryview(y)
                for off in range(0, len(x), BLOCK):
                    if mx[off : off + BLOCK] != my[off : off + BLOCK]:
                        changed_4k += 1
                        for unit, units in changed.items():
                            units.add((offset + off) // unit)
            offset += len(x)
    return {
        "changed_4k_blocks": changed_4k,
        "changed_bytes_4k": changed_4k * BLOCK,
        "changed_bytes_64k": len(changed[64 * KiB]) * 64 * KiB,
        "changed_bytes_1m": len(changed[MiB]) * MiB,
        "changed_bytes_4m": len(changed[4 * MiB]) * 4 * MiB,
        "zero_4m_blocks_day1": zero_4m,
        "total_4m_blocks": blocks,
    }


def build(directory: Path, size: int, seed: int) -> ImageStats:
    day1, day2 = directory / "day1.img", directory / "day2.img"
    part1, part2 = directory / "day1.img.partial", directory / "day2.img.partial"
    for p in (day1, day2, part1, part2, directory / "stats.json"):
        p.unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    mnt = Path(tempfile.mkdtemp(prefix="mnt-", dir=directory))
    try:
        print(f"building {part1} ({size_label(size)}) ...", flush=True)
        with part1.open("wb") as fh:
            fh.truncate(size)
        env = dict(os.environ, E2FSPROGS_FAKE_TIME="1700000000")
        run(
            "mkfs.ext4",
            "-F",
            "-q",
            "-U",
            FS_UUID,
            "-E",
            f"hash_seed={FS_UUID}",
            "-L",
            "benchdisk",
            str(part1),
            env=env,
        )
        with mounted(part1, mnt) as root:
            populate_day1(root, size, random.Random(seed))
            used1 = used_bytes(root)
        print(f"building {part2} ...", flush=True)
        run("cp", "--sparse=always", str(part1), str(part2))
        with mounted(part2, mnt) as root:
            change_day2(root, size, random.Random(seed + 1))
            used2 = used_bytes(root)
    finally:
        mnt.rmdir()
    print("comparing the images ...", flush=True)
    stats = ImageStats(
        size=size, seed=seed, used_bytes_day1=used1, used_bytes_day2=used2, **compare(part1, part2)
    )
    part1.rename(day1)
    part2.rename(day2)
    (directory / "stats.json").write_text(json.dumps(asdict(stats), indent=2) + "\n")
    return stats


def ensure_images(workdir: Path, size: int, rebuild: bool = False, seed: int = 1) -> ImageSet:
    """Return the image pair for ``size``, building it if missing (or if ``rebuild``)."""
    directory = workdir / f"images-{size_label(size)}"
    day1, day2, stats_file = (
        directory / "day1.img",
        directory / "day2.img",
        directory / "stats.json",
    )
    if rebuild or not (day1.exists() and day2.exists() and stats_file.exists()):
        stats = build(directory, size, seed)
    else:
        stats = ImageStats(**json.loads(stats_file.read_text()))
    return ImageSet(directory, day1, day2, stats)


def describe(stats: ImageStats) -> str:
    def mib(n: int) -> str:
        return f"{n / MiB:.1f} MiB"

    return "\n".join(
        [
            f"image size               {mib(stats.size)}",
            f"used day1 / day2         {mib(stats.used_bytes_day1)} "
            f"({100 * stats.used_bytes_day1 / stats.size:.1f}%) / {mib(stats.used_bytes_day2)}",
            f"changed 4 KiB blocks     {stats.changed_4k_blocks} "
            f"({mib(stats.changed_bytes_4k)}, "
            f"{100 * stats.changed_4k_blocks * BLOCK / stats.size:.2f}% of the image)",
            f"changed at 64 KiB        {mib(stats.changed_bytes_64k)}",
            f"changed at 1 MiB         {mib(stats.changed_bytes_1m)}",
            f"changed at 4 MiB         {mib(stats.changed_bytes_4m)}",
            f"all-zero 4 MiB blocks    {stats.zero_4m_blocks_day1}/{stats.total_4m_blocks} "
            f"({100 * stats.zero_4m_blocks_day1 / stats.total_4m_blocks:.1f}%) in day1",
        ]
    )


def check_workdir(workdir: Path) -> None:
    """Refuse a work dir inside the repository (images and repositories are gigabytes)."""
    if workdir.resolve().is_relative_to(REPO_ROOT):
        raise SystemExit(f"--workdir {workdir} is inside the repository {REPO_ROOT}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--size", default="4G", help="image size (default 4G; e.g. 1G)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rebuild", action="store_true", help="rebuild even if images exist")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("make_image.py needs root (loop mounts)", file=sys.stderr)
        return 2
    check_workdir(args.workdir)
    images = ensure_images(args.workdir, parse_size(args.size), args.rebuild, args.seed)
    print(f"{images.day1}\n{images.day2}")
    print(describe(images.stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
