"""Helpers for the NBD tests: a repository with known versions, `snapship nbd serve` as a real
process on 127.0.0.1, the real client tools, and a minimal raw-socket client for bad input.

A plain module (like clihelp.py): the test_nbd_*.py files import what they need.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from snapship.devices import Source
from snapship.engine.backup import run_backup
from snapship.nbd import protocol as p
from snapship.repository.repo import Repository
from snapship.storage.local import LocalStorage
from tests.clihelp import CLI, PASSPHRASE, cli_env, init_repo_fast_kdf

CHUNK = 64 * 1024
TOOL_TIMEOUT = 120.0


# -- repositories with known content ---------------------------------------------------------


def image_data(size: int, seed: int) -> bytearray:
    """Chunk-sized runs of random data, repeated data, zeroes and short patterns, so versions
    have zero chunks (holes), shared chunks (dedup), and data chunks with zero runs inside."""
    rng = random.Random(seed)
    data = bytearray(size)
    pattern = rng.randbytes(CHUNK)
    for off in range(0, size, CHUNK):
        n = min(CHUNK, size - off)
        kind = rng.random()
        if kind < 0.3:
            continue
        if kind < 0.75:
            data[off : off + n] = rng.randbytes(n)
        elif kind < 0.9:
            data[off : off + n] = pattern[:n]
        else:
            data[off + 100 : off + min(n, 300)] = b"snapship" * 25  # mostly zero, not all
    return data


@dataclass
class Version:
    volume: str
    version: str
    data: bytes

    @property
    def name(self) -> str:
        return f"{self.volume}@{self.version}"

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class NbdRepo:
    path: Path
    versions: list[Version] = field(default_factory=list)

    def open(self) -> Repository:
        return Repository.open(LocalStorage(str(self.path)), lambda: PASSPHRASE.encode())

    def latest(self, volume: str) -> Version:
        return [v for v in self.versions if v.volume == volume][-1]


def make_test_repo(root: Path, images: Sequence[tuple[str, bytes]],
                   encryption: str = "aes-256-gcm") -> NbdRepo:  # fmt: skip
    """A repository holding one version per (volume, data), backed up in order."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "repo"
    init_repo_fast_kdf(path, encryption=encryption, chunk_size=CHUNK)
    tr = NbdRepo(path)
    add_versions(tr, images, root)
    return tr


def add_versions(tr: NbdRepo, images: Sequence[tuple[str, bytes]], scratch: Path) -> None:
    repo = tr.open()
    for volume, data in images:
        img = scratch / f"{volume}.src.img"
        img.write_bytes(data)
        with Source(str(img)) as src:
            m = run_backup(repo, src, volume, workers=2)
        img.unlink()
        tr.versions.append(Version(volume, m.version, bytes(data)))


# -- the server -------------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    log_path: Path
    info: dict[str, object]

    def uri(self, export: str = "", scheme: str = "nbd") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/{export}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def assert_alive(self) -> None:
        assert self.proc.poll() is None, f"server died (exit {self.proc.returncode}):\n{self.log()}"

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not stop on SIGTERM:\n{self.log()}") from None


