"""Restoring into an LVM logical volume: `restore VOL[@VER] lvm:VG/LV`.

An LV that exists is a block-device target like any other (`engine/restore.py`: refused while
in use, and while it carries a signature unless forced). One that does not exist is created at
the version's size (thin in a pool, or linear, optionally on given PVs) through
`changes/lvm.py`, and restored into without a signature check (it is ours, made a moment
ago); the tail lvm2 adds by rounding up to whole extents is zeroed. A restore into an LV it
created that fails or is stopped removes the LV again, so a retry starts from nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from snapship.changes.lvm import Lvm, LvmError
from snapship.engine.progress import Progress
from snapship.engine.restore import RestoreStats, run_restore
from snapship.errors import UsageError
from snapship.formats.manifest import Manifest
from snapship.repository.repo import Repository

Warn = Callable[[str], None]


@dataclass(frozen=True)
class LvPlacement:
    """Where a new LV goes: a thin pool, or (linear) these PVs, or anywhere in the VG."""

    thin_pool: str | None = None
    pvs: tuple[str, ...] = ()


@dataclass(frozen=True)
class LvRestore:
    stats: RestoreStats
    device: str
    created: bool


def restore_to_lv(
    repo: Repository,
    m: Manifest,
    lvm: Lvm,
    vg: str,
    lv: str,
    *,
    placement: LvPlacement = LvPlacement(),
    force: bool = False,
    differential: bool = False,
    progress: Progress | None = None,
    warn: Warn = lambda _m: None,
) -> LvRestore:
    existing = lvm.find(vg, lv)
    if existing is not None:
        if placement != LvPlacement():
            raise UsageError(f"lvm:{vg}/{lv} exists: --thin-pool and --pv only place a new LV")
        stats = run_restore(repo, m, existing.device, progress=progress, force=force,
                            differential=differential, warn=warn)
        return LvRestore(stats, existing.device, False)
    if differential:
        raise UsageError(f"lvm:{vg}/{lv} does not exist: a differential restore updates an "
                         "existing copy (restore without --differential to create it)")
    new = lvm.create_lv(vg, lv, m.size, thin_pool=placement.thin_pool, pvs=placement.pvs)
    try:
        stats = run_restore(repo, m, new.device, progress=progress, force=True, fresh=True,
                            warn=warn)
    except BaseException:
        try:
            lvm.remove(vg, lv)
        except LvmError as e:
            warn(f"could not remove the LV {vg}/{lv} this restore created: {e}")
        raise
    return LvRestore(stats, new.device, True)

