"""The HTTP edge of `snapship server`: sockets, TLS, HTTP/1.1 framing, limits.

A thread per connection (`ThreadingHTTPServer`), HTTP/1.1 keep-alive, TLS handshakes done in
the connection's own thread (a slow client never holds up `accept`). Bounded resources: at
most `max_connections` connections are served (others get `503 busy`), request bodies in
memory are limited by a byte budget shared by all connections, idle connections time out.
Object GETs stream from the file (`sendfile` on plain sockets). Every decision is `App`'s; this
module only moves bytes.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from snapship import __version__
from snapship.errors import UsageError
from snapship.formats import http_api as api
from snapship.server.app import App, Response, error_response
from snapship.server.routes import ApiError

log = logging.getLogger("snapship.server")
HANDSHAKE_TIMEOUT = 30.0
BUDGET_WAIT = 60.0
_PIECE = 1 << 20
_TLS_HANDSHAKE = b"\x16"


class ByteBudget:
    """Bytes of request bodies held in memory at once, shared by every connection."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._used + n > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0 or n > self.capacity:
                    return False
                self._cond.wait(left)
            self._used += n
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self._used -= n
            self._cond.notify_all()


class _ClientGone(Exception):
    """The client closed the connection in the middle of a request body."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"snapship/{__version__}"
    sys_version = ""
    disable_nagle_algorithm = True
    server: ApiServer
    busy = False

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.idle_timeout)

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_PUT = do_DELETE = do_POST = do_GET

    # -- the request ------------------------------------------------------------------------

    def _client(self) -> str:
        host, port = self.client_address[:2]
        return f"{host}:{port}"

    def _content_length(self) -> int | None:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # its body cannot be skipped: end the connection
            raise ApiError(api.LENGTH_REQUIRED, "chunked request bodies are not accepted; "
                           "send a Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return None
        if not raw.strip().isdigit():
            self.close_connection = True
            raise ApiError(api.BAD_REQUEST, f"invalid Content-Length {raw!r}")
        return int(raw)

    def _serve(self) -> None:
        srv = self.server
        with srv.active():
            try:
                length = self._content_length()
            except ApiError as e:
                self._send(error_response(e.code, e.message))
                return
            consumed = held = 0

            def read_body() -> bytes:
                nonlocal consumed, held
                n = length or 0
                if not srv.budget.acquire(n, BUDGET_WAIT):
                    raise ApiError(api.BUSY, "the server is short of memory for request "
                                   "bodies; try again")
                held = n
                data = self.rfile.read(n) if n else b""
                consumed = n
                if len(data) != n:
                    raise _ClientGone
                return data

            try:
                if self.busy or srv.stopping:
                    reason = "shutting down" if srv.stopping else "serving too many connections"
                    resp = error_response(api.BUSY, f"the server is {reason}; try again")
                    self.close_connection = True
                else:
                    resp = srv.app.handle(self.command, self.path,
                                          self.headers.get("Authorization"), length, read_body,
                                          self._client())
                if length and consumed < length:
                    self._discard(length - consumed)
                self._send(resp)
            except (_ClientGone, ConnectionError, TimeoutError):
                self.close_connection = True
            except Exception:
                log.exception("internal error in %s %s", self.command, self.path)
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self._send(error_response(api.INTERNAL, "internal server error"))
            finally:
                if held:
                    srv.budget.release(held)

    def _discard(self, n: int) -> None:
        while n > 0:
            piece = self.rfile.read(min(n, _PIECE))
            if not piece:
                raise _ClientGone
            n -= len(piece)

    # -- the response -----------------------------------------------------------------------

    def _send(self, resp: Response) -> None:
        try:
            self.send_response(resp.status, resp.reason)
            self.send_header(api.API_HEADER, str(api.API_VERSION))
            length = resp.length if resp.length is not None else len(resp.body)
            if resp.content_type:
                self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(length))
            for name, value in resp.headers:
                self.send_header(name, value)
            if self.server.stopping:
                self.close_connection = True
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command == "HEAD":
                return
            if resp.file is not None:
                self._stream(resp.file, length)
            elif resp.body:
                self.wfile.write(resp.body)
        finally:
            if resp.file is not None:
                resp.file.close()

    def _stream(self, f: Any, length: int) -> None:
        if isinstance(self.connection, ssl.SSLSocket):
            buf = bytearray(min(length, _PIECE) or 1)
            view = memoryview(buf)
            left = length
            while left > 0:
                n = f.readinto(view[: min(left, len(buf))])
                if not n:
                    break
                self.wfile.write(view[:n])
                left -= n
        else:
            left = length - self.connection.sendfile(f, 0, length)
        if left > 0:  # the file shrank under us: the client cannot be told but by a close
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None
                   ) -> None:
        """Errors found by the HTTP parser (bad request line, oversized headers, unknown
        method), as JSON like every other error, and the end of the connection."""
        self.close_connection = True
        err = api.METHOD_NOT_ALLOWED if code == 501 else api.BAD_REQUEST
        text = message or HTTPStatus(code).phrase
        body = api.encode_error(err, text)
        self.send_response(code, text)
        self.send_header(api.API_HEADER, str(api.API_VERSION))
        self.send_header("Content-Type", api.JSON_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if self.server.access_log:
            log.info("%s %s %s %s", self._client(), self.command, self.path, code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s: " + format, self._client(), *args)


class _BusyHandler(_Handler):
    busy = True


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        app: App,
        *,
        tls: ssl.SSLContext | None = None,
        max_connections: int = 64,
        body_memory: int = 1 << 30,
        idle_timeout: float = 120.0,
        access_log: bool = False,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app = app
        self.tls = tls
        self.budget = ByteBudget(body_memory)
        self.idle_timeout = idle_timeout
        self.access_log = access_log
        self.stopping = False
        self._slots = threading.BoundedSemaphore(max_connections)
        self._active = 0
        self._idle = threading.Condition()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        addr, port = self.server_address[:2]
        host = addr.decode() if isinstance(addr, bytes) else str(addr)
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    @contextlib.contextmanager
    def active(self) -> Any:
        with self._idle:
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Runs in the connection's thread: the TLS handshake, then the HTTP exchange."""
        conn = request
        if self.tls is not None:
            try:
                request.settimeout(HANDSHAKE_TIMEOUT)
                first = request.recv(1, socket.MSG_PEEK)
                if first and first != _TLS_HANDSHAKE:
                    _refuse_plain_http(request)
                    return
                conn = self.tls.wrap_socket(request, server_side=True)
            except (OSError, ValueError) as e:
                log.debug("TLS handshake with %s failed: %s", client_address[0], e)
                return
        try:
            if self._slots.acquire(blocking=False):
                try:
                    _Handler(conn, client_address, self)
                finally:
                    self._slots.release()
            else:
                _BusyHandler(conn, client_address, self)
        finally:
            if conn is not request:
                with contextlib.suppress(OSError):
                    conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that broke outside a request (reset while idle, ...): not our fault."""
        log.debug("connection from %s ended abnormally", client_address[0], exc_info=True)

    def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let running requests finish (up to `grace` seconds)."""
        self.stopping = True
        self.shutdown()
        deadline = time.monotonic() + grace
        with self._idle:
            while self._active and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
        self.server_close()


def _refuse_plain_http(sock: socket.socket) -> None:
    """A plain-http request on the TLS port: say so in plain HTTP, as a one-line error the
    client can show, instead of a failed handshake it could only call a dropped connection."""
    head = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in head and len(head) < 65536:
            data = sock.recv(4096)
            if not data:
                break
            head += data
        body = api.encode_error(api.BAD_REQUEST, "this server speaks https: use an https:// "
                                "repository URL")
        sock.sendall(b"HTTP/1.1 400 Bad Request\r\n%s: %d\r\nContent-Type: %s\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (
                         api.API_HEADER.encode(), api.API_VERSION, api.JSON_TYPE.encode(),
                         len(body), body))
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(1.0)
        while sock.recv(65536):  # let the client's request body arrive, so no reset
            pass


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UsageError(f"cannot load TLS certificate {cert} with key {key}: {reason}"
                         ) from None
    return ctx