@contextlib.contextmanager
def serve(repo: Path, *args: str, log_dir: Path, passphrase: str = PASSPHRASE,
          env: dict[str, str] | None = None) -> Iterator[Server]:
    """`snapship nbd serve --repo REPO --listen 127.0.0.1:0 --json --debug ARGS...`, with
    `env` added to its environment."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{time.monotonic_ns()}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*CLI, "nbd", "serve", "--repo", str(repo), "--listen", "127.0.0.1:0", "--json",
             "--debug", *args],
            env={**cli_env(passphrase), **(env or {})}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
    server: Server | None = None
    try:
        assert proc.stdout is not None
        text = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"server exited early:\n{log_path.read_text()}")
            text += line
            with contextlib.suppress(json.JSONDecodeError):
                info = json.loads(text)
                break
        else:
            raise AssertionError("server did not say where it listens")
        port = int(str(info["listening"][0]).rsplit(":", 1)[1])
        server = Server(proc, port, log_path, info)
        yield server
    finally:
        if server is not None:
            server.stop()
        elif proc.poll() is None:
            proc.kill()
            proc.wait()


# -- real clients -----------------------------------------------------------------------------


def run_tool(*argv: str | os.PathLike[str], timeout: float = TOOL_TIMEOUT,
             check: bool = True, **kw: object) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
    r = subprocess.run([str(a) for a in argv], capture_output=True, timeout=timeout,
                       check=False, **kw)  # type: ignore[call-overload]
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} failed with exit {r.returncode}:\n"
            f"{r.stderr.decode(errors='replace')}"
        )
    result: subprocess.CompletedProcess[bytes] = r
    return result


def tool_stdout_sha(*argv: str) -> tuple[str, int]:
    """SHA-256 and length of what a tool writes to stdout (streamed, not kept)."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    h = hashlib.sha256()
    n = 0
    while block := proc.stdout.read(1 << 20):
        h.update(block)
        n += len(block)
    _, err = proc.communicate(timeout=TOOL_TIMEOUT)
    assert proc.returncode == 0, f"{argv} failed: {err.decode(errors='replace')}"
    return h.hexdigest(), n


def merged_map(extents: Sequence[tuple[int, int, object]]) -> list[tuple[int, int, object]]:
    """(start, length, kind) with touching extents of the same kind joined."""
    out: list[tuple[int, int, object]] = []
    for start, length, kind in sorted(extents, key=lambda e: e[0]):
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, kind)
        else:
            out.append((start, length, kind))
    return out


def nbdinfo_map(uri: str) -> list[tuple[int, int, object]]:
    out = run_tool("nbdinfo", "--map", "--json", uri).stdout
    return merged_map([(e["offset"], e["length"], e["type"]) for e in json.loads(out)])


def qemu_map(uri: str) -> list[tuple[int, int, object]]:
    out = run_tool("qemu-img", "map", "--output=json", "-f", "raw", uri).stdout
    return merged_map([(e["start"], e["length"], (e["data"], e["zero"])) for e in json.loads(out)])


