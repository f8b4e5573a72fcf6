"""The layout manifests and reference lists share: a JSON header and two parallel arrays.

`magic (4) | version u16 | reserved u16 | header_len u32 | header JSON | count u64 |
ids (count x 32 bytes) | u32 values (count x 4)`, integers little-endian (docs/format.md).
Each format names its own magic and version; this module only frames and checks the bytes.
"""

from __future__ import annotations

import json
import struct
import sys
from array import array
from typing import Any

from snapship.errors import FormatError
from snapship.formats.constants import ID_LEN, MAX_MANIFEST_HEADER

_PREFIX = struct.Struct("<4sHHI")
_COUNT = struct.Struct("<Q")


def encode(magic: bytes, version: int, header: dict[str, Any], ids: bytes,
           values: array[int]) -> bytes:
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if sys.byteorder == "big":
        values = array("I", values)
        values.byteswap()
    return b"".join((_PREFIX.pack(magic, version, 0, len(head)), head,
                     _COUNT.pack(len(ids) // ID_LEN), ids, values.tobytes()))


def decode(data: bytes, magic: bytes, version: int, kind: str, what: str
           ) -> tuple[dict[str, Any], bytes, array[int]]:
    """(header, ids, values); rejects another magic or version, a bad frame, trailing bytes."""
    if len(data) < _PREFIX.size:
        raise FormatError(f"{what} is truncated")
    got_magic, got_version, _, header_len = _PREFIX.unpack_from(data)
    if got_magic != magic:
        raise FormatError(f"{what} is not a {kind} (magic {got_magic!r})")
    if got_version != version:
        raise FormatError(f"{what} has {kind} version {got_version}; this snapship reads "
                          f"{version}")
    if header_len > MAX_MANIFEST_HEADER:
        raise FormatError(f"{what} has an oversized header ({header_len} bytes)")
    pos = _PREFIX.size
    try:
        header = json.loads(data[pos : pos + header_len])
        pos += header_len
        (count,) = _COUNT.unpack_from(data, pos)
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise FormatError(f"{what} is malformed: {e}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{what} is malformed: its header is not an object")
    pos += _COUNT.size
    ids = data[pos : pos + count * ID_LEN]
    pos += count * ID_LEN
    extra = len(data) - pos - count * 4
    if extra:
        raise FormatError(f"{what} is truncated" if extra < 0 else
                          f"{what} has {extra} bytes beyond its chunk list")
    values = array("I")
    values.frombytes(data[pos:])
    if sys.byteorder == "big":
        values.byteswap()
    return header, ids, values
