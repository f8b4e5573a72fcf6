"""The edge to loop devices for snapshot space: attach a file, detach a device, and say which
file a loop device is backed by (docs/snapspace.md).

`losetup` runs through the same kind of `Runner` as lvm2 (changes/lvm.py), so the workflow
above can be driven by a fake; the backing file is read from sysfs, as `losetup` itself does.
"""

from __future__ import annotations

import os
from pathlib import Path

from snapship.changes.lvm import Runner, run

LOSETUP = "losetup"
SYS_BLOCK = Path("/sys/block")


def attach_argv(path: str) -> list[str]:
    """The losetup command that attaches `path`, or finds the device already attached to it:
    `--nooverlap` makes it idempotent, so a second start can never give LVM the same PV
    twice. The systemd unit runs the same command at boot."""
    return [LOSETUP, "--find", "--nooverlap", "--show", path]


class Loop:
    def __init__(self, runner: Runner = run, sys_block: Path = SYS_BLOCK) -> None:
        self.runner = runner
        self.sys_block = sys_block

    def attach(self, path: str) -> str:
        """The loop device of `path` (attached now, or the one it already had)."""
        return self.runner(attach_argv(path)).strip()

    def detach(self, device: str) -> None:
        self.runner([LOSETUP, "--detach", device])

    def backing_file(self, device: str) -> str | None:
        """The file behind loop device `device`, or None if it is none (or not a loop)."""
        name = os.path.basename(device)
        try:
            text = (self.sys_block / name / "loop" / "backing_file").read_text()
        except OSError:
            return None
        return text.rstrip("\n") or None

    def devices_of(self, path: str) -> list[str]:
        """Every loop device attached to `path` (normally one)."""
        want = os.path.realpath(path)
        found = []
        try:
            names = sorted(os.listdir(self.sys_block))
        except OSError:
            return []
        for name in names:
            if name.startswith("loop"):
                backing = self.backing_file(name)
                if backing is not None and os.path.realpath(backing) == want:
                    found.append(f"/dev/{name}")
        return found
