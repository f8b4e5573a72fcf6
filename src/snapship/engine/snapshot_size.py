"""Where a classic tracking snapshot goes and how large it is (docs/snapspace.md): pure.

Placement: the PVs `--snapshot-pv` names, else the VG's snapshot space (PVs tagged
snapship-snapspace that are present), else anywhere in the VG. Size `auto`: what the earlier
tracking snapshots held per second, at the fastest of the recorded periods, over the longest
of them, twice over; 10% of the origin while nothing is recorded; never above the origin
(plus its COW metadata) nor what the chosen PVs have free.

The periods travel in the versions' stats (`stats.snapshot.periods`, docs/format.md): each
backup measures how full its tracking snapshot was when the next snapshot was taken, and
carries the base's newest periods forward, so sizing needs the base manifest only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from snapship.changes.lvm import PvInfo
from snapship.errors import SourceError, UsageError
from snapship.units import human_bytes

AUTO = "auto"
DEFAULT_PERCENT = 10
"""`auto` with no period recorded yet: the fixed default's share of the origin."""
HEADROOM = 2.0
MIN_BYTES = 32 << 20
KEEP_PERIODS = 8


@dataclass(frozen=True)
class Period:
    cow_bytes: int
    """What the tracking snapshot held when the next one was taken (its size if it
    overflowed: then at least that)."""
    seconds: float
    overflowed: bool = False

    def record(self) -> dict[str, Any]:
        return {"cow_bytes": self.cow_bytes, "seconds": round(self.seconds, 3),
                "overflowed": self.overflowed}


def periods_of(stats: dict[str, Any]) -> list[Period]:
    """The periods a version's stats carry (those of a wrong shape are left out: they are
    recorded data, and sizing falls back to the default without them)."""
    snap = stats.get("snapshot")
    raw = snap.get("periods") if isinstance(snap, dict) else None
    out = []
    for p in raw if isinstance(raw, list) else []:
        if not isinstance(p, dict):
            continue
        cow, secs, over = p.get("cow_bytes"), p.get("seconds"), p.get("overflowed", False)
        if (isinstance(cow, int) and not isinstance(cow, bool) and cow >= 0
                and isinstance(secs, int | float) and not isinstance(secs, bool)
                and math.isfinite(secs) and secs > 0 and isinstance(over, bool)):
            out.append(Period(cow, float(secs), over))
    return out[:KEEP_PERIODS]


def place(pvs: Sequence[PvInfo], wanted: Sequence[str], vg: str) -> tuple[list[PvInfo], str]:
    """The PVs a new classic snapshot goes on ([] = anywhere in the VG) and why."""
    present = [p for p in pvs if not p.missing]
    if wanted:
        by_name = {p.name: p for p in present}
        for name in wanted:
            if name not in by_name:
                raise UsageError(f"--snapshot-pv {name} is not a present PV of {vg} (see "
                                 f"`pvs -S vg_name={vg}`)")
        return [by_name[n] for n in dict.fromkeys(wanted)], "--snapshot-pv"
    space = [p for p in present if p.snapspace]
    if space:
        return space, "snapshot space"
    return [], "the volume group"


def auto_extents(periods: Sequence[Period], *, origin_size: int, extent_size: int,
                 free_extents: int) -> tuple[int, str]:
    """Extents for a tracking snapshot sized from `periods`, and a note saying how."""
    if extent_size <= 0:
        raise SourceError("the volume group's extent size is unknown")
    if periods:
        rate = max(p.cow_bytes * (2 if p.overflowed else 1) / p.seconds for p in periods)
        span = max(p.seconds for p in periods)
        want = rate * span * HEADROOM
        note = (f"auto: {human_bytes(rate * 3600)}/h at most over {len(periods)} "
                f"period(s), for {span / 3600:.2f} h, x{HEADROOM:g}")
    else:
        want = origin_size * DEFAULT_PERCENT / 100
        note = f"auto: no period recorded yet, {DEFAULT_PERCENT}% of the origin"
    # A COW needs ~16 bytes of metadata per 4 KiB chunk beside the data: past the origin's
    # size plus that, more space never helps.
    want = min(max(want, MIN_BYTES), origin_size * 1.01 + 2 * extent_size)
    extents = max(1, math.ceil(want / extent_size))
    if extents > free_extents:
        if free_extents <= 0:
            raise SourceError("no free extents for a tracking snapshot (add snapshot space: "
                              "snapship snapspace add VG --file FILE --size SIZE)")
        note += f"; only {free_extents} extents free, {extents} wanted"
        extents = free_extents
    return extents, note
