"""Retention rules (engine/prune.py) over a synthetic 3-year history, against hand-computed
tables.

The history: one version every 6 hours (00, 06, 12, 18 UTC) from 2023-01-01 00:00 to
2025-12-31 18:00, 4384 versions. 2025-12-31 is a Wednesday; ISO week 2026-W01 runs from
Monday 2025-12-29, so the weeks before it end on Sundays 12-28, 12-21, 12-14.
"""

from __future__ import annotations

import datetime as dt

import pytest

from snapship.engine.prune import Decision, Duration, Policy, decide, parse_duration
from snapship.errors import UsageError


def vid(stamp: str) -> str:
    """`2025-12-31 18` -> the version id of that 6-hourly backup."""
    t = dt.datetime.strptime(stamp, "%Y-%m-%d %H")
    return f"{t:%Y%m%d-%H%M%S}.000-{t.hour:04x}"


def history() -> list[str]:
    t = dt.datetime(2023, 1, 1)
    out = []
    while t <= dt.datetime(2025, 12, 31, 18):
        out.append(f"{t:%Y%m%d-%H%M%S}.000-{t.hour:04x}")
        t += dt.timedelta(hours=6)
    return out


HISTORY = history()


def kept(decisions: list[Decision]) -> dict[str, list[str]]:
    return {d.version: d.reasons for d in decisions if d.keep}


def test_history_shape() -> None:
    assert len(HISTORY) == (365 + 366 + 365) * 4 == 4384


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (Policy(last=3), ["2025-12-31 18", "2025-12-31 12", "2025-12-31 06"]),
        (Policy(hourly=5), ["2025-12-31 18", "2025-12-31 12", "2025-12-31 06", "2025-12-31 00",
                            "2025-12-30 18"]),
        (Policy(daily=7), [f"2025-12-{d} 18" for d in range(31, 24, -1)]),
        (Policy(weekly=4), ["2025-12-31 18", "2025-12-28 18", "2025-12-21 18", "2025-12-14 18"]),
        (Policy(monthly=12), ["2025-12-31 18", "2025-11-30 18", "2025-10-31 18", "2025-09-30 18",
                              "2025-08-31 18", "2025-07-31 18", "2025-06-30 18", "2025-05-31 18",
                              "2025-04-30 18", "2025-03-31 18", "2025-02-28 18", "2025-01-31 18"]),
        (Policy(yearly=5), ["2025-12-31 18", "2024-12-31 18", "2023-12-31 18"]),
        (Policy(within=Duration(days=2)),
         ["2025-12-31 18", "2025-12-31 12", "2025-12-31 06", "2025-12-31 00",
          "2025-12-30 18", "2025-12-30 12", "2025-12-30 06", "2025-12-30 00", "2025-12-29 18"]),
    ],
    ids=["last", "hourly", "daily", "weekly", "monthly", "yearly", "within-2d"],
)
def test_each_rule(policy: Policy, expected: list[str]) -> None:
    got = kept(decide(HISTORY, policy))
    assert list(got) == [vid(s) for s in expected]


def test_reasons_name_the_rule_and_period() -> None:
    got = kept(decide(HISTORY, Policy(daily=7, weekly=4, monthly=12, yearly=3)))
    assert got[vid("2025-12-31 18")] == ["daily 2025-12-31", "weekly 2026-W01",
                                         "monthly 2025-12", "yearly 2025"]
    assert got[vid("2025-12-28 18")] == ["daily 2025-12-28", "weekly 2025-W52"]
    assert got[vid("2025-12-14 18")] == ["weekly 2025-W50"]
    assert got[vid("2025-02-28 18")] == ["monthly 2025-02"]
    assert got[vid("2023-12-31 18")] == ["yearly 2023"]


