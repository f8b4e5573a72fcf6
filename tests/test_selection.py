"""Choosing a version like a person (issue 12, item 7): `repository/selection.py`.

Property tests draw version histories and time zones and check the rules against a plain
restatement of them; example tests pin the messages a person reads.
"""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from snapship.errors import NotFound, UsageError
from snapship.repository.selection import parse_when, select, version_time

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def vid(t: dt.datetime, suffix: str = "0a0b") -> str:
    """A version id as `new_version_id` makes it at UTC time `t`."""
    t = t.astimezone(dt.UTC)
    return f"{t:%Y%m%d-%H%M%S}.{t.microsecond // 1000:03d}-{suffix}"


times = st.lists(st.integers(min_value=0, max_value=90 * 86400 * 1000), min_size=1,
                 max_size=30, unique=True).map(
    lambda ms: sorted(T0 + dt.timedelta(milliseconds=m) for m in ms))
zones = st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=1)),
                         dt.timezone(dt.timedelta(hours=-7)),
                         dt.timezone(dt.timedelta(hours=5, minutes=30))])


@given(times)
def test_an_id_says_its_time(ts: list[dt.datetime]) -> None:
    for t in ts:
        assert version_time(vid(t)) == t.replace(microsecond=t.microsecond // 1000 * 1000)


@given(times, st.integers(min_value=0, max_value=40))
def test_latest_back_n(ts: list[dt.datetime], n: int) -> None:
    versions = [vid(t) for t in ts]
    if n < len(versions):
        assert select("v", versions, f"latest~{n}") == versions[-1 - n]
    else:
        with pytest.raises(NotFound, match=f"has {len(versions)} version"):
            select("v", versions, f"latest~{n}")
    assert select("v", versions, "latest") == select("v", versions, None) == versions[-1]


@given(times, zones, st.integers(min_value=-86400, max_value=91 * 86400),
       st.sampled_from(["day", "minute", "second"]), st.booleans())
def test_a_local_time_picks_the_newest_version_at_or_before_it(
    ts: list[dt.datetime], tz: dt.timezone, offset_s: int, precision: str, space: bool
) -> None:
    versions = [vid(t) for t in ts]
    local = (T0 + dt.timedelta(seconds=offset_s)).astimezone(tz)
    sep = " " if space else "T"
    if precision == "day":
        spec, end = f"{local:%Y-%m-%d}", dt.datetime.combine(
            local.date() + dt.timedelta(days=1), dt.time(), tz)
    elif precision == "minute":
        spec = f"{local:%Y-%m-%d}{sep}{local:%H:%M}"
        end = local.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    else:
        spec = f"{local:%Y-%m-%d}{sep}{local:%H:%M:%S}"
        end = local.replace(microsecond=0) + dt.timedelta(seconds=1)
    expected = [v for v in versions if (t := version_time(v)) is not None and t < end]
    if expected:
        assert select("v", versions, spec, tz) == expected[-1]
    else:
        with pytest.raises(NotFound, match="at or before"):
            select("v", versions, spec, tz)


@given(times, st.integers(min_value=1, max_value=19))
def test_a_prefix_is_unique_or_its_candidates_are_listed(ts: list[dt.datetime], k: int
                                                          ) -> None:
    versions = [vid(t, f"{i:04x}") for i, t in enumerate(ts)]
    prefix = versions[0][:k]
    assume(prefix not in versions and "-" not in prefix[4:5])
    matches = [v for v in versions if v.startswith(prefix)]
    if len(matches) == 1:
        assert select("v", versions, prefix) == matches[0]
    else:
        with pytest.raises(UsageError, match="ambiguous") as e:
            select("v", versions, prefix)
        for m in matches[:8]:
            assert m in str(e.value)


@given(st.text(max_size=30))
def test_any_text_selects_one_listed_version_or_fails_cleanly(spec: str) -> None:
    versions = [vid(T0 + dt.timedelta(hours=h), f"{h:04x}") for h in range(0, 200, 7)]
    try:
        assert select("v", versions, spec) in versions
    except (NotFound, UsageError) as e:
        assert "\n" not in str(e)


def test_the_forms_a_person_writes() -> None:
    tz = dt.timezone(dt.timedelta(hours=1))  # a CET winter: 07:30 UTC is 08:30 local
    versions = [vid(dt.datetime(2026, 11, 30, 23, 30, tzinfo=dt.UTC), "0001"),  # 00:30 Dec 1
                vid(dt.datetime(2026, 12, 1, 6, 59, 59, tzinfo=dt.UTC), "0002"),  # 07:59:59
                vid(dt.datetime(2026, 12, 1, 7, 30, tzinfo=dt.UTC), "0003"),  # 08:30
                vid(dt.datetime(2026, 12, 2, 7, 0, tzinfo=dt.UTC), "0004")]
    assert select("root", versions, "2026-12-01", tz) == versions[2]
    assert select("root", versions, "2026-12-01T08:00", tz) == versions[1]
    assert select("root", versions, "2026-12-01 07:59:58", tz) == versions[0]
    assert select("root", versions, "2026-12-01T06:59:59Z", tz) == versions[1]
    assert select("root", versions, "2030-01-01", tz) == versions[3]
    assert select("root", versions, "latest~3") == versions[0]
    with pytest.raises(NotFound, match=r"no version made at or before 2026-11-30 \(local "
                       r"time\); its oldest is 20261130-233000\.000-0001"):
        select("root", versions, "2026-11-30", tz)
    with pytest.raises(UsageError, match=r"ambiguous: it could be 20261201-065959.000-0002, "
                       r"20261201-073000.000-0003$"):
        select("root", versions, "20261201")
    with pytest.raises(UsageError, match="not a valid date"):
        select("root", versions, "2026-13-01")
    with pytest.raises(NotFound, match="has no version nope"):
        select("root", versions, "nope")
    with pytest.raises(NotFound, match="has no versions"):
        select("root", [], None)


def test_a_long_candidate_list_is_cut() -> None:
    versions = [vid(T0 + dt.timedelta(seconds=s), f"{s:04x}") for s in range(20)]
    with pytest.raises(UsageError, match=r"and 12 more$"):
        select("root", versions, "20261101")


def test_parse_when_is_none_for_what_is_no_date() -> None:
    assert parse_when("20261201") is None
    assert parse_when("2026-12-01x") is None
    end = parse_when("2026-12-01T08:00Z")
    assert end == dt.datetime(2026, 12, 1, 8, 1, tzinfo=dt.UTC)


def test_the_catalog_resolves_through_these_rules() -> None:
    from snapship.repository.catalog import Catalog
    from snapship.storage.memory import MemoryStorage
    from snapship.types import VersionRef

    catalog = Catalog(MemoryStorage())
    ids = [vid(dt.datetime(2026, 12, d, 12, tzinfo=dt.UTC), "0001") for d in (1, 2, 3)]
    for v in ids:
        catalog.put_manifest_blob("root", v, b"not read")
    assert catalog.resolve(VersionRef("root", "latest~2")) == ("root", ids[0])
    assert catalog.resolve(VersionRef("root", "2026-12-02T12:00Z")) == ("root", ids[1])
    assert catalog.resolve(VersionRef("root")) == ("root", ids[2])
    with pytest.raises(NotFound, match="volume other has no versions"):
        catalog.resolve(VersionRef("other", "latest~1"))
