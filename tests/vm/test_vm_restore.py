"""Restores into real LVM volumes (issue 12) in one VM boot with a real kernel and lvm2.

One guest script: back up an ext4 LV twice through its tracking snapshot (classic COW); change
it and roll it back to the newest version and to the one before (only the changed chunks
written, the next backup incremental and correct); the same rollback on a thin LV; restore
into a new linear and a new thin LV (byte-identical); a mounted LV refused in one line with
nothing written; an LV carrying a file system refused without --force; verify --against an
LV. The host side checks what the guest recorded.
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
LV_MIB = 64

SCRIPT = f"""
set -euo pipefail
export SNAPSHIP_REPO=/tmp/repo/r SNAPSHIP_PASSPHRASE=vm
G="$PYTHON {GUEST}"
S() {{ $PYTHON -m snapship.cli.main "$@"; }}
sha() {{ $G sha "$1"; }}
vid() {{ $PYTHON -c 'import json,sys; print(json.load(open(sys.argv[1]))["version_id"])' "$1"; }}
# change FILE MIB_OFFSET MIB: overwrite part of a file on the ext4 of vg/src
change() {{
  mount /dev/mapper/vg-src /tmp/fs
  dd if=/dev/urandom of=/tmp/fs/$1 bs=1M seek=$2 count=$3 conv=notrunc status=none
  umount /tmp/fs
}}
# fails NAME CMD...: the command must fail; keep its stderr and exit code
fails() {{
  local name=$1; shift
  "$@" > /scratch/$name.out 2> /scratch/$name.err && {{ echo "$name: should fail"; exit 1; }} \
    || echo $? > /scratch/$name.rc
}}
pvcreate -q /dev/vda
vgcreate -q vg /dev/vda
mkdir -p /tmp/repo /tmp/fs
lvcreate -q -y -L 96M -n repo vg
mkfs.ext4 -q -m 0 /dev/mapper/vg-repo
mount /dev/mapper/vg-repo /tmp/repo
S init --encryption none > /dev/null

# -- rollback of a classic LV ------------------------------------------------------------
lvcreate -q -y -L {LV_MIB}M -n src vg
mkfs.ext4 -q /dev/mapper/vg-src
mount /dev/mapper/vg-src /tmp/fs
dd if=/dev/urandom of=/tmp/fs/a bs=1M count=12 status=none
dd if=/dev/urandom of=/tmp/fs/b bs=1M count=8 status=none
umount /tmp/fs
S backup lvm:vg/src --snapshot-size 32M --json > /scratch/b1.json
sha /dev/mapper/vg-src > /scratch/v1.sha
change a 2 1
S backup lvm:vg/src --snapshot-size 32M --json > /scratch/b2.json
sha /dev/mapper/vg-src > /scratch/v2.sha
V1=$(vid /scratch/b1.json) V2=$(vid /scratch/b2.json)
change b 5 1                                     # written after the newest backup
S verify vg.src --against lvm:vg/src --json > /scratch/drift.json || true
S restore --rollback vg.src lvm:vg/src --json > /scratch/rb_latest.json
sha /dev/mapper/vg-src > /scratch/rb_latest.sha
change b 1 1
S restore --rollback vg.src@latest~1 lvm:vg/src --json > /scratch/rb_prev.json
sha /dev/mapper/vg-src > /scratch/rb_prev.sha
S backup lvm:vg/src --snapshot-size 32M --json > /scratch/b3.json   # after the rollbacks
S restore vg.src /tmp/repo/b3.img > /dev/null
sha /tmp/repo/b3.img > /scratch/b3.sha
rm /tmp/repo/b3.img
mount -o ro,noload /dev/mapper/vg-src /tmp/fs      # mounted, but writing nothing itself
fails rb_mounted S restore --rollback vg.src@$V2 lvm:vg/src
umount /tmp/fs
sha /dev/mapper/vg-src > /scratch/rb_mounted.sha

# -- rollback of a thin LV (raw writes) --------------------------------------------------
lvcreate -q -y -L 160M -T vg/pool
lvcreate -q -y -V 16M -T vg/pool -n tsrc
dd if=/dev/urandom of=/dev/mapper/vg-tsrc bs=1M count=16 oflag=direct status=none
S backup lvm:vg/tsrc --json > /scratch/tb1.json
sha /dev/mapper/vg-tsrc > /scratch/tv1.sha
dd if=/dev/urandom of=/dev/mapper/vg-tsrc bs=64K seek=50 count=20 oflag=direct conv=notrunc \\
    status=none                                  # 1.25 MiB: chunks 3 and 4
S restore --rollback vg.tsrc lvm:vg/tsrc --json > /scratch/trb.json
sha /dev/mapper/vg-tsrc > /scratch/trb.sha
S backup lvm:vg/tsrc --json > /scratch/tb2.json

# -- new LVs ---------------------------------------------------------------------------------
S restore vg.src@$V2 lvm:vg/newlin --json > /scratch/newlin.json
sha /dev/mapper/vg-newlin > /scratch/newlin.sha
S restore vg.src@$V2 lvm:vg/newthin --thin-pool pool --json > /scratch/newthin.json
sha /dev/mapper/vg-newthin > /scratch/newthin.sha
lvs --noheadings -o lv_name,segtype,lv_size --units b --nosuffix vg > /scratch/lvs.txt
S verify vg.src@$V2 --against lvm:vg/newthin --json > /scratch/against_same.json
fails against_other S verify vg.src@$V1 --against lvm:vg/newthin --json

