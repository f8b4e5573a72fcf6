"""The changed-ranges file and `backup --changed-ranges`: reads only what the list names."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapship.changes.range_file import parse_ranges
from snapship.errors import UsageError
from snapship.types import ByteRange


def test_parse_ranges_formats() -> None:
    text = "# snapship-ranges 1\n0 4096\n\n0x100000, 0x2000  # hex\n4096 10\n"
    assert parse_ranges(text) == [ByteRange(0, 4106), ByteRange(0x100000, 0x102000)]


@pytest.mark.parametrize(
    ("text", "message"),
    [("# snapship-ranges 2\n", "version 2"), ("1 2 3\n", "line 1"), ("abc\n", "line 1"),
     ("0 1\n-5 3\n", "line 2")],
)
def test_parse_ranges_rejects(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_ranges(text)


@given(st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 2**20))))
def test_parse_ranges_round_trip(pairs: list[tuple[int, int]]) -> None:
    text = "".join(f"{s} {n}\n" if i % 2 else f"{hex(s)},{hex(n)}\n"
                   for i, (s, n) in enumerate(pairs))
    expected = parse_ranges("".join(f"{s} {n}\n" for s, n in pairs))
    assert parse_ranges(text) == expected
    assert sum(r.length for r in expected) <= sum(n for _, n in pairs)


def test_parse_ranges_leading_zeros_are_decimal() -> None:
    assert parse_ranges("0100 4096\n00 010\n0x0010,0x00\n") == [ByteRange(0, 10),
                                                                  ByteRange(100, 4196)]


@pytest.mark.parametrize("number", ["1" * 5000, "9" * 20, str(1 << 63), "0x" + "f" * 17,
                                    "0x8000000000000000"])
def test_parse_ranges_bounds_numbers_and_names_the_line(number: str) -> None:
    with pytest.raises(UsageError, match=r"line 2: .* is too large \(at most 2\^63-1\)") as e:
        parse_ranges(f"0 1\n{number} 1\n")
    assert len(str(e.value)) < 120


def test_parse_ranges_accepts_the_largest_numbers() -> None:
    top = (1 << 63) - 1
    for text in (f"{top} {top}", f"{'0' * 100}{top} 0x{'0' * 50}7fffffffffffffff"):
        assert parse_ranges(text) == [ByteRange(top, 2 * top)]


@pytest.mark.parametrize("text", ["\u0661\u0662 4096\n", "1 \uff11\n"])
def test_parse_ranges_takes_only_ascii_digits(text: str) -> None:
    with pytest.raises(UsageError, match="line 1: expected 'START LENGTH'"):
        parse_ranges(text)


@given(st.lists(st.tuples(st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1),
                          st.integers(0, 5)), max_size=10))
def test_parse_ranges_any_padding_of_zeros_is_the_same_number(
        items: list[tuple[int, int, int]]) -> None:
    plain = "".join(f"{s} {n}\n" for s, n, _ in items)
    padded = "".join(f"{'0' * z}{s},{'0' * z}{n}\n" for s, n, z in items)
    assert parse_ranges(padded) == parse_ranges(plain)


@given(st.text(max_size=60))
def test_parse_ranges_never_crashes(text: str) -> None:
    with contextlib.suppress(UsageError):
        for r in parse_ranges(text):
            assert 0 <= r.start <= r.end < 2**64


def cli(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SNAPSHIP_PASSPHRASE": "pw"}
    return subprocess.run([sys.executable, "-m", "snapship.cli.main", *map(str, args)],
                          input=stdin, capture_output=True, text=True, env=env, check=False)


def test_backup_with_changed_ranges_reads_only_those_chunks(tmp_path: Path) -> None:
    repo, img = tmp_path / "repo", tmp_path / "disk.img"
    chunk = 64 * 1024
    data = bytearray(os.urandom(20 * chunk))
    img.write_bytes(data)
    assert cli("init", "--repo", repo, "--encryption", "none", "--chunk-size", "64K"
               ).returncode == 0
    r = cli("backup", "--repo", repo, img, "--volume", "d", "--changed-ranges", "-", stdin="")
    assert r.returncode == 2 and "needs an earlier version" in r.stderr
    assert cli("backup", "--repo", repo, img, "--volume", "d").returncode == 0
    data[3 * chunk + 10 : 3 * chunk + 20] = b"x" * 10
    data[7 * chunk - 1 : 7 * chunk + 1] = b"yy"
    img.write_bytes(data)
    ranges = tmp_path / "ranges"
    ranges.write_text(f"{3 * chunk + 10} 10\n{7 * chunk - 1} 2\n")
    r = cli("backup", "--repo", repo, img, "--volume", "d", "--changed-ranges", ranges, "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)["stats"]
    assert stats["mode"] == "incremental" and stats["chunks_read"] == 3  # chunks 3, 6 and 7
    assert stats["bytes_read"] == 3 * chunk
    out = tmp_path / "out"
    assert cli("restore", "--repo", repo, "d", out).returncode == 0
    assert out.read_bytes() == bytes(data)
    ranges.write_text(f"{20 * chunk} 1\n")
    r = cli("backup", "--repo", repo, img, "--volume", "d", "--changed-ranges", ranges)
    assert r.returncode == 2 and "beyond the volume" in r.stderr
