"""The HTTP edge of `snapship server`: sockets, TLS, HTTP/1.1 framing, deadlines and limits.

One asyncio event loop owns every socket; h11 (sans-I/O) parses request heads and frames
replies (a body, always framed by its Content-Length, is read by count, past h11's buffer);
`App` (disk I/O, and maintenance that may run for hours) runs in a pool of worker threads,
at most one per authenticated connection. The edge decides nothing about requests (that is
`App`'s); it moves bytes and bounds what a connection may cost:

- **Before a valid token** (a connection's "pending" phase: TLS handshake, then its first
  request head) a connection costs an asyncio task and a buffer, not a thread. The handshake
  and the whole first head must arrive within `header_timeout` of connecting; at most
  `max_unauthenticated` connections may be pending at once (when full, the oldest pending
  one is dropped to make room: a flood of slow heads cannot keep a real client out).
- **Once a request carries a valid token** the connection takes one of `max_connections`
  slots, for as long as it stays open; when they are all taken the request gets `503 busy`.
  A later request head must arrive within `header_timeout` of its first byte, and the next
  request within `idle_timeout` of the last reply.
- **Bodies** are read only for an authenticated request that `App` reads the body of,
  bounded by the byte budget shared by every connection (`body_memory`), each read within
  `idle_timeout`. A body left unread (an error answered from the head, such as `401`, `403`
  or `413`) is never read through without a token: an authenticated request's body (within
  the object size limit) is skipped to keep the connection and let its sender see the
  refusal rather than a dropped connection; otherwise the reply says `Connection: close` and the
  connection ends after a short lingering read (`LINGER_LIMIT` bytes, `LINGER_TIME`
  seconds), so that the reply is not lost to a TCP reset.

Other features: HTTP/1.1 keep-alive; TLS with the handshake on the loop (never holding up
`accept`), a friendly `400` to plain http sent to the TLS port; object GETs streamed from the
open file (sendfile on plain sockets, pieces otherwise); `Snapship-API` and a JSON body on
every reply, protocol errors included; graceful stop (no new connections, idle ones closed,
running requests finish within a grace time).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import email.utils
import functools
import io
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, BinaryIO, ParamSpec, TypeVar, cast

import h11

from snapship import __version__
from snapship.errors import UsageError
from snapship.formats import http_api as api
from snapship.server.app import App, Response, error_response
from snapship.server.routes import ApiError
from snapship.server.tokens import Principal

log = logging.getLogger("snapship.server")

BUDGET_WAIT = 60.0
"""Seconds a request waits for room in the body budget before it gets `503 busy`."""
MAX_HEAD = 64 * 1024
"""Bytes of a request line and headers, together."""
DRAIN_LIMIT = 1 << 20
"""Bodies up to this size are read on the loop before App is asked (no thread round trip)."""
LINGER_LIMIT = 64 * 1024
"""Bytes read (and dropped) after a closing reply before the connection is closed."""
LINGER_TIME = 2.0
"""Seconds that lingering read may take."""
STOP_GRACE = 30.0
_HELD = 1 << 20
"""Received bytes a connection may have waiting before the server stops reading from it."""
_PIECE = 1 << 20
_SMALL = 256 * 1024
"""Objects up to this size are read into memory for their reply (no sendfile set-up)."""
_TLS_HANDSHAKE = b"\x16"
_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "POST"})
_SERVER = f"snapship/{__version__}"

P = ParamSpec("P")
T = TypeVar("T")


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


class _Workers(concurrent.futures.Executor):
    """At most `size` daemon threads, started as needed. (Daemons: a maintenance request
    still running when the stop's grace time is over does not keep the process alive, which
    `ThreadPoolExecutor`'s threads would.)"""

    def __init__(self, size: int) -> None:
        self._size = size
        self._started = 0
        self._lock = threading.Lock()
        self._idle = threading.Semaphore(0)
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
               ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:
                    future.set_exception(e)

        self._queue.put(run)
        if not self._idle.acquire(blocking=False):
            with self._lock:
                if self._started < self._size:
                    self._started += 1
                    threading.Thread(target=self._work, name=f"request-{self._started}",
                                     daemon=True).start()
        return future

    def _work(self) -> None:
        while True:
            self._queue.get()()
            self._idle.release()


class _ClientGone(Exception):
    """The client went away, stalled past a deadline, or broke the framing mid-body."""


class _HeadTimeout(Exception):
    """A request head did not arrive in time."""


@dataclass(eq=False)
class _Conn:
    """One connection's state, as the server's bookkeeping sees it."""

    client: str
    sock: socket.socket
    stream: _Stream | None = None
    """The stream over `sock`, once made (it then owns the socket)."""
    task: asyncio.Task[None] | None = None
    slot: bool = False
    """Holds one of the `max_connections` slots (it has presented a valid token)."""
    busy: bool = False
    """A request is being answered (a graceful stop lets it finish)."""
    who: Principal | None = None


class _Stream(asyncio.Protocol):
    """A connection's bytes both ways. Received data is handed on as it came (no copying
    into a stream buffer), and reading from the socket pauses while more than `_HELD` bytes
    wait; writes wait (`drain`) while the transport's buffer is full."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._held = 0
        self._eof = False
        self._lost: BaseException | None = None
        self._paused = False
        self._reader: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None

    # -- asyncio's side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._held += len(data)
        if self._held > _HELD and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return True  # keep the write side open: the reply may still go out

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._lost = exc or ConnectionResetError("connection lost")
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _wake(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    # -- ours
    @property
    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return self._held

    def unread(self, data: bytes) -> None:
        """Put `data` back in front of what is to be read."""
        if data:
            self._chunks.appendleft(data)
            self._held += len(data)

    async def read(self, limit: int) -> bytes:
        """What has come, at most `limit` bytes of it; b"" at the end."""
        while not self._chunks:
            if self._eof:
                return b""
            self._reader = self._loop.create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        data = self._chunks.popleft()
        if len(data) > limit:
            self._chunks.appendleft(data[limit:])
            data = data[:limit]
        self._held -= len(data)
        if self._paused and self._held <= _HELD and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        if self._lost is not None:
            raise ConnectionResetError("connection lost")
        if self._writable is not None:
            await self._writable
            if self._lost is not None:
                raise ConnectionResetError("connection lost")

    def can_write_eof(self) -> bool:
        return self.transport is not None and self.transport.can_write_eof()

    def write_eof(self) -> None:
        assert self.transport is not None
        self.transport.write_eof()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass(eq=False)
class _Body:
    """A request's body as the edge tracks it."""

    length: int
    data: bytes | None = None
    held: int = 0
    """Bytes of the budget taken for it."""

    @property
    def read(self) -> bool:
        return self.held > 0


class _FileBody:
    """Stands for a streamed file in h11's `Data` event: h11 needs only its length."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length


def _head_bytes(status: int, reason: str, body: bytes) -> bytes:
    """A whole closing JSON reply as bytes, for the replies sent outside h11's state machine
    (plain http on the TLS port)."""
    return (b"HTTP/1.1 %d %s\r\n%s: %d\r\nServer: %s\r\nContent-Type: %s\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (
                status, reason.encode(), api.API_HEADER.encode(), api.API_VERSION,
                _SERVER.encode(), api.JSON_TYPE.encode(), len(body), body))


def _protocol_error(e: h11.RemoteProtocolError, buffered: bytes) -> Response:
    """The reply to a request h11 could not parse: JSON like every other error."""
    status = e.error_status_hint
    if status == 431 and b"\r\n" not in buffered[:MAX_HEAD]:
        status, text = 414, f"the request line is too long (at most {MAX_HEAD} bytes)"
    elif status == 431:
        text = f"the request head is too large (at most {MAX_HEAD} bytes)"
    elif status == 501:
        text = f"not implemented: {e}"
    else:
        text = f"malformed request: {e}"
    resp = error_response(api.BAD_REQUEST, text)
    resp.status = status
    return resp


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """The first byte the client sent, left in the socket (b"" if it closed)."""
    while True:
        try:
            return sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            pass
        ready = loop.create_future()

        def wake(f: asyncio.Future[None] = ready) -> None:
            if not f.done():
                f.set_result(None)

        loop.add_reader(sock.fileno(), wake)
        try:
            await ready
        finally:
            loop.remove_reader(sock.fileno())


class ApiServer:
    """The listening socket and its connections. `serve_forever()` runs the event loop in
    the calling thread until `stop_soon()` (from any thread or a signal handler)."""

    def __init__(
        self,
        address: tuple[str, int],
        app: App,
        *,
        tls: ssl.SSLContext | None = None,
        max_connections: int = 64,
        max_unauthenticated: int = 256,
        body_memory: int = 1 << 30,
        idle_timeout: float = 120.0,
        header_timeout: float = 20.0,
        stop_grace: float = STOP_GRACE,
        access_log: bool = False,
    ) -> None:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind(address)
            self._sock.listen(1024)
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise
        self.app = app
        self.tls = tls
        self.budget = ByteBudget(body_memory)
        self.max_connections = max_connections
        self.max_unauthenticated = max_unauthenticated
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self.stop_grace = stop_grace
        self.access_log = access_log
        self.stopping = False
        self._workers = _Workers(max_connections)
        self._conns: set[_Conn] = set()
        self._pending: dict[_Conn, None] = {}
        """Connections without a slot yet, oldest first."""
        self._slots_used = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_early = False

    @property
    def url(self) -> str:
        addr, port = self._sock.getsockname()[:2]
        host = f"[{addr}]" if ":" in addr else str(addr)
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    # -- running and stopping ---------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve until `stop_soon()`, then stop gracefully; returns when stopped."""
        try:
            asyncio.run(self._main())
        finally:
            self._sock.close()

    def stop_soon(self) -> None:
        """Begin a graceful stop: accept nothing more, close idle connections, let running
        requests finish (for up to `stop_grace` seconds). Safe from any thread."""
        loop, stop = self._loop, self._stop
        if loop is None or stop is None:
            self._stop_early = True
            return
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(stop.set)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self._stop_early:
            self._stop.set()
        acceptor = asyncio.create_task(self._accept())
        await self._stop.wait()
        self.stopping = True
        acceptor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acceptor
        self._sock.close()  # new clients are refused at once (and retry elsewhen)
        for c in list(self._conns):
            if not c.busy and c.task is not None:
                c.task.cancel()
        tasks = [c.task for c in self._conns if c.task is not None]
        if tasks:
            _done, late = await asyncio.wait(tasks, timeout=self.stop_grace)
            for t in late:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(self._sock)
            except OSError as e:  # out of file descriptors, or the like: not for ever
                log.warning("cannot accept a connection: %s", e.strerror or e)
                await asyncio.sleep(0.1)
                continue
            host, port = address[:2]
            conn = _Conn(f"{host}:{port}", sock)
            if len(self._pending) >= self.max_unauthenticated:
                oldest = next(iter(self._pending))
                log.debug("%d connections without a token: dropping the oldest, from %s",
                          len(self._pending), oldest.client)
                self._pending.pop(oldest, None)
                if oldest.task is not None:
                    oldest.task.cancel()
            self._pending[conn] = None
            self._conns.add(conn)
            conn.task = asyncio.create_task(self._connection(conn))
            conn.task.add_done_callback(functools.partial(self._closed, conn))
            await asyncio.sleep(0)  # let connections run between accepts

    def _closed(self, conn: _Conn, _task: object) -> None:
        """A connection's end (also of one dropped before its task ever ran)."""
        self._pending.pop(conn, None)
        self._conns.discard(conn)
        if conn.slot:
            conn.slot = False
            self._slots_used -= 1
        if conn.stream is not None:
            conn.stream.close()
        else:
            conn.sock.close()

    # -- one connection ---------------------------------------------------------------------

    async def _connection(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.header_timeout
        sock = conn.sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                async with asyncio.timeout_at(deadline):
                    first = await _peek(loop, sock)
                if not first:
                    return
                if first != _TLS_HANDSHAKE:
                    await self._refuse_plain_http(sock, deadline)
                    return
            stream = _Stream(loop)
            async with asyncio.timeout_at(deadline):
                await loop.connect_accepted_socket(
                    lambda: stream, sock, ssl=self.tls,
                    ssl_handshake_timeout=max(0.1, deadline - loop.time())
                    if self.tls else None)
            conn.stream = stream
            await self._exchange(conn, stream, deadline)
        except (_ClientGone, _HeadTimeout, h11.RemoteProtocolError, OSError, ssl.SSLError,
                EOFError) as e:
            what = "TLS handshake" if conn.stream is None and self.tls else "connection"
            log.debug("%s with %s ended: %s", what, conn.client, type(e).__name__)
        except asyncio.CancelledError:
            log.debug("connection with %s closed (stopping, or dropped for newer ones)",
                      conn.client)
        except Exception:
            log.exception("internal error on the connection with %s", conn.client)

    async def _refuse_plain_http(self, sock: socket.socket, deadline: float) -> None:
        """A plain-http request on the TLS port: say so in plain HTTP, as a one-line error
        the client can show, instead of a failed handshake it could only call a dropped
        connection."""
        loop = asyncio.get_running_loop()
        head = b""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
                    data = await loop.sock_recv(sock, 4096)
                    if not data:
                        break
                    head += data
        body = api.encode_error(api.BAD_REQUEST, "this server speaks https: use an https:// "
                                "repository URL")
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(LINGER_TIME):
                await loop.sock_sendall(sock, _head_bytes(400, "Bad Request", body))
                sock.shutdown(socket.SHUT_WR)
                read = 0
                while read < LINGER_LIMIT:  # let the client's request body arrive: no reset
                    data = await loop.sock_recv(sock, 65536)
                    if not data:
                        break
                    read += len(data)

    async def _next(self, h: h11.Connection, stream: _Stream,
                    deadline: float | None) -> Any:
        """The next h11 event of a request head. `deadline`: when the head must be complete;
        None for a later request on the connection, which must start within `idle_timeout`
        and then be complete within `header_timeout`."""
        loop = asyncio.get_running_loop()
        if deadline is None and stream.buffered:
            deadline = loop.time() + self.header_timeout
        while True:
            event = h.next_event()
            if event is not h11.NEED_DATA:
                return event
            buffered = len(h.trailing_data[0])
            wait = self.idle_timeout if deadline is None else deadline - loop.time()
            try:
                async with asyncio.timeout(max(wait, 0)):
                    # Never more than MAX_HEAD in h11's buffer: a longer head is a 431.
                    data = await stream.read(max(1, MAX_HEAD + 1 - buffered))
            except TimeoutError:
                raise _HeadTimeout from None
            if deadline is None:
                deadline = loop.time() + self.header_timeout
            h.receive_data(data)

    async def _exchange(self, conn: _Conn, stream: _Stream, first_deadline: float) -> None:
        """Requests and replies until one side closes. h11 parses each request head and
        frames each reply, a new h11 connection per request; a body (always framed by its
        Content-Length: chunked ones are refused) is read by count from the stream, which
        saves copying it through h11's buffer. What h11 read past the head goes back into
        the stream."""
        deadline: float | None = first_deadline
        while True:
            h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
            try:
                event = await self._next(h, stream, deadline)
            except h11.RemoteProtocolError as e:
                buffered, closed = h.trailing_data
                if not closed and h.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    resp = _protocol_error(e, buffered)
                    await self._reply(conn, h, stream, "-", "-", resp, close=True)
                return
            deadline = None
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                raise _ClientGone(f"unexpected {type(event).__name__}")
            stream.unread(h.trailing_data[0])
            conn.busy = True
            try:
                keep = await self._request(conn, h, stream, event)
            finally:
                conn.busy = False
            if not keep or self.stopping or h.our_state is h11.MUST_CLOSE:
                return

    async def _request(self, conn: _Conn, h: h11.Connection, stream: _Stream,
                       req: h11.Request) -> bool:
        """Answer one request; whether the connection may carry another."""
        loop = asyncio.get_running_loop()
        method = req.method.decode("ascii", "replace")
        target = req.target.decode("ascii", "replace")
        headers: dict[bytes, bytes] = {}
        for name, value in req.headers:
            headers.setdefault(name, value)
        raw_length = headers.get(b"content-length")
        length = int(raw_length) if raw_length is not None else None
        body = _Body(length or 0)

        async def reply(resp: Response, close: bool = True) -> bool:
            return await self._reply(conn, h, stream, method, target, resp, close=close)

        if method not in _METHODS:
            resp = error_response(api.METHOD_NOT_ALLOWED, f"method {method} is not supported")
            resp.status = 501
            return await reply(resp)
        if b"transfer-encoding" in headers:
            return await reply(error_response(api.LENGTH_REQUIRED, "chunked request bodies "
                                              "are not accepted; send a Content-Length"))
        authorization = headers.get(b"authorization")
        who = self.app.authenticate(
            authorization.decode("latin-1") if authorization is not None else None,
            conn.client)
        conn.who = who
        if who is None:
            return await reply(self.app.handle(method, target, None, length, _no_body,
                                               conn.client))
        if not conn.slot:
            if self._slots_used >= self.max_connections:
                return await reply(error_response(
                    api.BUSY, "the server is serving too many connections; try again"))
            self._slots_used += 1
            conn.slot = True
            self._pending.pop(conn, None)
        if self.stopping:
            return await reply(error_response(api.BUSY, "the server is shutting down; try "
                                              "again"))
        waiting_100 = h.they_are_waiting_for_100_continue
        if 0 < body.length <= DRAIN_LIMIT and not waiting_100 and self.budget.acquire(
                body.length, 0):
            # A small body comes now, on the loop: it would be read (to be skipped) even if
            # App did not want it, and this spares a round trip between the threads.
            body.held = body.length
            body.data = await self._body(h, stream, body.length)

        def read_body() -> bytes:
            if body.data is not None:
                return body.data
            if not body.length and not waiting_100:
                return b""
            if not self.budget.acquire(body.length, BUDGET_WAIT):
                raise ApiError(api.BUSY, "the server is short of memory for request bodies; "
                               "try again")
            body.held = body.length
            future = asyncio.run_coroutine_threadsafe(self._body(h, stream, body.length),
                                                      loop)
            try:
                body.data = future.result()
            except BaseException as e:
                raise _ClientGone(str(e)) from None
            return body.data

        def call() -> Response:
            resp = self.app.handle(method, target, who, length, read_body, conn.client)
            if resp.file is not None and resp.length is not None and resp.length <= _SMALL:
                with resp.file:  # a small object goes out as bytes: no sendfile set-up
                    resp.body = resp.file.read(resp.length)
                resp.file = None
                if len(resp.body) != resp.length:
                    raise _ClientGone("object shorter than its size")
            return resp

        close = False
        try:
            try:
                resp = await loop.run_in_executor(self._workers, call)
            except _ClientGone:
                raise
            except Exception:
                log.exception("internal error in %s %s", method, _short(target))
                resp = error_response(api.INTERNAL, "internal server error")
                close = True
        finally:
            body.data = None
            if body.held:
                self.budget.release(body.held)
        if not body.read and body.length:
            # A token holder's refused body is read through (within the object size limit):
            # closing under a client still sending would show it a dropped connection, which
            # it retries, instead of the refusal.
            if close or waiting_100 or body.length > self.app.max_object_size:
                close = True
            else:
                await self._skip(stream, body.length)
        return await reply(resp, close)

    async def _body(self, h: h11.Connection, stream: _Stream, n: int) -> bytes:
        """The whole request body (`n` bytes, as its Content-Length said), each read within
        `idle_timeout`. Held once in memory: the BytesIO is sized once, up front (growing
        it would copy), and its value taken without a copy."""
        if h.they_are_waiting_for_100_continue:
            stream.write(h.send(h11.InformationalResponse(
                status_code=100, headers=[(api.API_HEADER, str(api.API_VERSION))],
                reason=b"Continue")))
        buf = io.BytesIO()
        if n:
            buf.seek(n - 1)
            buf.write(b"\0")
            buf.seek(0)
        left = n
        while left:
            async with asyncio.timeout(self.idle_timeout):
                data = await stream.read(left)
            if not data:
                raise _ClientGone("closed in the middle of a request body")
            buf.write(data)
            left -= len(data)
        return buf.getvalue()

    async def _skip(self, stream: _Stream, n: int) -> None:
        """Read and drop the rest of a small unread body."""
        while n:
            async with asyncio.timeout(self.idle_timeout):
                data = await stream.read(n)
            if not data:
                raise _ClientGone("closed in the middle of a request body")
            n -= len(data)

    # -- the reply --------------------------------------------------------------------------

    async def _reply(self, conn: _Conn, h: h11.Connection, stream: _Stream, method: str,
                     target: str, resp: Response, *, close: bool) -> bool:
        """Send `resp`; with `close`, end the connection after it. Whether the connection
        may carry another request."""
        close = close or self.stopping
        try:
            await self._send(h, stream, method, resp, close)
        finally:
            if resp.file is not None:
                resp.file.close()
            if self.access_log:
                log.info("%s %s %s %s", conn.client, method, _short(target), resp.status)
        if close or h.our_state is h11.MUST_CLOSE:
            await self._linger(stream, DRAIN_LIMIT if conn.slot and conn.who else LINGER_LIMIT)
            return False
        return True

    async def _send(self, h: h11.Connection, stream: _Stream, method: str,
                    resp: Response, close: bool) -> None:
        length = resp.length if resp.length is not None else len(resp.body)
        headers = [(api.API_HEADER, str(api.API_VERSION)), ("Server", _SERVER),
                   ("Date", email.utils.formatdate(usegmt=True))]
        if resp.content_type:
            headers.append(("Content-Type", resp.content_type))
        if resp.status != 204:
            headers.append(("Content-Length", str(length)))
        headers += resp.headers
        if close:
            headers.append(("Connection", "close"))
        reason = resp.reason or _phrase(resp.status)
        out = [h.send(h11.Response(status_code=resp.status, headers=headers,
                                   reason=reason.encode("ascii", "replace")))]
        if method != "HEAD" and resp.status != 204:
            if resp.file is not None:
                stream.write(out.pop())
                h.send_with_data_passthrough(h11.Data(data=cast(bytes, _FileBody(length))))
                sent = await self._stream(stream, resp.file, length)
                if sent < length:  # the file shrank under us: only a close can tell
                    h.send_failed()
                    raise _ClientGone("object shorter than its size")
            elif resp.body:
                out.append(h.send(h11.Data(data=resp.body)))
        out.append(h.send(h11.EndOfMessage()))
        stream.write(b"".join(out))  # one write (one send) for a reply held in memory
        async with asyncio.timeout(self.idle_timeout):
            await stream.drain()

    async def _stream(self, stream: _Stream, f: BinaryIO, length: int) -> int:
        """Send `length` bytes of `f` (sendfile on plain sockets, reads on TLS), a piece at a
        time, each within `idle_timeout`; the number sent."""
        loop = asyncio.get_running_loop()
        sent = 0
        while sent < length:
            async with asyncio.timeout(self.idle_timeout):
                await stream.drain()
                assert stream.transport is not None
                n = await loop.sendfile(stream.transport, f, sent, min(_PIECE, length - sent))
            if not n:
                break
            sent += n
        return sent

    async def _linger(self, stream: _Stream, limit: int) -> None:
        """After a closing reply: let it reach the client, then read (and drop) what the
        client is still sending, a little and briefly, before the close. (A close with
        unread data sends a TCP reset, which may destroy the reply before it is read.)"""
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            async with asyncio.timeout(LINGER_TIME):
                await stream.drain()
                if stream.can_write_eof():
                    stream.write_eof()
                read = 0
                while read < limit:
                    data = await stream.read(limit - read)
                    if not data:
                        break
                    read += len(data)


def _no_body() -> bytes:
    raise AssertionError("the body of an unauthenticated request is never read")


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _short(target: str, limit: int = 1000) -> str:
    return target if len(target) <= limit else f"{target[:limit]}...({len(target)} chars)"


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
