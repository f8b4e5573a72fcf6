"""The reference list: which chunks one version uses, readable without the repository key.

Stored at `refs/<volume>/<version>` in an unencrypted object envelope of kind REFS (checksummed,
never encrypted), so prune, gc and a storage server can work without the passphrase. It reveals
nothing the chunk store does not already show (chunk ids are keyed hashes and are the chunk
objects' names), only which of them one version uses. Layout (little-endian, docs/format.md):
`magic "SNPR" | version u16 | reserved u16 | header_len u32 | header JSON | count u64 |
ids (count x 32, sorted, unique, never the zero id) | stored sizes (count x u32)`.
"""

from __future__ import annotations

import json
import struct
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from operator import itemgetter

from snapship.errors import FormatError, UsageError
from snapship.formats.constants import ID_LEN, MAX_MANIFEST_HEADER, REFS_MAGIC, REFS_VERSION
from snapship.formats.manifest import Manifest, check_name
from snapship.types import ZERO_ID

_PREFIX = struct.Struct("<4sHHI")
_COUNT = struct.Struct("<Q")
_SHORT = struct.Struct("<Q24x")


def short_key(cid: bytes) -> int:
    """An id's first 8 bytes as an int: what sets of millions of ids hold to stay small. Two
    ids sharing them only make gc keep a garbage chunk; nothing is ever lost."""
    return int.from_bytes(cid[:8], "little")


def short_keys(ids: bytes) -> Iterator[int]:
    """`short_key` of each id in a concatenation of ids, at C speed."""
    return map(itemgetter(0), _SHORT.iter_unpack(ids))


@dataclass(frozen=True)
class Refs:
    volume: str
    version: str
    writer: str
    """The writer session that stored it: gc drops a list whose manifest never came and whose
    writer is gone (docs/gc.md)."""
    ids: bytes
    sizes: array[int]

    @property
    def count(self) -> int:
        return len(self.ids) // ID_LEN

    def stored_bytes(self) -> int:
        return sum(self.sizes)


def from_manifest(m: Manifest, writer: str) -> Refs:
    unique = m.unique_chunks()
    ordered = sorted(unique)
    return Refs(m.volume, m.version, writer, b"".join(ordered),
                array("I", (unique[c] for c in ordered)))


def encode(r: Refs) -> bytes:
    header = json.dumps({"volume": r.volume, "version": r.version, "writer": r.writer},
                        sort_keys=True, separators=(",", ":")).encode()
    sizes = array("I", r.sizes)
    if sys.byteorder == "big":
        sizes.byteswap()
    return b"".join((_PREFIX.pack(REFS_MAGIC, REFS_VERSION, 0, len(header)), header,
                     _COUNT.pack(r.count), r.ids, sizes.tobytes()))


def decode(data: bytes, what: str) -> Refs:
    """Parse a reference list body; rejects anything not exactly version 1 and well formed."""
    if len(data) < _PREFIX.size:
        raise FormatError(f"{what} is truncated")
    magic, version, _, header_len = _PREFIX.unpack_from(data)
    if magic != REFS_MAGIC:
        raise FormatError(f"{what} is not a reference list (magic {magic!r})")
    if version != REFS_VERSION:
        raise FormatError(f"{what} has reference-list version {version}; this snapship reads 1")
    if header_len > MAX_MANIFEST_HEADER:
        raise FormatError(f"{what} has an oversized header ({header_len} bytes)")
    pos = _PREFIX.size
    try:
        h = json.loads(data[pos : pos + header_len])
        pos += header_len
        (count,) = _COUNT.unpack_from(data, pos)
        pos += _COUNT.size
        ids = data[pos : pos + count * ID_LEN]
        pos += count * ID_LEN
        sizes = array("I")
        sizes.frombytes(data[pos : pos + count * 4])
        pos += count * 4
        if sys.byteorder == "big":
            sizes.byteswap()
        fields = [h[k] for k in ("volume", "version", "writer")]
        if not all(isinstance(f, str) for f in fields):
            raise ValueError("volume, version and writer must be strings")
        check_name("volume", fields[0])
        check_name("version", fields[1])
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError, UsageError) as e:
        raise FormatError(f"{what} is malformed: {e}") from None
    if pos != len(data) or len(ids) != count * ID_LEN or len(sizes) != count:
        raise FormatError(f"{what} is truncated or has trailing bytes")
    for i in range(count):
        cid = ids[i * ID_LEN : (i + 1) * ID_LEN]
        if cid == ZERO_ID or (i and cid <= ids[(i - 1) * ID_LEN : i * ID_LEN]):
            raise FormatError(f"{what} is inconsistent: ids are not sorted, unique and non-zero")
    return Refs(fields[0], fields[1], fields[2], ids, sizes)
