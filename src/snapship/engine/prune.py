"""Retention: which versions a policy keeps, and why; and forgetting the others.

`decide` is pure: versions and a policy in, one decision per version out, each kept version
with the rules that keep it. The rules are restic's, which sysadmins know: `--keep-last N`
keeps the N newest; `--keep-hourly/daily/weekly/monthly/yearly N` keep the newest version of
each of the N most recent hours/days/ISO weeks/months/years that have a version; `--keep-within
D` keeps every version less than D older than the newest one (not than now: a volume whose
backups stopped does not expire by itself). Calendar periods are in the given time zone.
Protected versions are always kept. Forgetting only deletes manifests and reference lists;
`gc` gives the space back.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from snapship.errors import NotFound, ObjectNotFound, UsageError
from snapship.formats import refs as refs_codec
from snapship.repository import locks
from snapship.repository.catalog import Catalog

BUCKETS = {
    "hourly": "%Y-%m-%d %H:00",
    "daily": "%Y-%m-%d",
    "weekly": "%G-W%V",  # ISO 8601 weeks: Monday to Sunday, week 1 holds the first Thursday
    "monthly": "%Y-%m",
    "yearly": "%Y",
}
"""Each period rule and the strftime pattern naming its periods (also used as the reason)."""
_DURATION = re.compile(r"(\d+)([ymwdh])")


@dataclass(frozen=True)
class Duration:
    """A calendar duration: years and months move the calendar, the rest is fixed time."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    def before(self, t: dt.datetime) -> dt.datetime:
        months = t.year * 12 + t.month - 1 - self.years * 12 - self.months
        year, month = divmod(months, 12)
        month += 1
        day = t.day
        while True:  # 31 March minus one month is 28/29 February, as people count
            try:
                moved = t.replace(year=year, month=month, day=day)
                break
            except ValueError:
                day -= 1
        return moved - dt.timedelta(days=self.days, hours=self.hours)


def parse_duration(text: str) -> Duration:
    """`1y6m`, `30d`, `2w`, `12h`: y years, m months, w weeks, d days, h hours."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise UsageError(f"invalid duration {text!r}: use e.g. 7d, 2w, 6m, 1y6m, 12h")
    amounts = dict.fromkeys("ymwdh", 0)
    for n, unit in parts:
        amounts[unit] += int(n)
    return Duration(amounts["y"], amounts["m"], amounts["d"] + 7 * amounts["w"], amounts["h"])


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration | None = None

    def is_empty(self) -> bool:
        return not (self.last or self.within or any(getattr(self, b) for b in BUCKETS))


@dataclass
class Decision:
    version: str
    time: dt.datetime
    reasons: list[str] = field(default_factory=list)

    @property
    def keep(self) -> bool:
        return bool(self.reasons)


def version_time(version: str) -> dt.datetime:
    """The UTC time a snapship version id starts with (`YYYYMMDD-HHMMSS.mmm-xxxx`)."""
    try:
        return dt.datetime.strptime(version[:19], "%Y%m%d-%H%M%S.%f").replace(tzinfo=dt.UTC)
    except ValueError:
        raise UsageError(f"version id {version!r} does not start with a time") from None


def decide(versions: Sequence[str], policy: Policy, *, protected: frozenset[str] = frozenset(),
           tz: dt.tzinfo = dt.UTC) -> list[Decision]:
    """One volume's versions, newest first, each with the reasons it is kept (none: forget)."""
    if policy.is_empty():
        raise UsageError("no retention rule given: use at least one --keep-* option")
    out = sorted((Decision(v, version_time(v).astimezone(tz)) for v in versions),
                 key=lambda d: d.version, reverse=True)
    for i, d in enumerate(out):
        if d.version in protected:
            d.reasons.append("protected")
        if i < policy.last:
            d.reasons.append(f"last {policy.last}")
    for name, pattern in BUCKETS.items():
        left = getattr(policy, name)
        seen = None
        for d in out:
            if not left:
                break
            period = d.time.strftime(pattern)
            if period != seen:
                d.reasons.append(f"{name} {period}")
                seen = period
                left -= 1
    if policy.within is not None and out:
        cutoff = policy.within.before(out[0].time)
        for d in out:
            if d.time >= cutoff:
                d.reasons.append("within")
    return out


@dataclass
class PruneReport:
    decisions: dict[str, list[Decision]] = field(default_factory=dict)
    """Per volume, newest first."""
    forgotten: int = 0
    chunks_freeable: int = 0
    bytes_freeable: int = 0
    """What the next gc gives back: chunks only forgotten versions use."""



def freeable(catalog: Catalog, forget: set[tuple[str, str]]) -> tuple[int, int]:
    """Chunks (and their stored bytes) that only versions in `forget` reference."""
    kept: set[int] = set()
    doomed: dict[int, int] = {}
    for vol, ver in catalog.refs_listed():
        try:
            r = catalog.load_refs(vol, ver)
        except ObjectNotFound:
            continue
        if (vol, ver) in forget:
            doomed.update(zip(refs_codec.short_keys(r.ids), r.sizes, strict=True))
        else:
            kept.update(refs_codec.short_keys(r.ids))
    sizes = [n for k, n in doomed.items() if k not in kept]
    return len(sizes), sum(sizes)


def run_prune(catalog: Catalog, policy: Policy, *, volume: str | None = None,
              dry_run: bool = False, tz: dt.tzinfo = dt.UTC,
              warn: Callable[[str], None] = lambda message: None) -> PruneReport:
    """Apply `policy` to every volume (or one), forgetting what no rule keeps."""
    report = PruneReport()
    with catalog.exclusive(locks.PRUNE, "prune", warn) as lock:
        by_volume: dict[str, list[str]] = {}
        for vol, ver in catalog.versions(volume):
            by_volume.setdefault(vol, []).append(ver)
        if volume is not None and volume not in by_volume:
            raise NotFound(f"volume {volume} has no versions in this repository")
        shielded = catalog.protected()
        forget: set[tuple[str, str]] = set()
        for vol, versions in by_volume.items():
            mine = frozenset(v for pv, v in shielded if pv == vol)
            report.decisions[vol] = decide(versions, policy, protected=mine, tz=tz)
            forget.update((vol, d.version) for d in report.decisions[vol] if not d.keep)
            # decide() keeps the newest under any rule; an incremental base is never lost.
            assert report.decisions[vol][0].keep
        report.chunks_freeable, report.bytes_freeable = freeable(catalog, forget)
        if not dry_run:
            for vol, ver in sorted(forget):
                lock.ensure("forgetting more versions")
                catalog.delete_version(vol, ver)
                report.forgotten += 1
    return report


def forget_versions(catalog: Catalog, targets: Sequence[tuple[str, str]], *,
                    allow_newest: bool = False,
                    warn: Callable[[str], None] = lambda message: None) -> tuple[int, int]:
    """Forget exactly these versions; returns what the next gc frees (chunks, bytes).

    Refuses a protected version, and the newest of a volume unless `allow_newest`."""
    with catalog.exclusive(locks.PRUNE, "forget", warn) as lock:
        shielded = catalog.protected()
        for vol, ver in targets:
            if (vol, ver) in shielded:
                raise UsageError(f"{vol}@{ver} is protected: unprotect it first")
            if not allow_newest and catalog.versions(vol)[-1] == (vol, ver):
                raise UsageError(f"{vol}@{ver} is the newest version of {vol} (the base of "
                                 "the next incremental backup): add --allow-newest to forget it")
        result = freeable(catalog, set(targets))
        for vol, ver in targets:
            lock.ensure("forgetting more versions")
            catalog.delete_version(vol, ver)
    return result
