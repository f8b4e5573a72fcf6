"""The lvm2 commands a restore into a new LV runs (changes/lvm.py), against a fake runner:
the real ones run in the VM (tests/vm/test_vm_restore.py)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from snapship.changes.lvm import Lvm, LvmError


class FakeLvm:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.lvs: list[dict[str, str]] = []

    def __call__(self, argv: Sequence[str]) -> str:
        argv = list(argv)
        self.calls.append(argv)
        if argv[1] == "lvcreate":
            name = argv[argv.index("-n") + 1]
            self.lvs.append({"lv_name": name, "vg_name": "vg", "lv_size": "8388608",
                             "segtype": "thin" if "--thinpool" in argv else "linear"})
        if argv[1] == "lvs":
            return json.dumps({"report": [{"lv": self.lvs}]})
        return ""


def test_a_linear_lv_on_given_pvs_rounded_to_sectors() -> None:
    fake = FakeLvm()
    info = Lvm(fake).create_lv("vg", "new", 5 * 1024 * 1024 + 1, pvs=["/dev/vdb", "/dev/vdc"])
    create = next(c for c in fake.calls if c[1] == "lvcreate")
    assert create[create.index("-L") + 1] == f"{5 * 1024 * 1024 + 512}b"
    assert create[-3:] == ["vg", "/dev/vdb", "/dev/vdc"]
    assert {"--yes", "-ay"} <= set(create) and "--wipesignatures" in create
    assert (info.name, info.segtype, info.device) == ("new", "linear", "/dev/mapper/vg-new")


def test_a_thin_lv_in_a_pool() -> None:
    fake = FakeLvm()
    info = Lvm(fake).create_lv("vg", "t-1", 4096, thin_pool="pool")
    create = next(c for c in fake.calls if c[1] == "lvcreate")
    assert create[create.index("-V") + 1] == "4096b"
    assert create[create.index("--thinpool") + 1] == "pool" and create[-1] == "vg"
    assert info.device == "/dev/mapper/vg-t--1"
    with pytest.raises(LvmError, match="--pv goes with linear"):
        Lvm(fake).create_lv("vg", "x", 4096, thin_pool="pool", pvs=["/dev/vdb"])
    assert Lvm(fake).find("vg", "nope") is None
