#!/usr/bin/env python3
"""Benchmark live exports (`snapship nbd serve --writable --state-dir`): write throughput
through the export with and without a checkpoint running, and checkpoint duration against
dirty bytes, on two volume sizes (it must follow the dirty bytes, not the volume).

One run: a fresh repository (encryption on, as users run it) holding sparse volumes of
`--small` and `--large` MiB, one server, `nbdcopy --flush` writing fresh random data at the
start of an export, `snapship nbd checkpoint` cutting versions. Absolute numbers depend on
the machine's load; the ratios within one run are the result. Needs nbdcopy (libnbd-bin).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_SNAPSHIP = BENCH_DIR.parent / ".venv" / "bin" / "snapship"
PASSPHRASE = "bench-passphrase-not-secret"


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stderr}")
    return r


def write_random(uri: str, scratch: Path, length: int, request_size: int | None = None
                 ) -> float:  # fmt: skip
    """Seconds for nbdcopy to write `length` fresh random bytes at offset 0 and flush
    (in requests of `request_size` bytes if given, else nbdcopy's default)."""
    src = scratch / "random.bin"
    with open(src, "wb") as f:
        f.write(os.urandom(length))
    start = time.monotonic()
    sized = [] if request_size is None else [f"--request-size={request_size}"]
    r = subprocess.run(["nbdcopy", "--flush", *sized, str(src), uri], capture_output=True,
                       text=True, check=False)
    took = time.monotonic() - start
    src.unlink()
    if r.returncode != 0:
        raise SystemExit(f"nbdcopy failed:\n{r.stderr[-2000:]}")
    return took


def journal_cost(scratch: Path, requests: int = 50_000) -> dict[str, float]:
    """In this process: microseconds per 4 KiB request for the in-memory map update alone and
    for a durable layer's `journal` (the update, plus encoding and appending the map entry)."""
    import random

    from snapship.nbd.durable import DurableLayer
    from snapship.nbd.rangemap import RangeMap

    rng = random.Random(1)
    offsets = [rng.randrange(0, 1 << 18) * 4096 for _ in range(requests)]
    m = RangeMap()
    start = time.perf_counter()
    for o in offsets:
        m.set(o, o + 4096, 1)
    alone = time.perf_counter() - start
    layer = DurableLayer(scratch, 1, 1 << 30, create=True)
    start = time.perf_counter()
    for o in offsets:
        layer.journal(o, o + 4096, 1)
    journaled = time.perf_counter() - start
    layer.close()
    layer.remove()
    return {"map_set_us": round(alone / requests * 1e6, 2),
            "journal_us": round(journaled / requests * 1e6, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapship", default=str(DEFAULT_SNAPSHIP))
    ap.add_argument("--small", type=int, default=256, help="small volume, MiB")
    ap.add_argument("--large", type=int, default=2048, help="large volume, MiB")
    ap.add_argument("--write", type=int, default=64, help="MiB written per throughput step")
    ap.add_argument("--small-writes", type=int, default=16,
                    help="MiB written in 4 KiB requests (the per-request cost)")
    ap.add_argument("--dirty", default="8,32,128", help="dirty MiB per checkpoint, listed")
    ap.add_argument("--journal", action="store_true",
                    help="also time the map journal's append per request, in this process")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    dirty_sizes = [int(x) for x in args.dirty.split(",")]
    snap = [args.snapship]
    with tempfile.TemporaryDirectory(prefix="snapship-bench-live.") as tmp:
        t = Path(tmp)
        env = {**os.environ, "SNAPSHIP_PASSPHRASE": PASSPHRASE,
               "SNAPSHIP_STATE_DIR": str(t / "client-state")}
        repo, state = t / "repo", t / "live"
        run([*snap, "init", "--repo", str(repo)], env)
        for name, size in (("small", args.small), ("large", args.large)):
            img = t / f"{name}.img"
            with open(img, "wb") as f:
                f.truncate(size * MiB)
            run([*snap, "backup", "--repo", str(repo), str(img), "--volume", name], env)
            img.unlink()
        proc = subprocess.Popen(
            [*snap, "nbd", "serve", "--repo", str(repo), "--writable", "--state-dir",
             str(state), "--listen", "127.0.0.1:0", "--json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert proc.stdout is not None
            port = json.loads(proc.stdout.readline())["listening"][0].rsplit(":", 1)[1]
            uri = f"nbd://127.0.0.1:{port}/"
            results: dict[str, Any] = {"load_before": os.getloadavg()[0]}

            def checkpoint(volume: str) -> tuple[dict[str, Any], float]:
                start = time.monotonic()
                r = run([*snap, "nbd", "checkpoint", volume, "--state-dir", str(state),
                         "--json"], env)
                return json.loads(r.stdout), time.monotonic() - start

            # Throughput, quiet: the first write creates the export; measure a second one.
            write_random(uri + "small", t, args.write * MiB)
            checkpoint("small")
            quiet = write_random(uri + "small", t, args.write * MiB)
            small = write_random(uri + "small", t, args.small_writes * MiB, 4096)
            results["write_mb_s_4k_requests"] = round(args.small_writes * MiB / small / 1e6, 2)
            # Throughput while a checkpoint of 128 MiB of dirty data runs.
            big = max(dirty_sizes)
            write_random(uri + "small", t, big * MiB)
            cp = subprocess.Popen([*snap, "nbd", "checkpoint", "small", "--state-dir",
                                   str(state), "--json"], env=env, stdout=subprocess.PIPE,
                                  text=True)
            busy = write_random(uri + "small", t, args.write * MiB)
            cp_out, _ = cp.communicate()
            during = json.loads(cp_out)
            results["write_mb_s_quiet"] = round(args.write * MiB / quiet / 1e6, 1)
            results["write_mb_s_during_checkpoint"] = round(args.write * MiB / busy / 1e6, 1)
            results["during_ratio"] = round(quiet / busy, 3)
            results["checkpoint_overlapped_write"] = during["seconds"] > 0
            checkpoint("small")
            # Checkpoint duration against dirty bytes, on both volume sizes.
            rows = []
            for volume, size in (("small", args.small), ("large", args.large)):
                for d in dirty_sizes:
                    write_random(uri + volume, t, d * MiB)
                    cp_json, wall = checkpoint(volume)
                    rows.append({"volume_mib": size, "dirty_mib": d,
                                 "dirty_bytes": cp_json["dirty_bytes"],
                                 "checkpoint_s": cp_json["seconds"],
                                 "command_s": round(wall, 3)})
            results["checkpoints"] = rows
            if args.journal:
                results["journal"] = journal_cost(t)
            results["load_after"] = os.getloadavg()[0]
        finally:
            proc.terminate()
            proc.wait(60)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"load average before {results['load_before']:.2f}, after {results['load_after']:.2f}")
    print(f"write throughput: {results['write_mb_s_quiet']} MB/s quiet, "
          f"{results['write_mb_s_during_checkpoint']} MB/s during a checkpoint "
          f"(quiet/during time ratio {results['during_ratio']}); "
          f"{results['write_mb_s_4k_requests']} MB/s in 4 KiB requests")
    if "journal" in results:
        j = results["journal"]
        print(f"per 4 KiB request: map update {j['map_set_us']} us, with the journal append "
              f"{j['journal_us']} us")
    print("volume MiB  dirty MiB  checkpoint s  command s")
    for r in results["checkpoints"]:
        print(f"{r['volume_mib']:>10}  {r['dirty_mib']:>9}  {r['checkpoint_s']:>12}  "
              f"{r['command_s']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
