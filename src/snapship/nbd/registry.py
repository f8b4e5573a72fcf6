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

from snapship.formats.manifest import Manifest
from snapship.nbd.exports import VersionImage
from snapship.nbd.overlay import Overlay

log = logging.getLogger("snapship.nbd")

Committer = Callable[[VersionImage, Overlay], Manifest]
"""Stores an overlay over a version as a new version (blocking; run on a worker thread)."""


@dataclass
class _Shared:
    image: VersionImage
    overlay: Overlay
    users: int = 0
    tainted: str | None = None
    """Why the overlay must not be committed (a writer left without NBD_CMD_DISC)."""


class OverlayRegistry:
    def __init__(self, directory: str | None, committer: Committer | None) -> None:
        self.directory = directory
        self.committer = committer
        self._shared: dict[str, _Shared] = {}
        self._commits: set[asyncio.Task[None]] = set()
        self.committed: list[Manifest] = []

    def attach(self, image: VersionImage) -> Overlay:
        entry = self._shared.get(image.name)
        if entry is None:
            entry = _Shared(image, Overlay(image.size, self.directory))
            self._shared[image.name] = entry
        entry.users += 1
        return entry.overlay

    def detach(self, image: VersionImage, *, wrote: bool, clean: bool) -> None:
        entry = self._shared[image.name]
        if wrote and not clean and entry.tainted is None:
            entry.tainted = "a client that wrote to it disconnected without NBD_CMD_DISC"
        entry.users -= 1
        if entry.users:
            return
        del self._shared[image.name]
        if not entry.overlay.dirty:
            entry.overlay.close()
        elif self.committer is None:
            log.info("discarded the overlay of %s (%d bytes changed)", image.name,
                     entry.overlay.map.covered())
            entry.overlay.close()
        elif entry.tainted:
            log.warning("not committing the overlay of %s: %s", image.name, entry.tainted)
            entry.overlay.close()
        else:
            task = asyncio.get_running_loop().create_task(self._commit(entry))
            self._commits.add(task)
            task.add_done_callback(self._commits.discard)

    async def _commit(self, entry: _Shared) -> None:
        assert self.committer is not None
        image, overlay = entry.image, entry.overlay
        changed = overlay.map.covered()
        try:
            m = await asyncio.to_thread(self.committer, image, overlay)
        except Exception as e:  # a failed commit must not take the server down
            log.error("commit of the overlay of %s failed: %s", image.name, e)
            return
        finally:
            overlay.close()
        self.committed.append(m)
        log.info("committed %s@%s (parent %s, %d bytes changed, %d new chunks)", m.volume,
                 m.version, image.name, changed, m.stats.get("chunks_new", 0))

    async def drain(self) -> None:
        """Wait for every commit under way (at shutdown)."""
        while self._commits:
            await asyncio.gather(*self._commits, return_exceptions=True)
