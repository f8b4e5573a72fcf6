"""The dm-snapshot COW parser and writer: round trips and strict rejection of damage."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapship.changes.cow import (
    HEADER,
    RECORD,
    SNAP_MAGIC,
    CowError,
    CowInvalid,
    CowUninitialised,
    area_start,
    build_store,
    parse_bytes,
    parse_header,
)
from snapship.devices import UncachedReader
from snapship.types import ByteRange

SECTORS = st.sampled_from([1, 2, 8, 16])  # 512 B..8 KiB: small chunks, many areas


@st.composite
def stores(draw: st.DrawFn) -> tuple[int, dict[int, bytes]]:
    sectors = draw(SECTORS)
    olds = draw(st.lists(st.integers(0, 5000), unique=True, max_size=300))
    return sectors, {o: bytes([o % 251]) * 7 for o in olds}


@given(stores())
def test_valid_stores_round_trip(store: tuple[int, dict[int, bytes]]) -> None:
    sectors, chunks = store
    data = build_store(sectors, chunks)
    table = parse_bytes(data, origin_size=5001 * sectors * 512)
    assert table.header.chunk_sectors == sectors
    assert [old for old, _ in table.exceptions] == list(chunks)
    assert table.changed_chunks == sorted(chunks)
    c = sectors * 512
    for old, new in table.exceptions:  # each record's data chunk holds that chunk's content
        assert data[new * c : new * c + 7] == chunks[old]


def test_changed_ranges_coalesce_and_clip() -> None:
    table = parse_bytes(build_store(8, {3: b"", 4: b"", 9: b""}))
    assert table.changed_ranges() == [ByteRange(3 * 4096, 5 * 4096), ByteRange(9 * 4096, 10 * 4096)]
    clipped = table.changed_ranges(origin_size=9 * 4096 + 100)
    assert clipped[-1] == ByteRange(9 * 4096, 9 * 4096 + 100)


def test_area_layout_matches_the_kernel() -> None:
    # 4 KiB chunks: 256 records per area, area 0 at chunk 1, area 1 at chunk 258.
    header = parse_header(HEADER.pack(SNAP_MAGIC, 1, 1, 8))
    assert (area_start(0, header), area_start(1, header)) == (1, 258)
    data = build_store(8, {i: b"x" for i in range(300)})
    table = parse_bytes(data)
    assert table.areas == 2 and len(table.exceptions) == 300
    assert struct.unpack_from("<QQ", data, 258 * 4096) == (256, 259)


def test_full_area_is_followed_by_a_zeroed_one() -> None:
    table = parse_bytes(build_store(1, {i: b"" for i in range(32)}))  # exactly one full area
    assert table.areas == 2 and len(table.exceptions) == 32


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ((0, 0, 0, 0), CowUninitialised, "never initialised"),
        ((0x12345678, 1, 1, 8), CowError, "not a dm-snapshot COW store"),
        ((SNAP_MAGIC, 1, 2, 8), CowError, "version 2"),
        ((SNAP_MAGIC, 1, 1, 12), CowError, "not a power of two"),
        ((SNAP_MAGIC, 1, 1, 0), CowError, "not a power of two"),
        ((SNAP_MAGIC, 7, 1, 8), CowError, "valid = 7"),
        ((SNAP_MAGIC, 0, 1, 8), CowInvalid, "overflowed"),
    ],
)
def test_bad_headers(fields: tuple[int, int, int, int], error: type[Exception], message: str
                     ) -> None:
    data = bytearray(build_store(8, {1: b"a"}))
    HEADER.pack_into(data, 0, *fields)
    with pytest.raises(error, match=message):
        parse_bytes(bytes(data))


def test_invalid_store_is_never_an_empty_change_set() -> None:
    with pytest.raises(CowInvalid):
        parse_bytes(build_store(8, {}, valid=False))


def test_truncations() -> None:
    data = build_store(1, {i: b"" for i in range(40)})  # 512-byte chunks: 2 areas
    with pytest.raises(CowError, match="no complete header"):
        parse_bytes(data[:10])
    with pytest.raises(CowError, match="smaller than one chunk"):
        parse_bytes(data[:100])
    with pytest.raises(CowError, match="truncated"):
        parse_bytes(data[: 34 * 512])  # the second area is cut off


def test_records_pointing_past_the_store_or_origin() -> None:
    data = bytearray(build_store(8, {5: b"a", 6: b"b"}))
    RECORD.pack_into(data, 4096 + 16, 6, 10_000)
    with pytest.raises(CowError, match="past the end of the store"):
        parse_bytes(bytes(data))
    with pytest.raises(CowError, match="beyond the origin"):
        parse_bytes(build_store(8, {5: b"a", 6: b"b"}), origin_size=6 * 4096)
    data = bytearray(build_store(8, {5: b"a", 6: b"b"}))
    RECORD.pack_into(data, 4096 + 16, 6, 2)
    with pytest.raises(CowError, match="reuses data chunk"):
        parse_bytes(bytes(data))
    RECORD.pack_into(data, 4096 + 16, 6, 1)
    with pytest.raises(CowError, match="metadata chunk"):
        parse_bytes(bytes(data))


@settings(max_examples=400)
@given(store=stores(), data=st.data())
def test_random_corruption_never_crashes(store: tuple[int, dict[int, bytes]], data: st.DataObject
                                         ) -> None:
    sectors, chunks = store
    blob = bytearray(build_store(sectors, chunks))
    for _ in range(data.draw(st.integers(1, 5))):
        action = data.draw(st.sampled_from(["flip", "truncate", "zero-header"]))
        if action == "flip" and blob:
            pos = data.draw(st.integers(0, len(blob) - 1))
            blob[pos] ^= data.draw(st.integers(1, 255))
        elif action == "truncate":
            del blob[data.draw(st.integers(0, len(blob))) :]
        else:
            blob[: min(4, len(blob))] = bytes(min(4, len(blob)))
    try:
        table = parse_bytes(bytes(blob), origin_size=5001 * sectors * 512)
    except CowError as e:
        assert str(e)  # a precise message, never a crash
    else:
        c = table.header.chunk_size
        assert all(0 < new < len(blob) // c for _, new in table.exceptions)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "snapship.cli.main", *args],
                          capture_output=True, text=True, check=False)


def test_cow_inspect_cli(tmp_path: Path) -> None:
    store = tmp_path / "cow.img"
    store.write_bytes(build_store(8, {10: b"a", 11: b"b", 500: b"c"}))
    r = run_cli("cow", "inspect", str(store), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["exceptions"] == 3 and info["chunk_size"] == 4096
    assert info["changed_ranges"] == [[40960, 49152], [2048000, 2052096]]
    human = run_cli("cow", "inspect", str(store))
    assert "3 exceptions in 1 area(s)" in human.stdout


@pytest.mark.parametrize("valid", [True, False])
def test_cow_inspect_cli_errors_are_one_line(tmp_path: Path, valid: bool) -> None:
    store = tmp_path / "cow.img"
    data = build_store(8, {1: b"x"}, valid=valid)
    store.write_bytes(data if not valid else data[:4096 + 100])
    r = run_cli("cow", "inspect", str(store))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapship: error: ")
    assert ("truncated" if valid else "overflowed") in lines[0]


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_uncached_reader_reads_unaligned_ranges(tmp_path: Path, where: str) -> None:
    base = tmp_path if where == "disk" else Path(tempfile.mkdtemp(dir="/dev/shm"))
    path = base / "data"
    content = bytes(random.Random(5).randbytes(3 * 4096 + 123))
    path.write_bytes(content)
    try:
        with UncachedReader(str(path)) as r:
            assert r.size == len(content)
            for off, n in [(0, 16), (100, 5000), (4096, 4096), (12000, 10_000), (len(content), 5)]:
                assert r.read(off, n) == content[off : off + n]
            if where == "disk":
                assert r.direct  # the file system behind tmp_path takes O_DIRECT
    finally:
        if where == "tmpfs":
            shutil.rmtree(base)


def test_cow_inspect_refuses_a_fifo_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-m", "snapship.cli.main", "cow", "inspect", str(fifo)],
                       capture_output=True, text=True, check=False, timeout=20)
    assert r.returncode == 1 and "not a regular file or a block device" in r.stderr


def test_a_zero_magic_before_other_data_is_no_cow_store() -> None:
    """A disk or file system image often starts with zeroes (a boot block): only a store
    whose first 4 KiB are all zero is one the kernel has not initialised yet."""
    image = bytearray(64 << 10)
    image[1024:1026] = b"\x53\xef"  # where ext4 keeps its superblock's magic
    with pytest.raises(CowError, match="not a dm-snapshot COW store") as e:
        parse_bytes(bytes(image))
    assert not isinstance(e.value, CowUninitialised)
    with pytest.raises(CowUninitialised, match="never initialised"):
        parse_bytes(bytes(64 << 10))
