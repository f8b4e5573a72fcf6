"""Snapshot space (issue 14, item 4; docs/snapspace.md) on the host: what needs no
device-mapper runs against the real tools, the rest against a fake runner.

- Real lvm2, losetup, systemd-escape and systemd-analyze: `snapspace add` on a VG of a loop
  device, the unit it installs passes `systemd-analyze verify`, `status` sees the PV; a
  simulated reboot (the loop device detached: the PV is missing) is undone by the unit's own
  ExecStart= line; `remove` takes everything apart. Escaping matches `systemd-escape --path`.
- Pure: parsing `pvs`/`lvs` reports, placement, `--snapshot-size auto`, the periods recorded
  in the stats; `remove` refusing while LVs hold extents, and moving them given room.
The tracking snapshots themselves (LVs: device-mapper) are in tests/vm/test_vm_freespace.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from snapship.changes.loop import Loop
from snapship.changes.lvm import (
    SNAPSPACE_TAG,
    LvInfo,
    Lvm,
    LvmError,
    PvInfo,
    parse_lv_devices,
    parse_pvs,
)
from snapship.engine import snapshot_backup
from snapship.engine.snapshot_size import (
    MIN_BYTES,
    Period,
    auto_extents,
    periods_of,
    place,
)
from snapship.errors import SourceError, UsageError
from snapship.formats import manifest
from snapship.snapspace import space, unit
from tests.clihelp import describe, run_cli
from tests.lvmhost import host_vg, losetup
from tests.vm.guest import unit_start

MiB = 1 << 20
ANALYZE = shutil.which("systemd-analyze") or "systemd-analyze"


def systemd_escape(*args: str) -> str:
    return subprocess.run(["systemd-escape", *args], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("path", ["/srv/snapspace/vg0.img", "/var/lib/.hidden/a b.img",
                                  "/x//y/", "/data/vg-0_1:2.img", "/tmp/späce/ü$%.img", "/"])
def test_instance_names_are_systemd_escapes(path: str) -> None:
    assert unit.escape_path(path) == systemd_escape("--path", path)
    name = unit.escape_path(path)
    assert unit.unescape_path(name) == systemd_escape("--unescape", "--path", name)


def status(vg: str, units: Path) -> dict[str, Any]:
    r = run_cli("snapspace", "status", vg, "--unit-dir", units, "--json")
    assert r.returncode == 0, describe(r)
    obj: dict[str, Any] = json.loads(r.stdout)
    return obj


def test_add_reboot_and_remove_on_a_real_vg(tmp_path: Path) -> None:
    units = tmp_path / "units"
    with host_vg(tmp_path) as (vg, _):
        space_file = tmp_path / "space dir" / "vg.img"  # a space: the unit quotes it right
        space_file.parent.mkdir()
        r = run_cli("snapspace", "add", vg, "--file", space_file, "--size", "64M",
                    "--unit-dir", units, "--json")
        assert r.returncode == 0, describe(r)
        added = json.loads(r.stdout)
        dev = added["device"]
        assert added["unit"] == f"snapship-snapspace@{systemd_escape('--path', str(space_file))}" \
            ".service", added
        assert os.stat(space_file).st_size == 64 * MiB
        assert os.stat(space_file).st_blocks * 512 < 8 * MiB  # sparse
        link = units / "local-fs.target.wants" / added["unit"]
        assert os.readlink(link) == str(units / unit.TEMPLATE)
        v = subprocess.run([ANALYZE, "verify", added["unit"]], capture_output=True, text=True,
                           env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"}, check=False,
                           timeout=120)
        assert v.returncode == 0, v.stderr
        [pv] = status(vg, units)["pvs"]
        assert (pv["device"], pv["file"], pv["missing"], pv["unit_enabled"], pv["lvs"]) == \
            (dev, str(space_file), False, True, []), pv
        assert pv["free_extents"] == pv["extents"] == 15, pv  # 64 MiB - 1 MiB of metadata

        # A reboot as far as the PV sees it: the loop device gone, the VG missing a PV.
        losetup("-d", dev)
        [pv] = status(vg, units)["pvs"]
        assert (pv["missing"], pv["device"], pv["file"]) == (True, None, None), pv
        unit_start(str(link))
        [pv] = status(vg, units)["pvs"]
        assert (pv["missing"], pv["file"]) == (False, str(space_file)), pv
        unit_start(str(link))  # a second start attaches nothing more (--nooverlap)
        assert Loop().devices_of(str(space_file)) == [pv["device"]]

        r = run_cli("snapspace", "remove", vg, "--unit-dir", units, "--json")
        assert r.returncode == 0, describe(r)
        [gone] = json.loads(r.stdout)["removed"]
        assert (gone["file"], gone["file_kept"], gone["disabled"]) == (
            str(space_file), False, [str(link)]), gone
        assert not space_file.exists() and not link.exists()
        assert status(vg, units)["pvs"] == []
        assert Loop().devices_of(str(space_file)) == []


def test_add_refuses_what_cannot_work(tmp_path: Path) -> None:
    with host_vg(tmp_path) as (vg, _):
        (tmp_path / "taken.img").write_bytes(b"")
        cases: list[tuple[list[str | Path], int, str]] = [
            (["--file", tmp_path / "taken.img", "--size", "64M"], 2, "exists"),
            (["--file", tmp_path / "small.img", "--size", "1M"], 2, "too small"),
            (["--file", tmp_path / "no" / "x.img", "--size", "64M"], 2, "not a directory")]
        for args, code, words in cases:
            r = run_cli("snapspace", "add", vg, *args, "--no-systemd")
            assert r.returncode == code and words in r.stderr, describe(r)
            assert len(r.stderr.strip().splitlines()) == 1, describe(r)
        r = run_cli("snapspace", "add", vg + "x", "--file", tmp_path / "a.img", "--size", "64M",
                    "--no-systemd")
        assert r.returncode == 1 and "does not exist" in r.stderr, describe(r)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["pv0.img", "taken.img"]
        r = run_cli("snapspace", "remove", vg, "--no-systemd")
        assert r.returncode == 1 and "has no snapshot space" in r.stderr, describe(r)
        r = run_cli("snapspace", "remove", vg, "--file", tmp_path / "taken.img", "--no-systemd")
        assert r.returncode == 1 and "is not snapshot space" in r.stderr, describe(r)
        assert Loop().devices_of(str(tmp_path / "taken.img")) == []  # not left attached


# -- fakes and pure parts ------------------------------------------------------------------


def pv_row(name: str, *, extents: int = 10, allocated: int = 0, tags: str = "",
           missing: bool = False, vg: str = "vg") -> dict[str, str]:
    return {"pv_name": "[unknown]" if missing else name, "vg_name": vg, "pv_uuid": f"u-{name}",
            "pv_size": str(extents * 4 * MiB), "pv_free": str((extents - allocated) * 4 * MiB),
            "vg_extent_size": str(4 * MiB), "pv_pe_count": str(extents),
            "pv_pe_alloc_count": str(allocated), "pv_tags": tags,
            "pv_missing": "missing" if missing else ""}


class FakeLvm:
    def __init__(self, pvs: list[dict[str, str]], lvs: list[dict[str, str]] | None = None
                 ) -> None:
        self.pvs = pvs
        self.lvs = lvs or []
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> str:
        argv = list(argv)
        self.calls.append(argv)
        cmd = argv[1] if argv[0] == "lvm" else argv[0]
        if cmd == "pvs":
            return json.dumps({"report": [{"pv": self.pvs}]})
        if cmd == "vgs":
            return json.dumps({"report": [{"vg": [{"vg_name": "vg"}]}]})
        if cmd == "lvs":
            return json.dumps({"report": [{"lv": self.lvs}]})
        if cmd == "pvmove":
            for p in self.pvs:
                if p["pv_name"] == argv[-1]:
                    p["pv_pe_alloc_count"] = "0"
        return ""

    def ran(self, cmd: str) -> list[list[str]]:
        return [c for c in self.calls if c[:2] == ["lvm", cmd] or c[:1] == [cmd]]


def loop_sys(tmp: Path, devices: dict[str, str]) -> Path:
    for name, backing in devices.items():
        (tmp / "sys" / name / "loop").mkdir(parents=True)
        (tmp / "sys" / name / "loop" / "backing_file").write_text(backing + "\n")
    return tmp / "sys"


def test_remove_refuses_while_lvs_hold_extents_and_moves_them_given_room(tmp_path: Path
                                                                        ) -> None:
    f = tmp_path / "space.img"
    f.write_bytes(b"")
    snap = {"lv_name": "root-snapship-1", "devices": "/dev/loop7(0)"}
    other = {"lv_name": "root", "devices": "/dev/vda(0),/dev/vda(100)"}
    fake = FakeLvm([pv_row("/dev/vda", extents=100, allocated=98),
                    pv_row("/dev/loop7", allocated=3, tags=SNAPSPACE_TAG)], [snap, other])
    sys_block = loop_sys(tmp_path, {"loop7": str(f)})
    loop = Loop(fake, sys_block)
    with pytest.raises(space.SnapspaceError, match=r"holds vg/root-snapship-1: .*--move"):
        space.remove(Lvm(fake), loop, "vg", None, move=False, keep_file=False, unit_dir=None,
                     warn=print)
    with pytest.raises(space.SnapspaceError, match="3 extents needed, the other PVs have 2"):
        space.remove(Lvm(fake), loop, "vg", None, move=True, keep_file=False, unit_dir=None,
                     warn=print)
    assert fake.ran("pvmove") == fake.ran("vgreduce") == [] and f.exists()
    fake.pvs[0]["pv_pe_alloc_count"] = "90"
    r = space.remove(Lvm(fake), loop, "vg", None, move=True, keep_file=True, unit_dir=None,
                     warn=print)
    assert r["removed"] == [{"device": "/dev/loop7", "file": str(f), "file_kept": True,
                             "moved": ["root-snapship-1"], "unit": unit.instance(str(f)),
                             "disabled": []}]
    order = [c[1] if c[0] == "lvm" else c[0] for c in fake.calls
             if c[1] in ("pvmove", "vgreduce", "pvremove") or c[0] == "losetup"]
    assert order == ["pvmove", "vgreduce", "pvremove", "losetup"], fake.calls
    assert f.exists()  # --keep-file


def test_reports_of_pvs_and_lv_devices_parse() -> None:
    out = json.dumps({"report": [{"pv": [pv_row("/dev/vda", allocated=10),
                                         pv_row("x", tags=f"a,{SNAPSPACE_TAG}", missing=True)]}]})
    a, b = parse_pvs(out)
    assert (a.name, a.free_extents, a.snapspace, a.missing) == ("/dev/vda", 0, False, False)
    assert (b.name, b.snapspace, b.missing, b.tags) == ("[unknown]", True, True,
                                                        ("a", SNAPSPACE_TAG))
    lv = json.dumps({"report": [{"lv": [{"lv_name": "s", "devices": "/dev/loop0(0)"},
                                        {"lv_name": "[m]", "devices": "/dev/a(0),/dev/b(3)"},
                                        {"lv_name": "thin", "devices": ""}]}]})
    assert parse_lv_devices(lv) == {"s": ["/dev/loop0"], "[m]": ["/dev/a", "/dev/b"],
                                    "thin": []}
    for bad in ("", "{}", '{"report": [{"pv": [{"pv_name": "x"}]}]}', '{"report": [{"pv": 3}]}'):
        with pytest.raises(LvmError):
            parse_pvs(bad)


def pv(name: str, free: int, *, snapspace: bool = False, missing: bool = False) -> PvInfo:
    return PvInfo(name, "vg", name, free * 4 * MiB, free * 4 * MiB, 4 * MiB, free, 0,
                  (SNAPSPACE_TAG,) if snapspace else (), missing)


def test_placement_prefers_the_named_pvs_then_snapshot_space_then_the_vg() -> None:
    pvs = [pv("/dev/vda", 0), pv("/dev/loop0", 10, snapspace=True),
           pv("/dev/loop1", 10, snapspace=True, missing=True)]
    assert [p.name for p in place(pvs, [], "vg")[0]] == ["/dev/loop0"]
    assert place(pvs, [], "vg")[1] == "snapshot space"
    assert [p.name for p in place(pvs, ["/dev/vda", "/dev/vda"], "vg")[0]] == ["/dev/vda"]
    assert place(pvs[:1], [], "vg") == ([], "the volume group")
    assert place(pvs[::2], [], "vg") == ([], "the volume group")  # its space is missing
    with pytest.raises(UsageError, match="--snapshot-pv /dev/loop1 is not a present PV"):
        place(pvs, ["/dev/loop1"], "vg")


def test_auto_size_from_the_periods_with_headroom_within_what_is_free() -> None:
    ext = 4 * MiB
    origin = 10 << 30
    # no history: 10% of the origin
    assert auto_extents([], origin_size=origin, extent_size=ext, free_extents=10**6)[0] == \
        -(-origin // 10 // ext)
    # 100 MiB over an hour, 300 MiB over 2 hours: 150 MiB/h at most, for 2 h, twice: 600 MiB
    periods = [Period(100 * MiB, 3600), Period(300 * MiB, 7200)]
    n, note = auto_extents(periods, origin_size=origin, extent_size=ext, free_extents=10**6)
    assert n * ext == 600 * MiB and "x2" in note, note
    # an overflowed period counts twice its size: it held at least that
    n, _ = auto_extents([Period(100 * MiB, 3600, overflowed=True)], origin_size=origin,
                        extent_size=ext, free_extents=10**6)
    assert n * ext == 400 * MiB
    # a floor, a ceiling at the origin, and what is free
    assert auto_extents([Period(0, 60)], origin_size=origin, extent_size=ext,
                        free_extents=100)[0] * ext == MIN_BYTES
    n, _ = auto_extents([Period(origin, 60)], origin_size=origin, extent_size=ext,
                        free_extents=10**6)
    assert origin <= n * ext <= origin * 1.02
    n, note = auto_extents(periods, origin_size=origin, extent_size=ext, free_extents=50)
    assert n == 50 and "only 50 extents free" in note
    with pytest.raises(SourceError, match="snapspace add"):
        auto_extents(periods, origin_size=origin, extent_size=ext, free_extents=0)


def test_periods_in_the_stats_are_checked_when_written_and_read_leniently() -> None:
    good = {"snapshot": {"size": 4, "sizing": "auto", "pvs": ["/dev/loop0"],
                         "periods": [{"cow_bytes": 5, "seconds": 60.5, "overflowed": False}]}}
    manifest._check_stats(good)
    assert periods_of(good) == [Period(5, 60.5)]
    bad: dict[str, Any]
    for bad in ({"snapshot": []}, {"snapshot": {"size": -1}}, {"snapshot": {"pvs": [1]}},
                {"snapshot": {"periods": [{"cow_bytes": 1, "seconds": 0, "overflowed": False}]}}):
        with pytest.raises(ValueError, match="snapshot"):
            manifest._check_stats(bad)
        assert periods_of(bad) == []
    lacking = {"snapshot": {"periods": [{"cow_bytes": 1, "seconds": 1}]}}
    with pytest.raises(ValueError, match=r"snapshot\.periods"):
        manifest._check_stats(lacking)
    assert periods_of(lacking) == [Period(1, 1.0)]  # recorded data: read what is there
    assert periods_of({"snapshot": {"periods": [{"cow_bytes": True, "seconds": 1}, 7]}}) == []


def lv(name: str, *, thin: bool = False, origin: str = "") -> LvInfo:
    return LvInfo("vg", name, f"uuid-{name}", 1 << 30, "thin" if thin else "linear", origin,
                  "pool" if thin else "", 1 if thin else None, (), None, "-wi-a-----")


def base_with(periods: list[dict[str, Any]]) -> manifest.Manifest:
    return manifest.Manifest("v", "x", 1 << 30, 1 << 20, "2026-12-01T10:00:00.000Z", "lvm:vg/r",
                             None, b"", array("I"), {}, {"snapshot": {"periods": periods}})


def test_the_snapshot_goes_on_snapshot_space_sized_auto() -> None:
    fake = FakeLvm([pv_row("/dev/vda", extents=256, allocated=256),
                    pv_row("/dev/loop0", extents=64, tags=SNAPSPACE_TAG)])
    lvm = Lvm(fake)
    base = base_with([{"cow_bytes": 40 * MiB, "seconds": 3600, "overflowed": False}])
    periods = snapshot_backup.recorded_periods(lvm, None, base)  # nothing measured: the base's
    assert periods == [Period(40 * MiB, 3600)]
    opts = snapshot_backup.SnapshotOptions(size="auto")
    size, pvs, record = snapshot_backup.snapshot_layout(lvm, lv("r"), periods, opts, print)
    assert (size, pvs) == ("20e", ["/dev/loop0"]), (size, record)  # 80 MiB: 20 extents
    assert record["placement"] == "snapshot space" and record["sizing"] == "auto"
    fake.lvs = [{"lv_name": "s", "vg_name": "vg", "lv_size": str(80 * MiB)}]
    lvm.create_snapshot("vg", "r", "s", size, pvs)
    [create] = fake.ran("lvcreate")
    assert create[-4:] == ["-l", "20", "vg/r", "/dev/loop0"], create
    # a fixed size keeps its argument, on the named PV
    opts = snapshot_backup.SnapshotOptions(size="10%", pvs=("/dev/vda",))
    assert snapshot_backup.snapshot_layout(lvm, lv("r"), [], opts, print)[:2] == (
        "10%", ["/dev/vda"])
    with pytest.raises(UsageError, match="thin snapshot lives in its pool"):
        snapshot_backup.snapshot_layout(lvm, lv("t", thin=True), [], opts, print)
    # everything taken, no snapshot space: auto says where room comes from
    fake.pvs = [pv_row("/dev/vda", extents=256, allocated=256)]
    with pytest.raises(SourceError, match="snapspace add"):
        snapshot_backup.snapshot_layout(lvm, lv("r"), periods,
                                        snapshot_backup.SnapshotOptions(size="auto"), print)
    # the tracking snapshot the base was read from, now 25% full of its 64 MiB: the newest
    # period, measured before the new snapshot is sized
    base.labels[snapshot_backup.LABEL_SNAPSHOT_UUID] = "uuid-old"
    old = {"lv_name": "old", "vg_name": "vg", "lv_uuid": "uuid-old", "lv_size": str(64 * MiB),
           "snap_percent": "25.00", "origin": "r", "lv_attr": "swi-a-s---"}
    fake.lvs = [old]
    tracking = Lvm(fake).lv("vg", "old")
    newest, older = snapshot_backup.recorded_periods(lvm, tracking, base)
    assert newest.cow_bytes == 16 * MiB and not newest.overflowed and newest.seconds > 3600
    assert older == Period(40 * MiB, 3600)
    old["lv_attr"] = "swi-I-s---"  # overflowed: it held at least its size
    assert snapshot_backup.recorded_periods(lvm, tracking, base)[0].cow_bytes == 64 * MiB
    assert snapshot_backup.valid_snapshot_size("auto")
    assert not snapshot_backup.valid_snapshot_size("auto%")


def test_show_says_where_the_snapshot_went() -> None:
    from snapship.cli.reports import _snapshot

    rec = {"snapshot": {"size": 32 * MiB, "pvs": ["/dev/loop0"], "note": "auto: x"}}
    assert _snapshot(rec) == ["snapshot     32.0 MiB on /dev/loop0 (auto: x)"]
    assert _snapshot({"snapshot": {"size": MiB, "pvs": [], "requested": "10%"}}) == [
        "snapshot     1.0 MiB on the volume group (10%)"]
    assert _snapshot({}) == _snapshot({"snapshot": {"size": "x"}}) == []


def test_snapshot_pv_is_for_lvm_sources(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4096))
    r = run_cli("backup", "--repo", tmp_path / "repo", img, "--snapshot-pv", "/dev/loop0")
    assert r.returncode == 2 and "--snapshot-pv is for lvm:VG/LV sources" in r.stderr, describe(r)
    assert not (tmp_path / "repo").exists()
