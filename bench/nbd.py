#!/usr/bin/env python3
"""Benchmark the NBD server: nbdcopy reading a ~2 GiB version, against `snapship restore` of
the same version to a file and against `nbdkit file` serving the restored image, in one run.

Uses the benchmark's day-1 image (bench/make_image.py; built if missing, needs root), backs it
up into a fresh encrypted repository, then runs every step in turn, several rounds, after the
same warming of the page cache and a sync. Throughput is the image size over wall time (holes
count, as in bench/run.py). The ratios compare medians. Needs `nbdcopy` and `nbdkit`
(`make test` installs both). See bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import make_image

MB = 1_000_000
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_SNAPSHIP = BENCH_DIR.parent / ".venv" / "bin" / "snapship"
PASSPHRASE = "bench-passphrase-not-secret"


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stderr}")
    return r


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    subprocess.run(["sync"], check=True)
    start = time.monotonic()
    r = run(argv, env=env)
    return time.monotonic() - start, r.stdout


def warm(path: Path) -> None:
    """Read a file or every file under a directory once, so each step starts from a warm cache."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 20):
                pass


def sha256_of_stream(argv: list[str]) -> str:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    h = hashlib.sha256()
    while block := proc.stdout.read(1 << 20):
        h.update(block)
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(argv)} failed")
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class Process:
    """A background server whose address is read from its first output."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def start_snapship(exe: Path, repo: Path, env: dict[str, str]) -> tuple[Process, str]:
    server = Process([str(exe), "nbd", "serve", "--repo", str(repo), "--listen", "127.0.0.1:0",
                      "--json"], env=env)  # fmt: skip
    assert server.proc.stdout is not None
    text = ""
    while True:
        line = server.proc.stdout.readline()
        if not line:
            raise SystemExit("snapship nbd serve exited before listening")
        text += line
        try:
            info = json.loads(text)
            break
        except json.JSONDecodeError:
            continue
    return server, f"nbd://{info['listening'][0]}/disk"


def start_nbdkit(image: Path, sock: Path) -> tuple[Process, str]:
    sock.unlink(missing_ok=True)
    server = Process(["nbdkit", "--foreground", "-r", "-U", str(sock), "file", str(image)])
    deadline = time.monotonic() + 30
    while not sock.exists():
        if time.monotonic() > deadline or server.proc.poll() is not None:
            raise SystemExit("nbdkit did not start")
        time.sleep(0.05)
    return server, f"nbd+unix:///?socket={sock}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, default=make_image.DEFAULT_WORKDIR)
    parser.add_argument("--size", default="2G", help="image size (default 2G)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--snapship", type=Path, default=DEFAULT_SNAPSHIP)
    parser.add_argument("--json", type=Path, help="where to write the figures")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/nbd.py needs root (make_image.py loop-mounts the image)", file=sys.stderr)
        return 2
    make_image.check_workdir(args.workdir)
    images = make_image.ensure_images(args.workdir, make_image.parse_size(args.size))
    image = images.day1
    size = image.stat().st_size
    run_dir = args.workdir / f"nbd-{make_image.size_label(size)}"
    repo, restored = run_dir / "repo", run_dir / "restored.img"
    run_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["rm", "-rf", str(repo), str(restored)], check=True)
    env = dict(os.environ, SNAPSHIP_PASSPHRASE=PASSPHRASE)
    exe = str(args.snapship)
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    run([exe, "init", "--repo", str(repo)], env=env)
    run([exe, "backup", "--repo", str(repo), str(image), "--volume", "disk"], env=env)

    steps = ("restore", "nbdcopy", "nbdcopy --no-extents", "nbdkit file + nbdcopy")
    times: dict[str, list[float]] = {s: [] for s in steps}
    engine: list[float] = []
    snapship, uri = start_snapship(args.snapship, repo, env)
    nbdkit: Process | None = None
    try:
        for _ in range(args.rounds):
            warm(repo)
            seconds, out = timed([exe, "restore", "--repo", str(repo), "disk", str(restored),
                                  "--json"], env=env)  # fmt: skip
            times["restore"].append(seconds)
            engine.append(float(json.loads(out)["duration"]))
            if nbdkit is None:  # serves the restored image; restores rewrite it in place
                nbdkit, kit_uri = start_nbdkit(restored, run_dir / "nbdkit.sock")
            warm(repo)
            times["nbdcopy"].append(timed(["nbdcopy", uri, "null:"])[0])
            warm(repo)
            times["nbdcopy --no-extents"].append(timed(["nbdcopy", "--no-extents", uri,
                                                        "null:"])[0])
            warm(restored)
            times["nbdkit file + nbdcopy"].append(timed(["nbdcopy", kit_uri, "null:"])[0])
        image_sha = sha256_file(image)
        checks = {"restored file": sha256_file(restored) == image_sha,
                  "nbdcopy from snapship": sha256_of_stream(["nbdcopy", uri, "-"]) == image_sha}
    finally:
        snapship.stop()
        if nbdkit is not None:
            nbdkit.stop()
    print(f"load average after: {os.getloadavg()[0]:.2f}")

    med = {s: statistics.median(t) for s, t in times.items()}
    med_engine = statistics.median(engine)
    rate = {s: size / MB / t for s, t in med.items()}
    engine_rate = size / MB / med_engine
    print(f"\n{size / (1 << 30):.1f} GiB version, {args.rounds} rounds, medians:\n")
    print("| step | seconds | MB/s |")
    print("|---|---|---|")
    print(f"| snapship restore (engine time, without start-up) | {med_engine:.2f} | "
          f"{engine_rate:.0f} |")
    for s in steps:
        print(f"| {s} | {med[s]:.2f} | {rate[s]:.0f} |")
    ratios = {
        "nbdcopy / restore (engine)": rate["nbdcopy"] / engine_rate,
        "nbdcopy / restore (command)": rate["nbdcopy"] / rate["restore"],
        "nbdcopy --no-extents / restore (engine)": rate["nbdcopy --no-extents"] / engine_rate,
        "nbdcopy / nbdkit file": rate["nbdcopy"] / rate["nbdkit file + nbdcopy"],
    }
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    for name, good in checks.items():
        print(f"{name} SHA-256 matches the image: {good}")
    result = {"size": size, "rounds": args.rounds, "seconds": times, "restore_engine": engine,
              "ratios": ratios, "checks": checks, "loadavg": os.getloadavg()[0]}
    out = args.json or run_dir / "results.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nfigures in {out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
