"""Free space and unmapped thin blocks in `backup lvm:` on a real kernel (one VM boot).

1. ext4 and XFS LVs, files written and some deleted (free space holds their data), backed up
   while mounted and busy. XFS: the classic snapshot's log holds unreplayed transactions, so
   everything is read, with the note, and the restore is byte-identical. ext4: LVM's suspend
   freezes it, and ext4's freeze flushes the journal and clears needs_recovery on disk, so the
   snapshot is clean and its free space is skipped (measured here, not assumed).
2. The same LVs unmounted: the free space is not read (bytes read below the used size plus
   metadata); restores pass e2fsck -fn / xfs_repair -n and every file's checksum matches.
3. A thin LV: the first full backup reads only what the pool maps; then a file is deleted,
   `fstrim` discards its blocks and new data is written: the incremental reads only about the
   new data (the discards are recorded as zeroes). Every version restores byte-identical.
"""

from __future__ import annotations

import json
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
for name in x-busy t1 t2; do
  vol=${{name%-busy}}; vol=${{vol%[12]}}
  S restore $vol@$(version /scratch/$name.json) /tmp/out.img > /dev/null
  $G sha /tmp/out.img > /scratch/$name.restored
  rm /tmp/out.img
done
# where free space was skipped: the filesystem checks clean and every file is as it was
for name in e-busy e-clean x-clean; do
  fs=${{name%-*}}
  vol=$name
  if [ $name = e-busy ]; then vol=e; fi
  S restore $vol@$(version /scratch/$name.json) /tmp/out.img > /dev/null
  rc=0
  if [ $fs = e ]; then e2fsck -fn /tmp/out.img > /scratch/$name.fsck 2>&1 || rc=$?
  else xfs_repair -n /tmp/out.img > /scratch/$name.fsck 2>&1 || rc=$?; fi
  echo $rc > /scratch/$name.fsck.rc
  if [ $fs = e ]; then opts=loop,ro; else opts=loop,ro,nouuid; fi
  mount -o $opts /tmp/out.img /tmp/mnt
  (cd /tmp/mnt && sha256sum f1 f5) > /scratch/$name.restored-files
  umount /tmp/mnt
  rm /tmp/out.img
done
"""


def load(scratch: Path, name: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads((scratch / f"{name}.json").read_text())
    return info


def test_free_space_and_thin_mappings(tmp_path: Path) -> None:
    res = run_in_vm(SCRIPT, disks={"pv": 2 << 30}, timeout=1800, workdir=tmp_path).check()
    sc = res.scratch

    def read(name: str) -> str:
        return (sc / name).read_text().strip()

    # XFS, mounted and busy: the snapshot's log is dirty, so everything is read.
    busy = load(sc, "x-busy")
    f = busy["stats"]["free_space"]
    assert f["filesystem"] == "xfs" and f["skipped"] is False, f
    assert "its log" in f["note"], f
    assert busy["stats"]["bytes_read"] == 320 * MiB
    err = read("x-busy.err")
    assert "reading free space too" in err and "its log" in err, err
    assert read("x-busy.restored") == read("x-busy.sha")
    # ext4, mounted and busy: the frozen snapshot is clean, and is used as such.
    busy = load(sc, "e-busy")
    assert busy["stats"]["free_space"]["skipped"] is True, busy["stats"]
    assert "reading free space" not in read("e-busy.err")

    for name, size in (("e-busy", 128 * MiB), ("e-clean", 128 * MiB), ("x-clean", 320 * MiB)):
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