@contextlib.contextmanager
def nbdkit_file(path: Path, log_dir: Path) -> Iterator[str]:
    """`nbdkit file PATH` on a Unix socket; yields its URI."""
    sock = log_dir / f"nbdkit-{time.monotonic_ns()}.sock"
    proc = subprocess.Popen(
        ["nbdkit", "--foreground", "--exit-with-parent", "-r", "-U", str(sock), "file",
         str(path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"nbdkit did not start: {err}")
            time.sleep(0.05)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(30)


@functools.cache
def _nbdsh_path() -> str:
    """PATH for nbdsh, which runs `python3 -m nbd`: the first python3 on it must be one that
    python3-libnbd installed the module for (Debian's /usr/bin/python3), not a venv's or
    pyenv's."""
    path = os.environ.get("PATH", "")
    for python in (shutil.which("python3"), "/usr/bin/python3"):
        if python and subprocess.run([python, "-c", "import nbd"], capture_output=True,
                                     check=False).returncode == 0:  # fmt: skip
            return f"{os.path.dirname(python)}:{path}"
    raise AssertionError("no python3 can import libnbd's nbd module (python3-libnbd)")


def nbdsh(script: str, timeout: float = TOOL_TIMEOUT) -> object:
    """Run `nbdsh -c SCRIPT` (libnbd's Python shell; `nbd` is imported, the script makes its
    own handles) and return the JSON value of the last line it prints."""
    r = run_tool("nbdsh", "-c", script, timeout=timeout,
                 env={**os.environ, "PATH": _nbdsh_path()})  # fmt: skip
    lines = r.stdout.decode().splitlines()
    assert lines, f"nbdsh printed nothing:\n{r.stderr.decode(errors='replace')}"
    return json.loads(lines[-1])


# -- a raw-socket client (for bad input only) ------------------------------------------------


class RawClient:
    """Speaks just enough NBD to send what real clients never would."""

    def __init__(self, port: int, timeout: float = 20) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def close(self) -> None:
        self.sock.close()

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = self.sock.recv(n - len(buf))
            if not got:
                raise ConnectionError(f"server closed the connection ({len(buf)}/{n} bytes)")
            buf += got
        return bytes(buf)

    def closed_by_server(self) -> bool:
        """True if the server has closed its side (EOF or reset) within the timeout."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def greet(self, flags: int = p.CLIENT_FIXED_NEWSTYLE | p.CLIENT_NO_ZEROES) -> int:
        hello = self.recv(18)
        magic, opt_magic, server_flags = struct.unpack(">QQH", hello)
        assert (magic, opt_magic) == (p.NBDMAGIC, p.IHAVEOPT)
        self.sock.sendall(struct.pack(">I", flags))
        return int(server_flags)

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; return its replies (type, data) up to the final one."""
        self.sock.sendall(p.encode_option(option, data))
        replies = []
        while True:
            opt, rtype, length = p.parse_option_reply_header(self.recv(p.OPTION_REPLY_HEADER_SIZE))
            assert opt == option, (opt, option)
            replies.append((rtype, self.recv(length)))
            if rtype not in (p.REP_SERVER, p.REP_INFO, p.REP_META_CONTEXT):
                return replies

    def go(self, name: str, structured: bool, contexts: Sequence[str] = ()) -> tuple[int, int]:
        """Negotiate and enter transmission; returns (size, transmission flags)."""
        if structured:
            assert self.option(p.OPT_STRUCTURED_REPLY) == [(p.REP_ACK, b"")]
            if contexts:
                raw = name.encode()
                data = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(contexts))
                for c in contexts:
                    data += struct.pack(">I", len(c)) + c.encode()
                replies = self.option(p.OPT_SET_META_CONTEXT, data)
                assert replies[-1][0] == p.REP_ACK, replies
        raw = name.encode()
        replies = self.option(p.OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        assert replies[-1][0] == p.REP_ACK, replies
        for rtype, data in replies:
            if rtype == p.REP_INFO and struct.unpack(">H", data[:2])[0] == p.INFO_EXPORT:
                size, flags = struct.unpack(">QH", data[2:])
                return int(size), int(flags)
        raise AssertionError(f"no NBD_INFO_EXPORT in {replies}")

    def request(self, command: int, offset: int = 0, length: int = 0, flags: int = 0,
                cookie: int = 1, payload: bytes = b"") -> None:  # fmt: skip
        self.sock.sendall(p.encode_request(p.Request(flags, command, cookie, offset, length))
                          + payload)

    def simple_reply(self) -> tuple[int, int]:
        """(error, cookie) of a simple reply (its data, if any, is left to read)."""
        magic, error, cookie = struct.unpack(">IIQ", self.recv(p.SIMPLE_REPLY_SIZE))
        assert magic == p.SIMPLE_REPLY_MAGIC, hex(magic)
        return int(error), int(cookie)

    def structured_reply(self) -> tuple[int, list[tuple[int, int, bytes]]]:
        """(cookie, [(flags, type, payload)...]) up to the chunk flagged DONE."""
        chunks = []
        cookie = -1
        while True:
            magic, flags, rtype, ck, length = struct.unpack(
                ">IHHQI", self.recv(p.STRUCTURED_HEADER_SIZE))
            assert magic == p.STRUCTURED_REPLY_MAGIC, hex(magic)
            assert cookie in (-1, ck), "chunks of two replies interleaved"
            cookie = ck
            chunks.append((flags, rtype, self.recv(length)))
            if flags & p.REPLY_FLAG_DONE:
                return int(cookie), chunks


def structured_error(chunks: list[tuple[int, int, bytes]]) -> int:
    """The error code of a structured reply, 0 if it has no error chunk."""
    for _, rtype, payload in chunks:
        if rtype & 0x8000:
            return int(struct.unpack(">I", payload[:4])[0])
    return 0


@dataclass
class Answer:
    """A reply read by `checked_reply`: its error, and what a successful one carried."""

    error: int
    data: bytes = b""
    """READ: the bytes read, holes filled in."""
    extents: list[tuple[int, int]] = field(default_factory=list)
    """BLOCK_STATUS: the (length, flags) descriptors."""


def checked_reply(c: RawClient, req: p.Request, structured: bool) -> Answer:
    """Read the reply to `req` and fail unless it is well formed, as strictly as the protocol
    document puts it (and libnbd checks it): the request's cookie; every content chunk
    covering at least one byte, inside the request, none overlapping; a successful read
    covered whole; block status descriptors of non-zero length, exactly one with REQ_ONE and
    then no longer than the request; a NONE chunk only as the final, empty one."""
    if not structured:
        error, cookie = c.simple_reply()
        assert cookie == req.cookie, (cookie, req)
        if req.command == p.CMD_READ and error == 0:
            return Answer(0, c.recv(req.length))
        return Answer(error)
    cookie, chunks = c.structured_reply()
    assert cookie == req.cookie, (cookie, req)
    error = 0
    buf = bytearray(req.length if req.command == p.CMD_READ else 0)
    covered: list[tuple[int, int]] = []
    statuses: list[list[tuple[int, int]]] = []
    for i, (flags, rtype, pl) in enumerate(chunks):
        assert flags & ~p.REPLY_FLAG_DONE == 0, flags
        if rtype == p.REPLY_TYPE_NONE:
            assert i == len(chunks) - 1 and pl == b"", chunks
        elif rtype in (p.REPLY_TYPE_OFFSET_DATA, p.REPLY_TYPE_OFFSET_HOLE):
            assert req.command == p.CMD_READ, (req, rtype)
            if rtype == p.REPLY_TYPE_OFFSET_DATA:
                assert len(pl) > 8, f"an OFFSET_DATA chunk of {len(pl) - 8} bytes"
                (at,), n = struct.unpack(">Q", pl[:8]), len(pl) - 8
                buf[at - req.offset : at - req.offset + n] = pl[8:]
            else:
                assert len(pl) == 12, pl
                at, n = struct.unpack(">QI", pl)
                assert n > 0, "an OFFSET_HOLE chunk of 0 bytes"
            assert req.offset <= at and at + n <= req.end, (at, n, req)
            assert all(at + n <= s or e <= at for s, e in covered), "content chunks overlap"
            covered.append((at, at + n))
        elif rtype == p.REPLY_TYPE_BLOCK_STATUS:
            assert req.command == p.CMD_BLOCK_STATUS, (req, rtype)
            assert len(pl) >= 12 and (len(pl) - 4) % 8 == 0, pl
            descriptors = [struct.unpack(">II", pl[k : k + 8]) for k in range(4, len(pl), 8)]
            assert all(n > 0 for n, _ in descriptors), descriptors
            statuses.append([(int(n), int(f)) for n, f in descriptors])
        elif rtype in (p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET):
            assert len(pl) >= 6, pl
            code, msg_len = struct.unpack(">IH", pl[:6])
            tail = 8 if rtype == p.REPLY_TYPE_ERROR_OFFSET else 0  # the offset
            assert code != 0 and len(pl) == 6 + msg_len + tail, pl
            pl[6 : 6 + msg_len].decode()
            error = error or int(code)
        else:
            raise AssertionError(f"unknown structured reply type {rtype}")
    if error:
        return Answer(error)
    if req.command == p.CMD_READ:
        assert sum(e - s for s, e in covered) == req.length, (covered, req)
        return Answer(0, bytes(buf))
    if req.command == p.CMD_BLOCK_STATUS:
        assert len(statuses) == 1, chunks  # one context: base:allocation
        if req.flags & p.CMD_FLAG_REQ_ONE:
            assert len(statuses[0]) == 1 and statuses[0][0][0] <= req.length, statuses
        return Answer(0, extents=statuses[0])
    assert [rtype for _, rtype, _ in chunks] == [p.REPLY_TYPE_NONE], chunks
    return Answer(0)
