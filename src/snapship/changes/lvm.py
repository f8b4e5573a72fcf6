"""The edge to lvm2 and device-mapper: the only module that runs `lvs`, `pvs`, `lvcreate`,
`lvremove`, `dmsetup` and `thin_delta`: it reads LVs and PVs, makes and removes snapshots
(placed on given PVs), makes the LVs a restore writes into, and adds and removes the PVs of
snapshot space (`pvcreate`, `vgextend`, `vgreduce`, `pvmove`, `pvremove`; docs/snapspace.md).

Everything goes through a `Runner` (argv -> stdout), so the workflow above it can be driven by
a fake in unit tests and by the real tools in the VM tests. lvm2 is always given a config that
works without udev (device links may be missing; `/dev/mapper` names are used instead).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from snapship.errors import SnapshipError, SourceError

Runner = Callable[[Sequence[str]], str]

LVM_CONFIG = (
    "activation{udev_sync=0 udev_rules=0 monitoring=0} "
    "devices{obtain_device_list_from_udev=0} backup{backup=0 archive=0}"
)
TAG = "snapship"
"""Every snapshot snapship creates carries this tag, so it never touches anyone else's."""
SNAPSPACE_TAG = "snapship-snapspace"
"""Every PV `snapship snapspace add` adds to a VG carries this tag (docs/snapspace.md)."""


class LvmError(SnapshipError):
    """An lvm2 or dmsetup command failed."""

    kind = "lvm"


def run(argv: Sequence[str]) -> str:
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, check=False,
                           stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise LvmError(f"{argv[0]} is not installed (needed for LVM volumes)") from None
    if p.returncode != 0:
        detail = (p.stderr.strip() or p.stdout.strip()).splitlines()
        raise LvmError(f"{' '.join(argv[:2])} failed: {detail[-1] if detail else p.returncode}")
    return p.stdout


