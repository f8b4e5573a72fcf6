"""Parse `thin_dump` XML (thin-provisioning-tools) of one thin device into its mapped byte
ranges; no I/O. What a thin device does not map reads as zeroes, so need not be read.

`thin_dump --dev-id N` prints `<superblock ... data_block_size="S">` (S in 512-byte sectors)
holding one `<device dev_id="N" ...>` with `single_mapping origin_block=".."` and
`range_mapping origin_begin=".." length=".."` elements, in thin-device blocks.
"""

from __future__ import annotations

from snapship.changes.ranges import coalesce
from snapship.changes.thin_delta import ThinDeltaError, superblock, xml_int
from snapship.types import ByteRange


def mapped(xml_text: str, dev_id: int, volume_size: int) -> list[ByteRange]:
    """The byte ranges of thin device `dev_id` that the pool maps, coalesced, clipped to the
    volume; refuses anything it does not understand (the caller then reads everything)."""
    root, block = superblock(xml_text, "thin_dump")
    devices = [d for d in root if d.tag == "device"]
    if len(devices) != 1 or xml_int(devices[0], "dev_id") != dev_id or len(root) != 1:
        raise ThinDeltaError(f"thin_dump output does not describe exactly thin device {dev_id}")
    out = []
    for m in devices[0]:
        if m.tag == "single_mapping":
            begin, length = xml_int(m, "origin_block"), 1
        elif m.tag == "range_mapping":
            begin, length = xml_int(m, "origin_begin"), xml_int(m, "length")
        else:
            raise ThinDeltaError(f"thin_dump output has an unknown element <{m.tag}>")
        lo = begin * block
        if lo >= volume_size:
            continue  # past a volume that was shrunk: not part of what is read
        out.append(ByteRange(lo, min((begin + length) * block, volume_size)))
    return coalesce(out)


def unmapped(mapped_ranges: list[ByteRange], volume_size: int) -> list[ByteRange]:
    """The complement of `mapped_ranges` (coalesced) within [0, volume_size)."""
    out, at = [], 0
    for r in mapped_ranges:
        if r.start > at:
            out.append(ByteRange(at, r.start))
        at = max(at, r.end)
    if at < volume_size:
        out.append(ByteRange(at, volume_size))
    return out
