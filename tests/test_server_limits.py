"""What a client without a token can make the server spend, against a real server over real
sockets (issue 10, item 8): slow request heads, huge claimed bodies, malformed framing, and
what error replies reveal about the server's disk.

Each test polls for the condition it waits for, with a deadline; none sleeps to synchronise.
Every test also checks the server's peak memory (VmHWM).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snapship.formats import http_api as api
from tests.clihelp import assert_one_line_error
from tests.serverproc import ServerProc, http_storage, run_cli_env, running_server
from tests.test_server_tls import make_ca_and_server_cert

MAX_SERVER_MEMORY = 300 << 20
HEADER_TIMEOUT = 4.0


def server_pid(server: ServerProc) -> int:
    assert server.proc is not None
    return server.proc.pid


def status_field(pid: int, field: str) -> int:
    """A field of /proc/PID/status, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == field:
                parts = value.split()
                return int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def assert_memory_bounded(server: ServerProc) -> int:
    peak = status_field(server_pid(server), "VmHWM")
    assert peak < MAX_SERVER_MEMORY, f"server peak memory {peak >> 20} MiB"
    return peak


def socket_count(pid: int) -> int:
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if fd.readlink().name.startswith("socket:"):
                n += 1
    return n


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `condition` until it holds; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)
    return time.monotonic() - started


