"""Lock objects in the repository: who is writing, and who is running gc or prune.

Locks are ordinary objects under `locks/` (docs/gc.md, "Locks"), so they work on every backend
without compare-and-swap. Writer locks are shared (any number of backups run together);
maintenance locks are exclusive per kind: a process stores its lock, lists the others, and
backs off if another live one exists (both back off on a tie; neither proceeds unsafely).

A holder refreshes its heartbeat in a background thread and holds a *lease*: the time during
which no other process may take its lock for abandoned. Each beat first checks that the lock is
still there and still its own, and afterwards that nobody left a tombstone for it; a lock that
vanished is never recreated. A lock is stale when its process is gone: checked exactly through
/proc when the checker sees the holder's PID namespace on the same boot, and otherwise by a
heartbeat older than `STALE_AFTER`. Whoever removes a stale lock first leaves a tombstone, so a
holder that was only paused learns that its lease was broken (docs/gc.md, "Leases").
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from snapship.errors import Busy, FormatError, ObjectNotFound, SnapshipError, UsageError
from snapship.formats.constants import LOCK_VERSION, LOCK_VERSIONS_READ
from snapship.formats.json_bounded import load_object
from snapship.repository.layout import LOCK_PREFIX, TOMBSTONE_PREFIX, lock_key, tombstone_key
from snapship.storage.base import Storage

WRITER = "writer"
GC = "gc"
PRUNE = "prune"
KINDS = (WRITER, GC, PRUNE)
MAX_LOCK_BYTES = 64 * 1024
_LOCK_KEY = re.compile(rf"{re.escape(LOCK_PREFIX)}({'|'.join(KINDS)})-([A-Za-z0-9._+-]+)")

Warn = Callable[[str], None]


def _timing() -> tuple[float, float, float]:
    """(STALE_AFTER, HEARTBEAT_EVERY, LEASE) in seconds.

    `SNAPSHIP_TEST_STALE_AFTER` shortens all three in proportion, for tests only: every
    process that shares a repository must see the same value, or their leases disagree."""
    stale = 900.0
    raw = os.environ.get("SNAPSHIP_TEST_STALE_AFTER")
    if raw is not None:
        try:
            stale = float(raw)
        except ValueError:
            stale = -1.0
        if not 0.5 <= stale <= 86400:
            raise UsageError(f"SNAPSHIP_TEST_STALE_AFTER={raw!r} is not a number of seconds "
                             "(0.5..86400)")
    return stale, stale / 15, stale * 2 / 3


STALE_AFTER, HEARTBEAT_EVERY, LEASE = _timing()
"""A lock judged by its heartbeat is stale once the heartbeat is `STALE_AFTER` old. The holder
beats every `HEARTBEAT_EVERY` and holds its lease only while its last confirmed beat is younger
than `LEASE`: the margin below `STALE_AFTER` absorbs clock skew between machines and the time
a request takes."""
V1_GRACE = 3 * HEARTBEAT_EVERY
"""Version-1 locks name no PID namespace: their pid is trusted to be dead only once the
heartbeat is this old too (a holder in a container would still be beating)."""


def _boot_clock() -> float:
    """Seconds since boot, counting time spent stopped (SIGSTOP) or suspended: the clock a
    lease is measured on, so a laptop lid or a paused VM counts as the pause it is."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _start_time(stat: str | None) -> str | None:
    """The start time (clock ticks since boot) in a /proc/PID/stat line; None if unreadable."""
    if not stat or ")" not in stat:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` as this process's /proc shows it, or None if gone."""
    return _start_time(_read(f"/proc/{pid}/stat"))


def _nspids() -> list[int]:
    """This process's pid in each PID namespace from the one /proc belongs to down to its own."""
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith("NSpid:"):
            with contextlib.suppress(ValueError):
                return [int(p) for p in line.split()[1:]]
    return [os.getpid()]


def _identity() -> tuple[dict[int, int], int | None]:
    """({PID namespace inode: this process's pid there}, inode of the namespace whose pids
    this process's /proc shows). Only namespaces whose inode is known are named: a pid means
    nothing without its namespace (a container's backup is pid 1 in its own)."""
    own = _ns_inode("/proc/self/ns/pid")
    pids = _nspids()
    # /proc shows pids of its own namespace; it is ours when NSpid has one entry, otherwise
    # an outer one whose inode only /proc/1 tells (often refused inside user namespaces).
    proc_ns = own if len(pids) == 1 else _ns_inode("/proc/1/ns/pid")
    out: dict[int, int] = {}
    if own is not None:
        out[own] = os.getpid()
    if proc_ns is not None:
        out[proc_ns] = pids[0]
    return out, proc_ns


def _boot_id() -> str:
    return (_read("/proc/sys/kernel/random/boot_id") or "").strip()


MACHINE = f"{socket.gethostname()}/{_boot_id()}"
PIDS, PROC_NS = _identity()


@dataclass(frozen=True)
class LockInfo:
    key: str
    kind: str
    session: str
    machine: str = ""
    pid: int = 0
    pid_start: str = ""
    started: str = ""
    heartbeat: float = 0.0
    command: str = ""
    pids: dict[int, int] = field(default_factory=dict)
    """PID namespace inode -> the holder's pid there (version 2; empty in version 1)."""
    version: int = LOCK_VERSION
    owner: str = ""
    """The server token that stored it (set by a snapship server, docs/http-api.md)."""
    problem: str = ""
    """Why the object could not be read as a lock: it is listed, but never trusted."""

    def describe(self) -> str:
        if self.problem:
            return f"{self.key} ({self.problem})"
        host = self.machine.split("/", 1)[0]
        return f"{self.command} (pid {self.pid} on {host}, since {self.started})"

    def is_alive(self, now: float | None = None) -> bool:
        if self.problem:
            # A lock of a newer snapshot may mean what this one cannot check: keep clear of it.
            # Any other unreadable object is no lock at all (its holder, if any, notices at
            # its next heartbeat that its lock is gone).
            return self.version > LOCK_VERSION
        age = (now if now is not None else time.time()) - self.heartbeat
        if self.machine == MACHINE and self.pid_start:
            if self.version == 1:
                if _process_start(self.pid) == self.pid_start:
                    return True
                return age < V1_GRACE
            if PROC_NS is not None and PROC_NS in self.pids:
                return _process_start(self.pids[PROC_NS]) == self.pid_start
        # Another machine, or a PID namespace this process cannot look into. A heartbeat far
        # in the future is as untrustworthy as an old one (a forged or wildly wrong clock):
        # its holder, if alive, finds its tombstone and re-checks what it relies on.
        return -STALE_AFTER < age < STALE_AFTER


def parse_lock_key(key: str) -> tuple[str, str] | None:
    """(kind, session) of a lock key; None for anything else under `locks/`."""
    m = _LOCK_KEY.fullmatch(key)
    return (m.group(1), m.group(2)) if m else None


def _load_object(data: bytes, what: str) -> dict[str, Any]:
    return load_object(data, what, MAX_LOCK_BYTES, 4)


def _typed(d: dict[str, Any], name: str, kind: type) -> Any:
    value = d.get(name)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"field {name!r} is missing or not a {kind.__name__}")
    return value


def decode_lock(key: str, data: bytes) -> LockInfo:
    """Parse a lock object; `FormatError` for anything but a well-formed lock of a version
    this snapship reads (version 1 or 2), stored under its own key."""
    d = _load_object(data, f"lock {key}")
    version = d.get("v")
    if version not in LOCK_VERSIONS_READ:
        raise FormatError(f"lock {key} has version {version!r}; this snapship reads "
                          f"{', '.join(map(str, LOCK_VERSIONS_READ))}")
    try:
        pids: dict[int, int] = {}
        if version >= 2:
            raw = d.get("pids")
            if not isinstance(raw, dict) or len(raw) > 8:
                raise ValueError("field 'pids' is missing or not a small object")
            for ns, pid in raw.items():
                if not ns.isdigit() or not isinstance(pid, int) or isinstance(pid, bool):
                    raise ValueError("field 'pids' maps namespace inodes to pids")
                pids[int(ns)] = pid
        owner = d.get("owner", "")
        if not isinstance(owner, str):
            raise ValueError("field 'owner' is not a string")
        heartbeat = _typed(d, "heartbeat", float)
        if heartbeat != heartbeat or abs(heartbeat) > 1e12:  # NaN or beyond any clock
            raise ValueError(f"heartbeat {heartbeat!r} is not a time")
        info = LockInfo(key, _typed(d, "kind", str), _typed(d, "session", str),
                        _typed(d, "machine", str), _typed(d, "pid", int),
                        _typed(d, "pid_start", str), _typed(d, "started", str), heartbeat,
                        _typed(d, "command", str), pids, version, owner)
    except ValueError as e:
        raise FormatError(f"lock {key} is malformed: {e}") from None
    if info.kind not in KINDS or key != lock_key(info.kind, info.session):
        raise FormatError(f"lock {key} does not match its content")
    return info


def encode_lock(info: LockInfo) -> bytes:
    obj: dict[str, Any] = {
        "v": LOCK_VERSION, "kind": info.kind, "session": info.session, "machine": info.machine,
        "pid": info.pid, "pids": {str(ns): pid for ns, pid in info.pids.items()},
        "pid_start": info.pid_start, "started": info.started, "heartbeat": info.heartbeat,
        "command": info.command,
    }
    if info.owner:
        obj["owner"] = info.owner
    return json.dumps(obj, sort_keys=True).encode()


def _unreadable(key: str, data: bytes | None, e: FormatError) -> LockInfo | None:
    found = parse_lock_key(key)
    if found is None:
        return None
    version = 0
    with contextlib.suppress(Exception):
        v = json.loads(data or b"").get("v")
        version = v if isinstance(v, int) and not isinstance(v, bool) else 0
    return LockInfo(key, found[0], found[1], version=version, problem=str(e))


def list_locks(storage: Storage, kind: str | None = None,
               warn: Warn | None = None) -> list[LockInfo]:
    """Every lock; a lock that vanishes while being read is simply finished. An object that
    is not a readable lock is listed with its `problem` (and `warn`ed about), never trusted
    and never fatal: one bad object must not stop gc, backups or `locks`."""
    out = []
    for key, _size in storage.list(LOCK_PREFIX + (f"{kind}-" if kind else "")):
        if parse_lock_key(key) is None:
            continue  # tombstones, and whatever else is not a lock
        data: bytes | None = None
        try:
            data = storage.get(key)
            out.append(decode_lock(key, data))
        except ObjectNotFound:
            continue
        except FormatError as e:
            info = _unreadable(key, data, e)
            if info is not None:
                if warn is not None:
                    warn(f"ignoring {info.describe()}")
                out.append(info)
    return out


class LeaseLost(SnapshipError):
    """A lock holder went without a confirmed heartbeat for too long, or found its lock
    removed: another process may have taken it for abandoned."""

    kind = "lease-lost"


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
        self._beat_lock = threading.Lock()
        self.heartbeat_error: SnapshipError | None = None
        self.confirmed_at = 0.0
        """Boot-clock time at which the last confirmed beat started."""
        self.lost: str | None = None
        """Why the lease is broken, once it is: it never comes back."""

    def info(self) -> LockInfo:
        return LockInfo(self.key, self.kind, self.session, MACHINE, os.getpid(),
                        _start_time(_read("/proc/self/stat")) or "", self.started, time.time(),
                        self.command, dict(PIDS))

    def acquire(self) -> Lock:
        started = _boot_clock()
        self.storage.put(self.key, encode_lock(self.info()))
        self.confirmed_at = started
        self._thread = threading.Thread(target=self._beat, name=f"lock-{self.kind}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY) and self.lost is None:
            self.beat()

    def _mine(self, data: bytes) -> bool:
        try:
            other = decode_lock(self.key, data)
        except FormatError:
            return False
        me = self.info()
        return (other.machine, other.pid_start, other.started, other.pids) == (
            me.machine, me.pid_start, me.started, me.pids)

    def beat(self) -> None:
        """Refresh the heartbeat, unless the lock was removed or replaced meanwhile: then the
        lease is lost and the lock is not put back (a process that took it for abandoned may
        already have acted on that)."""
        with self._beat_lock:
            if self.lost is not None:
                return
            started = _boot_clock()
            try:
                current = self.storage.get(self.key)
                if not self._mine(current):
                    self.lost = "its lock was replaced by another process"
                    return
                self.storage.put(self.key, encode_lock(self.info()))
                # A remover leaves the tombstone before deleting the lock: found after our
                # put, it means our put may have come after the removal.
                if self.storage.stat(tombstone_key(self.key)) is not None:
                    self.lost = "another process took its lock for abandoned and removed it"
                    return
            except ObjectNotFound:
                self.lost = "its lock was removed (taken for abandoned by another process)"
                return
            except SnapshipError as e:  # a missed beat only matters once the lease runs out
                self.heartbeat_error = e
                if _boot_clock() - self.confirmed_at >= LEASE:
                    self.lost = f"its heartbeat failed for {LEASE:.0f} s: {e}"
                return
            gap = _boot_clock() - self.confirmed_at
            if gap >= LEASE:
                self.lost = (f"it went {gap:.0f} s without a heartbeat (paused or suspended?); "
                             f"after {STALE_AFTER:.0f} s others may take its lock for abandoned")
                return
            self.confirmed_at = started

    def lease_intact(self) -> bool:
        """Whether no other process can have taken this lock for abandoned so far."""
        return self.lost is None and _boot_clock() - self.confirmed_at < LEASE

    def confirm(self) -> bool:
        """Beat now, then say whether the lease has held without a gap up to this moment."""
        self.beat()
        return self.lease_intact()

    def lapse(self) -> str:
        """Why the lease is not intact (for messages)."""
        if self.lost is not None:
            return self.lost
        return (f"it went {_boot_clock() - self.confirmed_at:.0f} s without a confirmed "
                "heartbeat")

    def ensure(self, before: str) -> None:
        """Raise `LeaseLost` unless the lease is intact: a maintenance step that deletes or
        moves objects must not run on a lock others may have taken for abandoned."""
        if not self.lease_intact():
            raise LeaseLost(f"{self.kind} lost its lock ({self.lapse()}); stopped before "
                            f"{before}. Nothing it did is unsafe; run it again")

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


def remove_lock(storage: Storage, info: LockInfo, reason: str) -> None:
    """Remove another process's lock, leaving a tombstone first: if that process is only
    paused, its next heartbeat finds the tombstone and it knows its lease was broken."""
    storage.put(tombstone_key(info.key), json.dumps(
        {"v": 1, "removed": time.time(), "reason": reason, "lock": info.key}).encode())
    storage.delete(info.key)


def clear_stale(storage: Storage, locks: list[LockInfo], warn: Warn) -> list[LockInfo]:
    """Remove dead processes' locks and unreadable objects in their place (saying so through
    `warn`), and return the live ones."""
    live = []
    now = time.time()
    for info in locks:
        if info.is_alive(now):
            live.append(info)
            continue
        if info.problem:
            warn(f"removed {info.describe()}: it is not a lock this snapship can trust")
            remove_lock(storage, info, info.problem)
        else:
            warn(f"removed the stale {info.kind} lock of {info.describe()}: "
                 "that process is gone")
            remove_lock(storage, info, "stale")
    return live


def remove_old_tombstones(storage: Storage) -> int:
    """Delete tombstones no holder can still need: a holder paused long enough to miss one
    has also missed its lease, which its next heartbeat notices anyway."""
    removed = 0
    cutoff = time.time() - 3 * STALE_AFTER
    for key, _size in storage.list(TOMBSTONE_PREFIX):
        try:
            stamp = _load_object(storage.get(key), key).get("removed")
        except (ObjectNotFound, FormatError):
            stamp = None
        if not isinstance(stamp, int | float) or not cutoff < stamp < time.time() + STALE_AFTER:
            storage.delete(key)
            removed += 1
    return removed


@contextlib.contextmanager
def exclusive(storage: Storage, kind: str, command: str, warn: Warn) -> Iterator[Lock]:
    """Hold the `kind` lock alone, or raise `Busy` naming who holds it."""
    with Lock(storage, kind, command).acquire() as lock:
        others = [i for i in list_locks(storage, kind, warn) if i.session != lock.session]
        live = clear_stale(storage, others, warn)
        if live:
            raise Busy(f"{kind} is already running: {live[0].describe()}; "
                       "try again when it has finished")
        yield lock
