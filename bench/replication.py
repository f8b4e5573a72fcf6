#!/usr/bin/env python3
"""`snapship copy` of one ~256 MiB volume in both key modes, directory to directory.

Makes (in a temporary directory, removed afterwards) a source repository with one version of
a 256 MiB image (60% random data, 40% zeros and repeated blocks, like a used file system),
then times, each in a fresh process:

- `raw`: a copy to a destination made with `init --copy-key-from` (chunks are sent as they
  are stored, never decrypted or decompressed);
- `re-encrypt`: a copy to a destination with its own key (every chunk is read, decrypted,
  decompressed, hashed, compressed and encrypted again);
- `again`: the same copy a second time (nothing to send: the versions are there).

    python3 bench/replication.py [--size-mib 256]

Absolute times depend on the load of the machine; the ratio of the two modes is the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "snapship.cli.main"]
CHUNK = 1 << 20


def run(*args: str, env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    done = subprocess.run([*CLI, *args, "--json"], env=env, capture_output=True, text=True,
                          check=False)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return elapsed, json.loads(done.stdout) if done.stdout.strip() else {}


def make_image(path: Path, size: int) -> None:
    rng = random.Random(15)
    block = rng.randbytes(CHUNK)
    with open(path, "wb") as f:
        for _ in range(size // CHUNK):
            r = rng.random()
            if r < 0.6:
                f.write(rng.randbytes(CHUNK))
            elif r < 0.8:
                f.write(bytes(CHUNK))
            else:
                f.write(block[: CHUNK // 2] + bytes(CHUNK // 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="snapship-copy-bench-") as tmp:
        t = Path(tmp)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("SNAPSHIP_")},
               "SNAPSHIP_PASSPHRASE": "bench", "SNAPSHIP_STATE_DIR": str(t / "state"),
               "PYTHONPATH": str(ROOT / "src")}
        img = t / "disk.img"
        make_image(img, args.size_mib << 20)
        src = str(t / "src")
        run("init", "--repo", src, env=env)
        backup, _ = run("backup", "--repo", src, str(img), "--volume", "disk", env=env)
        print(f"backup of {args.size_mib} MiB: {backup:.1f} s (for scale)")
        run("init", "--repo", str(t / "raw"), "--copy-key-from", src, env=env)
        run("init", "--repo", str(t / "enc"), env=env)
        results = {}
        for mode, dst in (("raw", "raw"), ("re-encrypt", "enc")):
            elapsed, report = run("copy", "--from", src, "--to", str(t / dst), env=env)
            again, second = run("copy", "--from", src, "--to", str(t / dst), env=env)
            assert report["mode"] == mode and second["chunks_sent"] == 0, (report, second)
            results[mode] = elapsed
            print(f"{mode:10}  {elapsed:6.1f} s  ({args.size_mib / elapsed:6.1f} MiB/s of "
                  f"volume; sent {int(report['bytes_sent']) >> 20} MiB)   again: {again:.1f} s")
        print(f"re-encrypt / raw: {results['re-encrypt'] / results['raw']:.1f}x "
              f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
        in_memory(Path(src))


def in_memory(src_path: Path) -> None:
    """The engine alone, into memory: what the modes cost without the destination's disk
    (a local directory fsyncs every chunk, which hides the difference above)."""
    sys.path.insert(0, str(ROOT / "src"))
    from snapship.crypto import ScryptParams
    from snapship.engine.copy import copy_versions
    from snapship.repository.repo import Repository
    from snapship.storage.local import LocalStorage
    from snapship.storage.memory import MemoryStorage

    def pw() -> bytes:
        return b"bench"

    src = Repository.open(LocalStorage(str(src_path)), pw)
    assert src.keys is not None
    fast = ScryptParams(n=1 << 10)
    times = {}
    for mode, master in (("raw", src.keys.master), ("re-encrypt", None)):
        dst = Repository.create(MemoryStorage(), chunk_size=src.chunk_size, passphrase=pw,
                                kdf=fast, master=master)
        started, cpu = time.monotonic(), time.process_time()
        report = copy_versions(src, dst, src.list_versions())
        # CPU time of every thread: less at the mercy of other processes than wall time.
        times[mode] = time.process_time() - cpu
        assert report.mode == mode
        print(f"in memory: {mode:10}  {time.monotonic() - started:6.1f} s wall, "
              f"{times[mode]:6.1f} s CPU")
    print(f"in memory: re-encrypt / raw (CPU): {times['re-encrypt'] / times['raw']:.1f}x "
          f"(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
