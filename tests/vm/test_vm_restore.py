"""Restores into real LVM volumes (issue 12) in one VM boot with a real kernel and lvm2.

One guest script: back up a 512 MiB XFS LV twice through its tracking snapshot (classic COW);
rewrite ~2% of it through the file system, unmount it, and roll it back to the newest version
and to the one before: what is fetched and written is exactly the chunks that differ (worked
out beforehand by `verify --against` and the manifests, counts and stored bytes compared with
the restore's --json), the LV equals the version byte for byte, and the next backup is
incremental and restores correctly; a mounted origin is refused. The same rollback on a thin
LV (thin_delta). Restore of a small ext4 LV's versions into a new linear and a new thin LV
(byte-identical); a mounted LV refused in one line with nothing written; an LV carrying a
file system refused without --force; verify --against an LV. The host side checks what the
guest recorded."""

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
XFS_MIB = 512

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
lvcreate -q -y -L 192M -n repo vg
mkfs.ext4 -q -m 0 /dev/mapper/vg-repo
mount /dev/mapper/vg-repo /tmp/repo
S init --encryption none > /dev/null

# -- a small ext4 LV, backed up twice (for the new-LV and safety scenarios below) -----------
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

# -- rollback of a {XFS_MIB} MiB XFS LV (classic snapshot) --------------------------------------
lvcreate -q -y -L {XFS_MIB}M -n xsrc vg
mkfs.xfs -q /dev/mapper/vg-xsrc
mount /dev/mapper/vg-xsrc /tmp/fs
dd if=/dev/urandom of=/tmp/fs/a bs=1M count=24 status=none
dd if=/dev/urandom of=/tmp/fs/b bs=1M count=16 status=none
umount /tmp/fs
S backup lvm:vg/xsrc --json > /scratch/x1.json
sha /dev/mapper/vg-xsrc > /scratch/xv1.sha
mount /dev/mapper/vg-xsrc /tmp/fs
dd if=/dev/urandom of=/tmp/fs/a bs=1M seek=4 count=4 conv=notrunc status=none
umount /tmp/fs
S backup lvm:vg/xsrc --json > /scratch/x2.json
sha /dev/mapper/vg-xsrc > /scratch/xv2.sha
XV1=$(vid /scratch/x1.json) XV2=$(vid /scratch/x2.json)
# ~2% of the LV (10 MiB of file data) rewritten after the newest backup, then unmounted
mount /dev/mapper/vg-xsrc /tmp/fs
dd if=/dev/urandom of=/tmp/fs/a bs=1M seek=12 count=6 conv=notrunc status=none
dd if=/dev/urandom of=/tmp/fs/b bs=1M seek=2 count=4 conv=notrunc status=none
umount /tmp/fs
# What differs, found independently of the rollback (verify --against, the manifests)
S verify vg.xsrc --against lvm:vg/xsrc --json > /scratch/xdrift1.json || true
$G expect vg.xsrc@$XV2 - "" /scratch/xdrift1.json > /scratch/xexp_latest.json
S restore --rollback vg.xsrc lvm:vg/xsrc --json > /scratch/xrb_latest.json
sha /dev/mapper/vg-xsrc > /scratch/xrb_latest.sha
mount /dev/mapper/vg-xsrc /tmp/fs
dd if=/dev/urandom of=/tmp/fs/b bs=1M seek=9 count=2 conv=notrunc status=none
umount /tmp/fs
S verify vg.xsrc --against lvm:vg/xsrc --json > /scratch/xdrift2.json || true
# The second rollback also rewrites what the first wrote (the tracking snapshot still lists
# it) and chunk 0 (blanked and put back as the guard), and where the versions differ.
$G expect vg.xsrc@$XV1 vg.xsrc@$XV2 0 /scratch/xdrift1.json /scratch/xdrift2.json \\
    > /scratch/xexp_prev.json
S restore --rollback vg.xsrc@latest~1 lvm:vg/xsrc --json > /scratch/xrb_prev.json
sha /dev/mapper/vg-xsrc > /scratch/xrb_prev.sha
S backup lvm:vg/xsrc --json > /scratch/x3.json   # after the rollbacks
S restore vg.xsrc - | sha256sum | cut -d' ' -f1 > /scratch/x3.sha
mount -o ro,norecovery /dev/mapper/vg-xsrc /tmp/fs  # mounted, but writing nothing itself
fails xrb_mounted S restore --rollback vg.xsrc@$XV2 lvm:vg/xsrc
umount /tmp/fs
sha /dev/mapper/vg-xsrc > /scratch/xrb_mounted.sha

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
    res = run_in_vm(SCRIPT, disks={"pv": 3 << 29}, timeout=1500, workdir=tmp_path).check()
    s = res.scratch
    v1, v2 = text(s, "v1.sha"), text(s, "v2.sha")
    assert v1 != v2
    chunks = XFS_MIB  # 1 MiB chunks

    # Rollback to the newest version after ~2% of the XFS LV changed: what it fetched and
    # wrote is exactly the chunks that differ (found by verify --against beforehand), the
    # bytes fetched exactly their stored sizes.
    xv1, xv2 = text(s, "xv1.sha"), text(s, "xv2.sha")
    assert xv1 != xv2
    exp = read(s, "xexp_latest.json")
    assert chunks // 100 <= exp["chunks"] <= chunks * 4 // 100, exp  # ~2%: 10 MiB + metadata
    rb = read(s, "xrb_latest.json")
    assert text(s, "xrb_latest.sha") == xv2, "rollback to the newest is not byte-identical"
    info = rb["rollback"]
    assert rb["mode"] == "rollback" and info["change_source"] == "COW table", rb
    assert info["differ_from_newest"] == 0
    assert rb["chunks_written"] + rb["chunks_zero"] == info["changed_since_backup"] == \
        exp["chunks"], (rb, exp)
    assert rb["chunks_fetched"] == rb["chunks_written"] == exp["data_chunks"], (rb, exp)
    assert rb["bytes_fetched"] == exp["bytes"], (rb, exp)

    # Rollback to the one before: the chunks written since the backup (the new change and
    # what the first rollback wrote) plus where the two versions differ, exactly.
    pexp = read(s, "xexp_prev.json")
    prev = read(s, "xrb_prev.json")
    assert text(s, "xrb_prev.sha") == xv1, "rollback to the one before is not byte-identical"
    pinfo = prev["rollback"]
    pwritten = prev["chunks_written"] + prev["chunks_zero"]
    assert pinfo["differ_from_newest"] >= 4, prev  # the 4 MiB between the versions
    assert pwritten == pexp["chunks"], (prev, pexp)
    assert prev["chunks_fetched"] == pexp["data_chunks"], (prev, pexp)
    assert prev["bytes_fetched"] == pexp["bytes"], (prev, pexp)
    assert pwritten <= chunks // 10, prev  # O(changed), not O(volume)

    # The tracking chain holds: the next backup is incremental, reads what the rollbacks
    # wrote (plus the first chunk, blanked and put back as a guard), and restores as xv1.
    x3 = read(s, "x3.json")["stats"]
    assert (x3["mode"], x3["change_source"]) == ("incremental", "COW table"), x3
    assert x3["chunks_read"] <= pinfo["changed_since_backup"] + pwritten + 1, x3
    assert text(s, "x3.sha") == xv1
    one_line_error(text(s, "xrb_mounted.err"), "/dev/mapper/vg-xsrc", "mounted", "/tmp/fs")
    assert text(s, "xrb_mounted.sha") == xv1, "a mounted origin was written to"

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
