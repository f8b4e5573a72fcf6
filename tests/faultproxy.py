"""A TCP proxy on 127.0.0.1 that injects network faults between a client and a server.

The real server cannot be made to drop a connection half-way through a request, or to answer
a burst of 5xx, on demand; this proxy does both, and otherwise forwards bytes untouched. Used
by test_server_faults.py. Everything is seeded and bounded: it stops when closed.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from dataclasses import dataclass


@dataclass
class Faults:
    drops: int = 0
    """Connections cut in the middle of a request or a reply."""
    errors: int = 0
    """Requests answered with a 5xx by the proxy instead of the server."""
    connections: int = 0


class FaultProxy:
    """Forward 127.0.0.1:`port` to 127.0.0.1:`target`.

    - `drop_between=(lo, hi)`: each connection is cut after a random number of bytes in
      [lo, hi] went up (the server gets a truncated request), or another such number came
      down (the client gets a truncated reply), `max_drops` times in all.
    - `burst_every=N, burst_size=K`: after every N bytes forwarded (both ways, all connections
      together), every open connection is closed and the next K requests get `503` from the
      proxy.
    """

    def __init__(self, target: int, *, seed: int = 1, drop_between: tuple[int, int] | None = None,
                 max_drops: int = 1000, burst_every: int | None = None,
                 burst_size: int = 5) -> None:
        self.target = target
        self.rng = random.Random(seed)
        self.drop_between = drop_between
        self.max_drops = max_drops
        self.burst_every = burst_every
        self.burst_size = burst_size
        self.faults = Faults()
        self._forwarded = 0
        self._next_burst = burst_every
        self._pending_errors = 0
        self._live: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, repo: str) -> str:
        return f"http://127.0.0.1:{self.port}/{repo}"

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._close_live()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _close_live(self) -> None:
        with self._lock:
            live = list(self._live)
        for s in live:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            self.faults.connections += 1
            fail = self._pending_errors > 0
            if fail:
                self._pending_errors -= 1
            up = down = None
            if self.drop_between and self.faults.drops < self.max_drops:
                up = self.rng.randint(*self.drop_between)
                down = self.rng.randint(*self.drop_between)
        if fail:
            self._answer_503(client)
            return
        try:
            server = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            client.close()
            return
        with self._lock:
            self._live.update((client, server))
        downstream = threading.Thread(target=self._pump, args=(server, client, down),
                                      daemon=True)
        downstream.start()
        self._pump(client, server, up)
        downstream.join()
        with self._lock:
            self._live.difference_update((client, server))
        client.close()
        server.close()

    def _pump(self, src: socket.socket, dst: socket.socket, budget: int | None) -> None:
        """Copy src to dst; with a budget, cut both after that many bytes."""
        sent = 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if budget is not None and sent + len(data) > budget:
                    dst.sendall(data[: budget - sent])
                    with self._lock:
                        self.faults.drops += 1
                    break
                dst.sendall(data)
                sent += len(data)
                self._count(len(data))
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _count(self, n: int) -> None:
        burst = False
        with self._lock:
            self._forwarded += n
            if self._next_burst is not None and self._forwarded >= self._next_burst:
                assert self.burst_every is not None
                self._next_burst += self.burst_every
                self._pending_errors = self.burst_size
                burst = True
        if burst:
            self._close_live()

    def _answer_503(self, client: socket.socket) -> None:
        """Read one request (headers and body), answer 503, close."""
        try:
            client.settimeout(10)
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = client.recv(1 << 16)
                if not data:
                    return
                buf += data
            head, _, body = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            left = length - len(body)
            while left > 0:
                data = client.recv(min(left, 1 << 16))
                if not data:
                    return
                left -= len(data)
            client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                           b"Connection: close\r\n\r\n")
            with self._lock:
                self.faults.errors += 1
        except OSError:
            pass
        finally:
            client.close()
