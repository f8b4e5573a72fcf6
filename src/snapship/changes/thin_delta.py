"""Parse `thin_delta` XML (thin-provisioning-tools) into changed byte ranges; no I/O.

`thin_delta --snap1 A --snap2 B` prints `<superblock ... data_block_size="S">` (S in 512-byte
sectors) holding `<diff left="A" right="B">` with `same`, `different`, `left_only` and
`right_only` elements, each with `begin` and `length` in pool data blocks. For a backup of B on
top of A, every block that is not `same` changed: `different` and `right_only` hold new data,
and `left_only` blocks were discarded in B, so they now read as zeroes.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from snapship.changes.ranges import coalesce
from snapship.errors import FormatError
from snapship.types import ByteRange

CHANGED_KINDS = frozenset({"different", "right_only", "left_only"})
KNOWN_KINDS = CHANGED_KINDS | {"same"}


class ThinDeltaError(FormatError):
    """thin_delta's output is not what this parser understands."""


@dataclass(frozen=True)
class ThinDelta:
    block_size: int
    """Pool data block size in bytes."""
    changed: list[ByteRange]
    """Changed byte ranges of the thin volume, coalesced."""
    discarded: list[ByteRange] = field(default_factory=list)
    """The `left_only` part of `changed`: unmapped in B, so zeroes, need not be read."""


def xml_int(elem: ET.Element, name: str) -> int:
    value = elem.get(name)
    if value is None or not value.isdigit():
        raise ThinDeltaError(f"thin_delta <{elem.tag}> has no valid {name!r} ({value!r})")
    return int(value)


def superblock(xml_text: str, tool: str) -> tuple[ET.Element, int]:
    """The <superblock> root of thin_delta's or thin_dump's output and its data block size in
    bytes; refuses anything else."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as e:
        raise ThinDeltaError(f"{tool} output is not XML: {e}") from None
    if root.tag != "superblock":
        raise ThinDeltaError(f"{tool} output starts with <{root.tag}>, not <superblock>")
    sectors = xml_int(root, "data_block_size")
    if sectors == 0:
        raise ThinDeltaError(f"{tool} reports a data block size of 0")
    return root, sectors * 512


def parse(xml_text: str, volume_size: int | None = None) -> ThinDelta:
    """Changed ranges from thin_delta output; refuses ranges beyond `volume_size` if given."""
    root, block = superblock(xml_text, "thin_delta")
    diffs = list(root)
    if len(diffs) != 1 or diffs[0].tag != "diff":
        raise ThinDeltaError(f"thin_delta output has {len(diffs)} elements, expected one <diff>")
    ranges = []
    discarded = []
    for elem in diffs[0]:
        if elem.tag not in KNOWN_KINDS:
            raise ThinDeltaError(f"thin_delta output has an unknown element <{elem.tag}>")
        begin, length = xml_int(elem, "begin"), xml_int(elem, "length")
        if elem.tag in CHANGED_KINDS and length:
            r = ByteRange(begin * block, (begin + length) * block)
            if volume_size is not None:
                if r.start >= volume_size:
                    raise ThinDeltaError(
                        f"thin_delta names blocks {begin}..{begin + length - 1}, beyond the "
                        f"volume ({volume_size} bytes)"
                    )
                r = ByteRange(r.start, min(r.end, volume_size))
            ranges.append(r)
            if elem.tag == "left_only":
                discarded.append(r)
    return ThinDelta(block, coalesce(ranges), coalesce(discarded))
