#!/usr/bin/env python3
"""Benchmark live exports (`snapship nbd serve --writable --state-dir`): write throughput
through the export with and without a checkpoint running, and checkpoint duration against
dirty bytes, on two volume sizes (it must follow the dirty bytes, not the volume).

One run: a fresh repository (encryption on, as users run it) holding sparse volumes of
`--small` and `--large` MiB, one server, `nbdcopy --flush` writing fresh random data at the
start of an export, `snapship nbd checkpoint` cutting versions. Writes beside a checkpoint
are timed from its freeze to its answer only. `--compare OTHER` measures that for another
build too (e.g. a wrapper running an older checkout), alternating `--rounds` times, so both
see the same load. Absolute numbers depend on the machine's load; the ratios within one run
are the result. Needs nbdcopy (libnbd-bin).
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


def state_layers(state: Path, volume: str) -> int:
    try:
        doc = json.loads((state / "exports" / volume / "export.json").read_text())
    except (OSError, ValueError):  # replaced whole, never torn: only absent meanwhile
        return 0
    return len(doc["layers"])


def throughput_during_checkpoint(snap: list[str], env: dict[str, str], uri: str, state: Path,
                                 scratch: Path, volume: str, dirty: int, piece: int,
                                 quiet_pieces: int) -> dict[str, Any]:  # fmt: skip
    """Write `piece`-byte pieces (nbdcopy --flush each) through the export: `quiet_pieces` of
    them with nothing else running, then `dirty` bytes to make a checkpoint of, then pieces
    for exactly as long as that checkpoint commits (from its freeze, seen in export.json, to
    its answer). Throughput counts only the nbdcopy runs."""
    quiet = sum(write_random(uri + volume, scratch, piece) for _ in range(quiet_pieces))
    write_random(uri + volume, scratch, dirty)
    cp = subprocess.Popen([*snap, "nbd", "checkpoint", volume, "--state-dir", str(state),
                           "--json"], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while state_layers(state, volume) < 2 and cp.poll() is None:  # poll for the freeze
        if time.monotonic() > deadline:
            raise SystemExit("the checkpoint never froze its layer")
        time.sleep(0.005)
    busy, pieces = 0.0, 0
    while cp.poll() is None:
        busy += write_random(uri + volume, scratch, piece)
        pieces += 1
    out, _ = cp.communicate()
    answer = json.loads(out)
    quiet_mb_s = quiet_pieces * piece / quiet / 1e6
    busy_mb_s = pieces * piece / busy / 1e6 if pieces else 0.0
    return {"quiet_mb_s": round(quiet_mb_s, 1), "during_mb_s": round(busy_mb_s, 1),
            "ratio": round(busy_mb_s / quiet_mb_s, 3), "pieces_during": pieces,
            "checkpoint_s": answer["seconds"], "dirty_bytes": answer["dirty_bytes"]}


def serving(snap: list[str], env: dict[str, str], repo: Path,
            state: Path) -> tuple[subprocess.Popen[str], str]:  # fmt: skip
    proc = subprocess.Popen(
        [*snap, "nbd", "serve", "--repo", str(repo), "--writable", "--state-dir",
         str(state), "--listen", "127.0.0.1:0", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    port = json.loads(proc.stdout.readline())["listening"][0].rsplit(":", 1)[1]
    return proc, f"nbd://127.0.0.1:{port}/"


def compare(args: argparse.Namespace, env: dict[str, str], repo: Path,
            t: Path) -> list[dict[str, Any]]:  # fmt: skip
    """Write throughput during a checkpoint, for each snapship in turn (this one, then each
    --compare), `--rounds` times alternating: one load, the ratios side by side."""
    rows = []
    snaps = [args.snapship, *args.compare]
    for r in range(args.rounds):
        for i, exe in enumerate(snaps):
            state = t / f"cmp-{r}-{i}"
            proc, uri = serving([exe], env, repo, state)
            try:
                write_random(uri + "small", t, args.piece * MiB)  # creates the export
                rows.append({"snapship": exe, "round": r, "load": os.getloadavg()[0],
                             **throughput_during_checkpoint(
                                 [exe], env, uri, state, t, "small", args.during_dirty * MiB,
                                 args.piece * MiB, args.quiet_pieces)})
            finally:
                proc.terminate()
                proc.wait(60)
    return rows


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
    ap.add_argument("--during-dirty", type=int, default=128,
                    help="MiB dirty in the checkpoint writes run beside (default 128)")
    ap.add_argument("--piece", type=int, default=4, help="MiB per nbdcopy beside it")
    ap.add_argument("--quiet-pieces", type=int, default=16,
                    help="pieces written with no checkpoint, for the quiet throughput")
    ap.add_argument("--compare", action="append", default=[], metavar="SNAPSHIP",
                    help="another snapship executable (e.g. an older build) to measure the "
                    "write throughput during a checkpoint of, alternating with this one")
    ap.add_argument("--rounds", type=int, default=2, help="alternations for --compare")
    ap.add_argument("--only-compare", action="store_true",
                    help="measure only the throughput during a checkpoint")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    dirty_sizes = [int(x) for x in args.dirty.split(",")]
    snap = [args.snapship]
    results: dict[str, Any] = {"load_before": os.getloadavg()[0]}
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
        if args.compare or args.only_compare:
            results["during_checkpoint"] = compare(args, env, repo, t)
        if not args.only_compare:
            proc, uri = serving(snap, env, repo, state)
            try:
                measure(args, snap, env, uri, state, t, dirty_sizes, results)
            finally:
                proc.terminate()
                proc.wait(60)
    results["load_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    report(results)
    return 0


def measure(args: argparse.Namespace, snap: list[str], env: dict[str, str], uri: str,
            state: Path, t: Path, dirty_sizes: list[int],
            results: dict[str, Any]) -> None:  # fmt: skip
    def checkpoint(volume: str) -> tuple[dict[str, Any], float]:
        start = time.monotonic()
        r = run([*snap, "nbd", "checkpoint", volume, "--state-dir", str(state), "--json"], env)
        return json.loads(r.stdout), time.monotonic() - start

    # Throughput, quiet: the first write creates the export; measure a second one.
    write_random(uri + "small", t, args.write * MiB)
    checkpoint("small")
    quiet = write_random(uri + "small", t, args.write * MiB)
    small = write_random(uri + "small", t, args.small_writes * MiB, 4096)
    results["write_mb_s_quiet"] = round(args.write * MiB / quiet / 1e6, 1)
    results["write_mb_s_4k_requests"] = round(args.small_writes * MiB / small / 1e6, 2)
    checkpoint("small")
    # Throughput while a checkpoint runs, from its freeze to its answer.
    results["during"] = throughput_during_checkpoint(
        snap, env, uri, state, t, "small", args.during_dirty * MiB, args.piece * MiB,
        args.quiet_pieces)
    # Checkpoint duration against dirty bytes, on both volume sizes.
    rows = []
    for volume, size in (("small", args.small), ("large", args.large)):
        for d in dirty_sizes:
            write_random(uri + volume, t, d * MiB)
            cp_json, wall = checkpoint(volume)
            rows.append({"volume_mib": size, "dirty_mib": d,
                         "dirty_bytes": cp_json["dirty_bytes"],
                         "checkpoint_s": cp_json["seconds"], "command_s": round(wall, 3)})
    results["checkpoints"] = rows
    if args.journal:
        results["journal"] = journal_cost(t)


def report(results: dict[str, Any]) -> None:
    print(f"load average before {results['load_before']:.2f}, after {results['load_after']:.2f}")
    for row in results.get("during_checkpoint", []):
        print(f"{row['snapship']} (round {row['round']}, load {row['load']:.2f}): "
              f"{row['quiet_mb_s']} MB/s quiet, {row['during_mb_s']} MB/s during a "
              f"{row['dirty_bytes'] >> 20} MiB checkpoint ({row['checkpoint_s']} s, "
              f"{row['pieces_during']} pieces): ratio {row['ratio']}")
    if "during" not in results:
        return
    d = results["during"]
    print(f"write throughput: {results['write_mb_s_quiet']} MB/s quiet; beside a "
          f"{d['dirty_bytes'] >> 20} MiB checkpoint ({d['checkpoint_s']} s): "
          f"{d['during_mb_s']} MB/s against {d['quiet_mb_s']} MB/s just before (ratio "
          f"{d['ratio']}); {results['write_mb_s_4k_requests']} MB/s in 4 KiB requests")
    if "journal" in results:
        j = results["journal"]
        print(f"per 4 KiB request: map update {j['map_set_us']} us, with the journal append "
              f"{j['journal_us']} us")
    print("volume MiB  dirty MiB  checkpoint s  command s")
    for r in results["checkpoints"]:
        print(f"{r['volume_mib']:>10}  {r['dirty_mib']:>9}  {r['checkpoint_s']:>12}  "
              f"{r['command_s']:>9}")


if __name__ == "__main__":
    sys.exit(main())
