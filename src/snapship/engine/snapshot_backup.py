"""Backups of LVM volumes through a tracking snapshot: the classic-COW and thin workflows.

snapship keeps one snapshot per volume, tagged as its own, whose creation time is the moment
the newest version shows. Each run:

1. runs the pre-snapshot hook, creates a new snapshot (the new consistent view), runs the
   post-snapshot hook;
2. asks LVM what changed since the tracking snapshot: the exception table of its COW device
   (classic), or `thin_delta` between it and the new one (thin);
3. backs up only those chunks, read from the new snapshot, on top of the newest version;
4. removes the old snapshot, so the new one tracks the next period.

If the tracking snapshot is missing, overflowed, not the one the newest version was taken
from, or the origin was resized, the run reads everything instead (comparing with the newest
version, so unchanged chunks still cost no storage) and says why. If anything fails, the new
snapshot is removed and the old one kept, so the next run still covers every change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from snapship.changes import cow, thin_delta, thin_dump
from snapship.changes.lvm import LvInfo, Lvm, LvmError
from snapship.changes.ranges import coalesce
from snapship.devices import Source, UncachedReader
from snapship.engine.backup import BackupPlan, Prepared, run_backup
from snapship.engine.known_zero import KnownZero, survey
from snapship.engine.progress import Progress
from snapship.engine.snapshot_size import (
    AUTO,
    KEEP_PERIODS,
    Period,
    auto_extents,
    periods_of,
    place,
)
from snapship.errors import SnapshipError, SourceError, UsageError
from snapship.formats.manifest import Manifest
from snapship.logreplay import replayed_view
from snapship.repository.repo import Repository

Warn = Callable[[str], None]
FULL_WARNING_PERCENT = 80.0
LABEL_SNAPSHOT = "snapship.snapshot"
LABEL_SNAPSHOT_UUID = "snapship.snapshot_uuid"


@dataclass(frozen=True)
class SnapshotOptions:
    size: str = "10%"
    """Classic snapshot size: `N%` of the origin, an lvcreate size such as `2G`, or `auto`
    (engine/snapshot_size.py)."""
    pre_hook: str | None = None
    post_hook: str | None = None
    skip_free: bool = True
    """Skip the free space of a clean filesystem on the snapshot (docs/free-space.md)."""
    pvs: tuple[str, ...] = ()
    """Classic snapshots: the PVs to put it on (default: the VG's snapshot space, if any)."""


_LVM_SIZE = re.compile(r"(\d+(?:\.\d+)?)([bBsSkKmMgGtTpPeE]?)")


def valid_snapshot_size(text: str) -> bool:
    """`N%` of the origin (N at least 1), a size lvcreate takes (`2G`, `512M`, `1.5T`), or
    `auto` (sized from the earlier snapshots' use, docs/snapspace.md)."""
    if text == AUTO:
        return True
    if text.endswith("%"):
        return text[:-1].isdigit() and int(text[:-1]) >= 1
    m = _LVM_SIZE.fullmatch(text)
    return bool(m and float(m.group(1)) > 0)


def run_hook(command: str | None, what: str) -> None:
    if not command:
        return
    p = subprocess.run(command, shell=True, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        detail = (p.stderr.strip() or p.stdout.strip()).splitlines()
        raise SnapshipError(
            f"{what} hook failed with exit code {p.returncode}"
            + (f": {detail[-1]}" if detail else "")
        )


def snapshot_name(lv: str) -> str:
    return f"{lv}-snapship-{dt.datetime.now(dt.UTC):%Y%m%d%H%M%S%f}"[:127]


def plan_changes(
    lvm: Lvm, origin: LvInfo, tracking: LvInfo | None, new: LvInfo, base: Manifest | None
) -> BackupPlan:
    """What to read: the change set since `tracking`, or a full read with the reason."""
    if base is None:
        return BackupPlan(fallback=None if tracking is None else "no earlier version")
    if tracking is None:
        return BackupPlan(fallback="no tracking snapshot (first run, or it was removed)")
    if base.labels.get(LABEL_SNAPSHOT_UUID) != tracking.uuid:
        return BackupPlan(fallback=f"tracking snapshot {tracking.name} is not the one the "
                          "newest version was taken from")
    if origin.size != base.size:
        return BackupPlan(fallback=f"the origin was resized ({base.size} -> {origin.size})")
    if origin.is_thin:
        if tracking.thin_id is None or new.thin_id is None or not origin.pool:
            return BackupPlan(fallback="thin ids of the snapshots are unknown")
        xml = lvm.thin_delta(origin.vg, origin.pool, tracking.thin_id, new.thin_id)
        delta = thin_delta.parse(xml, origin.size)
        # Discarded blocks (left_only) are unmapped in the new snapshot: zeroes, not read.
        return BackupPlan(delta.changed, "thin_delta",
                          known_zero=KnownZero(delta.discarded, {"unmapped_bytes": sum(
                              r.length for r in delta.discarded)}))
    if tracking.invalid:
        return BackupPlan(fallback=f"tracking snapshot {tracking.name} overflowed")
    try:
        with UncachedReader(tracking.cow_device) as reader:
            table = cow.parse(reader.read, reader.size, origin.size)
    except cow.CowInvalid:
        return BackupPlan(fallback=f"tracking snapshot {tracking.name} overflowed")
    except (cow.CowError, SourceError) as e:
        return BackupPlan(fallback=f"COW table of {tracking.name} unusable: {e}")
    return BackupPlan(table.changed_ranges(origin.size), "COW table")


def _thin_zero(lvm: Lvm, origin: LvInfo, new: LvInfo, plan: BackupPlan, kz: KnownZero,
               warn: Warn) -> KnownZero:
    """Add what the thin snapshot does not map to what is known to be zero: for a full read
    every unmapped block (thin_dump), for thin_delta's incremental the discarded ones."""
    record = dict(kz.record)
    if plan.changed is not None:
        extra = plan.known_zero.ranges if plan.known_zero is not None else []
        record["unmapped_bytes"] = sum(r.length for r in extra)
    else:
        if new.thin_id is None or not origin.pool:
            return kz
        try:
            xml = lvm.thin_dump(origin.vg, origin.pool, new.thin_id)
            extra = thin_dump.unmapped(thin_dump.mapped(xml, new.thin_id, origin.size),
                                       origin.size)
        except (LvmError, thin_delta.ThinDeltaError) as e:
            warn(f"reading unmapped blocks of {origin.vg}/{origin.name} too: {e}")
            return kz
        record["unmapped_bytes"] = sum(r.length for r in extra)
    return KnownZero(coalesce([*kz.ranges, *extra]), record)


def snapshot_layout(lvm: Lvm, origin: LvInfo, periods: Sequence[Period],
                    options: SnapshotOptions, warn: Warn
                    ) -> tuple[str | None, list[str], dict[str, Any]]:
    """The new snapshot's size argument (None: thin), the PVs to put it on, and what to record
    of how they were chosen; `periods`: what earlier tracking snapshots held, newest first."""
    if origin.is_thin:
        if options.pvs:
            raise UsageError("--snapshot-pv is for classic snapshots: a thin snapshot lives in "
                             "its pool")
        return None, [], {}
    pvs = lvm.pvs(origin.vg)
    chosen, where = place(pvs, options.pvs, origin.vg)
    if where == "the volume group" and any(p.snapspace and p.missing for p in pvs):
        warn(f"the snapshot space of {origin.vg} is missing (its file is not attached: "
             "snapship snapspace status)")
    record: dict[str, Any] = {"sizing": "auto" if options.size == AUTO else "fixed",
                              "requested": options.size, "placement": where,
                              "pvs": [p.name for p in chosen]}
    if options.size != AUTO:
        return options.size, record["pvs"], record
    pool = chosen or [p for p in pvs if not p.missing]
    extents, note = auto_extents(
        periods, origin_size=origin.size,
        extent_size=pool[0].extent_size if pool else 0,
        free_extents=sum(p.free_extents for p in pool))
    if "free" in note:
        warn(f"tracking snapshot of {origin.vg}/{origin.name}: {note}")
    record["note"] = note
    return f"{extents}e", record["pvs"], record


def _replayed_free_space(device: str, size: int, kz: KnownZero, notes: list[str]
                         ) -> KnownZero:
    """The free space of an XFS snapshot whose log is not clean, read from a throwaway view
    with the log replayed (`logreplay`); `kz` (everything read, with its note) if that fails
    or the replayed filesystem is still not clean. Only then is the survey's warning kept."""
    try:
        with replayed_view(device, size) as view, Source(view) as replayed:
            got = survey(replayed, skip_free=True)
    except (SnapshipError, OSError) as e:
        notes.append(f"replaying the XFS log on a throwaway view failed: {e}")
        return kz
    if not got.record.get("skipped"):
        return kz
    notes.clear()
    as_stored = str(kz.record.get("note", "")).removeprefix("free space is read: ")
    got.record["note"] = (f"{got.record['note']}, read after replaying the log on a throwaway "
                          f"view (as stored, {as_stored})")
    got.record["log_replayed"] = True
    return got


def measured_period(lvm: Lvm, tracking: LvInfo | None, base: Manifest | None) -> Period | None:
    """How full the tracking snapshot the base was read from is now, just before the new one
    is taken: the changes of one period between backups (timed from the base's end, a little
    short of the snapshot's life, so the rate comes out a little high)."""
    if (tracking is None or base is None or tracking.is_thin
            or base.labels.get(LABEL_SNAPSHOT_UUID) != tracking.uuid):
        return None
    now = lvm.find(tracking.vg, tracking.name)
    try:
        seconds = (dt.datetime.now(dt.UTC)
                   - dt.datetime.fromisoformat(base.created)).total_seconds()
    except ValueError:
        return None
    if now is None or seconds <= 0:
        return None
    if now.invalid:
        return Period(now.size, seconds, overflowed=True)
    if now.snap_percent is None:
        return None
    return Period(round(now.snap_percent * now.size / 100), seconds)


def recorded_periods(lvm: Lvm, tracking: LvInfo | None, base: Manifest | None
                     ) -> list[Period]:
    """`stats.snapshot.periods` of the new version: the period measured now, then the base's."""
    period = measured_period(lvm, tracking, base)
    older = periods_of(base.stats) if base is not None else []
    return ([period] if period else []) + older[:KEEP_PERIODS - (1 if period else 0)]


def run_snapshot_backup(
    repo: Repository,
    lvm: Lvm,
    vg: str,
    lv: str,
    volume: str,
    *,
    options: SnapshotOptions,
    labels: dict[str, str] | None = None,
    progress: Progress | None = None,
    warn: Warn = lambda message: None,
) -> Manifest:
    origin = lvm.lv(vg, lv)
    if origin.origin:
        raise UsageError(f"{vg}/{lv} is itself a snapshot; back up its origin instead")
    done: list[LvInfo | None] = []  # the old tracking snapshot, once the version is stored

    @contextlib.contextmanager
    def prepare(base: Manifest | None) -> Iterator[Prepared]:
        want = base.labels.get(LABEL_SNAPSHOT_UUID) if base else None
        ours = lvm.snapshots_of(vg, lv)
        tracking = next((s for s in ours if s.uuid == want), ours[-1] if ours else None)
        for stale in ours:
            if stale is not tracking:  # left by a run that died; it tracks nothing we have
                warn(f"removing stale snapshot {vg}/{stale.name}")
                lvm.remove(vg, stale.name)

        # Measured before the new snapshot is sized, so that the newest period counts (after an
        # overflow, the very next snapshot is larger).
        periods = [] if origin.is_thin else recorded_periods(lvm, tracking, base)
        size, pvs, record = snapshot_layout(lvm, origin, periods, options, warn)
        run_hook(options.pre_hook, "pre-snapshot")
        try:
            new = lvm.create_snapshot(vg, lv, snapshot_name(lv), size, pvs)
        except BaseException:
            run_hook(options.post_hook, "post-snapshot")
            raise
        try:
            run_hook(options.post_hook, "post-snapshot")
            stats = {} if origin.is_thin else {"snapshot": {
                "size": new.size, **record, "periods": [p.record() for p in periods]}}
            plan = plan_changes(lvm, origin, tracking, new, base)
            if plan.fallback:
                warn(f"full read of {vg}/{lv}: {plan.fallback}")
            with Source(new.device) as source:
                # Not assumed clean because LVM froze the filesystem: survey() checks. A frozen
                # ext4 is (its freeze clears needs_recovery); a frozen XFS's log still holds
                # transactions: its free space is read from a view with the log replayed
                # (docs/free-space.md, "XFS snapshots").
                quiet: list[str] = []
                kz = survey(source, skip_free=options.skip_free, warn=quiet.append)
                if kz.record.get("filesystem") == "xfs" and not kz.record.get("skipped"):
                    kz = _replayed_free_space(new.device, source.size, kz, quiet)
                for line in quiet:
                    warn(line)
                if origin.is_thin:
                    kz = _thin_zero(lvm, origin, new, plan, kz, warn)
                plan = dataclasses.replace(
                    plan, labels={LABEL_SNAPSHOT: f"{vg}/{new.name}",
                                  LABEL_SNAPSHOT_UUID: new.uuid}, known_zero=kz, stats=stats)
                yield source, plan
        except BaseException:
            try:
                lvm.remove(vg, new.name)
            except LvmError as e:
                warn(f"could not remove the new snapshot {vg}/{new.name}: {e}")
            raise
        done.append(tracking)

    m = run_backup(repo, prepare, volume, command=f"backup lvm:{vg}/{lv}", labels=labels,
                   source_desc=f"lvm:{vg}/{lv}", progress=progress, warn=warn)
    tracking = done[0] if done else None
    if tracking is not None:
        try:
            used = lvm.lv(vg, tracking.name).snap_percent
            if used is not None and used >= FULL_WARNING_PERCENT:
                warn(f"tracking snapshot {tracking.name} was {used:.0f}% full: raise "
                     "--snapshot-size or back up more often before it overflows")
            lvm.remove(vg, tracking.name)
        except SnapshipError as e:
            warn(f"could not remove the old snapshot {vg}/{tracking.name}: {e}")
    return m
