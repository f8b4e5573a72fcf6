"""The control socket of a server with a state directory: `DIR/control.sock`, so that
`snapship nbd checkpoint` in another shell reaches the running server (docs/nbd.md).

Protocol, version 1: the client sends one JSON line `{"version": 1, "op": "checkpoint",
"export": VOLUME}`; the server answers with one JSON line, `{"version": 1, "ok": true,
"volume": ..., "checkpoint": VERSION, "changed": BOOL, "dirty_bytes": N, "seconds": S}` once
the version is stored, or `{"version": 1, "ok": false, "kind": KIND, "error": MESSAGE}`
(KIND `usage` for a request naming no live export, else `error`). Unknown versions
and operations get an error. The socket is only as reachable as the directory (mode 0700).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from snapship.errors import SnapshipError, UsageError
from snapship.nbd.live import LiveRegistry

VERSION = 1
SOCKET_NAME = "control.sock"
_LINE_LIMIT = 1 << 16
_SUN_PATH_MAX = 100
"""Socket paths are limited to 108 bytes; longer ones are reached through /proc/self/fd."""


@contextlib.contextmanager
def _reachable(path: Path) -> Iterator[str]:
    """A name for the socket at `path` short enough to bind or connect to."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class ControlServer:
    def __init__(self, registry: LiveRegistry) -> None:
        self.registry = registry
        self.path = registry.state_dir / SOCKET_NAME
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        # The state directory is locked by this process: a socket file left there by a
        # killed server is stale.
        self.path.unlink(missing_ok=True)
        with _reachable(self.path) as name:
            self._server = await asyncio.start_unix_server(self._handle, name,
                                                           limit=_LINE_LIMIT)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            answer = await self._answer(line)
            writer.write(json.dumps({"version": VERSION, **answer}).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "the request is not JSON"}
        if not isinstance(req, dict) or req.get("version") != VERSION:
            return {"ok": False, "error": f"control protocol version {VERSION} expected"}
        if req.get("op") != "checkpoint" or not isinstance(req.get("export"), str):
            return {"ok": False, "error": f"unknown request {req.get('op')!r}"}
        task = asyncio.get_running_loop().create_task(self.registry.checkpoint(req["export"]))
        self.registry.track(task)
        try:
            # Shielded: a client that goes away does not cut a checkpoint short.
            cp = await asyncio.shield(task)
        except UsageError as e:
            return {"ok": False, "kind": "usage", "error": str(e)}
        except (SnapshipError, OSError) as e:
            return {"ok": False, "kind": "error", "error": str(e)}
        m = cp.manifest
        return {"ok": True, "volume": m.volume, "checkpoint": m.version, "changed": cp.changed,
                "dirty_bytes": cp.dirty_bytes, "seconds": round(cp.seconds, 3)}


def request_checkpoint(state_dir: Path, export: str, timeout: float | None = None
                       ) -> dict[str, Any]:
    """Blocking client side: ask the server on `state_dir` for a checkpoint of `export`."""
    path = state_dir / SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            with _reachable(path) as name:
                s.connect(name)
        except OSError as e:
            raise UsageError(f"no snapship nbd serve is running on the state directory "
                             f"{state_dir} ({path}: {e.strerror or e})") from None
        s.sendall(json.dumps({"version": VERSION, "op": "checkpoint",
                              "export": export}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            piece = s.recv(_LINE_LIMIT)
            if not piece:
                break
            data += piece
    try:
        answer = json.loads(data)
    except ValueError:
        raise SnapshipError(f"the server on {state_dir} gave no answer (did it stop?)") from None
    if not isinstance(answer, dict) or answer.get("version") != VERSION:
        raise SnapshipError(f"the server on {state_dir} speaks another control protocol")
    if not answer.get("ok"):
        error = UsageError if answer.get("kind") == "usage" else SnapshipError
        raise error(f"checkpoint of {export} failed: {answer.get('error')}")
    return answer