def mapper_name(vg: str, lv: str) -> str:
    """device-mapper name of an LV: dashes inside names are doubled."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


@dataclass(frozen=True)
class LvInfo:
    vg: str
    name: str
    uuid: str
    size: int
    segtype: str
    origin: str
    pool: str
    thin_id: int | None
    tags: tuple[str, ...]
    snap_percent: float | None
    attr: str

    @property
    def device(self) -> str:
        return f"/dev/mapper/{mapper_name(self.vg, self.name)}"

    @property
    def cow_device(self) -> str:
        return self.device + "-cow"

    @property
    def is_thin(self) -> bool:
        return self.segtype == "thin"

    @property
    def invalid(self) -> bool:
        # lv_attr: 5th char is the state; 'I' = invalid snapshot
        return len(self.attr) > 4 and self.attr[4] == "I"


@dataclass(frozen=True)
class PvInfo:
    name: str
    """The device (`/dev/loop3`), or `[unknown]` for a missing PV."""
    vg: str
    uuid: str
    size: int
    free: int
    extent_size: int
    extents: int
    allocated: int
    """Extents in use by LVs."""
    tags: tuple[str, ...]
    missing: bool

    @property
    def free_extents(self) -> int:
        return self.extents - self.allocated

    @property
    def snapspace(self) -> bool:
        return SNAPSPACE_TAG in self.tags


_FIELDS = (
    "lv_name,vg_name,lv_uuid,lv_size,segtype,origin,pool_lv,thin_id,lv_tags,snap_percent,lv_attr"
)
_PV_FIELDS = ("pv_name,vg_name,pv_uuid,pv_size,pv_free,vg_extent_size,pv_pe_count,"
              "pv_pe_alloc_count,pv_tags,pv_missing")


def _report(out: str, kind: str) -> list[dict[str, str]]:
    """The rows of an lvm2 `--reportformat json` report."""
    try:
        rows = json.loads(out)["report"][0][kind]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise LvmError(f"cannot parse {kind}s output: {e}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise LvmError(f"cannot parse {kind}s output: not a list of rows")
    return rows


def parse_pvs(out: str) -> list[PvInfo]:
    """`pvs --reportformat json --units b --nosuffix -o` _PV_FIELDS, as PvInfo."""
    try:
        return [PvInfo(
            name=r["pv_name"], vg=r.get("vg_name", ""), uuid=r.get("pv_uuid", ""),
            size=int(r["pv_size"]), free=int(r["pv_free"]),
            extent_size=int(r["vg_extent_size"] or 0), extents=int(r["pv_pe_count"] or 0),
            allocated=int(r["pv_pe_alloc_count"] or 0),
            tags=tuple(t for t in r.get("pv_tags", "").split(",") if t),
            missing=r.get("pv_missing", "") not in ("", "0"))
            for r in _report(out, "pv")]
    except (KeyError, ValueError) as e:
        raise LvmError(f"cannot parse pvs output: {e!r}") from None


def parse_lv_devices(out: str) -> dict[str, list[str]]:
    """`lvs -a -o lv_name,devices --reportformat json`: each LV's PVs (`/dev/loop0(12)` ->
    `/dev/loop0`); a classic snapshot's row names its COW's PVs. Hidden LVs (`[x]`) keep
    their brackets."""
    found: dict[str, list[str]] = {}
    for r in _report(out, "lv"):
        devs = [d.rsplit("(", 1)[0] for d in r.get("devices", "").split(",") if d]
        found.setdefault(r.get("lv_name", ""), []).extend(devs)
    return found


class Lvm:
    def __init__(self, runner: Runner = run) -> None:
        self.runner = runner

    def _lvm(self, *args: str) -> str:
        return self.runner(["lvm", args[0], "--config", LVM_CONFIG, *args[1:]])

    def lvs(self, vg: str) -> list[LvInfo]:
        out = self._lvm("lvs", "--reportformat", "json", "--units", "b", "--nosuffix",
                        "-o", _FIELDS, vg)
        return [_info(r) for r in _report(out, "lv")]

    def pvs(self, vg: str | None = None) -> list[PvInfo]:
        """The PVs of `vg` (every VG's, and PVs in none, if None), missing ones included."""
        select = ["-S", f"vg_name={vg}"] if vg is not None else []
        return parse_pvs(self._lvm("pvs", "--reportformat", "json", "--units", "b",
                                   "--nosuffix", "-o", _PV_FIELDS, *select))

    def vg_names(self) -> list[str]:
        out = self._lvm("vgs", "--reportformat", "json", "-o", "vg_name")
        return [r["vg_name"] for r in _report(out, "vg") if "vg_name" in r]

    def lv_devices(self, vg: str) -> dict[str, list[str]]:
        """Each LV of `vg` (hidden ones too) -> the PVs its extents are on."""
        return parse_lv_devices(self._lvm("lvs", "-a", "--reportformat", "json", "-o",
                                          "lv_name,devices", vg))

    def add_pv(self, vg: str, device: str, tag: str) -> None:
        """pvcreate `device`, add it to `vg`, tag it. Undone step by step if a step fails."""
        self._lvm("pvcreate", "--yes", device)
        try:
            self._lvm("vgextend", vg, device)
            try:
                self._lvm("pvchange", "--addtag", tag, device)
            except LvmError:
                self._lvm("vgreduce", vg, device)
                raise
        except LvmError:
            self._lvm("pvremove", "--yes", device)
            raise

    def move_extents(self, device: str) -> None:
        """pvmove every allocated extent of `device` to the other PVs of its VG."""
        self._lvm("pvmove", "-i", "1", device)

    def remove_pv(self, vg: str, device: str) -> None:
        """vgreduce `device` out of `vg` (it must hold no extents), then pvremove it."""
        self._lvm("vgreduce", vg, device)
        self._lvm("pvremove", "--yes", device)

    def lv(self, vg: str, name: str) -> LvInfo:
        for info in self.lvs(vg):
            if info.name == name:
                return info
        raise SourceError(f"logical volume {vg}/{name} does not exist")

    def snapshots_of(self, vg: str, origin: str) -> list[LvInfo]:
        """snapship's own snapshots of `origin`, oldest name first."""
        return sorted(
            (i for i in self.lvs(vg) if i.origin == origin and TAG in i.tags),
            key=lambda i: i.name,
        )

    def create_snapshot(self, vg: str, origin: str, name: str, size: str | None,
                        pvs: Sequence[str] = ()) -> LvInfo:
        """A classic snapshot of `size` (`-L 2G`, `-l 10%ORIGIN`, or `-l N` for `N` extents
        given as `Ne`) with its COW on `pvs` if given, or a thin one if `size` is None."""
        args = ["lvcreate", "-s", "-n", name, "--addtag", TAG]
        if size is None:
            args += ["-kn", "-ay"]  # thin snapshots skip activation unless told otherwise
        elif size.endswith("%"):
            args += ["-l", size + "ORIGIN"]
        elif size.endswith("e"):
            args += ["-l", size[:-1]]
        else:
            args += ["-L", size]
        self._lvm(*args, f"{vg}/{origin}", *(pvs if size is not None else ()))
        return self.lv(vg, name)

    def find(self, vg: str, name: str) -> LvInfo | None:
        """The LV, or None if the volume group has none of that name."""
        return next((i for i in self.lvs(vg) if i.name == name), None)

    def create_lv(self, vg: str, name: str, size: int, *, thin_pool: str | None = None,
                  pvs: Sequence[str] = ()) -> LvInfo:
        """A new, active LV of at least `size` bytes (lvm2 rounds up to whole extents): thin
        in `thin_pool`, else linear, on `pvs` if given. Signatures left on the extents by an
        earlier LV are wiped, so the new LV starts out carrying none."""
        args = ["lvcreate", "-n", name, "--yes", "--wipesignatures", "y", "-ay"]
        size = -(-size // 512) * 512  # whole sectors; lvm2 rounds up to extents from there
        if thin_pool is not None:
            if pvs:
                raise LvmError("a thin LV is placed by its pool: --pv goes with linear LVs")
            args += ["-V", f"{size}b", "--thinpool", thin_pool, vg]
        else:
            args += ["-L", f"{size}b", vg, *pvs]
        self._lvm(*args)
        return self.lv(vg, name)

    def remove(self, vg: str, name: str) -> None:
        self._lvm("lvremove", "-f", f"{vg}/{name}")

    def thin_delta(self, vg: str, pool: str, thin_id1: int, thin_id2: int) -> str:
        """thin_delta XML between two thin devices (`_on_metadata_snap`)."""
        return self._on_metadata_snap(vg, pool, ["thin_delta", "--metadata-snap", "--snap1",
                                                 str(thin_id1), "--snap2", str(thin_id2)])

    def thin_dump(self, vg: str, pool: str, thin_id: int) -> str:
        """thin_dump XML of one thin device's mappings (`_on_metadata_snap`)."""
        return self._on_metadata_snap(vg, pool, ["thin_dump", "--metadata-snap", "--dev-id",
                                                 str(thin_id)])

    def _on_metadata_snap(self, vg: str, pool: str, argv: list[str]) -> str:
        """Run a thin tool on the pool's metadata device under a reserved metadata snapshot,
        released again whatever happens."""
        tpool = mapper_name(vg, pool) + "-tpool"
        tmeta = f"/dev/mapper/{mapper_name(vg, pool + '_tmeta')}"
        self.runner(["dmsetup", "message", tpool, "0", "reserve_metadata_snap"])
        try:
            return self.runner([*argv, tmeta])
        finally:
            self.runner(["dmsetup", "message", tpool, "0", "release_metadata_snap"])


def _info(r: dict[str, str]) -> LvInfo:
    pct = r.get("snap_percent", "")
    tid = r.get("thin_id", "")
    return LvInfo(
        vg=r["vg_name"],
        name=r["lv_name"],
        uuid=r.get("lv_uuid", ""),
        size=int(r["lv_size"]),
        segtype=r.get("segtype", ""),
        origin=r.get("origin", ""),
        pool=r.get("pool_lv", ""),
        thin_id=int(tid) if tid.strip() else None,
        tags=tuple(t for t in r.get("lv_tags", "").split(",") if t),
        snap_percent=float(pct) if pct.strip() else None,
        attr=r.get("lv_attr", ""),
    )
