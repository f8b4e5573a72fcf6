"""A throwaway view of a block device with its XFS log replayed: where a backup of a classic
snapshot of a mounted XFS reads the free space from (docs/free-space.md, "XFS snapshots").

Such a snapshot's log holds transactions its metadata lacks (LVM's freeze quiesces the log
but writes no unmount record), so its free-space B+trees cannot be trusted as stored. The
view is a non-persistent dm-snapshot of the device whose copy-on-write store is a sparse file
on a loop device: mounting the view replays the log into that file, never into the device,
and the unmount leaves a clean log whose free space the parsers can read. Everything is torn
down afterwards, whatever happened (unmount, `dmsetup remove`, `losetup --detach`, the file).

Only the free map comes from the view; the data is read from the snapshot itself. A block
free after replay is unused by the filesystem the restored image becomes once it is mounted
(which replays the same log); a block the log allocates is not free, so it is read.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Iterator

from snapship.changes.loop import Loop
from snapship.changes.lvm import Runner, run

SECTOR = 512
COW_CHUNK_SECTORS = 8
"""4 KiB copy-on-write chunks: replay writes metadata blocks, not whole megabytes."""
MAX_COW_BYTES = 2 << 30
"""The sparse store's size: more than any XFS log can replay into it (a log is at most 2 GiB
and the store is written only where replay writes)."""


@contextlib.contextmanager
def replayed_view(device: str, size: int, workdir: str | None = None,
                  runner: Runner = run) -> Iterator[str]:
    """The path of a view of `device` (`size` bytes) in which its XFS log was replayed by a
    mount and unmount; `LvmError` (from the runner) if any step fails. Needs root, the xfs
    module and device-mapper, as `backup lvm:` does."""
    loop = Loop(runner)
    with contextlib.ExitStack() as undo:
        tmp = undo.enter_context(tempfile.TemporaryDirectory(prefix="snapship-replay-",
                                                             dir=workdir))
        store = os.path.join(tmp, "cow")
        with open(store, "wb") as f:
            f.truncate(min(MAX_COW_BYTES, max(size, 64 << 20)))
        dev = loop.attach(store)
        undo.callback(loop.detach, dev)
        name = f"snapship-replay-{os.getpid()}-{secrets.token_hex(4)}"
        # Not waiting for udev (a minimal system runs none); mknodes makes the node itself.
        runner(["dmsetup", "create", "--noudevsync", name, "--table",
                f"0 {size // SECTOR} snapshot {device} {dev} N {COW_CHUNK_SECTORS}"])
        undo.callback(_remove, runner, name)
        runner(["dmsetup", "mknodes", name])
        view = f"/dev/mapper/{name}"
        mnt = os.path.join(tmp, "mnt")
        os.mkdir(mnt)
        # nouuid: the origin, with the same UUID, is mounted.
        runner(["mount", "-t", "xfs", "-o", "nouuid", view, mnt])
        mounted = [True]
        undo.callback(_unmount, runner, mnt, mounted)
        runner(["umount", mnt])
        mounted[0] = False
        yield view


def _remove(runner: Runner, name: str) -> None:
    runner(["dmsetup", "remove", "--noudevsync", "--retry", name])
    runner(["dmsetup", "mknodes"])


def _unmount(runner: Runner, mnt: str, mounted: list[bool]) -> None:
    if mounted[0]:
        runner(["umount", "--lazy", mnt])
