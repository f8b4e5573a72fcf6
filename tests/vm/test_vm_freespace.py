"""Free space and unmapped thin blocks in `backup lvm:` on a real kernel (one VM boot).

1. ext4 and XFS LVs, files written and some deleted (free space holds their data), backed up
   while mounted and busy. XFS: the classic snapshot's log holds unreplayed transactions, so
   its free space is read from a throwaway dm-snapshot view of it with the log replayed
   (logreplay.py), and nothing of the view is left. ext4: LVM's suspend freezes it, and
   ext4's freeze flushes the journal and clears needs_recovery on disk, so the snapshot is
   clean and its free space is skipped (measured here, not assumed). Both restores pass
   fsck (XFS after the mount that replays its log) with every file's checksum equal.
2. The same LVs unmounted: the free space is not read (bytes read below the used size plus
   metadata); restores pass e2fsck -fn / xfs_repair -n and every file's checksum matches.
3. A thin LV: the first full backup reads only what the pool maps; then a file is deleted,
   `fstrim` discards its blocks and new data is written: the incremental reads only about the
   new data (the discards are recorded as zeroes). Every version restores byte-identical.
4. Snapshot space (docs/snapspace.md): the VG has no free extents; `snapspace add` gives it a
   loop PV and the tracking snapshots land there (`lvs -o devices`), sized `auto`. A simulated
   reboot (VG deactivated, loop device detached) is undone by the start command of the unit
   `snapspace add` installed (parsed from the unit, run by hand: the guest has no systemd);
   the VG activates, the next backup is incremental and restores byte-identical. `snapspace
   remove` is refused while the snapshot is there and, given room, moves it off (pvmove).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.vm.harness import run_in_vm

pytestmark = pytest.mark.slow

GUEST = Path(__file__).resolve().parent / "guest.py"
MiB = 1 << 20

SCRIPT = f"""
set -euo pipefail
export SNAPSHIP_REPO=/tmp/repo/r
G="$PYTHON {GUEST}"
S() {{ $PYTHON -m snapship.cli.main "$@"; }}
# bk NAME VOLUME LV ARGS...: back up lvm:vg/LV as VOLUME, keep its JSON and stderr, and the
# checksum of the snapshot it read (the tracking snapshot, still in place)
bk() {{
  local name=$1 vol=$2 lv=$3; shift 3
  S backup lvm:vg/$lv --volume $vol --json "$@" > /scratch/$name.json 2> /scratch/$name.err
  $G sha "$($G snapdev $vol)" > /scratch/$name.sha
}}
version() {{ $PYTHON -c 'import json,sys; print(json.load(open(sys.argv[1]))["version_id"])' $1; }}
pvcreate -q /dev/vda
vgcreate -q vg /dev/vda
mkdir -p /tmp/repo /tmp/e /tmp/x /tmp/t /tmp/mnt
lvcreate -q -y -L 160M -n repo vg
mkfs.ext4 -q -m 0 /dev/mapper/vg-repo
mount /dev/mapper/vg-repo /tmp/repo
S init --encryption none > /dev/null

lvcreate -q -y -L 128M -n e vg
mkfs.ext4 -q /dev/mapper/vg-e
lvcreate -q -y -L 320M -n x vg
mkfs.xfs -q /dev/mapper/vg-x
for fs in e x; do
  mount /dev/mapper/vg-$fs /tmp/$fs
  for i in 1 2 3 4 5; do dd if=/dev/urandom of=/tmp/$fs/f$i bs=1M count=6 status=none; done
  sync
  rm /tmp/$fs/f2 /tmp/$fs/f3 /tmp/$fs/f4
  sync
  (cd /tmp/$fs && sha256sum f1 f5) > /scratch/$fs.files
done

# 1. mounted and busy: a writer keeps changing a file while the snapshot is taken and read
for fs in e x; do
  (while :; do dd if=/dev/urandom of=/tmp/$fs/busy bs=64K count=4 conv=notrunc status=none
     sleep 0.2; done) &
  W=$!
  bk $fs-busy $fs $fs
  kill $W; wait $W || true
done

