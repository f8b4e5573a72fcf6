"""The NBD server on a thread of its own, for a command that uses a version while it runs.

`snapship mount` and instant restore serve one version to a kernel NBD client or nbdfuse in
the same process, while the main thread runs the commands (mount, nbd-client) whose I/O the
server must answer meanwhile. So the server's event loop runs on a background thread; the
socket is a unix socket in a private directory: only this machine's root sees the data.
"""

from __future__ import annotations

import asyncio
import threading

from snapship.nbd.names import ExportNames
from snapship.nbd.registry import OverlayRegistry
from snapship.nbd.server import NbdServer, ServerOptions

_STOP_TIMEOUT = 60.0


class ThreadedServer:
    """An `NbdServer` listening on `socket_path`, started by `start`, stopped by `close`."""

    def __init__(self, names: ExportNames, options: ServerOptions) -> None:
        registry = OverlayRegistry(None, None) if options.writable else None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="snapship-nbd-loop",
                                        daemon=True)
        self._server = NbdServer(names, registry, options)
        self._started = False

    def start(self, socket_path: str) -> None:
        self._thread.start()
        self._started = True
        asyncio.run_coroutine_threadsafe(self._server.start_unix(socket_path),
                                         self._loop).result()

    def close(self) -> None:
        """End every connection (a client still attached sees its device fail) and stop."""
        if not self._started:
            return
        self._started = False
        try:
            asyncio.run_coroutine_threadsafe(self._server.close(),
                                             self._loop).result(_STOP_TIMEOUT)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_STOP_TIMEOUT)
            if not self._thread.is_alive():
                self._loop.close()
