"""A real volume group on a loop device of the host, for tests of what needs no device-mapper
(PVs, VGs, tags: `snapspace add/status/remove`); LVs need the VM (tests/vm/)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from snapship.changes.lvm import LVM_CONFIG


def lvm(*args: str, check: bool = True) -> str:
    try:
        p = subprocess.run(["lvm", args[0], "--config", LVM_CONFIG, *args[1:]],
                           capture_output=True, text=True, check=False,
                           stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        if check:
            raise AssertionError("no lvm command: `make vm-assets` installs lvm2") from None
        return ""  # taking apart: the loop devices must still be detached
    if check and p.returncode != 0:
        raise AssertionError(f"lvm {' '.join(args)}: {p.stderr}")
    return p.stdout


def loops_under(directory: Path) -> list[str]:
    """Loop devices whose backing file is in `directory`."""
    found = []
    for name in sorted(os.listdir("/sys/block")):
        try:
            backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
        except OSError:
            continue
        if backing.startswith(f"{directory}/"):
            found.append(f"/dev/{name}")
    return found


def losetup(*args: str) -> str:
    return subprocess.run(["losetup", *args], capture_output=True, text=True,
                          check=True).stdout.strip()


@contextlib.contextmanager
def host_vg(tmp: Path, size: int = 64 << 20) -> Iterator[tuple[str, str]]:
    """(VG name, its first PV) on a fresh loop device; everything on loop devices of files
    in `tmp` is taken apart afterwards, whatever the test left."""
    vg = f"snapshiptest{uuid.uuid4().hex[:10]}"
    img = tmp / "pv0.img"
    with open(img, "wb") as f:
        f.truncate(size)
    dev = losetup("--find", "--show", str(img))
    try:
        lvm("pvcreate", "-q", "--yes", dev)
        lvm("vgcreate", "-q", vg, dev)
        yield vg, dev
    finally:
        lvm("vgremove", "-q", "-ff", "--yes", vg, check=False)
        devices: Sequence[str] = loops_under(tmp)
        for d in devices:
            lvm("pvremove", "-q", "-ff", "--yes", d, check=False)
            subprocess.run(["losetup", "-d", d], check=False)
