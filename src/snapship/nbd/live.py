"""Live exports: writable exports whose overlay lives in a state directory (`--state-dir`),
survives restarts, and is cut into versions while clients stay connected (checkpoints).

One live export per volume, in `DIR/exports/VOLUME/`: `export.json` (the base version and the
layers over it, replaced atomically) and one or two `durable.DurableLayer`s. Writes go to the
active layer. A checkpoint freezes it at a FLUSH boundary (new writes go to a fresh layer at
once), commits the frozen layer over the base through the backup engine, then makes the new
version the base and drops the frozen layer. Every state the directory passes through reads
as the same content, so a crash at any point loses no acknowledged-durable write (docs/nbd.md,
"Durable exports" and "Checkpoints").
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapship.errors import FormatError, UsageError
from snapship.formats.manifest import Manifest, check_name
from snapship.nbd.durable import DurableLayer, fsync_dir
from snapship.nbd.exports import OverlayView, VersionImage
from snapship.nbd.overlay import FROZEN, WRITTEN, PieceSource

log = logging.getLogger("snapship.nbd")

STATE_FORMAT = "snapship live export"
STATE_VERSION = 1

Commit = Callable[[VersionImage, DurableLayer], Manifest]
"""Stores a frozen layer over a version as a new version (blocking; on a worker thread)."""

COMMIT_NICE = 10
"""How much lower a checkpoint commit's CPU priority is than the server's (nice +10: about a
tenth of a contended CPU)."""


def lower_priority() -> None:
    """Run in a commit thread as it starts: nice +COMMIT_NICE for this thread only, and for the
    engine's worker threads it starts (on Linux a thread's nice value is its own, and a new
    thread takes its creator's). Requests are then served first on a busy CPU, while the
    commit still has every idle cycle. Where it cannot be set, commits run as before."""
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid,
                       min(19, os.getpriority(os.PRIO_PROCESS, tid) + COMMIT_NICE))


OpenVersion = Callable[[str, str], VersionImage | None]
"""Loads VOLUME, VERSION (blocking)."""


class LiveStateError(FormatError):
    """A state directory this version cannot use (unknown format or version, missing base)."""


@dataclass(frozen=True)
class Checkpoint:
    manifest: Manifest
    changed: bool
    """False: nothing was written since the base, which is returned as it is."""
    seconds: float
    dirty_bytes: int


class _Pin:
    """A read under way from a layer's data file: the layer is closed only after it."""

    def __init__(self, export: LiveExport, layer: DurableLayer) -> None:
        self.export = export
        self.layer = layer
        layer.pins += 1

    def pread(self, offset: int, length: int) -> bytes:
        return self.layer.pread(offset, length)

    def unpin(self) -> None:
        self.layer.pins -= 1
        if self.layer.retired and not self.layer.pins:
            self.layer.close()


def _write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.new")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_dir(path.parent)


