#!/usr/bin/env python3
"""Incremental backups from change lists vs full backups, on the benchmark image.

Uses the images of bench/make_image.py (day 1, and day 2 with ~1% of its 4 KiB blocks
changed) plus a day 3 made here with ~9% of the volume rewritten in extents of 256 KiB to
4 MiB (a new large file, a database's busy region). For each day the
changed 4 KiB blocks are written as a real dm-snapshot COW store (what LVM's classic snapshot
would hold), parsed back with `snapship cow inspect --json`, and fed to
`snapship backup --changed-ranges`. Prints the time of each step against a full backup.

    python3 bench/incremental.py [--workdir /var/tmp/snapship-bench] [--size 4G]
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
from collections.abc import Iterator
from pathlib import Path

BLOCK = 4096
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from snapship.changes.cow import iter_store  # noqa: E402


def changed_blocks(a: Path, b: Path) -> list[int]:
    out: list[int] = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        index = 0
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if not x:
                return out
            if x != y:
                out.extend(index + i for i in range(0, len(x), BLOCK)
                           if x[i : i + BLOCK] != y[i : i + BLOCK])
            index += len(x)


def write_cow(old_image: Path, offsets: list[int], out: Path) -> None:
    """The COW store a classic snapshot taken at `old_image` holds after these writes."""
    with open(old_image, "rb") as f, open(out, "wb") as o:
        def items() -> Iterator[tuple[int, bytes]]:
            for off in offsets:
                f.seek(off)
                yield off // BLOCK, f.read(BLOCK)
        for piece in iter_store(BLOCK // 512, items()):
            o.write(piece)


def make_day3(day2: Path, day3: Path, fraction: float, seed: int = 3) -> None:
    shutil.copyfile(day2, day3)
    size = day3.stat().st_size
    rng = random.Random(seed)
    target, done = int(size * fraction), 0
    with open(day3, "r+b") as f:
        while done < target:
            length = rng.choice([256, 512, 1024, 4096]) * 1024
            off = rng.randrange(0, size - length) // BLOCK * BLOCK
            f.seek(off)
            f.write(rng.randbytes(length))
            done += length


def snapship(exe: str, *args: str) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run([exe, *args], capture_output=True, text=True, check=True)
    return time.perf_counter() - t, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/var/tmp/snapship-bench")
    ap.add_argument("--size", default="4G")
    ap.add_argument("--snapship", default=str(ROOT / ".venv" / "bin" / "snapship"))
    args = ap.parse_args()
    images = Path(args.workdir) / f"images-{args.size}"
    day1, day2 = images / "day1.img", images / "day2.img"
    if not day2.exists():
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_image.py"), "--size", args.size,
                        "--workdir", args.workdir], check=True)
    work = Path(args.workdir) / "incremental"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    day3 = work / "day3.img"
    make_day3(day2, day3, 0.09)
    os.environ.setdefault("SNAPSHIP_PASSPHRASE", "bench-passphrase-not-secret")
    repo = str(work / "repo")
    snapship(args.snapship, "init", "--repo", repo)
    for img in (day1, day2, day3):
        subprocess.run(["cat", str(img)], stdout=subprocess.DEVNULL, check=True)
    t_full, out = snapship(args.snapship, "backup", "--repo", repo, str(day1), "--volume", "disk",
                           "--json")
    full = json.loads(out)["stats"]
    size = day1.stat().st_size
    rows = [("full backup of day 1", t_full, full["duration"], size, full["bytes_read"])]
    previous = day1
    for day, img in (("day 2", day2), ("day 3", day3)):
        blocks = changed_blocks(previous, img)
        name = f"{day} ({len(blocks) * BLOCK / size:.1%} of blocks changed)"
        cow = work / f"{img.stem}.cow"
        write_cow(previous, blocks, cow)
        t_parse, out = snapship(args.snapship, "cow", "inspect", str(cow), "--json")
        ranges = json.loads(out)["changed_ranges"]
        rfile = work / f"{img.stem}.ranges"
        rfile.write_text("".join(f"{a} {b - a}\n" for a, b in ranges))
        t_inc, out = snapship(args.snapship, "backup", "--repo", repo, str(img), "--volume", "disk",
                              "--changed-ranges", str(rfile), "--json")
        st = json.loads(out)["stats"]
        changed = len(blocks) * BLOCK
        rows.append((f"{name}: cow inspect", t_parse, None, changed, 0))
        rows.append((f"{name}: incremental", t_inc, st["duration"], changed, st["bytes_read"]))
        snapship(args.snapship, "restore", "--repo", repo, "disk", str(work / "out.img"))
        if subprocess.run(["cmp", "-s", str(img), str(work / "out.img")]).returncode != 0:
            raise SystemExit(f"restore of {name} differs from the image")
        os.unlink(work / "out.img")
        previous = img
    print(f"\n## Incremental vs full ({args.size} image, encrypted repository, 1 MiB chunks)\n")
    print("| step | wall s | engine s | changed (4 KiB blocks) | bytes read | wall vs full "
          "| engine vs full |")
    print("|---|---|---|---|---|---|---|")
    for label, wall, engine, changed, read in rows:
        ev = f"{engine:.3f}" if engine is not None else "-"
        er = f"{engine / full['duration']:.1%}" if engine is not None else "-"
        print(f"| {label} | {wall:.2f} | {ev} | {changed / 2**20:.1f} MiB | {read / 2**20:.0f} MiB "
              f"| {wall / t_full:.1%} | {er} |")
    print("\nrestores of every version verified byte-identical (cmp)")


if __name__ == "__main__":
    main()
