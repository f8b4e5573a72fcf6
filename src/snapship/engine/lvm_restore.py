"""Restoring into an LVM logical volume: `restore VOL[@VER] lvm:VG/LV`.

An LV that exists is a block-device target like any other (`engine/restore.py`: refused while
in use, and while it carries a signature unless forced). One that does not exist is created at
the version's size (thin in a pool, or linear, optionally on given PVs) through
`changes/lvm.py`, and restored into without a signature check (it is ours, made a moment
ago); the tail lvm2 adds by rounding up to whole extents is zeroed. A restore into an LV it
created that fails or is stopped removes the LV again, so a retry starts from nothing.

A rollback (`restore --rollback VOL@VER lvm:VG/LV`) restores a version onto the LV its
volume is backed up from, while the tracking snapshot of the newest version still exists, in
O(changed): it writes only the chunks written on the LV since that backup (the snapshot's COW
table or thin_delta, read exactly as the next backup reads them: `plan_changes`) and those
where the version differs from the newest one (the two manifests compared: no data read).
Every chunk it writes lands in the snapshot's change set in turn, so the next backup,
incremental on top of the newest version, reads exactly what the rollback changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from snapship.changes.lvm import Lvm, LvmError
from snapship.changes.ranges import touched_chunks
from snapship.devices import Target
from snapship.engine.progress import Progress
from snapship.engine.restore import RestoreStats, run_restore
from snapship.engine.snapshot_backup import LABEL_SNAPSHOT_UUID, plan_changes
from snapship.errors import NotFound, UsageError
from snapship.formats.manifest import Manifest
from snapship.repository.repo import Repository

Warn = Callable[[str], None]


@dataclass(frozen=True)
class LvPlacement:
    """Where a new LV goes: a thin pool, or (linear) these PVs, or anywhere in the VG."""

    thin_pool: str | None = None
    pvs: tuple[str, ...] = ()


@dataclass(frozen=True)
class RollbackCounts:
    newest: str
    """The newest version, whose tracking snapshot told what changed since."""
    change_source: str
    changed_since_backup: int
    """Chunks written on the LV since the newest version was backed up."""
    differ_from_newest: int
    """Chunks where the version restored differs from the newest version."""


@dataclass(frozen=True)
class LvRestore:
    stats: RestoreStats
    device: str
    created: bool
    rollback: RollbackCounts | None = None


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



def rollback_lv(
    repo: Repository,
    m: Manifest,
    lvm: Lvm,
    vg: str,
    lv: str,
    *,
    progress: Progress | None = None,
    warn: Warn = lambda _m: None,
) -> LvRestore:
    where = f"lvm:{vg}/{lv}"
    alternative = "restore --differential reads the whole LV instead"
    origin = lvm.find(vg, lv)
    if origin is None:
        raise NotFound(f"logical volume {vg}/{lv} does not exist: a rollback restores onto the "
                       "LV the version was backed up from")
    if m.source != where:
        raise UsageError(f"{m.volume}@{m.version} was backed up from {m.source}, not "
                              f"{where}: --rollback restores a version onto its own origin")
    newest = repo.latest_manifest(m.volume)
    assert newest is not None  # m itself is a version of the volume
    if newest.source != where:
        raise UsageError(f"the newest version of {m.volume} was backed up from "
                              f"{newest.source}, not {where}; {alternative}")
    if m.size != origin.size:
        raise UsageError(f"{vg}/{lv} is {origin.size} bytes and {m.volume}@{m.version} "
                              f"{m.size}: a rollback keeps the LV's size; {alternative}")
    want = newest.labels.get(LABEL_SNAPSHOT_UUID)
    tracking = next((t for t in lvm.snapshots_of(vg, lv) if t.uuid == want), None)
    if tracking is None:
        raise UsageError(f"the tracking snapshot of {m.volume}@{newest.version} is gone, so "
                              f"what changed on {vg}/{lv} since is unknown; {alternative}")
    counts: list[RollbackCounts] = []

    def choose(_target: Target, _progress: Progress, _workers: int) -> list[int]:
        # Here the LV is held exclusively: nothing writes to it while the change set is read.
        plan = plan_changes(lvm, origin, tracking, origin, newest)
        if plan.fallback is not None or plan.changed is None:
            raise UsageError(f"cannot tell what changed on {vg}/{lv} since "
                                  f"{m.volume}@{newest.version}: {plan.fallback}; {alternative}")
        since = touched_chunks(plan.changed, m.chunk_size, m.size)
        differ = [i for i in range(m.count) if m.chunk(i) != newest.chunk(i)]
        counts.append(RollbackCounts(newest.version, plan.change_source, len(since),
                                     len(differ)))
        return sorted(set(since) | set(differ))

    stats = run_restore(repo, m, origin.device, progress=progress, choose=choose,
                        mode="rollback", warn=warn)
    return LvRestore(stats, origin.device, False, counts[0])