class LiveExport:
    """One volume's live export; implements `exports.OverlayView`. Used from the event loop."""

    def __init__(self, directory: Path, image: VersionImage, layers: list[DurableLayer],
                 next_layer: int) -> None:  # fmt: skip
        self.directory = directory
        self.volume = image.volume
        self.image = image
        self.size = image.size
        self.frozen: DurableLayer | None = layers[0] if len(layers) == 2 else None
        self.active = layers[-1]
        self.next_layer = next_layer
        self._lock = asyncio.Lock()
        """Held by flushes and by the switches of a checkpoint: one change of state at once."""
        self._checkpoint_lock = asyncio.Lock()
        self._write_done = asyncio.Event()
        self._state_saved = True
        self.last_checkpoint = -math.inf
        self.checkpoint_due = False
        """A checkpoint on FLUSH is scheduled (rate-limited) and has not started yet."""
        self.users = 0

    # -- the state directory ----------------------------------------------------------------

    @classmethod
    def create(cls, directory: Path, image: VersionImage) -> LiveExport:
        """Blocking: a new live export over `image`, with one empty layer."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fsync_dir(directory.parent)
        layer = DurableLayer(directory, 1, image.size, create=True)
        export = cls(directory, image, [layer], 2)
        export.save_state()
        return export

    @classmethod
    def load(cls, directory: Path, open_version: OpenVersion) -> LiveExport:
        """Blocking: the live export kept in `directory`, as it was at its last durable state."""
        doc = read_state(directory / "export.json")
        volume, base = doc["volume"], doc["base"]
        image = open_version(volume, base)
        if image is None:
            raise LiveStateError(f"the live export {volume} in {directory} is based on "
                                 f"{volume}@{base}, which the repository no longer holds")
        if image.size != doc["size"]:
            raise LiveStateError(f"{directory}: {volume}@{base} has {image.size} bytes, the "
                                 f"live export {doc['size']}")
        layers = [DurableLayer(directory, n, image.size, create=False) for n in doc["layers"]]
        for layer in layers:
            if layer.dropped:
                # Written since the last FLUSH of a boot that ended: never acknowledged as
                # durable, and the data they point at may not have reached the disk.
                log.warning("live export %s, layer %d: %d map records not made durable "
                            "before the machine restarted were dropped", volume, layer.number,
                            layer.dropped)
        listed = {f"layer-{n}.{kind}" for n in doc["layers"] for kind in ("data", "map")}
        for leftover in directory.glob("layer-*"):
            # A layer made for a freeze that never reached export.json, or one already
            # committed: nothing in it is needed (docs/nbd.md, "Checkpoints").
            if leftover.name not in listed:
                leftover.unlink()
        return cls(directory, image, layers, doc["next_layer"])

    def save_state(self) -> None:
        layers = [x.number for x in (self.frozen, self.active) if x is not None]
        _write_json_atomic(self.directory / "export.json", {
            "format": STATE_FORMAT, "version": STATE_VERSION, "volume": self.volume,
            "base": self.image.version, "size": self.size, "layers": layers,
            "next_layer": self.next_layer})

    # -- OverlayView ------------------------------------------------------------------------

    @property
    def base(self) -> VersionImage:
        return self.image

    @property
    def dirty(self) -> bool:
        return self.active.dirty or self.frozen is not None

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, int | None]]:
        frozen = self.frozen
        for s, e, state in self.active.segments(start, end):
            if state is not None or frozen is None:
                yield s, e, state
                continue
            for fs, fe, fstate in frozen.segments(s, e):
                yield fs, fe, FROZEN if fstate == WRITTEN else fstate

    def source_for(self, state: int) -> PieceSource:
        layer = self.frozen if state == FROZEN else self.active
        assert layer is not None
        return _Pin(self, layer)

    def mark(self, start: int, end: int, state: int) -> None:
        self.active.journal(start, end, state)

    async def write(self, io: Executor, offset: int, data: bytes) -> None:
        # Data and its mark go to the layer active when the write began, even if a freeze
        # switched layers meanwhile: the freeze waits for such writes before it flushes.
        layer = self.active
        layer.writers += 1
        try:
            await asyncio.get_running_loop().run_in_executor(io, layer.pwrite, offset, data)
            layer.data_dirty = True
            layer.journal(offset, offset + len(data), WRITTEN)
        finally:
            layer.writers -= 1
            self._write_done.set()

    async def flush(self) -> None:
        async with self._lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        if not self._state_saved:
            await asyncio.to_thread(self.save_state)
            self._state_saved = True
        for layer in (self.frozen, self.active):
            if layer is None or not layer.unflushed:
                continue
            # Writes go on meanwhile: their entries follow the ones this flush covers.
            ticket = layer.begin_flush()
            ok = False
            try:
                await asyncio.to_thread(layer.sync_data, ticket)
                layer.seal(ticket)
                await asyncio.to_thread(layer.sync_map, ticket)
                ok = True
            finally:
                layer.end_flush(ticket, ok)

    # -- checkpoints ------------------------------------------------------------------------

    async def _freeze(self) -> None:
        """Make the active layer the frozen one, durable and unchanging; writes go on into a
        fresh layer from the switch on, without waiting."""
        async with self._lock:
            number = self.next_layer
            fresh = await asyncio.to_thread(DurableLayer, self.directory, number, self.size,
                                            create=True)
            old = self.active
            self.frozen, self.active = old, fresh
            self.next_layer = number + 1
            self._state_saved = False  # flushes of the fresh layer wait for export.json
            while old.writers:
                self._write_done.clear()
                await self._write_done.wait()
            await self._flush_locked()

    async def checkpoint(self, commit: Commit, executor: Executor | None = None) -> Checkpoint:
        """Store the export's content as of now (a FLUSH boundary) as a new version; the
        commit runs on `executor` (default: the loop's)."""
        async with self._checkpoint_lock:
            started = time.monotonic()
            if not self.dirty:
                return Checkpoint(self.image.manifest, False, 0.0, 0)
            dirty_bytes = 0
            while True:
                froze = self.frozen is None
                if froze:  # else a layer frozen before a restart or a failed commit is first
                    await self._freeze()
                frozen = self.frozen
                assert frozen is not None
                dirty_bytes += frozen.map.covered()
                m = await asyncio.get_running_loop().run_in_executor(
                    executor, commit, self.image, frozen)
                await self._rebase(VersionImage(m))
                if froze:
                    self.last_checkpoint = time.monotonic()
                    return Checkpoint(m, True, self.last_checkpoint - started, dirty_bytes)

    async def _rebase(self, image: VersionImage) -> None:
        """The frozen layer is stored as `image`: make it the base and drop the layer. The
        state file says so first, so a crash before the files go leaves only leftovers."""
        async with self._lock:
            frozen = self.frozen
            assert frozen is not None
            self.frozen, old_image = None, self.image
            self.image = image
            try:
                await asyncio.to_thread(self.save_state)
            except BaseException:
                self.frozen, self.image = frozen, old_image
                raise
        await asyncio.to_thread(frozen.remove)
        frozen.retired = True
        if not frozen.pins:
            frozen.close()

    def close(self) -> None:
        for layer in (self.frozen, self.active):
            if layer is not None:
                layer.close()


def read_state(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LiveStateError(f"cannot read {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise LiveStateError(f"{path} is not a live export's state")
    if doc.get("version") != STATE_VERSION:
        raise LiveStateError(f"{path}: live export state version {doc.get('version')} is not "
                             f"supported (this snapship reads version {STATE_VERSION})")
    try:
        check_name("volume", doc["volume"])
        check_name("version", doc["base"])
        layers = doc["layers"]
        if not (isinstance(doc["size"], int) and isinstance(doc["next_layer"], int)
                and isinstance(layers, list) and 1 <= len(layers) <= 2
                and all(isinstance(n, int) and 0 < n < doc["next_layer"] for n in layers)):
            raise ValueError("bad fields")
    except (KeyError, TypeError, ValueError, UsageError) as e:
        raise LiveStateError(f"{path} is damaged: {e}") from None
    return doc


# -- the registry -------------------------------------------------------------------------


class StateDirLock:
    """One server per state directory: an exclusive lock on DIR/lock for the process's life."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UsageError(f"the state directory {state_dir} is in use by another "
                             "snapship nbd serve") from None

    def release(self) -> None:
        os.close(self.fd)


class LiveRegistry:
    """The live exports of one state directory; implements `registry.Registry`."""

    def __init__(self, state_dir: Path, open_version: OpenVersion, commit: Commit, *,
                 checkpoint_every: float | None = None,
                 checkpoint_on_flush: float | None = None) -> None:  # fmt: skip
        self.state_dir = state_dir
        self.exports_dir = state_dir / "exports"
        self.open_version = open_version
        self.commit = commit
        self.checkpoint_every = checkpoint_every
        self.checkpoint_on_flush = checkpoint_on_flush
        """Minimum seconds between checkpoints made on a FLUSH; None: none."""
        self.exports: dict[str, LiveExport] = {}
        self._making: dict[str, asyncio.Future[LiveExport]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.Task[None] | None = None
        self._waiting: set[asyncio.Task[None]] = set()
        """Checkpoints on FLUSH waiting for their rate limit (cancelled at shutdown)."""
        # Commits compete with serving for the CPUs (hashing, compression, encryption): on
        # threads of their own at a lower priority, never the loop's default executor, whose
        # threads serve flushes (docs/live.md, "What a checkpoint costs the writes").
        self._commit_pool = ThreadPoolExecutor(2, thread_name_prefix="snapship-commit",
                                               initializer=lower_priority)

    def load(self) -> None:
        """Blocking, at start: every live export kept in the state directory."""
        self.exports_dir.mkdir(mode=0o700, exist_ok=True)
        for d in sorted(self.exports_dir.iterdir()):
            if (d / "export.json").exists():
                export = LiveExport.load(d, self.open_version)
                self.exports[export.volume] = export
                log.info("live export %s: base %s, %d bytes in its layers", export.volume,
                         export.image.name, sum(x.map.covered() for x in
                                                (export.frozen, export.active) if x))

    def start(self) -> None:
        if self.checkpoint_every:
            self._timer = asyncio.get_running_loop().create_task(
                self._every(self.checkpoint_every))

    def resolve(self, image: VersionImage) -> VersionImage:
        export = self.exports.get(image.volume)
        return image if export is None else export.image

    async def attach(self, image: VersionImage) -> OverlayView:
        export = self.exports.get(image.volume)
        if export is None:
            making = self._making.get(image.volume)
            if making is None:
                making = asyncio.ensure_future(asyncio.to_thread(
                    LiveExport.create, self.exports_dir / image.volume, image))
                self._making[image.volume] = making
            try:
                export = await asyncio.shield(making)
            finally:
                self._making.pop(image.volume, None)
            self.exports[image.volume] = export
            log.info("live export %s created over %s", image.volume, image.name)
        export.users += 1
        return export

    def detach(self, image: VersionImage, *, wrote: bool, clean: bool) -> None:
        # The overlay outlives its connections: a mirror leg that reconnects finds it again.
        self.exports[image.volume].users -= 1

    def flushed(self, image: VersionImage) -> None:
        export = self.exports.get(image.volume)
        if (export is None or self.checkpoint_on_flush is None or not export.dirty
                or export.checkpoint_due):
            return
        # At most one per interval, and the last FLUSH of a burst still gets one: at the
        # end of the interval if it came too soon.
        wait = export.last_checkpoint + self.checkpoint_on_flush - time.monotonic()
        export.checkpoint_due = True
        task = asyncio.get_running_loop().create_task(self._on_flush(export, max(0.0, wait)))
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)

    async def _on_flush(self, export: LiveExport, wait: float) -> None:
        try:
            await asyncio.sleep(wait)  # the rate limit's timer
        finally:
            export.checkpoint_due = False
        self._spawn(self._logged(export))

    async def checkpoint(self, volume: str) -> Checkpoint:
        export = self.exports.get(volume)
        if export is None:
            raise UsageError(f"no live export named {volume!r} in {self.state_dir} "
                             f"(it has: {', '.join(sorted(self.exports)) or 'none'})")
        result = await export.checkpoint(self.commit, self._commit_pool)
        if result.changed:
            log.info("checkpoint %s@%s (%d bytes changed, %.2f s)", volume,
                     result.manifest.version, result.dirty_bytes, result.seconds)
        return result

    async def _logged(self, export: LiveExport) -> None:
        try:
            await self.checkpoint(export.volume)
        except Exception as e:  # a failed checkpoint must not take the server down
            log.error("checkpoint of %s failed: %s", export.volume, e)

    async def _every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)  # a timer, not a synchronisation
            for export in list(self.exports.values()):
                if export.dirty and not export._checkpoint_lock.locked():
                    self._spawn(self._logged(export))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def track(self, task: asyncio.Task[Any]) -> None:
        """A checkpoint asked for from outside (the control socket): shutdown waits for it."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """At shutdown: stop the timers, let checkpoints under way end, make everything
        acknowledged durable (a clean stop keeps every write, flushed or not)."""
        for task in list(self._waiting):
            task.cancel()
        await asyncio.gather(*self._waiting, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
        while self._tasks:  # a checkpoint cut short would leave its version half-registered
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._commit_pool.shutdown(wait=True)
        for export in self.exports.values():
            with contextlib.suppress(OSError):
                await export.flush()
            export.close()
