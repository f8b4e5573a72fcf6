"""The reference list: which chunks one version uses, readable without the repository key.

Stored at `refs/<volume>/<version>` in an unencrypted object envelope of kind REFS (checksummed,
never encrypted), so prune, gc and a storage server can work without the passphrase. It reveals
nothing the chunk store does not already show (chunk ids are keyed hashes and are the chunk
objects' names), only which of them one version uses. Layout (little-endian, docs/format.md):
`magic "SNPR" | version u16 | reserved u16 | header_len u32 | header JSON | count u64 |
ids (count x 32, sorted, unique, never the zero id) | stored sizes (count x u32)`.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import itemgetter

from snapship.errors import FormatError, UsageError
from snapship.formats import index
from snapship.formats.constants import ID_LEN, MAX_MANIFEST_HEADER, REFS_MAGIC, REFS_VERSION
from snapship.formats.manifest import Manifest, check_name
from snapship.types import ZERO_ID

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
    header = {"volume": r.volume, "version": r.version, "writer": r.writer}
    return index.encode(REFS_MAGIC, REFS_VERSION, header, r.ids, r.sizes)


def plaintext_size(peek: Callable[[int], bytes], what: str) -> int:
    """The exact size of a reference list's plaintext from its start: 20 + header_len + 36 x
    count."""
    return index.read_head(peek, REFS_MAGIC, REFS_VERSION, "reference list", what).size


def max_plaintext(stored: int) -> int:
    """The most a reference list stored in `stored` bytes can hold once decompressed. Its ids
    are keyed hashes (random), which zstd cannot shrink: 36 bytes per id compress to at least
    32 or so; twice the stored size, plus a full header, is more than any real list needs."""
    return 2 * stored + MAX_MANIFEST_HEADER + 20


def decode(data: bytes, what: str) -> Refs:
    """Parse a reference list body; rejects anything not exactly version 1 and well formed."""
    h, ids, sizes = index.decode(data, REFS_MAGIC, REFS_VERSION, "reference list", what)
    try:
        fields = [h[k] for k in ("volume", "version", "writer")]
        if not all(isinstance(f, str) for f in fields):
            raise ValueError("volume, version and writer must be strings")
        check_name("volume", fields[0])
        check_name("version", fields[1])
    except (ValueError, KeyError, UsageError) as e:
        raise FormatError(f"{what} is malformed: {e}") from None
    for i in range(1, len(ids) // ID_LEN):
        if ids[(i - 1) * ID_LEN : i * ID_LEN] >= ids[i * ID_LEN : (i + 1) * ID_LEN]:
            raise FormatError(f"{what} is inconsistent: ids are not sorted and unique")
    if ids[:ID_LEN] == ZERO_ID:  # sorted: the zero id could only come first
        raise FormatError(f"{what} is inconsistent: it lists the zero id")
    return Refs(fields[0], fields[1], fields[2], ids, sizes)
