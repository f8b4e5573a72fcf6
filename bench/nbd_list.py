#!/usr/bin/env python3
"""Benchmark NBD export listing: `nbdinfo --list` of a repository with 60 exports, against a
raw client doing the same option exchange, and `nbdinfo --list` of nbdkit's one export.

    .venv/bin/python bench/nbd_list.py [--exports 60] [--rounds 3]

`nbdinfo --list` lists the exports, then for each sends NBD_OPT_INFO and
NBD_OPT_LIST_META_CONTEXT. libnbd (1.14 here, and upstream) sends the latter, when it has no
queries, with MSG_MORE on its last piece: the client's kernel holds it until its probe timer
fires (~200 ms), whatever the server does. The raw client sends the same options, each in one
piece, so its time is the server's own cost; nbdkit shows the client's fixed cost per export.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from snapship.crypto import ScryptParams  # noqa: E402
from snapship.devices import Source  # noqa: E402
from snapship.engine.backup import run_backup  # noqa: E402
from snapship.nbd import protocol as p  # noqa: E402
from snapship.repository.repo import Repository  # noqa: E402
from snapship.storage.local import LocalStorage  # noqa: E402

PASSPHRASE = "bench-passphrase-not-secret"


def make_repo(path: Path, exports: int) -> None:
    """Three volumes and enough small versions of them for `exports` export names."""
    repo = Repository.create(LocalStorage(str(path)), chunk_size=64 << 10,
                             passphrase=PASSPHRASE.encode, kdf=ScryptParams(n=1 << 10))
    volumes = ("alpha", "beta", "gamma")
    src = path.parent / "src.img"
    for i in range(exports - len(volumes)):
        src.write_bytes(bytes([i % 255 + 1]) * 70000)
        with Source(str(src)) as s:
            run_backup(repo, s, volumes[i % len(volumes)], workers=1)
    src.unlink()


@contextlib.contextmanager
def snapship_server(repo: Path, state: Path) -> Iterator[int]:
    env = dict(os.environ, SNAPSHIP_PASSPHRASE=PASSPHRASE, SNAPSHIP_STATE_DIR=str(state))
    proc = subprocess.Popen([sys.executable, "-m", "snapship.cli.main", "nbd", "serve",
                             "--repo", str(repo), "--listen", "127.0.0.1:0", "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        text = ""
        while True:
            line = proc.stdout.readline()
            if not line:
                raise SystemExit("snapship nbd serve exited before listening")
            text += line
            with contextlib.suppress(json.JSONDecodeError):
                yield int(json.loads(text)["listening"][0].rsplit(":", 1)[1])
                break
    finally:
        proc.terminate()
        proc.wait(60)


@contextlib.contextmanager
def nbdkit_server(port: int) -> Iterator[int]:
    proc = subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "memory", "1M"],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            if time.monotonic() > deadline:
                raise SystemExit("nbdkit did not start")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


def time_nbdinfo(port: int) -> tuple[float, int]:
    start = time.monotonic()
    r = subprocess.run(["nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{port}"],
                       capture_output=True, text=True, check=True)
    return time.monotonic() - start, len(json.loads(r.stdout)["exports"])


def recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            raise ConnectionError("closed")
        buf += got
    return buf


def option(sock: socket.socket, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
    sock.sendall(p.encode_option(opt, data))
    out = []
    while True:
        _, rtype, length = p.parse_option_reply_header(recv(sock, p.OPTION_REPLY_HEADER_SIZE))
        out.append((rtype, recv(sock, length)))
        if rtype not in (p.REP_SERVER, p.REP_INFO, p.REP_META_CONTEXT):
            return out


def time_raw(port: int) -> tuple[float, int]:
    """What nbdinfo --list asks, each option sent whole."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        start = time.monotonic()
        recv(sock, 18)
        sock.sendall(struct.pack(">I", p.CLIENT_FIXED_NEWSTYLE | p.CLIENT_NO_ZEROES))
        option(sock, p.OPT_STRUCTURED_REPLY)
        names = [d[4 : 4 + struct.unpack(">I", d[:4])[0]] for t, d in option(sock, p.OPT_LIST)
                 if t == p.REP_SERVER]
        for name in names:
            raw = struct.pack(">I", len(name)) + name
            option(sock, p.OPT_INFO, raw + struct.pack(">HHH", 2, p.INFO_NAME, p.INFO_DESCRIPTION))
            option(sock, p.OPT_LIST_META_CONTEXT, raw + struct.pack(">I", 0))
        option(sock, p.OPT_ABORT)
        return time.monotonic() - start, len(names)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--exports", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="snapship-nbd-list-") as tmp:
        repo = Path(tmp) / "repo"
        make_repo(repo, args.exports)
        results: dict[str, list[float]] = {"nbdinfo --list": [], "raw client": [],
                                           "nbdinfo --list, nbdkit (1 export)": []}
        with snapship_server(repo, Path(tmp)) as port, nbdkit_server(free_port()) as kit:
            for _ in range(args.rounds):
                seconds, n = time_nbdinfo(port)
                assert n == args.exports, n
                results["nbdinfo --list"].append(seconds)
                seconds, n = time_raw(port)
                assert n == args.exports, n
                results["raw client"].append(seconds)
                results["nbdinfo --list, nbdkit (1 export)"].append(time_nbdinfo(kit)[0])
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    print(f"{args.exports} exports, median of {args.rounds} rounds (min-max):\n")
    print("| client | seconds | per export |")
    print("|---|---|---|")
    for what, times in results.items():
        n = 1 if "nbdkit" in what else args.exports
        med = statistics.median(times)
        print(f"| {what} | {med:.3f} ({min(times):.3f}-{max(times):.3f}) | "
              f"{1000 * med / n:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