# 2. unmounted: clean; a volume of its own, so this is a full read too
for fs in e x; do
  rm /tmp/$fs/busy
  (cd /tmp/$fs && sha256sum f1 f5) > /scratch/$fs.files
  umount /tmp/$fs
  bk $fs-clean $fs-clean $fs
done

# 3. thin: the full read skips unmapped blocks, the incremental skips what fstrim discarded
lvcreate -q -y -L 400M -T vg/pool
lvcreate -q -y -V 256M -T vg/pool -n t
mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/vg-t
mount /dev/mapper/vg-t /tmp/t
dd if=/dev/urandom of=/tmp/t/a bs=1M count=8 status=none
dd if=/dev/urandom of=/tmp/t/b bs=1M count=8 status=none
sync
bk t1 t t --no-skip-free
# c first: written after the deletion, ext4 would reuse b's blocks (changed, not discarded)
dd if=/dev/urandom of=/tmp/t/c bs=1M count=4 status=none
sync
rm /tmp/t/b
sync
fstrim /tmp/t
bk t2 t t --no-skip-free
umount /tmp/t

# restores: byte-identical to the snapshot read where nothing was skipped as free space
for name in t1 t2; do
  vol=${{name%[12]}}
  S restore $vol@$(version /scratch/$name.json) /tmp/out.img > /dev/null
  $G sha /tmp/out.img > /scratch/$name.restored
  rm /tmp/out.img
done
# where free space was skipped: the filesystem checks clean and every file is as it was
# (the busy XFS image holds its snapshot's log as it was: a read-write mount replays it first)
for name in e-busy e-clean x-busy x-clean; do
  fs=${{name%-*}}
  vol=$name
  if [ $name = e-busy ]; then vol=e; fi
  if [ $name = x-busy ]; then vol=x; fi
  S restore $vol@$(version /scratch/$name.json) /tmp/out.img > /dev/null
  if [ $name = x-busy ]; then
    mount -o loop,nouuid /tmp/out.img /tmp/mnt
    (cd /tmp/mnt && sha256sum f1 f5) > /scratch/$name.restored-files
    umount /tmp/mnt
  fi
  rc=0
  if [ $fs = e ]; then e2fsck -fn /tmp/out.img > /scratch/$name.fsck 2>&1 || rc=$?
  else xfs_repair -n /tmp/out.img > /scratch/$name.fsck 2>&1 || rc=$?; fi
  echo $rc > /scratch/$name.fsck.rc
  if [ $name != x-busy ]; then
    if [ $fs = e ]; then opts=loop,ro; else opts=loop,ro,nouuid; fi
    mount -o $opts /tmp/out.img /tmp/mnt
    (cd /tmp/mnt && sha256sum f1 f5) > /scratch/$name.restored-files
    umount /tmp/mnt
  fi
  rm /tmp/out.img
done
# the throwaway views are gone: no dm device, loop device or file of theirs is left
dmsetup ls | grep -c snapship-replay > /scratch/replay-left || true
losetup -a | grep -c snapship-replay >> /scratch/replay-left || true
ls "$($PYTHON -c 'import tempfile; print(tempfile.gettempdir())')" | grep -c snapship-replay \
  >> /scratch/replay-left || true

# 4. snapshot space: a VG with no free extents gets a loop PV; the tracking snapshots go there
lvcreate -q -y -L 64M -n s vg
mkfs.ext4 -q /dev/mapper/vg-s
mkdir -p /tmp/s /tmp/space
mount /dev/mapper/vg-s /tmp/s
dd if=/dev/urandom of=/tmp/s/a bs=1M count=8 status=none
sync
lvcreate -q -y -l 100%FREE -n fill vg
vgs --noheadings -o vg_free_count vg | tr -d ' ' > /scratch/sp-free-before
S snapspace add vg --file /tmp/space/vg.img --size 256M --unit-dir /tmp/units --json \
  > /scratch/sp-add.json
LOOP=$($PYTHON -c 'import json,sys; print(json.load(open(sys.argv[1]))["device"])' \
  /scratch/sp-add.json)
