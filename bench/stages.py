#!/usr/bin/env python3
"""The CPU budget of a full backup and a restore, stage by stage (docs/perf.md).

Part 1 runs every stage of the pipeline in isolation, on one thread, over every chunk of an
image, and adds up the CPU time (`time.thread_time`) each C call costs: read, zero test, chunk
id, zstd, the synthetic nonce, AES-GCM, the store (write + fsync + rename) and, for restore,
fetch, AES-GCM open, zstd decompress, the id check, write and the final fsync. CPU time is
robust on a loaded machine; wall time is printed beside it, with the load average.

Part 2 runs the real engines in-process (`run_backup`, `run_restore`, default workers) on the
same image into a scratch repository and reads the CPU time of every thread from
/proc/self/task, so the budget can be set against what a run really spends, and on which
thread (the caller's thread produces reads and writes the target; the workers do the rest).

    .venv/bin/python bench/stages.py IMAGE [--workdir DIR] [--part 1|2|both]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zstandard

from snapship import crypto
from snapship.crypto import Keys, ScryptParams
from snapship.engine.backup import run_backup
from snapship.engine.restore import run_restore
from snapship.formats import envelope
from snapship.formats.constants import DEFAULT_CHUNK_SIZE, DEFAULT_ZSTD_LEVEL, KIND_CHUNK
from snapship.repository.repo import Repository
from snapship.storage.local import LocalStorage

FAST_KDF = ScryptParams(n=1 << 10, r=8, p=1)
"""The KDF is a fixed cost per command, not part of the pipeline: kept out of the figures."""
MB = 1_000_000


class Budget:
    """CPU and wall seconds, and bytes, per stage."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self.nbytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def stage(self, name: str, nbytes: int) -> Iterator[None]:
        c0, w0 = time.thread_time(), time.perf_counter()
        yield
        self.cpu[name] += time.thread_time() - c0
        self.wall[name] += time.perf_counter() - w0
        self.nbytes[name] += nbytes
        self.calls[name] += 1

    def rows(self) -> list[dict[str, Any]]:
        return [{"stage": k, "cpu_s": round(self.cpu[k], 3), "wall_s": round(self.wall[k], 3),
                 "bytes": self.nbytes[k], "calls": self.calls[k],
                 "cpu_mbps": round(self.nbytes[k] / MB / self.cpu[k], 0) if self.cpu[k] else None}
                for k in self.cpu]


def isolated(image: Path, scratch: Path, level: int, cs: int) -> dict[str, Any]:
    """Part 1: each stage alone, one thread, over the whole image."""
    keys = Keys.generate()
    aead, id_key, nonce_key = keys.aead, keys.id_key, keys.nonce_key
    cctx = zstandard.ZstdCompressor(level=level)
    dctx = zstandard.ZstdDecompressor()
    store = LocalStorage(str(scratch / "objects"))
    b, r = Budget(), Budget()
    zero = bytes(cs)
    seen: set[bytes] = set()
    stored: list[tuple[int, bytes, int]] = []  # (index, cid, raw length)
    chunks = zeros = dups = incompressible = 0
    raw_new = packed_new = 0
    fd = os.open(image, os.O_RDONLY)
    size = os.fstat(fd).st_size
    try:
        for off in range(0, size, cs):
            n = min(cs, size - off)
            chunks += 1
            with b.stage("read (pread, page cache)", n):
                data = os.pread(fd, n, off)
            with b.stage("zero test", n):
                is_zero = data == (zero if n == cs else bytes(n))
            if is_zero:
                zeros += 1
                continue
            with b.stage("chunk id (keyed BLAKE3)", n):
                cid = crypto.chunk_id(data, id_key)
            if cid in seen:
                dups += 1
                continue
            seen.add(cid)
            with b.stage(f"zstd -{level} compress", n):
                packed = cctx.compress(data)
            body: bytes = packed if len(packed) < n else data
            if body is data:
                incompressible += 1
            raw_new += n
            packed_new += len(body)
            header = envelope._HEADER.pack(b"SNPO", 1, KIND_CHUNK, 3, 0)
            aad = header + cid
            with b.stage("nonce (BLAKE3 of the body)", len(body)):
                nonce = crypto.synthetic_nonce(nonce_key, aad, body)
            with b.stage("AES-256-GCM seal", len(body)):
                blob = crypto.encrypt_after(header, aead, body, aad, nonce)
            with b.stage("store (write+fsync+rename)", len(blob)):
                store.put(f"chunks/{cid[:1].hex()}/{cid.hex()}", blob)
            stored.append((off, cid, n))
    finally:
        os.close(fd)
    with b.stage("flush (syncfs)", 0):
        store.flush()

    target = scratch / "restored.img"
    tfd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(tfd, size)
        for off, cid, n in stored:
            key = f"chunks/{cid[:1].hex()}/{cid.hex()}"
            with r.stage("fetch (read object)", 0):
                obj = store.get(key)
            r.nbytes["fetch (read object)"] += len(obj)
            mv = memoryview(obj)[8:]
            with r.stage("AES-256-GCM open", len(obj)):
                body = aead.decrypt(mv[:12], mv[12:], obj[:8] + cid)
            if len(body) < n:
                with r.stage("zstd decompress", n):
                    data = dctx.decompress(body, max_output_size=n)
            else:
                data = body
            with r.stage("id check (keyed BLAKE3)", n):
                crypto.chunk_id(data, id_key)
            with r.stage("write (pwrite, new file)", n):
                os.pwrite(tfd, data, off)
        with r.stage("final fsync", 0):
            os.fsync(tfd)
    finally:
        os.close(tfd)
    return {
        "chunks": chunks, "zero": zeros, "duplicates": dups, "stored": len(stored),
        "incompressible": incompressible, "raw_new": raw_new, "packed_new": packed_new,
        "backup": b.rows(), "restore": r.rows(),
    }