# -- safety --------------------------------------------------------------------------------
mount -o ro,noload /dev/mapper/vg-newlin /tmp/fs
fails mounted S restore vg.src@$V1 lvm:vg/newlin --force
umount /tmp/fs
sha /dev/mapper/vg-newlin > /scratch/mounted.sha
fails signature S restore vg.src@$V1 lvm:vg/newlin
sha /dev/mapper/vg-newlin > /scratch/signature.sha
S restore vg.src@$V1 lvm:vg/newlin --force --json > /scratch/forced.json
sha /dev/mapper/vg-newlin > /scratch/forced.sha
fails exists S restore vg.src@$V1 lvm:vg/newlin --thin-pool pool
"""


def read(res_scratch: Path, name: str) -> Any:
    return json.loads((res_scratch / name).read_text())


def text(res_scratch: Path, name: str) -> str:
    return (res_scratch / name).read_text().strip()


def one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapship: error: "), err
    for needle in needles:
        assert needle in lines[0], err


def test_restores_into_lvm(tmp_path: Path) -> None:
    res = run_in_vm(SCRIPT, disks={"pv": 1 << 30}, timeout=1500, workdir=tmp_path).check()
    s = res.scratch
    v1, v2 = text(s, "v1.sha"), text(s, "v2.sha")
    assert v1 != v2
    chunks = LV_MIB  # 1 MiB chunks

    # Rollback to the newest version: only what was written since its backup.
    drift = read(s, "drift.json")
    assert drift["ok"] is False and 1 <= drift["chunks_differing"] <= 4, drift
    rb = read(s, "rb_latest.json")
    assert text(s, "rb_latest.sha") == v2, "rollback to the newest is not byte-identical"
    info = rb["rollback"]
    assert rb["mode"] == "rollback" and info["change_source"] == "COW table", rb
    assert info["differ_from_newest"] == 0
    written = rb["chunks_written"] + rb["chunks_zero"]
    assert written == info["changed_since_backup"], rb
    assert drift["chunks_differing"] <= written <= 10, rb  # the 1 MiB change, the journal
    assert rb["chunks_fetched"] == rb["chunks_written"]
    assert rb["bytes_fetched"] <= rb["chunks_fetched"] * MiB + 4096 * rb["chunks_fetched"]

    # Rollback to the one before: the changed chunks plus where the versions differ.
    prev = read(s, "rb_prev.json")
    assert text(s, "rb_prev.sha") == v1, "rollback to the one before is not byte-identical"
    pinfo = prev["rollback"]
    pwritten = prev["chunks_written"] + prev["chunks_zero"]
    assert pinfo["differ_from_newest"] >= 1
    assert max(pinfo["differ_from_newest"], pinfo["changed_since_backup"]) <= pwritten <= \
        pinfo["differ_from_newest"] + pinfo["changed_since_backup"], prev
    assert pwritten <= chunks // 4, prev  # O(changed), not O(volume)

    # The tracking chain holds: the next backup is incremental, reads what the rollbacks
    # wrote (plus the first chunk, blanked and put back as a guard), and restores as v1.
    b3 = read(s, "b3.json")["stats"]
    assert (b3["mode"], b3["change_source"]) == ("incremental", "COW table"), b3
    assert b3["chunks_read"] <= pinfo["changed_since_backup"] + pwritten + 1, b3
    assert text(s, "b3.sha") == v1
    one_line_error(text(s, "rb_mounted.err"), "/dev/mapper/vg-src", "mounted", "/tmp/fs")
    assert text(s, "rb_mounted.sha") == v1, "a mounted origin was written to"

    # Thin: the same through thin_delta.
    trb = read(s, "trb.json")
    assert text(s, "trb.sha") == text(s, "tv1.sha")
    assert trb["rollback"]["change_source"] == "thin_delta", trb
    assert (trb["rollback"]["changed_since_backup"], trb["chunks_written"]) == (2, 2), trb
    tb2 = read(s, "tb2.json")["stats"]
    assert (tb2["mode"], tb2["change_source"]) == ("incremental", "thin_delta"), tb2
    assert tb2["chunks_new"] == 0, tb2  # what it read is what tb1 already holds

    # New LVs, byte-identical, of the version's size.
    for name in ("newlin", "newthin"):
        out = read(s, f"{name}.json")
        assert out["lv"] == {"device": f"/dev/mapper/vg-{name}", "created": True}, out
        assert text(s, f"{name}.sha") == v2, f"{name} is not byte-identical"
    lvs = {line.split()[0]: line.split()[1:] for line in text(s, "lvs.txt").splitlines()}
    assert lvs["newlin"] == ["linear", str(LV_MIB * MiB)], lvs
    assert lvs["newthin"] == ["thin", str(LV_MIB * MiB)], lvs
    assert read(s, "against_same.json")["ok"] is True
    other = read(s, "against_other.out")
    assert other["ok"] is False and other["chunks_differing"] >= 1, other

    # Safety.
    one_line_error(text(s, "mounted.err"), "/dev/mapper/vg-newlin", "mounted", "/tmp/fs",
                   "nothing was written")
    assert text(s, "mounted.sha") == v2, "a mounted LV was written to"
    one_line_error(text(s, "signature.err"), "ext4 file system", "--force")
    assert text(s, "signature.sha") == v2
    assert read(s, "forced.json")["lv"]["created"] is False
    assert text(s, "forced.sha") == v1
    one_line_error(text(s, "exists.err"), "exists", "--thin-pool")
    assert text(s, "exists.rc") == "2"
