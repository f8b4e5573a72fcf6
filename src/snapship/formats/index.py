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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from snapship.errors import FormatError
from snapship.formats.constants import ID_LEN, MAX_MANIFEST_HEADER
from snapship.formats.json_bounded import load_object

_PREFIX = struct.Struct("<4sHHI")
_COUNT = struct.Struct("<Q")


def encode(magic: bytes, version: int, header: dict[str, Any], ids: bytes,
           values: array[int]) -> bytes:
    return b"".join(encode_parts(magic, version, header, ids, values))


def encode_parts(magic: bytes, version: int, header: dict[str, Any], ids: bytes,
                 values: array[int]) -> list[bytes | memoryview]:
    """The encoding in three parts (everything before the ids, the ids, the values), which
    join to `encode`'s bytes: the ids are not copied."""
    head = _spelled(header)
    if sys.byteorder == "big":
        values = array("I", values)
        values.byteswap()
    return [b"".join((_PREFIX.pack(magic, version, 0, len(head)), head,
                      _COUNT.pack(len(ids) // ID_LEN))), ids, memoryview(values).cast("B")]


@dataclass(frozen=True)
class Head:
    """What the start of an index object says: its header, and how many entries follow."""

    header: dict[str, Any]
    header_len: int
    count: int

    @property
    def size(self) -> int:
        """The whole plaintext's size this head implies."""
        return _PREFIX.size + self.header_len + _COUNT.size + self.count * (ID_LEN + 4)


def read_head(peek: Callable[[int], bytes], magic: bytes, version: int, kind: str, what: str
              ) -> Head:
    """Parse the prefix, header and count through `peek` (the first n bytes of the plaintext),
    reading no further: so a compressed object's real size can be checked before it is
    decompressed. Rejects another magic or version, reserved bits set, an oversized or
    malformed header, or one not spelled as `encode` spells it."""
    prefix = peek(_PREFIX.size)
    if len(prefix) < _PREFIX.size:
        raise FormatError(f"{what} is truncated")
    got_magic, got_version, reserved, header_len = _PREFIX.unpack(prefix)
    if got_magic != magic:
        raise FormatError(f"{what} is not a {kind} (magic {got_magic!r})")
    if got_version != version:
        raise FormatError(f"{what} has {kind} version {got_version}; this snapship reads "
                          f"{version}")
    if reserved:  # a field this version does not define: refused, never ignored
        raise FormatError(f"{what} has reserved bits set ({reserved:#06x}); this snapship "
                          f"reads {kind} version {version} without them")
    if header_len > MAX_MANIFEST_HEADER:
        raise FormatError(f"{what} has an oversized header ({header_len} bytes)")
    end = _PREFIX.size + header_len
    head = peek(end + _COUNT.size)
    if len(head) < end + _COUNT.size:
        raise FormatError(f"{what} is truncated")
    raw = head[_PREFIX.size : end]
    header = load_object(raw, f"the header of {what}", MAX_MANIFEST_HEADER)
    if _spelled(header) != raw:
        # One header has one spelling (every writer has used this one): any other is damage
        # or a foreign writer, and would decode to a header other than the bytes stored.
        raise FormatError(f"the header of {what} is not in the form snapship writes (sorted "
                          "keys, no spaces, ASCII escapes)")
    (count,) = _COUNT.unpack_from(head, end)
    return Head(header, header_len, count)


def _spelled(header: dict[str, Any]) -> bytes:
    """The one spelling of a header: the bytes `encode` writes and `read_head` accepts."""
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def cut(head: Head) -> list[int]:
    """The lengths of the three parts `decode_parts` takes, from the head."""
    return [_PREFIX.size + head.header_len + _COUNT.size, head.count * ID_LEN, head.count * 4]


def decode_parts(parts: list[bytes], magic: bytes, version: int, kind: str, what: str
                 ) -> tuple[dict[str, Any], bytes, array[int]]:
    """`decode` of the plaintext cut by `cut`: the ids part is kept as it is, not copied."""
    if len(parts) != 3:
        raise FormatError(f"{what} is malformed")
    head = read_head(lambda n: parts[0][:n], magic, version, kind, what)
    if [len(p) for p in parts] != cut(head):
        raise FormatError(f"{what} is truncated")
    values = array("I")
    values.frombytes(parts[2])
    if sys.byteorder == "big":
        values.byteswap()
    return head.header, parts[1], values


def decode(data: bytes, magic: bytes, version: int, kind: str, what: str
           ) -> tuple[dict[str, Any], bytes, array[int]]:
    """(header, ids, values); rejects another magic or version, a bad frame, trailing bytes."""
    head = read_head(lambda n: data[:n], magic, version, kind, what)
    extra = len(data) - head.size
    if extra:
        raise FormatError(f"{what} is truncated" if extra < 0 else
                          f"{what} has {extra} bytes beyond its chunk list")
    pos = _PREFIX.size + head.header_len + _COUNT.size
    ids = data[pos : pos + head.count * ID_LEN]
    values = array("I")
    values.frombytes(data[pos + head.count * ID_LEN :])
    if sys.byteorder == "big":
        values.byteswap()
    return head.header, ids, values