bk s1 s s --snapshot-size auto --no-skip-free
lvs --noheadings -o lv_name,devices vg > /scratch/sp-lvs1
dd if=/dev/urandom of=/tmp/s/a bs=1M count=4 conv=notrunc status=none
sync
bk s2 s s --snapshot-size auto --no-skip-free
S snapspace status --unit-dir /tmp/units --json > /scratch/sp-status.json
# a simulated reboot: nothing active, the loop device gone, /run/lvm's online records gone
umount /tmp/s
umount /tmp/repo
vgchange -q -an vg
losetup -d $LOOP
rm -rf /run/lvm/pvs_online /run/lvm/vgs_online
vgs --noheadings -o vg_missing_pv_count vg 2>/dev/null | tr -d ' ' > /scratch/sp-missing
$G unit-start /tmp/units/local-fs.target.wants/snapship-snapspace@*.service
vgs --noheadings -o vg_missing_pv_count vg | tr -d ' ' > /scratch/sp-missing-after
mount /dev/mapper/vg-repo /tmp/repo
mount /dev/mapper/vg-s /tmp/s
dd if=/dev/urandom of=/tmp/s/b bs=1M count=2 status=none
sync
bk s3 s s --snapshot-size auto --no-skip-free
S restore s@$(version /scratch/s3.json) /tmp/out.img > /dev/null
$G sha /tmp/out.img > /scratch/s3.restored
rm /tmp/out.img
# remove: refused while the tracking snapshot is there; with room elsewhere, --move moves it
rc=0; S snapspace remove vg --unit-dir /tmp/units 2> /scratch/sp-refused || rc=$?
echo $rc > /scratch/sp-refused.rc
lvremove -q -y vg/fill
S snapspace remove vg --move --unit-dir /tmp/units --json > /scratch/sp-remove.json
lvs --noheadings -o lv_name,devices vg > /scratch/sp-lvs-after
losetup -l -n -O NAME,BACK-FILE > /scratch/sp-losetup-after
ls /tmp/space /tmp/units/local-fs.target.wants > /scratch/sp-files-after 2>&1 || true
"""


def load(scratch: Path, name: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads((scratch / f"{name}.json").read_text())
    return info


def test_free_space_and_thin_mappings(tmp_path: Path) -> None:
    res = run_in_vm(SCRIPT, disks={"pv": 2 << 30}, timeout=1800, workdir=tmp_path).check()
    sc = res.scratch

    def read(name: str) -> str:
        return (sc / name).read_text().strip()

    # XFS, mounted and busy: the snapshot's log is not clean; its free space is read from a
    # throwaway view with the log replayed, and the view is gone afterwards.
    busy = load(sc, "x-busy")
    f = busy["stats"]["free_space"]
    assert f["filesystem"] == "xfs" and f["skipped"] is True and f["log_replayed"] is True, f
    assert "after replaying the log" in f["note"] and "its log" in f["note"], f
    assert "reading free space too" not in read("x-busy.err"), read("x-busy.err")
    assert read("replay-left").split() == ["0", "0", "0"], read("replay-left")
    # ext4, mounted and busy: the frozen snapshot is clean, and is used as such.
    busy = load(sc, "e-busy")
    assert busy["stats"]["free_space"]["skipped"] is True, busy["stats"]
    assert "reading free space" not in read("e-busy.err")

    for name, size in (("e-busy", 128 * MiB), ("e-clean", 128 * MiB), ("x-busy", 320 * MiB),
                       ("x-clean", 320 * MiB)):
        s = load(sc, name)["stats"]
        f = s["free_space"]
        assert f["skipped"] is True and f["chunks_skipped"] > 0, (name, f)
        assert s["bytes_read"] + f["bytes_skipped"] == size
        # Used size plus metadata, never the deleted files' 18 MiB: 12 MiB of files left,
        # journal or log, inode tables/bitmaps, rounded up to whole chunks.
        assert s["bytes_read"] <= size - f["free_bytes"] + f["bytes_zeroed"], (name, f)
        assert s["bytes_read"] < (40 * MiB if name[0] == "e" else 96 * MiB), (name, s)
        assert read(f"{name}.fsck.rc") == "0", read(f"{name}.fsck")
        assert read(f"{name}.restored-files") == read(f"{name[0]}.files"), name

    t1, t2 = load(sc, "t1")["stats"], load(sc, "t2")["stats"]
    assert t1["mode"] == "full"
    assert t1["free_space"]["unmapped_bytes"] > 128 * MiB, t1  # most of 256 MiB is unmapped
    assert t1["bytes_read"] + t1["free_space"]["bytes_skipped"] == 256 * MiB
    assert t1["bytes_read"] <= 256 * MiB - t1["free_space"]["unmapped_bytes"] + 32 * MiB, t1
    assert (t2["mode"], t2["change_source"]) == ("incremental", "thin_delta"), t2
    assert t2["free_space"]["unmapped_bytes"] >= 7 * MiB, t2  # b's 8 MiB, discarded
    # c's 4 MiB and the metadata its writes and the deletion changed; b's discarded 8 MiB are
    # recorded as zeroes without being read (at least 7 whole chunks of them).
    assert t2["free_space"]["chunks_skipped"] >= 7, t2
    assert t2["bytes_read"] <= 4 * MiB + 10 * MiB, t2
    for name in ("t1", "t2"):
        assert read(f"{name}.restored") == read(f"{name}.sha"), name
    check_snapspace(sc, read)


def check_snapspace(sc: Path, read: Callable[[str], str]) -> None:
    assert read("sp-free-before") == "0"
    added = load(sc, "sp-add")
    loop = added["device"]
    assert loop.startswith("/dev/loop") and added["file"] == "/tmp/space/vg.img", added
    assert added["unit"] == "snapship-snapspace@tmp-space-vg.img.service", added
    s1, s2, s3 = (load(sc, n) for n in ("s1", "s2", "s3"))
    snap1 = s1["labels"]["snapship.snapshot"].split("/")[1]
    # lvs -o devices: the tracking snapshot's extents are on the loop PV, nowhere else
    rows = {w[0]: w[1:] for w in map(str.split, read("sp-lvs1").splitlines())}
    assert rows[snap1] == [f"{loop}(0)"], rows
    rec1 = s1["stats"]["snapshot"]
    assert (rec1["placement"], rec1["pvs"], rec1["sizing"]) == ("snapshot space", [loop],
                                                                "auto"), rec1
    assert "no period recorded" in rec1["note"] and rec1["size"] == 32 * MiB, rec1  # the floor
    assert s2["stats"]["mode"] == "incremental", s2["stats"]
    p = s2["stats"]["snapshot"]["periods"]
    assert len(p) == 1 and 4 * MiB <= p[0]["cow_bytes"] <= 16 * MiB, p  # the 4 MiB rewritten
    assert p[0]["overflowed"] is False and p[0]["seconds"] > 0, p
    status = load(sc, "sp-status")["pvs"]
    assert [(x["device"], x["file"], x["unit_enabled"]) for x in status] == \
        [(loop, "/tmp/space/vg.img", True)], status
    snap2 = s2["labels"]["snapship.snapshot"].split("/")[1]
    assert status[0]["lvs"] == [snap2] and status[0]["allocated_extents"] > 0, status
    # the simulated reboot: one PV missing, then none; the next backup is incremental
    assert (read("sp-missing"), read("sp-missing-after")) == ("1", "0")
    assert (s3["stats"]["mode"], s3["stats"]["change_source"]) == ("incremental",
                                                                    "COW table"), s3["stats"]
    assert s3["stats"]["bytes_read"] <= 12 * MiB, s3["stats"]  # b's 2 MiB, journal, metadata
    assert len(s3["stats"]["snapshot"]["periods"]) == 2, s3["stats"]["snapshot"]
    assert read("s3.restored") == read("s3.sha")
    assert read("sp-refused.rc") == "1", read("sp-refused")
    assert f"vg/{s3['labels']['snapship.snapshot'].split('/')[1]}" in read("sp-refused")
    assert "--move" in read("sp-refused"), read("sp-refused")
    removed = load(sc, "sp-remove")["removed"]
    assert [(x["device"], x["file_kept"]) for x in removed] == [(loop, False)], removed
    assert loop not in read("sp-lvs-after") and loop not in read("sp-losetup-after")
    assert "vg.img" not in read("sp-files-after") and "snapship-snapspace@" not in \
        read("sp-files-after"), read("sp-files-after")
