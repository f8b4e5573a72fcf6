#!/usr/bin/env python3
"""Benchmark snapship's fixed cost per command: whole processes, median of 10 runs each.

    .venv/bin/python bench/startup.py [--runs 10] [--snapship .venv/bin/snapship]

Times `snapship --help`, `snapship locks` and `snapship prune --dry-run` (no key needed) on a
local encrypted repository, `snapship versions` on it (needs the key: one scrypt run), and
the bare interpreter (`python -c pass`) for scale. Wall time is what a user waits for; CPU
time (user + system) is also printed, as it suffers less from a loaded machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASSPHRASE = "bench-passphrase-not-secret"


def measure(argv: list[str], env: dict[str, str], runs: int) -> tuple[list[float], list[float]]:
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           check=False)
        walls.append(time.monotonic() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {r.stderr.decode(errors='replace')}")
    return walls, cpus


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--snapship", type=Path, default=ROOT / ".venv" / "bin" / "snapship")
    args = ap.parse_args()
    exe = str(args.snapship)
    python = str(Path(exe).with_name("python"))
    with tempfile.TemporaryDirectory(prefix="snapship-startup-") as tmp:
        repo = Path(tmp) / "repo"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPSHIP_")}
        env.update(SNAPSHIP_STATE_DIR=tmp, SNAPSHIP_PASSPHRASE=PASSPHRASE)
        subprocess.run([exe, "init", "--repo", str(repo)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        cases = {
            "python -c pass": [python, "-c", "pass"],
            "snapship --help": [exe, "--help"],
            "snapship locks": [exe, "--repo", str(repo), "locks"],
            "snapship prune --dry-run": [exe, "--repo", str(repo), "prune", "--keep-last", "1",
                                         "--dry-run"],
            "snapship versions (key: one scrypt)": [exe, "--repo", str(repo), "versions"],
        }
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        results = {name: measure(argv, env, args.runs) for name, argv in cases.items()}
        print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    print(f"median of {args.runs} whole processes (min-max):\n")
    print("| command | wall s | CPU s |")
    print("|---|---|---|")
    for name, (walls, cpus) in results.items():
        print(f"| {name} | {statistics.median(walls):.3f} ({min(walls):.3f}-{max(walls):.3f}) "
              f"| {statistics.median(cpus):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
