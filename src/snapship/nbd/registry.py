"""Overlays shared per export, and what happens when the last connection to one leaves.

All connections to the same version of a writable server share one overlay, so a write
acknowledged on one connection is visible on every other one at once (which is what lets the
server advertise NBD_FLAG_CAN_MULTI_CONN). When the last connection closes, the overlay is
detached (a connection arriving later gets a fresh one) and either discarded or, with
commit on, stored as a new version on a worker thread. A commit only happens if every
connection that wrote ended with NBD_CMD_DISC: a client killed mid-transfer leaves nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from snapship.formats.manifest import Manifest
from snapship.nbd.exports import OverlayView, VersionImage
from snapship.nbd.overlay import Overlay

log = logging.getLogger("snapship.nbd")

Committer = Callable[[VersionImage, Overlay], Manifest]
"""Stores an overlay over a version as a new version (blocking; run on a worker thread)."""


class Registry(Protocol):
    """What the server asks of the keeper of writable exports' overlays."""

    def resolve(self, image: VersionImage) -> VersionImage:
        """The version a connection asking for `image` is served (a live export's base)."""

    async def attach(self, image: VersionImage) -> OverlayView: ...
    def detach(self, image: VersionImage, *, wrote: bool, clean: bool) -> None: ...
    def flushed(self, image: VersionImage) -> None:
        """A client's FLUSH of `image` completed (a checkpoint trigger)."""

    async def drain(self) -> None: ...


@dataclass
class _Shared:
    image: VersionImage
    ready: asyncio.Future[Overlay]
    """The overlay, once its file is made (on a worker thread)."""
    users: int = 0
    tainted: str | None = None
    """Why the overlay must not be committed (a writer left without NBD_CMD_DISC)."""


class OverlayRegistry:
    def __init__(self, directory: str | None, committer: Committer | None) -> None:
        self.directory = directory
        self.committer = committer
        self._shared: dict[str, _Shared] = {}
        self._commits: set[asyncio.Task[None]] = set()

    def resolve(self, image: VersionImage) -> VersionImage:
        return image

    def flushed(self, image: VersionImage) -> None:
        pass

    async def attach(self, image: VersionImage) -> Overlay:
        entry = self._shared.get(image.name)
        if entry is None:
            made = asyncio.to_thread(Overlay, image.size, self.directory)
            entry = _Shared(image, asyncio.ensure_future(made))
            self._shared[image.name] = entry
        entry.users += 1
        try:
            return await asyncio.shield(entry.ready)
        except BaseException:
            self.detach(image, wrote=False, clean=True)
            raise

    def detach(self, image: VersionImage, *, wrote: bool, clean: bool) -> None:
        entry = self._shared[image.name]
        if wrote and not clean and entry.tainted is None:
            entry.tainted = "a client that wrote to it disconnected without NBD_CMD_DISC"
        entry.users -= 1
        if entry.users:
            return
        del self._shared[image.name]
        # Runs once the overlay's file exists (at once, unless the last user left while it
        # was still being made).
        entry.ready.add_done_callback(lambda _: self._last_user_left(entry))

    def _last_user_left(self, entry: _Shared) -> None:
        if entry.ready.cancelled() or entry.ready.exception() is not None:
            return
        overlay = entry.ready.result()
        name = entry.image.name
        if not overlay.dirty:
            overlay.close()
        elif self.committer is None:
            log.info("discarded the overlay of %s (%d bytes changed)", name,
                     overlay.map.covered())
            overlay.close()
        elif entry.tainted:
            log.warning("not committing the overlay of %s: %s", name, entry.tainted)
            overlay.close()
        else:
            task = asyncio.get_running_loop().create_task(self._commit(entry.image, overlay))
            self._commits.add(task)
            task.add_done_callback(self._commits.discard)

    async def _commit(self, image: VersionImage, overlay: Overlay) -> None:
        assert self.committer is not None
        changed = overlay.map.covered()
        try:
            m = await asyncio.to_thread(self.committer, image, overlay)
        except Exception as e:  # a failed commit must not take the server down
            log.error("commit of the overlay of %s failed: %s", image.name, e)
            return
        finally:
            overlay.close()
        log.info("committed %s@%s (parent %s, %d bytes changed, %d new chunks)", m.volume,
                 m.version, image.name, changed, m.stats.get("chunks_new", 0))

    async def drain(self) -> None:
        """Wait for every commit under way (at shutdown)."""
        await asyncio.sleep(0)  # a last user's departure may still be scheduled
        while self._commits:
            await asyncio.gather(*self._commits, return_exceptions=True)