class ThreadCpu:
    """CPU seconds of every thread of this process, sampled from /proc/self/task."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.seen: dict[int, tuple[str, float, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    head, rest = f.read().rsplit(")", 1)
            except OSError:
                continue
            fields = rest.split()
            name = head.split("(", 1)[1]
            self.seen[int(tid)] = (name, int(fields[11]) / self.tick, int(fields[12]) / self.tick)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.sample()

    def __enter__(self) -> ThreadCpu:
        self.before = dict(self._snapshot())
        self._thread.start()
        return self

    def _snapshot(self) -> Iterator[tuple[int, tuple[str, float, float]]]:
        self.sample()
        yield from self.seen.items()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def by_role(self, main_tid: int) -> dict[str, tuple[float, float]]:
        out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for tid, (name, u, s) in self.seen.items():
            _, u0, s0 = self.before.get(tid, (name, 0.0, 0.0))
            role = "caller's thread" if tid == main_tid else (
                "workers" if name.startswith("snapship") else "other threads")
            out[role][0] += u - u0
            out[role][1] += s - s0
        return {k: (round(v[0], 2), round(v[1], 2)) for k, v in out.items()}


def whole(image: Path, scratch: Path, level: int, cs: int) -> dict[str, Any]:
    """Part 2: the real engines, default workers, CPU per thread role."""
    repo_dir = scratch / "repo"
    shutil.rmtree(repo_dir, ignore_errors=True)
    repo = Repository.create(LocalStorage(str(repo_dir)), passphrase=lambda: b"bench",
                             kdf=FAST_KDF, chunk_size=cs, compression_level=level)
    from snapship.devices import Source

    out: dict[str, Any] = {"load_before": os.getloadavg()}
    for step in ("backup", "restore"):
        target = scratch / "restored.img"
        target.unlink(missing_ok=True)
        t0, w0 = os.times(), time.perf_counter()
        with ThreadCpu() as tc:
            if step == "backup":
                with Source(str(image)) as src:
                    m = run_backup(repo, src, "disk")
            else:
                run_restore(repo, m, str(target))
        t1, wall = os.times(), time.perf_counter() - w0
        cpu = (t1.user - t0.user) + (t1.system - t0.system)
        out[step] = {"wall_s": round(wall, 2), "user_s": round(t1.user - t0.user, 2),
                     "sys_s": round(t1.system - t0.system, 2), "cores": round(cpu / wall, 2),
                     "threads": tc.by_role(threading.get_native_id()),
                     "load": os.getloadavg()}
        if step == "backup":
            out[step]["stats"] = m.stats
    target.unlink(missing_ok=True)
    out["repo_bytes"] = sum(p.stat().st_size for p in repo_dir.rglob("*") if p.is_file())
    return out


def show(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}\n| stage | CPU s | wall s | MB | MB/s of CPU |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['stage']} | {row['cpu_s']:.2f} | {row['wall_s']:.2f} | "
              f"{row['bytes'] / MB:.0f} | {row['cpu_mbps'] or '-'} |")
    print(f"| total | {sum(r['cpu_s'] for r in rows):.2f} | "
          f"{sum(r['wall_s'] for r in rows):.2f} | | |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("image", type=Path)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/snapship-bench/stages"))
    p.add_argument("--part", choices=("1", "2", "both"), default="both")
    p.add_argument("--level", type=int, default=DEFAULT_ZSTD_LEVEL)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    result: dict[str, Any] = {"image": str(args.image), "load_start": os.getloadavg()}
    run: Callable[[Path, Path, int, int], dict[str, Any]]
    for part, run in (("1", isolated), ("2", whole)):
        if args.part in (part, "both"):
            result[f"part{part}"] = run(args.image, args.workdir, args.level, DEFAULT_CHUNK_SIZE)
    result["load_end"] = os.getloadavg()
    if "part1" in result:
        p1 = result["part1"]
        print({k: v for k, v in p1.items() if k not in ("backup", "restore")})
        show("backup, one thread, each stage alone", p1["backup"])
        show("restore, one thread, each stage alone", p1["restore"])
    if "part2" in result:
        print(json.dumps(result["part2"], indent=1, default=str))
    print(f"load average start {result['load_start']} end {result['load_end']}")
    out = args.json or args.workdir.parent / "stages.json"
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
