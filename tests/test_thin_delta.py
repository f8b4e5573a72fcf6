"""thin_delta XML parsing: changed blocks, discarded blocks, and strict rejections."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapship.changes.thin_delta import ThinDeltaError, parse
from snapship.types import ByteRange

SAMPLE = """<superblock uuid="" time="1" transaction="2" flags="0" version="2"
 data_block_size="128" nr_data_blocks="0">
  <diff left="1" right="2">
    <same begin="0" length="10"/>
    <different begin="10" length="2"/>
    <same begin="12" length="3"/>
    <right_only begin="15" length="1"/>
    <left_only begin="16" length="4"/>
    <same begin="20" length="100"/>
  </diff>
</superblock>
"""


def test_changed_blocks_include_discards() -> None:
    d = parse(SAMPLE)
    assert d.block_size == 64 * 1024
    assert d.changed == [ByteRange(10 * 65536, 12 * 65536), ByteRange(15 * 65536, 20 * 65536)]


def test_clipped_to_the_volume_and_refused_beyond_it() -> None:
    assert parse(SAMPLE, volume_size=19 * 65536 + 5).changed[-1].end == 19 * 65536 + 5
    with pytest.raises(ThinDeltaError, match="beyond the volume"):
        parse(SAMPLE, volume_size=12 * 65536)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not xml", "not XML"),
        ("<foo/>", "not <superblock>"),
        ('<superblock data_block_size="0"><diff/></superblock>', "block size of 0"),
        ('<superblock><diff/></superblock>', "data_block_size"),
        ('<superblock data_block_size="8"/>', "expected one <diff>"),
        ('<superblock data_block_size="8"><diff><moved begin="1" length="1"/></diff></superblock>',
         "unknown element"),
        ('<superblock data_block_size="8"><diff><different begin="-1" length="1"/></diff>'
         "</superblock>", "begin"),
    ],
)
def test_rejections(text: str, message: str) -> None:
    with pytest.raises(ThinDeltaError, match=message):
        parse(text)


@given(st.lists(st.tuples(st.sampled_from(["same", "different", "left_only", "right_only"]),
                          st.integers(1, 50)), max_size=40))
def test_changed_set_is_every_block_not_same(runs: list[tuple[str, int]]) -> None:
    pos, body, expected = 0, list[str](), set[int]()
    for kind, n in runs:
        body.append(f'<{kind} begin="{pos}" length="{n}"/>')
        if kind != "same":
            expected.update(range(pos, pos + n))
        pos += n
    xml = (f'<superblock data_block_size="8"><diff left="1" right="2">{"".join(body)}</diff>'
           "</superblock>")
    got = {b for r in parse(xml).changed for b in range(r.start // 4096, r.end // 4096)}
    assert got == expected


def test_discarded_blocks_are_the_left_only_ones() -> None:
    assert parse(SAMPLE).discarded == [ByteRange(16 * 65536, 20 * 65536)]


DUMP = """<superblock uuid="" time="1" transaction="2" flags="0" version="2"
 data_block_size="128" nr_data_blocks="100">
  <device dev_id="7" mapped_blocks="4" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="2" data_begin="10" length="2" time="0"/>
    <single_mapping origin_block="4" data_block="40" time="0"/>
    <single_mapping origin_block="9" data_block="41" time="1"/>
    <single_mapping origin_block="60" data_block="42" time="1"/>
  </device>
</superblock>
"""


def test_thin_dump_mappings_and_their_complement() -> None:
    from snapship.changes.thin_dump import mapped, unmapped

    b = 65536
    got = mapped(DUMP, 7, 10 * b - 5)  # block 9 is the partial last one; 60 lies past the end
    assert got == [ByteRange(2 * b, 5 * b), ByteRange(9 * b, 10 * b - 5)]
    assert unmapped(got, 10 * b - 5) == [ByteRange(0, 2 * b), ByteRange(5 * b, 9 * b)]
    with pytest.raises(ThinDeltaError, match="exactly thin device 8"):
        mapped(DUMP, 8, 10 * b)
    with pytest.raises(ThinDeltaError, match="unknown element"):
        mapped(DUMP.replace("single_mapping origin_block=\"4\"", "odd origin_block=\"4\""), 7, b)
