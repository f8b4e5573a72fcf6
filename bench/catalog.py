#!/usr/bin/env python3
"""Benchmark the catalog: `snapship versions` and `show` of 1,000 versions of a 1 TiB sparse
volume (1 MiB chunks, so every manifest lists 1,048,576 chunks: 36 MiB of plaintext), as whole
processes with the default scrypt cost, and what a version without a summary costs.

    .venv/bin/python bench/catalog.py [--versions 1000] [--without 3] [--rounds 3] [--no-server]

The repository is made by `snapship init` and filled through the repository API with
zero-chunk versions (tests/test_catalog_scale.py builds them). `--without N` then removes N
summaries, as in a repository written before summaries existed, and times `versions` again:
the difference is what reading N manifests costs. Unless `--no-server`, `versions` and `show`
also run through a `snapship server` on loopback serving the same repository (a read token).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from tests.serverproc import ServerProc, write_tokens  # noqa: E402
from tests.test_catalog_scale import COUNT, UnsyncedStorage, put_zero_version  # noqa: E402

from snapship.repository.repo import Repository  # noqa: E402

PASSPHRASE = "bench-passphrase-not-secret"


def timed(argv: list[str], env: dict[str, str], rounds: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each run: CPU (user + system) suffers less from a loaded
    machine."""
    out = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        out.append((time.monotonic() - start, after.ru_utime - before.ru_utime
                    + after.ru_stime - before.ru_stime))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--versions", type=int, default=1000)
    ap.add_argument("--without", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-server", action="store_true",
                    help="skip listing the same repository through a snapship server")
    args = ap.parse_args()
    exe = str(ROOT / ".venv" / "bin" / "snapship")
    with tempfile.TemporaryDirectory(prefix="snapship-catalog-", dir="/var/tmp") as tmp:
        path = Path(tmp) / "root" / "repo"
        path.parent.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPSHIP_")}
        env.update(SNAPSHIP_STATE_DIR=tmp, SNAPSHIP_PASSPHRASE=PASSPHRASE)
        subprocess.run([exe, "init", "--repo", str(path)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        started = time.monotonic()
        repo = Repository.open(UnsyncedStorage(str(path)), PASSPHRASE.encode)
        ids, sizes = bytes(32 * COUNT), array("I", bytes(4 * COUNT))
        t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        versions: list[str] = []
        for i in range(args.versions):
            t = t0 + dt.timedelta(hours=i)
            v = f"{t:%Y%m%d-%H%M%S}.000-{i:04x}"
            put_zero_version(repo, "big", v, versions[-1] if versions else None, ids, sizes,
                             summary=True)
            versions.append(v)
        print(f"built {args.versions} versions of 1 TiB in {time.monotonic() - started:.1f} s")
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        r = ["--repo", str(path)]
        results = {
            "snapship versions": timed([exe, *r, "versions"], env, args.rounds),
            "snapship versions --json": timed([exe, *r, "versions", "--json"], env, args.rounds),
            "snapship show big": timed([exe, *r, "show", "big"], env, args.rounds),
            "snapship locks (start-up and open, no key)": timed([exe, *r, "locks"], env,
                                                                args.rounds),
        }
        if not args.no_server:
            # The same repository through a snapship server on loopback (a read token): what
            # the "under 5 s on the server" is measured on.
            tokens = write_tokens(Path(tmp) / "tokens")
            with ServerProc(path.parent, Path(tmp) / "tokens") as server:
                token = Path(tmp) / "read.token"
                token.write_text(tokens["restorer"] + "\n")
                via = ["--repo", server.url("repo"), "--token-file", str(token)]
                results["snapship versions through the server"] = timed(
                    [exe, *via, "versions"], env, args.rounds)
                results["snapship show big through the server"] = timed(
                    [exe, *via, "show", "big"], env, args.rounds)
        for v in versions[: args.without]:
            (path / "summaries" / "big" / v).unlink()
        results[f"snapship versions, {args.without} without a summary"] = timed(
            [exe, *r, "versions"], env, args.rounds)
        print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    print(f"{args.versions} versions of a 1 TiB volume, median of {args.rounds} (min-max):\n")
    print("| command | wall s | CPU s |")
    print("|---|---|---|")
    for name, runs in results.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        print(f"| {name} | {statistics.median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f}) "
              f"| {statistics.median(cpus):.2f} |")
    without = results[f"snapship versions, {args.without} without a summary"]
    per = (statistics.median(c for _, c in without)
           - statistics.median(c for _, c in results["snapship versions"])) / max(1, args.without)
    print(f"\na version without a summary costs about {per:.2f} s of CPU more (its 36 MiB "
          "manifest)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
