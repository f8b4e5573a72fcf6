"""`snapship snapspace add|status|remove`: snapshot space for a full volume group.

The work is `snapspace.space`'s; this module builds the lvm2 and loop edges, picks the unit
directory (none with --no-systemd) and reports.
"""

from __future__ import annotations

import argparse
import os
import subprocess

from snapship.changes.loop import Loop
from snapship.changes.lvm import SNAPSPACE_TAG, Lvm
from snapship.cli import options
from snapship.cli.output import warn
from snapship.cli.reports import Report, emit
from snapship.snapspace import space, unit
from snapship.units import human_bytes


def _unit_dir(args: argparse.Namespace) -> str | None:
    return None if getattr(args, "no_systemd", False) else str(args.unit_dir)


def _reload(unit_dir: str | None) -> None:
    """Tell a running systemd about the unit `add` wrote (or `remove` disabled)."""
    if unit_dir != unit.DEFAULT_UNIT_DIR or not os.path.isdir("/run/systemd/system"):
        return
    p = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True,
                       check=False)
    if p.returncode != 0:
        warn(f"systemctl daemon-reload failed: {p.stderr.strip() or p.returncode}")


def describe_add(r: Report) -> list[str]:
    lines = [f"added {r['file']} ({human_bytes(r['size'])}) to {r['vg']} as {r['device']}, "
             f"tagged {SNAPSPACE_TAG}"]
    if r["unit_dir"] is None:
        lines.append("no systemd unit (--no-systemd): attach it again at every boot, before "
                     f"LVM activates {r['vg']}: losetup --find --nooverlap {r['file']}")
    else:
        lines.append(f"enabled {r['unit']} (re-attaches it at boot)")
    return lines


def cmd_add(args: argparse.Namespace) -> int:
    unit_dir = _unit_dir(args)
    r = space.add(Lvm(), Loop(), args.vg, args.file, args.size, unit_dir=unit_dir, warn=warn)
    _reload(unit_dir)
    emit("snapspace add", r, describe_add, json=args.json)
    return 0


def describe_status(r: Report) -> list[str]:
    if not r["pvs"]:
        return ["no snapshot space" + (f" in {r['vg']}" if r["vg"] else "")]
    lines = []
    for p in r["pvs"]:
        where = "MISSING" if p["missing"] else f"{p['device']} <- {p['file']}"
        lines.append(f"{p['vg']}: {where}: {human_bytes(p['size'])}, {p['free_extents']} of "
                     f"{p['extents']} extents free"
                     + (f", holds {', '.join(p['lvs'])}" if p["lvs"] else "")
                     + ("" if p["unit_enabled"] is not False else ", unit NOT enabled"))
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    unit_dir = str(args.unit_dir)
    spaces = space.describe(Lvm(), Loop(), args.vg)
    emit("snapspace status", {"vg": args.vg, "unit_dir": unit_dir,
                              "pvs": [s.report(unit_dir) for s in spaces]},
         describe_status, json=args.json)
    return 0


def describe_remove(r: Report) -> list[str]:
    return [f"removed {x['device']} ({x['file']}{', kept' if x['file_kept'] else ', deleted'})"
            f" from {r['vg']}" + (f", moved {', '.join(x['moved'])}" if x["moved"] else "")
            for x in r["removed"]]


def cmd_remove(args: argparse.Namespace) -> int:
    unit_dir = _unit_dir(args)
    r = space.remove(Lvm(), Loop(), args.vg, args.file, move=args.move,
                     keep_file=args.keep_file, unit_dir=unit_dir, warn=warn)
    _reload(unit_dir)
    emit("snapspace remove", r, describe_remove, json=args.json)
    return 0


def _unit_options(p: argparse.ArgumentParser, *, no_systemd: bool = True) -> None:
    p.add_argument("--unit-dir", metavar="DIR", default=unit.DEFAULT_UNIT_DIR,
                   help="where the systemd unit goes (default: %(default)s)")
    if no_systemd:
        p.add_argument("--no-systemd", action="store_true",
                       help="leave the systemd unit alone (a host without systemd: attach "
                       "the file at boot by other means)")


def register(sub: options.SubParsers) -> None:
    p = options.add_command(
        sub, "snapspace", summary="snapshot space: loop-device PVs for tracking snapshots",
        description="""
        Classic snapshots need free extents in their VG, and a full VG has none. `snapspace
        add` makes a sparse file, attaches it as a loop device, adds it to the VG as a PV
        tagged snapship-snapspace and enables a systemd unit that attaches it again at boot,
        before LVM activates the VG; `backup lvm:` then puts its tracking snapshots there
        (docs/snapspace.md).""",
        examples=["snapship snapspace add vg0 --file /srv/snapspace/vg0.img --size 20G",
                  "snapship snapspace status --json",
                  "snapship snapspace remove vg0 --move"])
    inner = p.add_subparsers(dest="snapspace_command", required=True, metavar="COMMAND",
                             title="commands")
    a = options.add_command(
        inner, "add", summary="add a sparse file to a VG as snapshot space",
        description="""
        Create FILE (it must not exist; it must not be on an LV of VG itself) as a sparse
        file of SIZE, attach it as a loop device, pvcreate it, vgextend VG with it and tag it
        snapship-snapspace. Then write snapship-snapspace@.service into the unit directory
        and enable its instance for FILE (local-fs.target wants it): at boot it re-attaches
        the file and activates VG. The file's blocks are allocated as snapshots write them.""",
        examples=["snapship snapspace add vg0 --file /srv/snapspace/vg0.img --size 20G",
                  "snapship snapspace add vg0 --file /srv/vg0.img --size 8G --no-systemd"],
        parents=options.parents())
    a.add_argument("vg", help="the volume group to extend")
    a.add_argument("--file", required=True, metavar="PATH", help="the sparse file to create")
    a.add_argument("--size", required=True, metavar="SIZE", type=options.size(1),
                   help="its size (e.g. 20G)")
    _unit_options(a)
    a.set_defaults(func=cmd_add, quiet_report=True)

    s = options.add_command(
        inner, "status", summary="list snapshot space: files, devices, extents, what is on it",
        description="""
        Every PV tagged snapship-snapspace (of VG, or of every VG): its loop device and
        file, its size and free extents, the LVs on it (tracking snapshots), and whether its
        unit is enabled. A PV whose file is not attached is listed as missing.""",
        examples=["snapship snapspace status", "snapship snapspace status vg0 --json"],
        parents=options.parents())
    s.add_argument("vg", nargs="?", help="only this volume group")
    _unit_options(s, no_systemd=False)
    s.set_defaults(func=cmd_status)

    r = options.add_command(
        inner, "remove", summary="take snapshot space out of a VG again",
        description="""
        vgreduce and pvremove the snapshot space of FILE (without --file: all of VG's),
        detach its loop device, disable its unit and delete the file (--keep-file keeps it).
        Refused while LVs (tracking snapshots) have extents there, unless --move moves them
        to the VG's other PVs with pvmove, which needs that much free space there.""",
        examples=["snapship snapspace remove vg0",
                  "snapship snapspace remove vg0 --file /srv/vg0.img --move --keep-file"],
        parents=options.parents())
    r.add_argument("vg", help="the volume group")
    r.add_argument("--file", metavar="PATH", help="only this file's snapshot space")
    r.add_argument("--move", action="store_true",
                   help="move LVs' extents to the VG's other PVs first (pvmove)")
    r.add_argument("--keep-file", action="store_true", help="keep the file")
    _unit_options(r)
    r.set_defaults(func=cmd_remove, quiet_report=True)
