#!/usr/bin/env python3
"""A differential restore vs a full restore of the same version, time and bytes fetched.

Makes a random image (`--size`, default 256 MiB) with some zero regions, backs it up (v1),
changes `--changed` percent of its 1 MiB chunks and backs it up again (v2). Then restores v2
twice: in full to a new file, and with `--differential` onto a copy holding v1. Prints the
seconds, bytes fetched (from `--json`) and the ratios differential / full, from one run on
this machine (absolute times depend on its load; the ratios are what to read). Rollback needs
LVM and a kernel with device-mapper: its counts come from tests/vm/test_vm_restore.py.

    .venv/bin/python bench/restore_modes.py [--workdir DIR] [--size 256M] [--changed 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def snapship(*args: str | Path, env: dict[str, str]) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "snapship.cli.main", *map(str, args), "--json"],
                       env=env, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"snapship {' '.join(map(str, args))} failed: {p.stderr.strip()}")
    out: dict[str, Any] = json.loads(p.stdout)
    return out


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.monotonic()
    out = fn()
    return time.monotonic() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--size", default="256M", help="image size, e.g. 256M or 1G")
    ap.add_argument("--changed", type=float, default=2.0, help="percent of chunks changed")
    a = ap.parse_args()
    size = int(a.size[:-1]) * {"M": MiB, "G": 1024 * MiB}[a.size[-1].upper()]
    work = a.workdir or Path(tempfile.mkdtemp(prefix="snapship-restore-bench."))
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPSHIP_")}
    env.update(SNAPSHIP_PASSPHRASE="bench", SNAPSHIP_STATE_DIR=str(work / "state"),
               PYTHONPATH=str(ROOT / "src"))
    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    snapship("init", "--repo", repo, env=env)

    rng = random.Random(1)
    chunks = size // MiB
    image = work / "v1.img"
    with open(image, "wb") as f:
        for i in range(chunks):
            f.write(bytes(MiB) if i % 5 == 4 else rng.randbytes(MiB))
    v1 = snapship("backup", "--repo", repo, image, "--volume", "vol", env=env)["version_id"]
    copy = work / "copy.img"
    shutil.copyfile(image, copy)  # what the target holds: v1
    changed = rng.sample(range(chunks), max(1, round(chunks * a.changed / 100)))
    with open(image, "r+b") as f:
        for i in changed:
            f.seek(i * MiB + rng.randrange(MiB - 4096))
            f.write(rng.randbytes(4096))
    v2 = snapship("backup", "--repo", repo, image, "--volume", "vol", env=env)["version_id"]
    want = sha(image)

    full_target = work / "full.img"
    t_full, full = timed(lambda: snapship("restore", "--repo", repo, f"vol@{v2}", full_target,
                                          env=env))
    t_diff, diff = timed(lambda: snapship("restore", "--repo", repo, "--differential",
                                          f"vol@{v2}", copy, env=env))
    assert sha(full_target) == want and sha(copy) == want, "a restore is not byte-identical"
    rows = [("full", t_full, full), ("differential", t_diff, diff)]
    print(f"image {size // MiB} MiB, {len(changed)} of {chunks} chunks changed "
          f"({a.changed:g}%), v1 {v1}, v2 {v2}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'mode':<14}{'seconds':>9}{'fetched MiB':>13}{'chunks fetched':>16}"
          f"{'chunks written':>16}")
    for name, t, r in rows:
        print(f"{name:<14}{t:>9.2f}{r['bytes_fetched'] / MiB:>13.2f}{r['chunks_fetched']:>16}"
              f"{r['chunks_written'] + r['chunks_zero']:>16}")
    print(f"differential / full: time {t_diff / t_full:.3f}, bytes fetched "
          f"{diff['bytes_fetched'] / max(1, full['bytes_fetched']):.4f}")
    if a.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
