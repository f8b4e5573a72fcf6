"""Smoke test of the VM harness against a real kernel: a classic LVM snapshot's COW device,
read back and parsed by snapship's parser, names exactly the origin chunks written after the
snapshot was taken."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from snapship.changes.cow import parse_bytes
from snapship.types import ByteRange
from tests.vm.harness import run_in_vm

MiB = 1 << 20
WRITE_AT = 100 * MiB
WRITE_LEN = 8 * MiB

pytestmark = pytest.mark.slow

SCRIPT = f"""
set -euo pipefail
pvcreate -q /dev/vda
vgcreate -q vg /dev/vda
lvcreate -q -y -L 400M -n lv vg
mkfs.xfs -q /dev/mapper/vg-lv
mkdir -p /tmp/mnt
mount /dev/mapper/vg-lv /tmp/mnt
dd if=/dev/urandom of=/tmp/mnt/file bs=1M count=20 status=none
umount /tmp/mnt            # nothing writes to the origin from here on but the dd below

lvcreate -q -s -L 64M -n snap vg/lv
dmsetup table vg-snap > /scratch/table
blockdev --getsize64 /dev/mapper/vg-lv > /scratch/origin_size
dd if=/dev/urandom of=/tmp/new.bin bs=1M count={WRITE_LEN // MiB} status=none
dd if=/tmp/new.bin of=/dev/mapper/vg-lv bs=1M seek={WRITE_AT // MiB} oflag=direct \\
    conv=notrunc status=none
dmsetup status vg-snap > /scratch/status
dd if=/dev/mapper/vg-snap-cow of=/scratch/cow.img bs=1M iflag=direct status=none
dd if=/dev/mapper/vg-snap of=/scratch/snap-old.bin bs=1M skip={WRITE_AT // MiB} \\
    count={WRITE_LEN // MiB} iflag=direct status=none
cmp /tmp/new.bin <(dd if=/dev/mapper/vg-lv bs=1M skip={WRITE_AT // MiB} \\
    count={WRITE_LEN // MiB} iflag=direct status=none)
lvs --reportformat json -o lv_name,lv_size,origin,snap_percent --units b vg > /scratch/lvs.json
$PYTHON -c 'import snapship.changes.cow as c; print(c.__file__)'
"""


def test_classic_snapshot_cow_names_exactly_the_written_chunks(tmp_path: Path) -> None:
    start = time.monotonic()
    res = run_in_vm(SCRIPT, disks={"pv": 1 << 30}, timeout=300, workdir=tmp_path).check()
    s = res.scratch
    assert "snapship/changes/cow.py" in res.stdout  # the checkout is importable in the guest

    # `0 <sectors> snapshot <origin-real> <cow> P <chunk sectors>`
    table = (s / "table").read_text().split()
    assert table[2] == "snapshot" and table[5] == "P", table
    chunk_sectors = int(table[6])
    origin_size = int((s / "origin_size").read_text())
    assert origin_size == 400 * MiB

    store = (s / "cow.img").read_bytes()
    assert len(store) == 64 * MiB
    cow = parse_bytes(store, origin_size)
    assert cow.header.valid and cow.header.chunk_sectors == chunk_sectors
    c = cow.header.chunk_size
    assert cow.changed_ranges(origin_size) == [ByteRange(WRITE_AT, WRITE_AT + WRITE_LEN)]
    assert len(cow.exceptions) == WRITE_LEN // c
    assert cow.areas == -(-len(cow.exceptions) // cow.header.records_per_area) + (
        1 if len(cow.exceptions) % cow.header.records_per_area == 0 else 0
    )

    # The COW data chunks hold the snapshot-time content of the chunks they name.
    old = (s / "snap-old.bin").read_bytes()
    for old_chunk, new_chunk in cow.exceptions:
        at = old_chunk * c - WRITE_AT
        assert store[new_chunk * c : (new_chunk + 1) * c] == old[at : at + c], old_chunk

    # `0 <sectors> snapshot <allocated>/<total> <metadata>`: every exception is one data chunk.
    status = (s / "status").read_text().split()
    allocated, total = (int(x) for x in status[3].split("/"))
    metadata = int(status[4])
    assert total == 64 * MiB // 512
    assert allocated - metadata == len(cow.exceptions) * chunk_sectors

    elapsed = time.monotonic() - start
    print(
        f"VM run {res.seconds:.1f}s, test {elapsed:.1f}s, chunk {c} B, "
        f"{len(cow.exceptions)} exceptions in {cow.areas} areas"
    )
    assert elapsed < 240
