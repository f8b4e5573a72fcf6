"""The on-disk map of a durable overlay layer, version 1 (docs/nbd.md, "Durable exports").

Pure encoding and decoding, no I/O. A map file is a header followed by batches; each batch is
the (start, end, state) records one FLUSH made durable, in the order they were set, sealed by
a CRC-32 over the batch. Replaying every intact batch in order rebuilds the map. A crash can
only tear the last batch being appended: decoding stops at the first batch that is short or
fails its check, and says where the intact part ends (the writer truncates the file there
before appending again). Unknown versions and states are refused.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from snapship.errors import FormatError

MAGIC = b"SNAPSHIP-OVMAP\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<16sIIQI")  # magic, version, reserved, export size, crc of the rest
HEADER_SIZE = _HEADER.size
_BATCH = struct.Struct("<4sIQ")  # magic, record count, sequence number
BATCH_MAGIC = b"BTCH"
_RECORD = struct.Struct("<QQI")  # start, end, state
RECORD_SIZE = _RECORD.size
_CRC = struct.Struct("<I")
KNOWN_STATES = frozenset({1, 2, 3})
"""Written, zero (a hole), zero allocated: the states of `snapship.nbd.overlay`."""
MAX_RECORDS = 1 << 24
"""More records than this in one batch is damage, not a flush (one per request at most)."""

Record = tuple[int, int, int]


class OverlayMapError(FormatError):
    """A map file this version cannot read (wrong magic, unknown version or state)."""


@dataclass(frozen=True)
class Decoded:
    size: int
    """The export size the map was made for."""
    records: list[Record]
    """Every record of every intact batch, in order."""
    batches: int
    valid_length: int
    """Bytes of the file that are intact; anything after is a torn append."""


def encode_header(size: int) -> bytes:
    body = _HEADER.pack(MAGIC, VERSION, 0, size, 0)[:-4]
    return body + _CRC.pack(zlib.crc32(body))


def encode_batch(seq: int, records: Sequence[Record]) -> bytes:
    """One batch: the records of one flush. `seq` counts batches from 0 in the file."""
    parts = [_BATCH.pack(BATCH_MAGIC, len(records), seq)]
    for start, end, state in records:
        parts.append(_RECORD.pack(start, end, state))
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def encode(size: int, batches: Iterable[Sequence[Record]]) -> bytes:
    out = [encode_header(size)]
    out += [encode_batch(i, b) for i, b in enumerate(batches)]
    return b"".join(out)


def decode(data: bytes) -> Decoded:
    """Read a whole map file. Its header is written and synced before the layer is listed in
    the export's state, so a header that is short or fails its check is damage, not a crash."""
    if len(data) < HEADER_SIZE:
        raise OverlayMapError(f"overlay map of {len(data)} bytes: its header is missing")
    magic, version, _, size, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise OverlayMapError("not an overlay map file (bad magic)")
    if version != VERSION:
        raise OverlayMapError(f"overlay map version {version} is not supported "
                              f"(this snapship reads version {VERSION})")
    if zlib.crc32(data[: HEADER_SIZE - 4]) != crc:
        raise OverlayMapError("overlay map header fails its check")
    records: list[Record] = []
    pos = HEADER_SIZE
    seq = 0
    while pos + _BATCH.size <= len(data):
        bmagic, count, bseq = _BATCH.unpack_from(data, pos)
        if bmagic != BATCH_MAGIC or bseq != seq or count > MAX_RECORDS:
            break
        end = pos + _BATCH.size + count * RECORD_SIZE
        if end + _CRC.size > len(data):
            break
        (crc,) = _CRC.unpack_from(data, end)
        if zlib.crc32(data[pos:end]) != crc:
            break
        batch = [_RECORD.unpack_from(data, pos + _BATCH.size + i * RECORD_SIZE)
                 for i in range(count)]
        for start, stop, state in batch:
            if state not in KNOWN_STATES:
                raise OverlayMapError(f"overlay map batch {seq} has unknown state {state}")
            if stop < start or stop > size:
                raise OverlayMapError(f"overlay map batch {seq} has a range [{start}, {stop}) "
                                      f"outside the {size}-byte export")
        records += batch
        pos = end + _CRC.size
        seq += 1
    return Decoded(size, records, seq, pos)
