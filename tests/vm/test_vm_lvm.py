"""Incremental backups of real LVM volumes (classic COW and thin) in a VM with a real kernel.

Each scenario boots one VM and runs a sequence of rounds: write to an XFS file system on an
LV (files created, overwritten, deleted) or to the raw LV, back up through snapship, and record
a checksum of the snapshot the backup read (still in place as the tracking snapshot). At the
end every version is restored and compared with its checksum. The host side then checks what
each round read, and why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.vm.harness import VmResult, run_in_vm

pytestmark = pytest.mark.slow

GUEST = Path(__file__).resolve().parent / "guest.py"
MiB = 1 << 20

COMMON = f"""
set -euo pipefail
export SNAPSHIP_REPO=/tmp/repo/r SNAPSHIP_PASSPHRASE=vm
G="$PYTHON {GUEST}"
S() {{ $PYTHON -m snapship.cli.main "$@"; }}
# bk NAME ARGS...: back up, keep its JSON and stderr, checksum the snapshot it read.
# --no-skip-free: these rounds compare restores with the snapshot byte for byte, and the raw
# writes land in the filesystem's free space (tests/vm/test_vm_freespace.py covers the skip).
bk() {{
  local name=$1; shift
  S backup "$SRC" --volume vol --json --no-skip-free "$@" > /scratch/$name.backup.json \
    2> /scratch/$name.err
  $G sha "$($G snapdev vol)" > /scratch/$name.sha
}}
restore_all() {{
  for f in /scratch/*.backup.json; do
    name=$(basename $f .backup.json)
    v=$($PYTHON -c 'import json,sys; print(json.load(open(sys.argv[1]))["version_id"])' $f)
    S restore vol@$v /tmp/repo/out.img > /dev/null
    $G sha /tmp/repo/out.img > /scratch/$name.restored
    rm /tmp/repo/out.img
  done
}}
raw() {{  # raw OFFSET_KIB LENGTH_KIB: random data straight onto the LV
  dd if=/dev/urandom of=$DEV bs=1K seek=$1 count=$2 oflag=direct conv=notrunc status=none
}}
prepare() {{  # prepare REPO_SIZE: XFS on vg/lv, a repository on an ext4 LV of its own
  lvcreate -q -y -L $1 -n repo vg
  DEV=/dev/mapper/vg-lv SRC=lvm:vg/lv
  mkfs.xfs -q $DEV
  mkfs.ext4 -q -m 0 /dev/mapper/vg-repo
  mount /dev/mapper/vg-repo /tmp/repo
  S init --encryption none > /dev/null
}}
pvcreate -q /dev/vda
vgcreate -q vg /dev/vda
mkdir -p /tmp/repo /tmp/fs
"""

RAW_WRITES_KIB = [(200 * 1024, 1024), (250 * 1024 + 4, 8), (300 * 1024 - 4, 8)]
"""(offset, length) in KiB: 1 MiB chunks 200, 250, 299 and 300."""

RAW = "\n".join(f"raw {off} {n}" for off, n in RAW_WRITES_KIB)

ROUNDS = f"""
mount $DEV /tmp/fs
dd if=/dev/urandom of=/tmp/fs/a bs=1M count=16 status=none
cp -r /usr/share/doc/bash /tmp/fs/doc
dd if=/dev/urandom of=/tmp/fs/b bs=1M count=8 status=none
sync
bk r1
dd if=/dev/urandom of=/tmp/fs/a bs=64K count=4 seek=37 conv=notrunc status=none
rm /tmp/fs/b
dd if=/dev/urandom of=/tmp/fs/c bs=1M count=3 status=none
echo appended >> /tmp/fs/doc/copyright
sync
bk r2
umount /tmp/fs
bk r2u                                         # what unmounting wrote
{RAW}
bk r3
bk r4
"""

CLASSIC = COMMON + f"""
lvcreate -q -y -L 320M -n lv vg
prepare 400M
{ROUNDS}
mount $DEV /tmp/fs
dd if=/dev/urandom of=/tmp/fs/d bs=1M count=2 status=none; sync
bk r5 --snapshot-size 8M                      # a tracking snapshot too small for what follows
dd if=/dev/urandom of=/tmp/fs/big bs=1M count=24 status=none; sync
lvs --noheadings -o lv_name,lv_attr vg > /scratch/r5.lvs
bk r6                                          # its COW overflowed: full read, with a warning
dd if=/dev/urandom of=/tmp/fs/e bs=1M count=4 status=none; sync
if S backup $SRC --volume vol --post-snapshot 'echo hook broke >&2; exit 3' \\
    > /dev/null 2> /scratch/r7fail.err; then echo "a failing hook must fail the backup"; exit 1; fi
lvs --noheadings -o lv_name,lv_tags vg > /scratch/r7fail.lvs
bk r7                                          # the old tracking snapshot still covers e
dd if=/dev/urandom of=/tmp/fs/f bs=1M count=12 status=none; sync
free=$(df --output=avail -B1 /tmp/repo | tail -1)
fallocate -l $((free - 4 * 1024 * 1024)) /tmp/repo/filler   # leave 4 MiB: the disk fills up
if S backup $SRC --volume vol --no-skip-free > /dev/null 2> /scratch/r8fail.err; then
  echo "the repository disk should have filled up"; exit 1; fi
lvs --noheadings -o lv_name,lv_tags vg > /scratch/r8fail.lvs
S verify --json > /scratch/r8fail.verify
rm /tmp/repo/filler
bk r8                                          # after the failure: incremental, complete
umount /tmp/fs
restore_all
# cow export: over a device holding r8, a snapshot target must read exactly as r2
new=$($PYTHON -c 'import json; print(json.load(open("/scratch/r8.backup.json"))["version_id"])')
old=$($PYTHON -c 'import json; print(json.load(open("/scratch/r2.backup.json"))["version_id"])')
S restore vol@$new /tmp/repo/new.img > /dev/null
S cow export vol@$new vol@$old /tmp/repo/cow.img --json > /scratch/export.json
L1=$(losetup -f --show /tmp/repo/new.img)
L2=$(losetup -f --show /tmp/repo/cow.img)
dmsetup create --noudevsync view --table "0 $(blockdev --getsz $L1) snapshot $L1 $L2 P 128"
dmsetup mknodes view
$G sha /dev/mapper/view > /scratch/cowview.sha
dmsetup remove --noudevsync view
losetup -d $L1 $L2
"""

THIN = COMMON + f"""
lvcreate -q -y -L 500M -T vg/pool
lvcreate -q -y -V 320M -T vg/pool -n lv
prepare 200M
{ROUNDS}
lvextend -q -L +32M vg/lv > /dev/null
raw $((340 * 1024)) 64
bk r5                                          # the origin grew: full read, with a warning
raw 4096 4
bk r6                                          # and incremental again after that
restore_all
dmsetup status vg-pool-tpool > /scratch/pool.status
"""


def results(res: VmResult) -> dict[str, dict[str, Any]]:
    out = {}
    for f in sorted(res.scratch.glob("*.backup.json")):
        name = f.name.removesuffix(".backup.json")
        out[name] = {
            "backup": json.loads(f.read_text()),
            "err": (res.scratch / f"{name}.err").read_text(),
            "sha": (res.scratch / f"{name}.sha").read_text().strip(),
            "restored": (res.scratch / f"{name}.restored").read_text().strip(),
        }
    return out


def one_line_error(text: str, *needles: str) -> None:
    lines = [line for line in text.splitlines() if line.startswith("snapship: error:")]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    for needle in needles:
        assert needle in lines[0], text


def check_rounds(r: dict[str, dict[str, Any]], change_source: str) -> None:
    for name, round_ in r.items():
        assert len(round_["sha"]) == 64
        assert round_["restored"] == round_["sha"], f"{name} did not restore byte-identical"
    first = r["r1"]["backup"]["stats"]
    assert first["mode"] == "full" and "fallback" not in first
    for name in ("r2", "r2u", "r3", "r4"):
        s = r[name]["backup"]["stats"]
        assert (s["mode"], s["change_source"]) == ("incremental", change_source), (name, s)
        assert "warning" not in r[name]["err"], r[name]["err"]
    raw_chunks = {
        c
        for off, n in RAW_WRITES_KIB
        for c in range(off * 1024 // MiB, ((off + n) * 1024 - 1) // MiB + 1)
    }
    r3 = r["r3"]["backup"]["stats"]
    assert r3["chunks_read"] == len(raw_chunks) == 4, r3
    assert r3["bytes_read"] == 4 * MiB
    r4 = r["r4"]["backup"]["stats"]  # nothing changed: only the change list was read
    assert (r4["chunks_read"], r4["bytes_read"], r4["chunks_new"]) == (0, 0, 0), r4
    assert r["r4"]["sha"] == r["r3"]["sha"]
    assert len({r[n]["sha"] for n in ("r1", "r2", "r3")}) == 3


def test_classic_snapshot_backups(tmp_path: Path) -> None:
    res = run_in_vm(CLASSIC, disks={"pv": 2 << 30}, timeout=1200, workdir=tmp_path).check()
    r = results(res)
    assert set(r) == {f"r{i}" for i in range(1, 9)} | {"r2u"}
    check_rounds(r, "COW table")
    attrs = [line.split()[1] for line in (res.scratch / "r5.lvs").read_text().splitlines()
             if "snapship" in line]
    assert len(attrs) == 1 and attrs[0][4] == "I", attrs  # the kernel invalidated it
    r6 = r["r6"]["backup"]["stats"]
    assert r6["mode"] == "full" and "overflowed" in r6["fallback"], r6
    assert "snapship: warning:" in r["r6"]["err"] and "overflowed" in r["r6"]["err"]
    one_line_error((res.scratch / "r7fail.err").read_text(), "post-snapshot hook failed")
    # the failed run removed its own snapshot and kept the tracking one of r6
    kept = [line.split()[0] for line in (res.scratch / "r7fail.lvs").read_text().splitlines()
            if "snapship" in line]
    assert kept == [snapshot_of(r, "r6")], kept
    r7 = r["r7"]["backup"]["stats"]
    assert (r7["mode"], r7["change_source"]) == ("incremental", "COW table")
    one_line_error((res.scratch / "r8fail.err").read_text(), "No space left on device")
    kept = [line.split()[0] for line in (res.scratch / "r8fail.lvs").read_text().splitlines()
            if "snapship" in line]
    assert kept == [snapshot_of(r, "r7")], kept
    assert json.loads((res.scratch / "r8fail.verify").read_text())["ok"] is True
    r8 = r["r8"]["backup"]["stats"]
    assert (r8["mode"], r8["change_source"]) == ("incremental", "COW table")
    export = json.loads((res.scratch / "export.json").read_text())
    assert export["exceptions"] > 0
    assert (res.scratch / "cowview.sha").read_text().strip() == r["r2"]["sha"]


def snapshot_of(r: dict[str, dict[str, Any]], name: str) -> str:
    """LV name of the tracking snapshot a round's version was read from."""
    label: str = r[name]["backup"]["labels"]["snapship.snapshot"]
    return label.split("/")[1]


def test_thin_snapshot_backups(tmp_path: Path) -> None:
    res = run_in_vm(THIN, disks={"pv": 2 << 30}, timeout=900, workdir=tmp_path).check()
    r = results(res)
    assert set(r) == {"r1", "r2", "r2u", "r3", "r4", "r5", "r6"}
    check_rounds(r, "thin_delta")
    r5 = r["r5"]["backup"]
    assert r5["size"] == (320 + 32) * MiB
    assert r5["stats"]["mode"] == "full" and "resized" in r5["stats"]["fallback"]
    assert "snapship: warning:" in r["r5"]["err"] and "resized" in r["r5"]["err"]
    r6 = r["r6"]["backup"]["stats"]
    assert (r6["mode"], r6["change_source"], r6["chunks_read"]) == ("incremental", "thin_delta", 1)
