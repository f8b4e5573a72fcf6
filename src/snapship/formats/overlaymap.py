"""The on-disk map log of a durable overlay layer, version 2, and a reader of version 1
(docs/nbd.md, "State directory").

Pure encoding and decoding, no I/O. A version 2 map file is a header followed by entries, each
sealed by a CRC-32 and numbered (consecutive sequence numbers):
- a *journal* entry: the (start, end, state) records one request set, with the boot id of the
  machine's boot it was written in; appended before the request is answered, not synced;
- a *durable* mark: "every entry up to sequence N is on stable storage", appended by a flush
  after the data file was synced, then synced itself;
- a *base* entry (only ever the first): the whole map as of its sequence number, durable; a
  rewritten log starts with one.
Decoding replays the trusted entries in order: those a durable mark covers (or a base), and
the rest only if they were written in the current boot (a killed process leaves its writes in
the page cache; a machine crash may not have). It stops at the first entry that is short or
fails its check (a torn append) or is not trusted, and says where the kept part ends.
Version 1 files (batches of records, each made durable by one flush) are still read. Unknown
versions, kinds and states are refused.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from snapship.errors import FormatError

MAGIC = b"SNAPSHIP-OVMAP\x00\x00"
VERSION = 2
READS = frozenset({1, 2})
_HEADER = struct.Struct("<16sIIQI")  # magic, version, reserved, export size, crc of the rest
HEADER_SIZE = _HEADER.size
_ENTRY = struct.Struct("<4sIQ")  # magic (kind), record count, sequence number
ENTRY_HEADER_SIZE = _ENTRY.size
BATCH_MAGIC = b"BTCH"
"""Version 1's only entry: a batch of records one flush made durable."""
JOURNAL = b"JRNL"
DURABLE = b"DURA"
BASE = b"BASE"
BOOT_ID_SIZE = 16
_COVERS = struct.Struct("<Q")
_RECORD = struct.Struct("<QQI")  # start, end, state
RECORD_SIZE = _RECORD.size
_CRC = struct.Struct("<I")
KNOWN_STATES = frozenset({1, 2, 3})
"""Written, zero (a hole), zero allocated: the states of `snapship.nbd.overlay`."""
MAX_RECORDS = 1 << 24
"""More records than this in one entry is damage (a base holds at most the map's ranges)."""
JOURNAL_ENTRY_SIZE = ENTRY_HEADER_SIZE + BOOT_ID_SIZE + RECORD_SIZE + _CRC.size
"""The bytes one request adds to the log."""

Record = tuple[int, int, int]


class OverlayMapError(FormatError):
    """A map file this version cannot read (wrong magic, unknown version, kind or state)."""


@dataclass(frozen=True)
class Decoded:
    size: int
    """The export size the map was made for."""
    version: int
    records: list[Record]
    """Every record of every trusted entry, in order."""
    next_seq: int
    """The sequence number the next entry appended after `kept_length` takes."""
    durable_seq: int
    """The highest sequence number on stable storage (-1: none)."""
    kept_length: int
    """Bytes of the file that are kept; anything after is torn or not trusted."""
    undurable: bool
    """Some kept entries are not on stable storage yet (a killed server's, this boot)."""
    rewrite: bool
    """Cutting the file at `kept_length` would lose a durable mark (or it is version 1): it
    must be rewritten with the kept records instead."""
    dropped: int
    """Records of intact entries not trusted (written before a machine crash, never
    made durable)."""


def encode_header(size: int, version: int = VERSION) -> bytes:
    body = _HEADER.pack(MAGIC, version, 0, size, 0)[:-4]
    return body + _CRC.pack(zlib.crc32(body))


def _seal(body: bytes) -> bytes:
    return body + _CRC.pack(zlib.crc32(body))


def _records(records: Sequence[Record]) -> bytes:
    return b"".join(_RECORD.pack(s, e, state) for s, e, state in records)


def encode_journal(seq: int, boot: bytes, records: Sequence[Record]) -> bytes:
    """The entry of one request (or of requests that arrived together)."""
    assert len(boot) == BOOT_ID_SIZE
    return _seal(_ENTRY.pack(JOURNAL, len(records), seq) + boot + _records(records))


def encode_durable(seq: int, covers: int) -> bytes:
    """A flush's mark: entries up to `covers` (before this one) are on stable storage."""
    assert covers < seq
    return _seal(_ENTRY.pack(DURABLE, 0, seq) + _COVERS.pack(covers))


def encode_base(seq: int, records: Sequence[Record]) -> bytes:
    """The first entry of a rewritten log: the whole map as of entry `seq`, durable."""
    return _seal(_ENTRY.pack(BASE, len(records), seq) + _records(records))


def encode_batch(seq: int, records: Sequence[Record]) -> bytes:
    """Version 1: the records of one flush. `seq` counts batches from 0 in the file."""
    return _seal(_ENTRY.pack(BATCH_MAGIC, len(records), seq) + _records(records))