def test_combination_is_the_union() -> None:
    # daily: 12-25..12-31 (7); weekly adds 12-21 and 12-14; monthly adds Jan..Nov 2025 (11);
    # yearly adds 2024-12-31 and 2023-12-31: 7 + 2 + 11 + 2.
    got = kept(decide(HISTORY, Policy(daily=7, weekly=4, monthly=12, yearly=3)))
    assert len(got) == 22
    assert set(got) == (
        {vid(f"2025-12-{d} 18") for d in range(25, 32)}
        | {vid("2025-12-21 18"), vid("2025-12-14 18")}
        | {vid(s) for s in ["2025-01-31 18", "2025-02-28 18", "2025-03-31 18", "2025-04-30 18",
                            "2025-05-31 18", "2025-06-30 18", "2025-07-31 18", "2025-08-31 18",
                            "2025-09-30 18", "2025-10-31 18", "2025-11-30 18"]}
        | {vid("2024-12-31 18"), vid("2023-12-31 18")}
    )


def test_last_and_within_overlap_once() -> None:
    got = kept(decide(HISTORY, Policy(last=2, within=Duration(hours=12))))
    assert got == {vid("2025-12-31 18"): ["last 2", "within"],
                   vid("2025-12-31 12"): ["last 2", "within"],
                   vid("2025-12-31 06"): ["within"]}


def test_within_a_month_counts_calendar_months() -> None:
    got = kept(decide(HISTORY, Policy(within=parse_duration("1m"))))
    # From 2025-11-30 18:00 on: that one, then every version of December.
    assert len(got) == 1 + 31 * 4
    assert min(got) == vid("2025-11-30 18")


def test_protected_versions_are_kept_whatever_the_rules() -> None:
    old = vid("2023-06-15 06")
    got = kept(decide(HISTORY, Policy(last=1), protected=frozenset({old})))
    assert got == {vid("2025-12-31 18"): ["last 1"], old: ["protected"]}


def test_the_newest_is_kept_by_every_rule() -> None:
    for policy in (Policy(last=1), Policy(hourly=1), Policy(daily=1), Policy(weekly=1),
                   Policy(monthly=1), Policy(yearly=1), Policy(within=Duration(hours=1))):
        assert decide(HISTORY, policy)[0].keep


def test_periods_follow_the_time_zone() -> None:
    # At UTC+10, 2025-12-31 18:00Z is 2026-01-01 04:00 and 12:00Z is 22:00 on 12-31.
    tz = dt.timezone(dt.timedelta(hours=10))
    got = kept(decide(HISTORY, Policy(daily=2), tz=tz))
    assert got == {vid("2025-12-31 18"): ["daily 2026-01-01"],
                   vid("2025-12-31 12"): ["daily 2025-12-31"]}


def test_sparse_history_keeps_periods_that_have_versions() -> None:
    # Monthly rule over gaps: periods without versions don't use up the count.
    versions = [vid(s) for s in ["2024-01-05 00", "2024-01-20 00", "2024-06-01 00",
                                 "2025-03-03 06", "2025-03-04 12"]]
    got = kept(decide(versions, Policy(monthly=3)))
    assert list(got) == [vid("2025-03-04 12"), vid("2024-06-01 00"), vid("2024-01-20 00")]


def test_no_rule_is_an_error() -> None:
    with pytest.raises(UsageError):
        decide(HISTORY, Policy())


@pytest.mark.parametrize(("text", "expected"), [
    ("7d", Duration(days=7)), ("2w", Duration(days=14)), ("1y6m", Duration(1, 6)),
    ("12h", Duration(hours=12)), ("1y2m3w4d5h", Duration(1, 2, 25, 5)),
])
def test_parse_duration(text: str, expected: Duration) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "7", "d", "1x", "-1d", "1d ", "1.5d"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_duration(text)


def test_month_arithmetic_clamps_to_month_end() -> None:
    t = dt.datetime(2025, 3, 31, 18, tzinfo=dt.UTC)
    assert Duration(months=1).before(t) == dt.datetime(2025, 2, 28, 18, tzinfo=dt.UTC)
    assert Duration(years=1, months=1).before(t) == dt.datetime(2024, 2, 29, 18, tzinfo=dt.UTC)
    assert Duration(months=3).before(t) == dt.datetime(2024, 12, 31, 18, tzinfo=dt.UTC)
