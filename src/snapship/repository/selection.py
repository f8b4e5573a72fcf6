"""Choosing a version the way a person names it: the text after `VOLUME@`.

Pure: given a volume's version ids (sorted, as the catalog lists them) and what the user wrote,
pick one id or say in one line why none fits. No storage, no clock (the local time zone is a
parameter, the system's by default).

The forms, tried in this order:

- nothing or `latest`: the newest version;
- `latest~N`: the Nth before the newest (`latest~0` is the newest);
- `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM` or `YYYY-MM-DDTHH:MM:SS` (a space may stand for the `T`):
  the newest version made at or before the end of the day, minute or second named, in local
  time (a trailing `Z` reads it as UTC). Version ids carry their UTC time
  (`YYYYMMDD-HHMMSS.mmm-xxxx`, `new_version_id`), so this needs no manifest;
- otherwise an exact id or a unique prefix of one; a prefix shared by several lists them.

A date cannot be mistaken for an id prefix: ids have no `-` after the year.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

from snapship.errors import NotFound, UsageError

_LATEST_BACK = re.compile(r"latest~(\d{1,9})")
_WHEN = re.compile(
    r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})"
    r"(?:[T ](?P<h>\d{2}):(?P<mi>\d{2})(?::(?P<s>\d{2}))?)?(?P<z>Z)?"
)
_ID_TIME = re.compile(r"(\d{8}-\d{6})\.(\d{3})")
MAX_LISTED = 8
"""Candidates an ambiguous prefix names; more are counted."""


def version_time(version: str) -> dt.datetime | None:
    """The UTC time a version id says it was made (to the millisecond), None for an id that
    does not start with one (snapship makes none such, but storage may hold anything)."""
    m = _ID_TIME.match(version)
    if m is None:
        return None
    try:
        t = dt.datetime.strptime(m.group(1), "%Y%m%d-%H%M%S").replace(tzinfo=dt.UTC)
    except ValueError:
        return None
    return t + dt.timedelta(milliseconds=int(m.group(2)))


def parse_when(text: str, tz: dt.tzinfo | None = None) -> dt.datetime | None:
    """The last instant (exclusive bound) of the day, minute or second `text` names, as an
    aware UTC time; None when `text` is not of the date form at all. A date of the form that
    does not exist (month 13, 25:00) is a `UsageError`."""
    m = _WHEN.fullmatch(text)
    if m is None:
        return None
    try:
        start = dt.datetime(int(m["y"]), int(m["mo"]), int(m["d"]),
                            int(m["h"] or 0), int(m["mi"] or 0), int(m["s"] or 0))
    except ValueError as e:
        raise UsageError(f"version {text!r} is not a valid date or time: {e}") from None
    if m["s"] is not None:
        step = dt.timedelta(seconds=1)
    elif m["h"] is not None:
        step = dt.timedelta(minutes=1)
    else:
        step = dt.timedelta(days=1)
    # Naive arithmetic first: "the end of that day" is a wall-clock notion, whatever the DST.
    end = start + step
    if m["z"]:
        return end.replace(tzinfo=dt.UTC)
    local = end.replace(tzinfo=tz) if tz is not None else end.astimezone()
    return local.astimezone(dt.UTC)


def select(volume: str, versions: Sequence[str], spec: str | None,
           tz: dt.tzinfo | None = None) -> str:
    """The id in `versions` (ascending, non-empty) that `spec` names; `NotFound` when none
    fits, `UsageError` for an ambiguous prefix or a date that does not exist."""
    if not versions:
        raise NotFound(f"volume {volume} has no versions in this repository")
    if spec is None or spec == "latest":
        return versions[-1]
    back = _LATEST_BACK.fullmatch(spec)
    if back is not None:
        n = int(back.group(1))
        if n >= len(versions):
            raise NotFound(f"volume {volume} has {_count(len(versions))}: latest~{n} would be "
                           f"the {_ordinal(n + 1)} newest")
        return versions[-1 - n]
    if spec in versions:
        return spec
    before = parse_when(spec, tz)
    if before is not None:
        return _at_or_before(volume, versions, spec, before)
    matches = [v for v in versions if v.startswith(spec)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        listed = ", ".join(matches[:MAX_LISTED])
        more = f" and {len(matches) - MAX_LISTED} more" if len(matches) > MAX_LISTED else ""
        raise UsageError(f"version {spec!r} of {volume} is ambiguous: it could be {listed}"
                         f"{more}")
    # What was typed, quoted only when it would not show as itself on one line.
    shown = spec if spec.isprintable() and spec.strip() == spec and spec else repr(spec)
    raise NotFound(f"volume {volume} has no version {shown}")


def _at_or_before(volume: str, versions: Sequence[str], spec: str, end: dt.datetime) -> str:
    timed = [(t, v) for v in versions if (t := version_time(v)) is not None]
    fits = [v for t, v in timed if t < end]
    if fits:
        return max(fits, key=lambda v: (version_time(v), v))
    oldest = min(timed)[1] if timed else None
    zone = "UTC" if spec.endswith("Z") else "local time"
    raise NotFound(f"volume {volume} has no version made at or before {spec} ({zone})"
                   + (f"; its oldest is {oldest}" if oldest else ""))


def _count(n: int) -> str:
    return f"{n} version" + ("" if n == 1 else "s")


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