def encode_v1(size: int, batches: Iterable[Sequence[Record]]) -> bytes:
    out = [encode_header(size, 1)]
    out += [encode_batch(i, b) for i, b in enumerate(batches)]
    return b"".join(out)


def _check(kind: str, seq: int, records: list[Record], size: int) -> None:
    for start, stop, state in records:
        if state not in KNOWN_STATES:
            raise OverlayMapError(f"overlay map {kind} {seq} has unknown state {state}")
        if stop < start or stop > size:
            raise OverlayMapError(f"overlay map {kind} {seq} has a range [{start}, {stop}) "
                                  f"outside the {size}-byte export")


def _unpack_records(data: bytes, pos: int, count: int) -> list[Record]:
    return [_RECORD.unpack_from(data, pos + i * RECORD_SIZE) for i in range(count)]


def decode(data: bytes, boot: bytes) -> Decoded:
    """Read a whole map file, trusting un-durable journal entries only if they were written in
    the boot `boot`. Its header is written and synced before the layer is listed in the
    export's state, so a header that is short or fails its check is damage, not a crash."""
    if len(data) < HEADER_SIZE:
        raise OverlayMapError(f"overlay map of {len(data)} bytes: its header is missing")
    magic, version, _, size, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise OverlayMapError("not an overlay map file (bad magic)")
    if version not in READS:
        raise OverlayMapError(f"overlay map version {version} is not supported "
                              f"(this snapship reads versions 1 and 2)")
    if zlib.crc32(data[: HEADER_SIZE - 4]) != crc:
        raise OverlayMapError("overlay map header fails its check")
    if version == 1:
        return _decode_v1(data, size)
    # (kind, seq, boot or covers, records, offset) of every intact entry
    entries: list[tuple[bytes, int, bytes | int, list[Record], int]] = []
    pos = HEADER_SIZE
    expect: int | None = None
    while pos + _ENTRY.size <= len(data):
        kind, count, seq = _ENTRY.unpack_from(data, pos)
        if kind not in (JOURNAL, DURABLE, BASE) or count > MAX_RECORDS:
            break
        if expect is None and kind != BASE and seq != 0:
            break
        if expect is not None and seq != expect:
            break
        extra = BOOT_ID_SIZE if kind == JOURNAL else _COVERS.size if kind == DURABLE else 0
        end = pos + _ENTRY.size + extra + count * RECORD_SIZE
        if end + _CRC.size > len(data):
            break
        (crc,) = _CRC.unpack_from(data, end)
        if zlib.crc32(data[pos:end]) != crc:
            break
        body = pos + _ENTRY.size
        if kind == BASE and expect is not None:
            raise OverlayMapError(f"overlay map entry {seq} is a base, not first in the file")
        if kind == DURABLE:
            (covers,) = _COVERS.unpack_from(data, body)
            if count or covers >= seq:
                raise OverlayMapError(f"overlay map durable mark {seq} is damaged")
            entries.append((kind, seq, covers, [], pos))
        else:
            tag = data[body : body + extra]
            records = _unpack_records(data, body + extra, count)
            _check("entry", seq, records, size)
            entries.append((kind, seq, tag, records, pos))
        pos = end + _CRC.size
        expect = seq + 1
    durable = -1
    for e_kind, e_seq, e_tag, _, _ in entries:
        if e_kind == BASE:
            durable = e_seq
        elif e_kind == DURABLE:
            assert isinstance(e_tag, int)
            durable = max(durable, e_tag)
    kept: list[Record] = []
    kept_length, next_seq = pos, (expect if expect is not None else 0)
    undurable = rewrite = False
    dropped = 0
    for i, (e_kind, e_seq, e_tag, e_records, at) in enumerate(entries):
        if e_kind == JOURNAL and e_seq > durable:
            if e_tag != boot:  # written before a reboot and never made durable: cut from here
                kept_length, next_seq = at, e_seq
                dropped = sum(len(e[3]) for e in entries[i:])
                rewrite = any(e[0] == DURABLE for e in entries[i:])
                break
            undurable = True
        kept += e_records
    return Decoded(size, 2, kept, next_seq, durable, kept_length, undurable, rewrite, dropped)


def _decode_v1(data: bytes, size: int) -> Decoded:
    records: list[Record] = []
    pos = HEADER_SIZE
    seq = 0
    while pos + _ENTRY.size <= len(data):
        bmagic, count, bseq = _ENTRY.unpack_from(data, pos)
        if bmagic != BATCH_MAGIC or bseq != seq or count > MAX_RECORDS:
            break
        end = pos + _ENTRY.size + count * RECORD_SIZE
        if end + _CRC.size > len(data):
            break
        (crc,) = _CRC.unpack_from(data, end)
        if zlib.crc32(data[pos:end]) != crc:
            break
        batch = _unpack_records(data, pos + _ENTRY.size, count)
        _check("batch", seq, batch, size)
        records += batch
        pos = end + _CRC.size
        seq += 1
    # Every intact batch was made durable by its flush; the file is rewritten as version 2.
    return Decoded(size, 1, records, seq, seq - 1, pos, False, True, 0)
