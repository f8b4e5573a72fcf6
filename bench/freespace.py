#!/usr/bin/env python3
"""Full backups of a "used disk": snapship skipping free space vs reading it, restic, borg.

The image is an ext4 filesystem (default 4 GiB) on which files were written until about 70%
was in use, synced (so their data is on the disk), then deleted down to about 40% in use: the
free space holds the deleted files' data, as on a disk used for a year. restic and borg read
the image as a stream and store that data too; snapship reads the filesystem's block bitmaps
and records free blocks as zeroes without reading them (docs/free-space.md). One run, each tool
once, unencrypted where the tool allows (restic always encrypts): wall time, bytes read
(snapship's own figure) and repository size. Absolute numbers depend on the machine's load;
compare the ratios of one run. Needs root (loop mount) and bench/setup.sh's tools.

    python3 bench/freespace.py [--workdir /var/tmp/snapship-freespace] [--size 4G]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from run import Borg, Restic, dir_bytes  # noqa: E402

MB = 1_000_000
PASSPHRASE = "bench"


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def file_data(rnd: random.Random, size: int) -> bytes:
    """Half random, half repetitive text: compressible like real files, not trivially."""
    half = size // 2
    words = b" ".join(rnd.choice([b"block", b"backup", b"volume", b"ext4", b"chunk", b"data"])
                      for _ in range(64))
    text = (words * (half // len(words) + 1))[:half]
    return rnd.randbytes(size - half) + text


def make_used_disk(image: Path, size: int, mnt: Path, seed: int = 1) -> dict[str, float]:
    """ext4 written to ~70% and deleted back to ~40% in use; returns the in-use shares."""
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(image)], check=True)
    mnt.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    rnd = random.Random(seed)
    try:
        files: list[Path] = []
        written = 0
        while written < size * 0.68:
            n = rnd.randrange(256 << 10, 16 << 20)
            p = mnt / f"d{len(files) % 16}" / f"f{len(files)}"
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(file_data(rnd, n))
            files.append(p)
            written += n
        os.sync()
        peak = 1 - shutil.disk_usage(mnt).free / shutil.disk_usage(mnt).total
        rnd.shuffle(files)
        for p in files:
            if 1 - shutil.disk_usage(mnt).free / shutil.disk_usage(mnt).total <= 0.40:
                break
            p.unlink()
        os.sync()
        now = 1 - shutil.disk_usage(mnt).free / shutil.disk_usage(mnt).total
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    return {"peak_in_use": round(peak, 3), "in_use": round(now, 3)}


def timed(argv: list[str], env: dict[str, str], **kw: object) -> tuple[float, str]:
    start = time.monotonic()
    p = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    seconds = time.monotonic() - start
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed: {p.stderr.strip()[-500:]}")
    out: str = p.stdout
    return seconds, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/snapship-freespace"))
    ap.add_argument("--size", default="4G")
    args = ap.parse_args()
    wd: Path = args.workdir
    shutil.rmtree(wd, ignore_errors=True)
    wd.mkdir(parents=True)
    size = parse_size(args.size)
    image = wd / "used.img"
    usage = make_used_disk(image, size, wd / "mnt")
    exe = str(Path(sys.executable).with_name("snapship"))
    env = dict(os.environ, SNAPSHIP_STATE_DIR=str(wd / "state"))
    rows: list[tuple[str, float, int | None, int]] = []

    for name, extra in (("snapship (skip free)", []), ("snapship (--no-skip-free)",
                                                         ["--no-skip-free"])):
        repo = wd / f"repo-{len(rows)}"
        timed([exe, "init", "--repo", str(repo), "--encryption", "none"], env)
        seconds, out = timed([exe, "backup", "--repo", str(repo), str(image), "--volume",
                              "disk", "--json", *extra], env)
        rows.append((name, seconds, json.loads(out)["stats"]["bytes_read"], dir_bytes(repo)))

    for tool in (Restic(wd / "restic", wd / "restic-cache"), Borg(wd / "borg", wd / "borg-cache",
                                                                 "none")):
        init = tool.init()
        timed(init.argv, tool.env)
        cmd = tool.backup(image, "day1")
        stdin = cmd.stdin.open("rb") if cmd.stdin else subprocess.DEVNULL
        try:
            seconds, _ = timed(cmd.argv, tool.env, stdin=stdin, cwd=cmd.cwd)
        finally:
            if not isinstance(stdin, int):
                stdin.close()
        rows.append((tool.name, seconds, None, dir_bytes(tool.repo)))

    load = os.getloadavg()[0]
    print(f"used-disk ext4 image: {size / MB:.0f} MB, {usage['peak_in_use']:.0%} in use before "
          f"deleting, {usage['in_use']:.0%} after; load average {load:.1f} on "
          f"{os.cpu_count()} CPUs (absolute times are not reliable: compare ratios)")
    print(f"{'tool':28} {'full backup s':>14} {'read MB':>9} {'repo MB':>9}")
    for name, seconds, read, repo_bytes in rows:
        print(f"{name:28} {seconds:14.1f} {(f'{read / MB:.0f}' if read else '-'):>9} "
              f"{repo_bytes / MB:9.0f}")
    skip = rows[0]
    for name, seconds, _, repo_bytes in rows[1:]:
        print(f"snapship (skip free) vs {name}: {seconds / skip[1]:.2f}x faster, repository "
              f"{skip[3] / repo_bytes:.2f}x the size")


if __name__ == "__main__":
    main()