def connect(server: ServerProc, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def read_reply(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response (status, lower-cased headers, body) from a raw socket."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise AssertionError(f"connection closed before a reply: {data!r}")
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        body += piece
    return status, headers, body


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Whether the server ends the connection (EOF or reset) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


def whoami(server: ServerProc, token: str) -> tuple[int, float]:
    """(status, seconds) of one authenticated request on a new connection."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/v1/repos/db1", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.monotonic() - started
    finally:
        conn.close()


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[ServerProc, dict[str, str]]]:
    with running_server(tmp_path / "srv", extra=[
            "--max-connections", "10", "--header-timeout", str(HEADER_TIMEOUT),
            "--max-object-size", "1M", "--body-memory", "4M", "--access-log"]) as running:
        yield running


class Dribbler:
    """Connections that send a request line, then one header line every `every` seconds,
    and never finish the head; records when the server cut each one off."""

    def __init__(self, server: ServerProc, count: int, every: float, limit: float) -> None:
        self.socks = [connect(server) for _ in range(count)]
        self.opened = [time.monotonic()] * count
        self.cut: list[float | None] = [None] * count
        self.every = every
        self.limit = limit
        self.lines_sent = 0
        self._stop = threading.Event()
        for s in self.socks:
            s.sendall(b"GET /v1/repos/db1 HTTP/1.1\r\nHost: x\r\n")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        n = 0
        while not self._stop.wait(self.every) and time.monotonic() - started < self.limit:
            n += 1
            for i, s in enumerate(self.socks):
                if self.cut[i] is not None:
                    continue
                try:
                    s.sendall(b"X-Slow-%d: still coming\r\n" % n)
                    self.lines_sent += 1
                except OSError:
                    self.cut[i] = time.monotonic()
                    continue
                if closed_by_server(s, 0.001):
                    self.cut[i] = time.monotonic()

    def all_cut(self) -> bool:
        return all(t is not None for t in self.cut)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for s in self.socks:
            s.close()


def test_slow_unauthenticated_heads_neither_lock_out_token_holders_nor_last(
        limited: tuple[ServerProc, dict[str, str]]) -> None:
    """12 connections (more than --max-connections 10) that dribble one header line every
    1.5 s: a token holder is still served at once, and each of them is cut off once the
    header deadline passes."""
    server, tokens = limited
    pid = server_pid(server)
    before = socket_count(pid)
    slow = Dribbler(server, 12, every=1.5, limit=4 * HEADER_TIMEOUT)
    try:
        wait_until(lambda: socket_count(pid) >= before + 12, 10,
                   "the server accepted the 12 slow connections")
        waits = []
        for _ in range(5):
            status, took = whoami(server, tokens["restorer"])
            assert status == 200
            waits.append(took)
        assert max(waits) < 2.0, waits
        assert not slow.all_cut()  # they were still open while the token holder was served
        wait_until(slow.all_cut, HEADER_TIMEOUT + 5, "the slow connections were cut off")
        lived = [c - o for c, o in zip(slow.cut, slow.opened, strict=True) if c is not None]
        assert max(lived) < HEADER_TIMEOUT + 2.5, lived
        assert slow.lines_sent >= 12  # they really did dribble before being cut off
        print(f"token holder waited at most {max(waits):.3f} s; slow heads cut after "
              f"{min(lived):.2f}..{max(lived):.2f} s")
    finally:
        slow.close()
    assert whoami(server, tokens["restorer"])[0] == 200
    print(f"server VmHWM {assert_memory_bounded(server) >> 20} MiB")


@pytest.mark.parametrize("token_name", [None, "ops"])
def test_a_huge_claimed_body_is_refused_at_once_and_not_read(
        limited: tuple[ServerProc, dict[str, str]], token_name: str | None) -> None:
    """Content-Length 10^12: without a token 401, with one 413, both at once; then the
    connection ends, and the server has read no more than a small bounded amount (it cannot
    have read more than the client managed to send, socket buffers included)."""
    server, tokens = limited
    auth = f"Authorization: Bearer {tokens[token_name]}\r\n" if token_name else ""
    sock = connect(server)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    started = time.monotonic()
    sock.sendall(f"PUT /v1/repos/db1/objects/chunks/ab/abcd HTTP/1.1\r\nHost: x\r\n{auth}"
                 f"Content-Length: {10**12}\r\n\r\n".encode())
    sent = [0]
    stop = threading.Event()

    def flood() -> None:
        piece = b"\0" * 65536
        while not stop.is_set() and sent[0] < 2 << 30:
            try:
                sent[0] += sock.send(piece)
            except OSError:
                return

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        status, headers, body = read_reply(sock, timeout=5)
        took = time.monotonic() - started
        assert status == (413 if token_name else 401), body
        assert headers.get(api.API_HEADER.lower()) == "1"
        assert took < 2.0
        assert closed_by_server(sock, 5.0), "the server kept reading the body"
    finally:
        stop.set()
        flooder.join()
        sock.close()
    print(f"reply after {took:.3f} s; the client pushed {sent[0] >> 10} KiB of the body")
    assert sent[0] < 4 << 20, f"the server took {sent[0]} bytes of a body it refused"
    assert whoami(server, tokens["restorer"])[0] == 200
    assert_memory_bounded(server)


def test_a_token_holder_refused_mid_upload_sees_the_refusal(tmp_path: Path) -> None:
    """A token whose role may not put gets its 403, not a dropped connection to retry, even
    for a body as large as the server takes (the server reads it through and drops it)."""
    from snapship.errors import PermissionDenied

    with running_server(tmp_path / "srv", extra=["--max-object-size", "17M"]) as (server,
                                                                               tokens):
        s = http_storage(server, "db1", tokens["restorer"], retry_time=20)
        started = time.monotonic()
        with pytest.raises(PermissionDenied, match="may only read"):
            s.put("chunks/ab/" + "ab" * 32, b"x" * (16 << 20))  # a 16 MiB repository's chunk
        assert time.monotonic() - started < 5


@pytest.mark.parametrize("value", [b"\xb2", b"\xc2\xb2", b"12abc", b"-5", b"1, 2"])
def test_a_malformed_content_length_is_a_400(
        limited: tuple[ServerProc, dict[str, str]], value: bytes) -> None:
    """`Content-Length: ²` (a superscript digit: str.isdigit() says yes, int() says no) and
    other non-numbers get a JSON 400, not a dropped connection."""
    server, tokens = limited
    for auth in (b"", f"Authorization: Bearer {tokens['ops']}\r\n".encode()):
        with connect(server) as sock:
            sock.sendall(b"PUT /v1/repos/db1/objects/x HTTP/1.1\r\nHost: x\r\n" + auth
                         + b"Content-Length: " + value + b"\r\n\r\n")
            status, headers, body = read_reply(sock, timeout=5)
            assert status == 400, body
            assert headers.get(api.API_HEADER.lower()) == "1"
            err = api.decode_error(body)
            assert err is not None and err[0] == api.BAD_REQUEST, body
            assert closed_by_server(sock, 5.0)
    assert "Traceback" not in server.log() and "internal error" not in server.log()
    assert whoami(server, tokens["restorer"])[0] == 200
    assert_memory_bounded(server)


def test_an_overlong_request_line_is_a_clean_414_with_the_access_log(
        limited: tuple[ServerProc, dict[str, str]]) -> None:
    server, tokens = limited
    with connect(server) as sock:
        sock.sendall(b"GET /v1/repos/db1/objects/" + b"a" * 70_000 + b" HTTP/1.1\r\n"
                     b"Host: x\r\n\r\n")
        status, headers, body = read_reply(sock, timeout=5)
        assert status == 414, body
        assert headers.get(api.API_HEADER.lower()) == "1"
        err = api.decode_error(body)
        assert err is not None and err[0] == api.BAD_REQUEST, body
        assert closed_by_server(sock, 5.0)
    # Too many header bytes: 431, also as JSON.
    with connect(server) as sock:
        sock.sendall(b"GET /v1/repos/db1 HTTP/1.1\r\n" + b"X-Big: " + b"b" * 70_000
                     + b"\r\n\r\n")
        status, headers, body = read_reply(sock, timeout=5)
        assert status == 431 and headers.get(api.API_HEADER.lower()) == "1", body
    assert whoami(server, tokens["restorer"])[0] == 200
    server.wait_for_log("GET /v1/repos/db1 200")
    assert "Traceback" not in server.log(), server.log()
    assert_memory_bounded(server)


def test_error_messages_name_keys_not_server_paths(
        limited: tuple[ServerProc, dict[str, str]]) -> None:
    """A storage failure is reported with the repository key and the OS reason; the
    server's own directory appears only in its log."""
    server, tokens = limited
    root = str(server.root.resolve())
    auth = {"Authorization": f"Bearer {tokens['ops']}"}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("PUT", "/v1/repos/db1/objects/plain", body=b"x", headers=auth)
        assert conn.getresponse().read() == b""
        # "plain" is a file, so "plain/below" cannot be written (ENOTDIR).
        replies = []
        for method, path, body in (
                ("PUT", "/v1/repos/db1/objects/plain/below", b"y"),
                ("POST", "/v1/repos/db1/rename", json.dumps(
                    {"from": "plain", "to": "plain/x/y"}).encode()),
                ("POST", "/v1/repos/db1/maintenance/verify", b"{}")):
            conn.request(method, path, body=body, headers=auth)
            resp = conn.getresponse()
            replies.append((resp.status, resp.reason, resp.read()))
    finally:
        conn.close()
    (put_status, put_reason, put_body), (ren_status, _r, ren_body), (ver_status, ver_reason,
                                                                      ver_body) = replies
    assert put_status == 500 and ren_status == 500 and ver_status == 404
    put_err, ver_err = api.decode_error(put_body), api.decode_error(ver_body)
    assert put_err is not None and ver_err is not None
    assert put_err == (api.STORAGE_FAILED, "cannot write plain/below: Not a directory")
    assert "plain/x/y" in ren_body.decode()
    assert "db1" in ver_err[1]
    for text in (put_reason, put_body.decode(), ren_body.decode(), ver_reason, ver_err[1]):
        assert root not in text and "/tmp" not in text and "/srv" not in text, text
    assert f"{root}/db1/plain/below" in server.wait_for_log("storage failed")
    assert_memory_bounded(server)


def test_when_too_many_connections_wait_for_a_token_the_oldest_is_dropped(
        tmp_path: Path) -> None:
    """--max-unauthenticated 4: six silent connections, and the two oldest are closed to
    make room; a token holder who connects after them is served at once."""
    with running_server(tmp_path / "srv", extra=["--max-unauthenticated", "4"]) as (server,
                                                                                  tokens):
        silent = [connect(server) for _ in range(6)]
        try:
            for s in silent[:2]:
                assert closed_by_server(s, 5.0)
            assert not any(closed_by_server(s, 0.01) for s in silent[2:])
            status, took = whoami(server, tokens["restorer"])
            assert status == 200 and took < 2.0
        finally:
            for s in silent:
                s.close()
        assert_memory_bounded(server)


def test_graceful_stop_finishes_a_running_upload_and_closes_idle_connections(
        tmp_path: Path) -> None:
    with running_server(tmp_path / "srv") as (server, tokens):
        idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        idle.request("GET", "/v1/repos/db1", headers={"Authorization":
                                                      f"Bearer {tokens['restorer']}"})
        assert idle.getresponse().read()
        with connect(server) as up:
            body = b"z" * 100_000
            up.sendall(b"PUT /v1/repos/db1/objects/chunks/aa/aaaa HTTP/1.1\r\nHost: x\r\n"
                       + f"Authorization: Bearer {tokens['ops']}\r\n".encode()
                       + f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
                       .encode())
            # "100 Continue": the server is reading the body of a running request.
            assert read_reply(up, timeout=10)[0] == 100
            up.sendall(body[:1000])
            assert server.proc is not None
            server.proc.terminate()
            server.wait_for_log("SIGTERM: finishing running requests")
            assert idle.sock is not None and closed_by_server(idle.sock, 5.0)
            up.sendall(body[1000:])
            status, headers, _ = read_reply(up, timeout=10)
            assert status == 201 and headers.get("connection") == "close"
        assert server.proc.wait(timeout=10) == 0
        assert (server.root / "db1/chunks/aa/aaaa").read_bytes() == body
        idle.close()


@pytest.mark.parametrize(("option", "value"), [
    ("--max-connections", "0"), ("--max-connections", "-3"), ("--max-unauthenticated", "0"),
    ("--header-timeout", "0"), ("--header-timeout", "-1"), ("--header-timeout", "soon"),
    ("--idle-timeout", "0"), ("--idle-timeout", "nan")])
def test_limits_must_be_above_zero(option: str, value: str) -> None:
    r = run_cli_env("server", "--root", "/", "--tokens", "/dev/null", option, value)
    assert_one_line_error(r, option, code=2)


def test_stalled_tls_handshakes_are_cut_off_while_https_clients_are_served(
        tmp_path: Path) -> None:
    """On the TLS port: connections that send nothing, or half a ClientHello, cost no slot
    and are closed at --header-timeout; an https client is served meanwhile."""
    ca, cert, key = make_ca_and_server_cert(tmp_path / "pki")
    with running_server(tmp_path / "srv", tls=(cert, key), extra=[
            "--max-connections", "2", "--header-timeout", "2"]) as (server, tokens):
        stalled = [connect(server) for _ in range(6)]
        opened = time.monotonic()
        for s in stalled[3:]:
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        try:
            started = time.monotonic()
            client = http_storage(server, "db1", tokens["restorer"], ca=ca)
            assert client.whoami() == ("restorer", "read")
            assert time.monotonic() - started < 2.0
            for s in stalled:
                assert closed_by_server(s, 6.0)
            assert time.monotonic() - opened < 2 + 3
        finally:
            for s in stalled:
                s.close()
        assert_memory_bounded(server)
