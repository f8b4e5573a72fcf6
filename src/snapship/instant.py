"""The edge to lvm2 and device-mapper for instant restore: the LV's table swapped for a mirror.

An instant restore makes a new linear LV and, while the version is copied into it, gives the
LV's own device-mapper device a `mirror` table (dm-raid1, the target under `pvmove`) whose
first leg is the version on a kernel NBD device and whose second leg is the LV's own extents
(a second dm device, `snapship-instant-*`, with the LV's original linear table). dm-raid1
resyncs region by region from the first leg into the second while both serve I/O: reads go
to the first leg, writes to regions not yet copied go to it alone (the served export is
writable: the writes land in its overlay and are copied with the rest), writes to copied
regions go to both. Once every region is in sync, the LV's original table is loaded back:
a plain LV holding the version plus every write made meanwhile.

Every lvcreate/lvchange/dmsetup call of instant restore is here (changes/lvm.py owns the
other lvm2 uses). Nothing here decides the order of the steps; cli/instant_commands.py does.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from snapship.changes.lvm import LVM_CONFIG, LvmError, mapper_name, run

INCOMPLETE_TAG = "snapship_instant_incomplete"
"""On the LV from its creation until the copy is complete: `lvs -o tags` says it is not a
finished restore, and the LV is also marked to be skipped by activation (`lvchange -ky`), so
after a reboot a half-copied LV is not activated (nor mounted) by accident."""

DATA_PREFIX = "snapship-instant-"
MAX_REGION_SECTORS = 2048
"""Regions of at most 1 MiB: the unit the mirror copies and tracks."""


def _lvm(*args: str) -> str:
    return run(["lvm", args[0], "--config", LVM_CONFIG, *args[1:]])


def lv_exists(vg: str, lv: str) -> bool:
    out = _lvm("lvs", "--reportformat", "json", "-o", "lv_name", vg)
    rows = json.loads(out)["report"][0]["lv"]
    return any(r["lv_name"] == lv for r in rows)


def create_lv(vg: str, lv: str, size: int) -> None:
    """A linear LV of at least `size` bytes, tagged incomplete and skipped by activation."""
    _lvm("lvcreate", "--yes", "--name", lv, "--size", f"{size}b", "--addtag", INCOMPLETE_TAG,
         "--setactivationskip", "y", "--ignoreactivationskip", "--wipesignatures", "n",
         "--zero", "n", vg)


def mark_complete(vg: str, lv: str) -> None:
    _lvm("lvchange", "--deltag", INCOMPLETE_TAG, "--setactivationskip", "n", f"{vg}/{lv}")


def remove_lv(vg: str, lv: str) -> None:
    _lvm("lvremove", "--yes", f"{vg}/{lv}")


def deactivate(vg: str, lv: str) -> None:
    _lvm("lvchange", "--activate", "n", f"{vg}/{lv}")


def device(vg: str, lv: str) -> str:
    return f"/dev/mapper/{mapper_name(vg, lv)}"


def table(name: str) -> str:
    return run(["dmsetup", "table", name]).strip()


# State changes do not wait for udev (none runs in a minimal system, and then libdm would
# wait for it forever); `mknodes` makes or removes the /dev/mapper node itself.


def create_device(name: str, table_text: str) -> str:
    """A new dm device; returns it as MAJOR:MINOR, the way a table names it. Only tables
    name it, so it gets no /dev/mapper node; its number is read from sysfs (each dmsetup
    call costs a process start, seconds under emulation, and this is on the path to a
    usable LV)."""
    run(["dmsetup", "create", "--noudevsync", name, "--table", table_text])
    for entry in Path("/sys/block").glob("dm-*"):
        try:
            if (entry / "dm" / "name").read_text().strip() == name:
                return (entry / "dev").read_text().strip()
        except OSError:
            continue
    out = run(["dmsetup", "info", "-c", "--noheadings", "-o", "major,minor", name])
    return out.strip()


def device_exists(name: str) -> bool:
    return subprocess.run(["dmsetup", "info", name], capture_output=True, check=False,
                          stdin=subprocess.DEVNULL).returncode == 0


def remove_device(name: str) -> None:
    if device_exists(name):
        run(["dmsetup", "remove", "--noudevsync", name])
        run(["dmsetup", "mknodes"])


def open_count(name: str) -> int:
    out = run(["dmsetup", "info", "-c", "--noheadings", "-o", "open", name])
    return int(out.strip())


def swap_table(name: str, table_text: str) -> None:
    """Load a new table into a live device: load it as the inactive table, then resume,
    which suspends the device (in-flight I/O completes, new I/O waits, the file system is
    frozen), swaps the tables and resumes in one ioctl. A mounted file system on it notices
    nothing, and I/O waits only for the swap, not for a dmsetup process to start between
    a suspend and a load."""
    run(["dmsetup", "load", name, "--table", table_text])
    try:
        run(["dmsetup", "resume", "--noudevsync", name])
    except BaseException:
        with contextlib.suppress(LvmError):
            run(["dmsetup", "clear", name])  # the inactive table, never used
        raise


def region_sectors(sectors: int, largest: int = MAX_REGION_SECTORS) -> int:
    """The largest power of two up to `largest` (and 1 MiB) that divides the mirror's
    length."""
    region = 1
    while region * 2 <= min(largest, MAX_REGION_SECTORS):
        region *= 2
    while sectors % region:
        region //= 2
    return region


def mirror_table(sectors: int, source: str, data: str, lv_sectors: int,
                 region: int = MAX_REGION_SECTORS) -> str:  # fmt: skip
    """The LV as a mirror of `sectors`: the NBD device `source` first (the leg every region
    is copied from, and which serves reads), the LV's extents (`data`) second; a `core` log
    (region state in memory: every region starts out of sync). The LV's tail past the version
    (extents round its size up) maps straight to its extents. dm-raid1 copies one region at
    a time: its size is how much copying a read of the file system may have to wait behind."""
    lines = [f"0 {sectors} mirror core 1 {region_sectors(sectors, region)} 2 {source} 0 "
             f"{data} 0 "
             f"1 handle_errors"]
    if lv_sectors > sectors:
        lines.append(f"{sectors} {lv_sectors - sectors} linear {data} {sectors}")
    return "\n".join(lines)


@dataclass(frozen=True)
class MirrorStatus:
    in_sync: int
    regions: int
    health: str
    """One letter per leg: A alive, D a write failed, R a read failed, S the copy failed,
    F flush failed, U unclassified (dm-raid1's status)."""

    @property
    def complete(self) -> bool:
        return self.in_sync == self.regions and set(self.health) == {"A"}

    @property
    def failed(self) -> bool:
        return set(self.health) != {"A"}


def mirror_status(name: str) -> MirrorStatus | None:
    """The mirror's progress, None if the device holds no mirror (any more)."""
    return parse_mirror_status(run(["dmsetup", "status", name]))


def parse_mirror_status(out: str) -> MirrorStatus | None:
    """`dmsetup status` of a device: `START LEN mirror LEGS DEV... IN_SYNC/TOTAL 1 HEALTH
    LOGARGS...` on the mirror's line (other lines: the linear tail)."""
    for line in out.splitlines():
        f = line.split()
        if len(f) > 3 and f[2] == "mirror":
            legs = int(f[3])
            done, total = f[4 + legs].split("/")
            health = f[6 + legs]
            return MirrorStatus(int(done), int(total), health)
    return None
