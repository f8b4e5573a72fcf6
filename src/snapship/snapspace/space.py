"""`snapspace add`, `status` and `remove`: the original recipe for a full VG (a sparse file, a
loop device over it, `pvcreate`, `vgextend`), tagged so snapship knows the PV as its own, and
taken apart again only when nothing lives on it (docs/snapspace.md).

Every lvm2 call goes through `Lvm`, every losetup call through `Loop`; the systemd unit's
files through `snapspace.unit`. Each step that fails undoes the ones before it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from snapship.changes.loop import Loop
from snapship.changes.lvm import SNAPSPACE_TAG, Lvm, PvInfo, mapper_name
from snapship.errors import NotFound, SnapshipError, UsageError
from snapship.snapspace import unit
from snapship.units import human_bytes

Warn = Callable[[str], None]
MIN_SIZE = 16 << 20
"""Room for lvm2's metadata area (1 MiB) and a few extents."""


class SnapspaceError(SnapshipError):
    """Snapshot space cannot be added or removed as asked."""

    kind = "snapspace"


@dataclass(frozen=True)
class SpacePv:
    pv: PvInfo
    file: str | None
    """The loop device's backing file; None for a missing PV or one that is not a loop."""
    lvs: tuple[str, ...]
    """LVs with extents on it (a classic snapshot by its own name)."""

    def report(self, unit_dir: str | None) -> dict[str, object]:
        p = self.pv
        return {
            "vg": p.vg, "device": None if p.missing else p.name, "uuid": p.uuid,
            "missing": p.missing, "file": self.file, "size": p.size,
            "extent_size": p.extent_size, "extents": p.extents,
            "allocated_extents": p.allocated, "free_extents": p.free_extents,
            "free": p.free, "lvs": list(self.lvs),
            "unit": unit.instance(self.file) if self.file else None,
            "unit_enabled": (unit.enabled(unit_dir, self.file)
                             if unit_dir is not None and self.file else None),
        }


def snapspace_pvs(lvm: Lvm, vg: str | None) -> list[PvInfo]:
    return [p for p in lvm.pvs(vg) if p.snapspace]


def describe(lvm: Lvm, loop: Loop, vg: str | None) -> list[SpacePv]:
    """Every snapspace PV of `vg` (of every VG if None): its file and what is on it."""
    pvs = snapspace_pvs(lvm, vg)
    devices: dict[str, dict[str, list[str]]] = {}
    out = []
    for p in pvs:
        if p.vg not in devices:
            devices[p.vg] = lvm.lv_devices(p.vg)
        on = tuple(sorted(name.strip("[]") for name, devs in devices[p.vg].items()
                          if not p.missing and p.name in devs))
        out.append(SpacePv(p, None if p.missing else loop.backing_file(p.name), on))
    return out


def _check_vg(lvm: Lvm, vg: str) -> None:
    if vg not in lvm.vg_names():
        raise NotFound(f"volume group {vg} does not exist")


def _on_vg(lvm: Lvm, vg: str, directory: str) -> str | None:
    """The LV of `vg` whose file system holds `directory`, if one does: a file there could
    not be attached before the VG it completes is active."""
    dev = os.stat(directory).st_dev
    try:
        with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/dm/name") as f:
            dm = f.read().strip()
    except OSError:
        return None
    return next((lv.name for lv in lvm.lvs(vg) if mapper_name(vg, lv.name) == dm), None)


