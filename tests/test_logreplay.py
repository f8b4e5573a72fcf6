"""The throwaway log-replay view is torn down whatever step fails (logreplay.py).

The host has no device-mapper, so the real view is shown in the VM (tests/vm/
test_vm_freespace.py); here a runner records the commands and fails one of them on purpose:
the fault the real tools cannot produce on demand.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from snapship.changes.lvm import LvmError
from snapship.logreplay import replayed_view


class Recorder:
    """Records every command; `fail` names the command (its words) that fails."""

    def __init__(self, fail: list[str] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, argv: Sequence[str]) -> str:
        argv = list(argv)
        self.calls.append(argv)
        if self.fail is not None and argv[: len(self.fail)] == self.fail:
            raise LvmError(f"{' '.join(self.fail)} failed: injected")
        return "/dev/loop7\n" if argv[:2] == ["losetup", "--find"] else ""

    def verbs(self) -> list[str]:
        return [" ".join(c[:2]) for c in self.calls]


def test_the_view_is_made_replayed_and_removed(tmp_path: Path) -> None:
    r = Recorder()
    with replayed_view("/dev/mapper/vg-snap", 1 << 30, str(tmp_path), r) as view:
        assert view.startswith("/dev/mapper/snapship-replay-")
        table = next(c for c in r.calls if c[:2] == ["dmsetup", "create"])[-1]
        assert table == f"0 {(1 << 30) // 512} snapshot /dev/mapper/vg-snap /dev/loop7 N 8"
        assert [c[0] for c in r.calls][-2:] == ["mount", "umount"]  # replayed before use
    assert r.verbs()[-3:] == ["dmsetup remove", "dmsetup mknodes", "losetup --detach"]
    assert list(tmp_path.iterdir()) == []  # the sparse store and the mount point are gone


@pytest.mark.parametrize("fail", [["dmsetup", "create"], ["mount"], ["umount", "/"]],
                         ids=["create", "mount", "umount"])
def test_a_failing_step_leaves_nothing_behind(tmp_path: Path, fail: list[str]) -> None:
    if fail[0] == "umount":  # the plain unmount fails: the lazy one in the clean-up must run
        fail = ["umount", str(tmp_path)]
        r = Recorder()

        def runner(argv: Sequence[str]) -> str:
            if argv[0] == "umount" and "--lazy" not in argv:
                r.calls.append(list(argv))
                raise LvmError("umount failed: injected")
            return r(argv)
    else:
        r = Recorder(fail)
        runner = r
    with pytest.raises(LvmError, match="injected"), replayed_view(
            "/dev/mapper/vg-snap", 1 << 30, str(tmp_path), runner):
        pytest.fail("the view must not be handed out")
    verbs = r.verbs()
    assert verbs[-1] == "losetup --detach", verbs
    assert ("dmsetup remove" in verbs) == (fail != ["dmsetup", "create"]), verbs
    assert (["umount", "--lazy"] in [c[:2] for c in r.calls]) == (fail[0] == "umount"), r.calls
    assert list(tmp_path.iterdir()) == []
