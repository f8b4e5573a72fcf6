"""An HTTP/1.1 proxy on 127.0.0.1 that injects the faults a real S3 server won't make on demand.

Unlike tests/faultproxy.py (bytes, random cuts and bursts, for the snapship server), it reads
requests, so a test can aim a fault at one kind of request (chunk uploads, listings, HEADs).
It sits between boto3 and `weed` and forwards requests as they come (keep-alive included),
except those a rule claims. Rules are taken in order; each matches requests by method and
path and fires on its next `count` matches (None: every one) after letting `skip` pass:

- `status`: answer with an S3 error (503 SlowDown by default) without forwarding;
- `drop_upload`: forward the headers and the first `after` bytes of the body, then cut both
  connections: the server sees a truncated upload, the client a dropped connection;
- `drop_response`: forward the whole request, then cut the client's connection before the
  answer (the server did the work; the client cannot know);
- `cut_response`: forward the request, then send the answer's head and only half its body
  before cutting the client's connection (a download that breaks off);
- `stall`: wait `seconds` before forwarding (the client's read timeout fires first);
- `corrupt`: flip one byte of the body on its way (the server must refuse it: its CRC32).

`seen` keeps the method, path and headers (lower-case names) of every request, for tests
that check what the client sends.

Only used by tests: the proxy never opens a connection anywhere but to its upstream.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

_ERROR = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>"
          "<Message>injected by the test proxy</Message></Error>")
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


@dataclass
class Rule:
    kind: str
    match: Callable[[str, str], bool] = lambda method, path: True
    count: int | None = 1
    skip: int = 0
    status: int = 503
    code: str = "SlowDown"
    after: int = 0
    seconds: float = 0.0
    fired: int = 0

    def claims(self, method: str, path: str) -> bool:
        if not self.match(method, path):
            return False
        if self.skip > 0:
            self.skip -= 1
            return False
        if self.count is not None and self.fired >= self.count:
            return False
        self.fired += 1
        return True


def puts_under(fragment: str) -> Callable[[str, str], bool]:
    """Matches PUTs (uploads) whose path contains `fragment`, e.g. '/chunks/'."""
    return lambda method, path: method == "PUT" and fragment in path


@dataclass
class FaultProxy:
    upstream_port: int
    rules: list[Rule] = field(default_factory=list)
    injected: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.connection, self.rfile)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    # -- one client connection ------------------------------------------------------------

    def _rule_for(self, method: str, path: str, headers: list[tuple[str, str]]) -> Rule | None:
        with self._lock:
            self.requests += 1
            self.seen.append((method, path, {k.lower(): v for k, v in headers}))
            for rule in self.rules:
                if rule.claims(method, path):
                    self.injected[rule.kind] += 1
                    return rule
        return None

    def _serve(self, conn: socket.socket, rfile: io.BufferedIOBase) -> None:
        with self._lock:
            self._conns.add(conn)
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        try:
            for method, path, headers, body in _requests(conn, rfile):
                rule = self._rule_for(method, path, headers)
                if rule is not None and rule.kind == "status":
                    conn.sendall(_error_response(rule.status, rule.code, method))
                    continue
                if rule is not None and rule.kind == "drop_upload":
                    self._truncated_upload(method, path, headers, body, rule.after)
                    return
                if rule is not None and rule.kind == "stall":
                    time.sleep(rule.seconds)
                if rule is not None and rule.kind == "corrupt" and body:
                    body = bytes([body[0] ^ 0xFF]) + body[1:]
                response = _forward(upstream, method, path, headers, body)
                if rule is not None and rule.kind == "drop_response":
                    return
                if rule is not None and rule.kind == "cut_response":
                    head, _, body = response.partition(b"\r\n\r\n")
                    conn.sendall(head + b"\r\n\r\n" + body[: len(body) // 2])
                    return
                conn.sendall(response)
        except (OSError, http.client.HTTPException):
            pass
        finally:
            upstream.close()
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _truncated_upload(self, method: str, path: str, headers: list[tuple[str, str]],
                          body: bytes, after: int) -> None:
        with socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10) as s:
            head = f"{method} {path} HTTP/1.1\r\n" + "".join(
                f"{k}: {v}\r\n" for k, v in headers if k.lower() != "expect")
            s.sendall(head.encode("latin-1") + b"\r\n" + body[:after])
            time.sleep(0.05)  # let the server start on the body before it is cut off


def _requests(conn: socket.socket, rfile: io.BufferedIOBase
              ) -> Iterator[tuple[str, str, list[tuple[str, str]], bytes]]:
    read = rfile.readline
    while True:
        line = read(65537)
        if not line:
            return
        method, path, _version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        headers: list[tuple[str, str]] = []
        while (h := read(65537)) not in (b"\r\n", b"\n", b""):
            name, _, value = h.decode("latin-1").partition(":")
            if name.strip().lower() == "expect":
                # The client waits (up to a second) for this before it sends a body; the
                # proxy takes the whole body first and forwards it without asking again.
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            headers.append((name.strip(), value.strip()))
        length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
        body = rfile.read(length) if length else b""
        yield method, path, headers, body


def _forward(upstream: http.client.HTTPConnection, method: str, path: str,
             headers: list[tuple[str, str]], body: bytes) -> bytes:
    upstream.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for k, v in headers:
        if k.lower() not in ("connection", "keep-alive", "expect"):
            upstream.putheader(k, v)
    upstream.endheaders(body if body else None)
    resp = upstream.getresponse()
    data = resp.read()
    out = [f"HTTP/1.1 {resp.status} {resp.reason}\r\n"]
    for k, v in resp.getheaders():
        if k.lower() not in _HOP or (method == "HEAD" and k.lower() == "content-length"):
            out.append(f"{k}: {v}\r\n")
    if method != "HEAD":
        out.append(f"Content-Length: {len(data)}\r\n")
    out.append("\r\n")
    return "".join(out).encode("latin-1") + (data if method != "HEAD" else b"")


def _error_response(status: int, code: str, method: str) -> bytes:
    body = _ERROR.format(code=code).encode()
    head = (f"HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + (b"" if method == "HEAD" else body)