def add(lvm: Lvm, loop: Loop, vg: str, path: str, size: int, *, unit_dir: str | None,
        warn: Warn) -> dict[str, object]:
    """Make `path` (a new sparse file of `size` bytes), attach it, add it to `vg` as a tagged
    PV, and (with `unit_dir`) install and enable the unit that re-attaches it at boot."""
    path = os.path.abspath(path)
    _check_vg(lvm, vg)
    if size < MIN_SIZE:
        raise UsageError(f"--size {human_bytes(size)} is too small for a PV: at least "
                         f"{human_bytes(MIN_SIZE)}")
    if os.path.lexists(path):
        raise UsageError(f"{path} exists: snapspace add makes a new file (remove it, or "
                         "choose another path)")
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise UsageError(f"{directory} is not a directory")
    lv = _on_vg(lvm, vg, directory)
    if lv is not None:
        raise UsageError(f"{path} would be on {vg}/{lv}, an LV of the volume group it extends: "
                         "at boot it could not be attached before that VG is complete")
    st = os.statvfs(directory)
    if st.f_bavail * st.f_frsize < size:
        warn(f"the file system of {path} has {human_bytes(st.f_bavail * st.f_frsize)} free, "
             f"less than {human_bytes(size)}: a snapshot that needs more is invalidated "
             "(its origin is not affected)")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)  # sparse: blocks are allocated as snapshots write them
    finally:
        os.close(fd)
    try:
        device = loop.attach(path)
        try:
            lvm.add_pv(vg, device, SNAPSPACE_TAG)
        except BaseException:
            loop.detach(device)
            raise
    except BaseException:
        os.unlink(path)
        raise
    written = unit.install(unit_dir, path) if unit_dir is not None else []
    pv = next((p for p in lvm.pvs(vg) if p.name == device), None)
    return {"vg": vg, "file": path, "device": device, "size": size,
            "extents": pv.extents if pv else None, "unit": unit.instance(path),
            "unit_dir": unit_dir, "written": written}


def remove(lvm: Lvm, loop: Loop, vg: str, path: str | None, *, move: bool, keep_file: bool,
           unit_dir: str | None, warn: Warn) -> dict[str, object]:
    """Take the snapspace PV of `path` (every snapspace PV of `vg` if None) out of `vg`:
    refused while LVs have extents there, unless `move` and the VG's other PVs have room
    for them (pvmove); then pvremove, detach, disable the unit, delete the file unless
    `keep_file`."""
    _check_vg(lvm, vg)
    if path is not None:
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise NotFound(f"{path} is not a file")
        was = loop.devices_of(path)
        attached = loop.attach(path)  # a detached one is attached again, to be removed
    spaces = describe(lvm, loop, vg)
    if path is not None:
        want = os.path.realpath(path)
        spaces = [s for s in spaces if s.file and os.path.realpath(s.file) == want]
        if not spaces:
            if attached not in was:  # attached only to look: leave it as it was
                loop.detach(attached)
            raise NotFound(f"{path} is not snapshot space of {vg}")
    elif not spaces:
        raise NotFound(f"volume group {vg} has no snapshot space")
    missing = [s.pv.uuid for s in spaces if s.pv.missing]
    if missing:
        raise SnapspaceError(f"snapspace PV {missing[0]} of {vg} is missing: give --file FILE "
                             "to attach and remove it")
    foreign = [s.pv.name for s in spaces if s.file is None]
    if foreign:
        raise SnapspaceError(f"{foreign[0]} of {vg} is tagged {SNAPSPACE_TAG} but is not a "
                             "loop device: remove its tag (pvchange --deltag) or the PV by hand")
    held = [s for s in spaces if s.pv.allocated]
    if held:
        names = ", ".join(f"{vg}/{lv}" for s in held for lv in s.lvs)
        need = sum(s.pv.allocated for s in held)
        leaving = {s.pv.name for s in spaces}
        room = sum(p.free_extents for p in lvm.pvs(vg)
                   if not p.missing and p.name not in leaving)
        if not move:
            raise SnapspaceError(f"snapshot space of {vg} holds {names}: remove them, or give "
                                 f"--move to move them to the VG's other PVs ({need} extents "
                                 f"needed, {room} free)")
        if room < need:
            raise SnapspaceError(f"cannot move {names} off the snapshot space of {vg}: "
                                 f"{need} extents needed, the other PVs have {room} free")
        for s in held:
            lvm.move_extents(s.pv.name)
    removed = []
    for s in spaces:
        lvm.remove_pv(vg, s.pv.name)
        loop.detach(s.pv.name)
        assert s.file is not None  # checked above
        disabled = unit.disable(unit_dir, s.file) if unit_dir is not None else []
        if not keep_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(s.file)
        removed.append({"device": s.pv.name, "file": s.file, "file_kept": keep_file,
                        "moved": list(s.lvs) if s.pv.allocated else [],
                        "unit": unit.instance(s.file), "disabled": disabled})
    return {"vg": vg, "removed": removed}

