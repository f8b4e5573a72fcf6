"""The asyncio NBD server: listening sockets, TLS, and one task per connection.

A connection runs the handshake (`handshake.Handshake` decides, this module only moves bytes
and looks exports up off the event loop), then reads requests one after another and serves
each in a task of its own, so replies go out as soon as their data is ready, out of order.
In-flight work per connection is bounded (bytes and requests); past that, the connection
stops reading until replies drain. Nothing a client sends can stop the server: a connection
that breaks the protocol is closed, and errors in a request become error replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from snapship.errors import UsageError
from snapship.nbd import authz as az
from snapship.nbd import protocol as p
from snapship.nbd.chunkcache import ChunkCache
from snapship.nbd.exports import ExportSession, Piece, RequestFailed, VersionImage
from snapship.nbd.handshake import (
    Close,
    ExportInfo,
    Handshake,
    NeedExport,
    NeedList,
    Reply,
    StartTls,
    TlsMode,
    Transmit,
)
from snapship.nbd.names import ExportNames
from snapship.nbd.registry import Registry

log = logging.getLogger("snapship.nbd")

_ZEROES = bytes(1 << 20)
_STREAM_LIMIT = 4 << 20


@dataclass(frozen=True)
class ServerOptions:
    writable: bool = False
    tls: TlsMode = TlsMode.OFF
    ssl_context: ssl.SSLContext | None = None
    authz: az.Authz | None = None
    """Which volumes each client certificate may reach (None: every one)."""
    cache_bytes: int = 256 << 20
    readahead_bytes: int = 8 << 20
    workers: int = 2
    max_inflight_bytes: int = 64 << 20
    """Per connection: READ lengths and WRITE payloads being served at once."""
    max_inflight_requests: int = 256
    handshake_timeout: float = 30.0


def make_tls_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """A server-side TLS context; with `client_ca`, clients must present a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if client_ca:
            ctx.load_verify_locations(client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot load the TLS certificate, key or CA: {e}") from None
    return ctx


class NbdServer:
    def __init__(self, names: ExportNames, registry: Registry | None,
                 options: ServerOptions) -> None:  # fmt: skip
        if options.writable and registry is None:
            raise ValueError("a writable server needs an overlay registry")
        if options.tls is not TlsMode.OFF and options.ssl_context is None:
            raise ValueError("TLS needs an SSL context")
        if options.authz is not None and (
                options.tls is not TlsMode.REQUIRE or options.ssl_context is None
                or options.ssl_context.verify_mode is not ssl.CERT_REQUIRED):
            raise ValueError("an authorization needs TLS required with client certificates")
        self.names = names
        self.registry = registry
        self.options = options
        self.pool = ThreadPoolExecutor(options.workers, thread_name_prefix="snapship-nbd")
        # Name look-ups and overlay I/O get threads of their own: never queued behind
        # chunk decoding.
        self.io_pool = ThreadPoolExecutor(2, thread_name_prefix="snapship-nbd-io")
        self.cache = ChunkCache(names.repo.get_chunk, self.pool, options.cache_bytes,
                                max_prefetch=4 * options.workers)
        self.readahead_chunks = max(1, options.readahead_bytes // names.repo.chunk_size)
        self._listeners: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[None]] = set()
        self.accepted = 0

    async def start(self, host: str, port: int) -> list[tuple[str, int]]:
        """Listen on host:port (port 0: any free port); returns the addresses bound."""
        try:
            listener = await asyncio.start_server(self._accept, host, port, limit=_STREAM_LIMIT)
        except OSError as e:
            # asyncio's own text names the address as a Python tuple: the plain reason only.
            reason = os.strerror(e.errno) if e.errno else str(e)
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise UsageError(f"cannot listen on {where}: {reason}") from None
        self._listeners.append(listener)
        return [s.getsockname()[:2] for s in listener.sockets]

    async def start_unix(self, path: str) -> None:
        """Listen on a unix socket at `path`: for clients on this machine only (`snapship
        mount`, instant restore), reachable by whoever may open the directory it is in."""
        listener = await asyncio.start_unix_server(self._accept, path, limit=_STREAM_LIMIT)
        self._listeners.append(listener)

    async def close(self) -> None:
        """Stop accepting, end every connection, wait for commits under way, free the pools."""
        for listener in self._listeners:
            listener.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        for listener in self._listeners:
            await listener.wait_closed()
        if self.registry is not None:
            await self.registry.drain()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.io_pool.shutdown(wait=True, cancel_futures=True)
        log.debug("served %d connections; chunk cache: %d hits, %d misses", self.accepted,
                  self.cache.hits, self.cache.misses)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.accepted += 1
        set_nodelay(writer)
        try:
            await Connection(self, reader, writer).run()
        except asyncio.CancelledError:
            # Stopping the server cancels its connections. Ending the task quietly: Python
            # 3.11's stream callback asks a cancelled task for its exception and logs the
            # CancelledError it gets as an error with a traceback, on the user's terminal.
            pass
        finally:
            self._connections.discard(task)

    async def list_exports(self) -> list[tuple[str, str]]:
        return await asyncio.get_running_loop().run_in_executor(
            self.io_pool, self.names.list_exports)

    async def open_export(self, name: str) -> VersionImage | None:
        image = await asyncio.get_running_loop().run_in_executor(
            self.io_pool, self.names.open, name)
        if image is not None and self.registry is not None:
            image = self.registry.resolve(image)  # a live export's base, if it has one
        return image


class _Budget:
    """Bytes in flight on one connection; only the connection's reading loop waits on it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Event()

    async def acquire(self, n: int) -> int:
        n = min(n, self.limit)  # one huge request may use the whole budget, alone
        while self.used + n > self.limit:
            self._freed.clear()
            await self._freed.wait()
        self.used += n
        return n

    def release(self, n: int) -> None:
        self.used -= n
        self._freed.set()


class Connection:
    def __init__(self, server: NbdServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:  # fmt: skip
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = str(writer.get_extra_info("peername"))
        self.session: ExportSession | None = None
        self.clean = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._drain_lock = asyncio.Lock()
        self._budget = _Budget(server.options.max_inflight_bytes)
        self._structured = False
        self._context_id: int | None = None

    async def run(self) -> None:
        try:
            async with asyncio.timeout(self.server.options.handshake_timeout):
                go = await self._handshake()
            if go is not None:
                await self._transmission(*go)
        except asyncio.IncompleteReadError:
            log.debug("%s: connection closed by the client", self.peer)
        except (ConnectionError, ssl.SSLError, TimeoutError, p.ProtocolViolation) as e:
            log.debug("%s: connection ended: %s", self.peer, e)
        except Exception:  # never let one connection's bug take the server down
            log.exception("%s: internal error", self.peer)
        finally:
            await self._finish()

    async def _finish(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        session = self.session
        if session is not None and session.overlay is not None:
            assert self.server.registry is not None
            self.server.registry.detach(session.image, wrote=session.wrote, clean=self.clean)
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5)

    # -- handshake ------------------------------------------------------------------------

    async def _handshake(self) -> tuple[Transmit, VersionImage] | None:
        opts = self.server.options
        hs = Handshake(opts.tls, authz=opts.authz)
        self.writer.write(hs.greeting())
        await self.writer.drain()
        hs.client_flags(await self.reader.readexactly(p.CLIENT_FLAGS_SIZE))
        images: dict[str, VersionImage] = {}
        while True:
            header = await self.reader.readexactly(p.OPTION_HEADER_SIZE)
            option, length = p.parse_option_header(header)
            if length > p.MAX_OPTION_DATA:
                await self._skip(length)
                step = hs.option_too_big(option, length)
            else:
                step = hs.option(option, await self.reader.readexactly(length))
            while isinstance(step, NeedExport | NeedList):
                if isinstance(step, NeedList):
                    step = hs.listed(await self.server.list_exports())
                    continue
                image = await self.server.open_export(step.name)
                info: ExportInfo | None = None
                if image is not None:
                    images[image.name] = image
                    info = self.server.names.info(image)
                step = hs.resolved(info)
            if hs.denied is not None:
                log.info("%s: refused export %r: the client certificate is not granted its "
                         "volume (--tls-authz)", self.peer, hs.denied)
                hs.denied = None
            self.writer.write(step.data)
            await self.writer.drain()
            if isinstance(step, StartTls):
                assert opts.ssl_context is not None
                await self.writer.start_tls(opts.ssl_context)
                identities = az.identities(self.writer.get_extra_info("peercert"))
                hs.tls_started(identities)
                log.debug("%s: TLS up, client certificate %s", self.peer,
                          ", ".join(sorted(identities)) or "without a name")
            elif isinstance(step, Close):
                log.debug("%s: %s", self.peer, step.reason)
                return None
            elif isinstance(step, Transmit):
                return step, images[step.export.name]
            else:
                assert isinstance(step, Reply)

    async def _skip(self, length: int) -> None:
        """Read and drop `length` bytes (an option or payload refused), in bounded pieces."""
        while length:
            piece = await self.reader.readexactly(min(length, 1 << 20))
            length -= len(piece)

    # -- transmission ---------------------------------------------------------------------

    async def _transmission(self, go: Transmit, image: VersionImage) -> None:
        server = self.server
        overlay = None
        if server.options.writable:
            assert server.registry is not None
            try:
                overlay = await server.registry.attach(image)
            except OSError as e:
                log.error("%s: cannot make an overlay for %s: %s", self.peer, image.name, e)
                return
        self.session = ExportSession(image, server.cache, server.io_pool, overlay,
                                     server.readahead_chunks)
        self._structured = go.structured
        self._context_id = go.context_id
        log.debug("%s: serving %s as %r (%s)", self.peer, image.name, go.requested_name,
                  "read-only" if overlay is None else "writable")
        size, flags = image.size, go.tx_flags
        has_contexts = go.context_id is not None
        while True:
            req = p.parse_request(await self.reader.readexactly(p.REQUEST_SIZE))
            if req.command == p.CMD_DISC:
                self.clean = True
                if self._tasks:  # the protocol asks for outstanding requests to be served
                    await asyncio.gather(*self._tasks, return_exceptions=True)
                return
            check = p.check_request(req, size, flags, has_contexts)
            payload: bytes | None = None
            held = 0
            if check is not None:
                if req.command == p.CMD_WRITE:
                    await self._skip(req.length)
                await self._send(self._error_reply(req, check.error, check.message))
                continue
            if req.command in (p.CMD_READ, p.CMD_WRITE):
                held = await self._budget.acquire(req.length)
            if req.command == p.CMD_WRITE:
                try:
                    payload = await self.reader.readexactly(req.length)
                except BaseException:
                    self._budget.release(held)
                    raise
            if len(self._tasks) >= server.options.max_inflight_requests:
                await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.create_task(self._serve(req, payload, held))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, req: p.Request, payload: bytes | None, held: int) -> None:
        session = self.session
        assert session is not None
        try:
            try:
                reply = await self._execute(session, req, payload)
            except RequestFailed as e:
                reply = self._error_reply(req, e.error, str(e))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("%s: %s failed", self.peer, req.describe())
                reply = self._error_reply(req, p.EIO, f"internal error: {type(e).__name__}")
            await self._send(reply)
        finally:
            # Held until the reply has drained: a client that stops reading replies stops
            # the server reading its requests, instead of piling replies up in memory.
            self._budget.release(held)

    async def _execute(self, session: ExportSession, req: p.Request,
                       payload: bytes | None) -> Sequence[bytes | memoryview]:  # fmt: skip
        c = req.command
        if c == p.CMD_READ:
            return self._read_reply(req, await session.read(req.offset, req.length))
        if c == p.CMD_WRITE:
            assert payload is not None
            await session.write(req.offset, payload)
        elif c == p.CMD_WRITE_ZEROES:
            # Zeroing is a mark in the overlay's map: always fast, so FAST_ZERO never fails.
            session.write_zeroes(req.offset, req.length, bool(req.flags & p.CMD_FLAG_NO_HOLE))
        elif c == p.CMD_TRIM:
            session.trim(req.offset, req.length)
        if c in (p.CMD_WRITE, p.CMD_WRITE_ZEROES, p.CMD_TRIM) and req.flags & p.CMD_FLAG_FUA:
            await session.flush()
        elif c == p.CMD_FLUSH:
            # Every write acknowledged so far is already visible to every connection; a
            # durable overlay also makes them survive a crash (docs/nbd.md, "Durable exports").
            await session.flush()
            if self.server.registry is not None:
                self.server.registry.flushed(session.image)
        elif c == p.CMD_CACHE:
            await session.cache_range(req.offset, req.length)
        elif c == p.CMD_BLOCK_STATUS:
            assert self._context_id is not None
            extents = session.block_status(req.offset, req.length,
                                           bool(req.flags & p.CMD_FLAG_REQ_ONE))
            return [p.block_status_chunk(req.cookie, self._context_id, extents, True)]
        return [p.structured_done(req.cookie) if self._structured else p.simple_reply(req.cookie)]

    def _read_reply(self, req: p.Request, pieces: list[Piece]) -> list[bytes | memoryview]:
        cookie = req.cookie
        if not self._structured:
            out: list[bytes | memoryview] = [p.simple_reply(cookie)]
            for _, n, data in pieces:
                out.extend([data] if data is not None else _zeroes(n))
            return out
        if not pieces:
            return [p.structured_done(cookie)]
        if req.flags & p.CMD_FLAG_DF and len(pieces) > 1:
            # One content chunk asked for: holes are sent as explicit zeroes.
            parts = [data if data is not None else b"".join(_zeroes(n)) for _, n, data in pieces]
            return [p.offset_data_header(cookie, req.offset, req.length, True), *parts]
        out = []
        last = len(pieces) - 1
        for i, (offset, n, data) in enumerate(pieces):
            if data is None:
                out.append(p.offset_hole(cookie, offset, n, i == last))
            else:
                out += [p.offset_data_header(cookie, offset, n, i == last), data]
        return out

    def _error_reply(self, req: p.Request, error: int, message: str) -> list[bytes]:
        log.debug("%s: %s: error %d: %s", self.peer, req.describe(), error, message)
        if self._structured:
            return [p.error_chunk(req.cookie, error, message)]
        return [p.simple_reply(req.cookie, error)]

    async def _send(self, buffers: Sequence[bytes | memoryview]) -> None:
        if self.writer.is_closing():
            return
        for buf in buffers:
            self.writer.write(buf)
        # Replies are written whole before any await, so they never interleave; one drainer
        # at a time waits for the socket to take them.
        async with self._drain_lock:
            try:
                await self.writer.drain()
            except ConnectionError:
                self.writer.close()


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    """Turn Nagle's algorithm off on a TCP connection (a Unix socket has none).

    Every option reply and most transmission replies are small and answer a client that waits
    for them: with Nagle on, a reply written in two pieces waits for the client's delayed ACK
    (40 ms or more per round trip). asyncio sets this too, but only as a default of its own.
    """
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _zeroes(n: int) -> list[memoryview]:
    view = memoryview(_ZEROES)
    out = [view] * (n // len(_ZEROES))
    if n % len(_ZEROES):
        out.append(view[: n % len(_ZEROES)])
    return out
