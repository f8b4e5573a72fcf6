"""Lock objects in the repository: who is writing, and who is running gc or prune.

Locks are ordinary objects under `locks/` (docs/gc.md, "Locks"), so they work on every backend
without compare-and-swap. Writer locks are shared (any number of backups run together);
maintenance locks are exclusive per kind: a process stores its lock, lists the others, and
backs off if another live one exists (both back off on a tie; neither proceeds unsafely).
A holder refreshes its heartbeat in a background thread. A lock is stale when its process is
gone: on the same machine (same boot) that is checked exactly through /proc; from another
machine it is judged by the heartbeat, which must be older than `STALE_AFTER`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from snapship.errors import Busy, FormatError, ObjectNotFound, SnapshipError
from snapship.formats.constants import LOCK_PREFIX, LOCK_VERSION
from snapship.storage.base import Storage

WRITER = "writer"
GC = "gc"
PRUNE = "prune"
KINDS = (WRITER, GC, PRUNE)
HEARTBEAT_EVERY = 60.0
STALE_AFTER = 900.0
"""Seconds without a heartbeat after which another machine's lock counts as abandoned."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None if it is gone.

    Compared with the value stored in the lock, it tells a live holder from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


MACHINE = f"{socket.gethostname()}/{_boot_id()}"


@dataclass(frozen=True)
class LockInfo:
    key: str
    kind: str
    session: str
    machine: str
    pid: int
    pid_start: str
    started: str
    heartbeat: float
    command: str

    def describe(self) -> str:
        host = self.machine.split("/", 1)[0]
        return f"{self.command} (pid {self.pid} on {host}, since {self.started})"

    def is_alive(self, now: float | None = None) -> bool:
        if self.machine == MACHINE and self.pid_start:
            return _process_start(self.pid) == self.pid_start
        return (now if now is not None else time.time()) - self.heartbeat < STALE_AFTER


def lock_key(kind: str, session: str) -> str:
    return f"{LOCK_PREFIX}{kind}-{session}"


def decode_lock(key: str, data: bytes) -> LockInfo:
    try:
        d: dict[str, Any] = json.loads(data)
        if d.get("v") != LOCK_VERSION:
            raise FormatError(f"lock {key} has version {d.get('v')!r}; this snapship reads 1")
        info = LockInfo(key, str(d["kind"]), str(d["session"]), str(d["machine"]), int(d["pid"]),
                        str(d["pid_start"]), str(d["started"]), float(d["heartbeat"]),
                        str(d["command"]))
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"lock {key} is malformed: {e}") from None
    if info.kind not in KINDS or key != lock_key(info.kind, info.session):
        raise FormatError(f"lock {key} does not match its content")
    return info


def list_locks(storage: Storage, kind: str | None = None) -> list[LockInfo]:
    """Every readable lock; a lock that vanishes while being read is simply finished."""
    out = []
    for key, _size in storage.list(LOCK_PREFIX + (f"{kind}-" if kind else "")):
        try:
            out.append(decode_lock(key, storage.get(key)))
        except ObjectNotFound:
            continue
    return out


class Lock:
    """A lock this process holds; use as a context manager. Heartbeats until released."""

    def __init__(self, storage: Storage, kind: str, command: str) -> None:
        self.storage = storage
        self.kind = kind
        self.session = (dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
                        + "-" + secrets.token_hex(6))
        self.key = lock_key(kind, self.session)
        self.command = command
        self.started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat_error: SnapshipError | None = None

    def _encode(self) -> bytes:
        pid = os.getpid()
        return json.dumps({
            "v": LOCK_VERSION, "kind": self.kind, "session": self.session, "machine": MACHINE,
            "pid": pid, "pid_start": _process_start(pid) or "", "started": self.started,
            "heartbeat": time.time(), "command": self.command,
        }, sort_keys=True).encode()

    def acquire(self) -> Lock:
        self.storage.put(self.key, self._encode())
        self._thread = threading.Thread(target=self._beat, name=f"lock-{self.kind}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY):
            try:
                self.storage.put(self.key, self._encode())
            except SnapshipError as e:  # a missed beat only matters after STALE_AFTER
                self.heartbeat_error = e

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.storage.delete(self.key)

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.release_after(exc)

    def release_after(self, exc: BaseException | None) -> None:
        """Release; if that fails while `exc` is on its way up, `exc` is what the user must
        see (the storage is probably gone): the lock is left to go stale."""
        try:
            self.release()
        except SnapshipError:
            if exc is None:
                raise


def clear_stale(storage: Storage, locks: list[LockInfo], warn: Any) -> list[LockInfo]:
    """Remove dead processes' locks (saying so through `warn`) and return the live ones."""
    live = []
    now = time.time()
    for info in locks:
        if info.is_alive(now):
            live.append(info)
        else:
            warn(f"removed the stale {info.kind} lock of {info.describe()}: "
                 "that process is gone")
            storage.delete(info.key)
    return live


@contextlib.contextmanager
def exclusive(storage: Storage, kind: str, command: str, warn: Any) -> Iterator[Lock]:
    """Hold the `kind` lock alone, or raise `Busy` naming who holds it."""
    with Lock(storage, kind, command).acquire() as lock:
        others = [i for i in list_locks(storage, kind) if i.session != lock.session]
        live = clear_stale(storage, others, warn)
        if live:
            raise Busy(f"{kind} is already running: {live[0].describe()}; "
                       "try again when it has finished")
        yield lock
