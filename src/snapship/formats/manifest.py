"""The version manifest: one backup of one volume as a fixed index of chunk ids.

Plaintext layout (docs/format.md, "Manifests"), sealed in an object envelope of kind MANIFEST:
`magic "SNPM" | version u16 | reserved u16 | header_len u32 | header JSON | count u64 |
ids (count x 32 bytes) | stored sizes (count x u32)`, integers little-endian. Chunk `i` covers
bytes [i*chunk_size, min((i+1)*chunk_size, size)); the all-zero id marks an all-zero chunk.
Every manifest lists every chunk, so any version restores without reading another one.
"""

from __future__ import annotations

import math
import re
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from snapship.errors import FormatError, UsageError
from snapship.formats import index
from snapship.formats.constants import (
    ID_LEN,
    MANIFEST_MAGIC,
    MANIFEST_VERSION,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
)
from snapship.types import ZERO_ID

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def check_name(kind: str, name: str) -> str:
    """Volume names and version ids become object keys: keep them to a safe alphabet."""
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"invalid {kind} name {name!r}: use letters, digits and . _ + - (at most 128)"
        )
    return name


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


@dataclass
class Manifest:
    """One version. `ids` is the concatenation of the chunk ids, `sizes` their stored sizes."""

    volume: str
    version: str
    size: int
    chunk_size: int
    created: str
    source: str
    parent: str | None
    ids: bytes
    sizes: array[int]
    labels: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.sizes)

    def chunk(self, index: int) -> bytes:
        return self.ids[index * ID_LEN : (index + 1) * ID_LEN]

    def chunk_span(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk `index` in the volume."""
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def nonzero_indices(self) -> Iterator[int]:
        """The indices of the chunks that are not all-zero, in order (`nonzero_indices`)."""
        return nonzero_indices(self.ids)

    def zero_chunks(self) -> int:
        """How many chunks are all-zero (the sizes agree: `validate`)."""
        return self.count - sum(1 for _ in nonzero_indices(self.ids))

    def unique_chunks(self) -> dict[bytes, int]:
        """Distinct non-zero chunk ids with their stored sizes."""
        ids, sizes = self.ids, self.sizes
        return {ids[i * ID_LEN : (i + 1) * ID_LEN]: sizes[i] for i in nonzero_indices(ids)}

    def header(self) -> dict[str, Any]:
        return {
            "volume": self.volume,
            "version": self.version,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "created": self.created,
            "source": self.source,
            "parent": self.parent,
            "labels": self.labels,
            "stats": self.stats,
        }


# Blocks of ids compared with zeroes at once (startswith: no copy), so a sparse volume's
# manifest costs Python work only where it holds data: a 4 TiB volume has 4 Mi chunk ids.
# Two levels: runs of _SPAN entries, then blocks of _BLOCK inside a run that holds data.
_BLOCK = 256
_SPAN = 32 * _BLOCK
_ZEROES = {_BLOCK: bytes(_BLOCK * ID_LEN), _SPAN: bytes(_SPAN * ID_LEN)}
_ZERO_SIZES = bytes(_SPAN * 4)


def _zero_blocks(ids: bytes | bytearray, start: int, stop: int, block: int
                 ) -> Iterator[tuple[int, int, bool]]:
    """(first, end, all_zero) for the blocks of `block` entries in [start, stop)."""
    zeroes = _ZEROES[block]
    for b in range(start, stop, block):
        e = min(stop, b + block)
        # A full-length slice of bytes is the object itself: only a short last block copies.
        yield b, e, ids.startswith(zeroes[: (e - b) * ID_LEN], b * ID_LEN)


def nonzero_indices(ids: bytes | bytearray, start: int = 0, stop: int | None = None
                    ) -> Iterator[int]:
    """The indices in [start, stop) of `ids` (concatenated chunk ids) that are not the zero
    id, in order."""
    n = len(ids) // ID_LEN if stop is None else stop
    for s0, s1, zero in _zero_blocks(ids, start, n, _SPAN):
        if zero:
            continue
        for b0, b1, bzero in _zero_blocks(ids, s0, s1, _BLOCK):
            if bzero:
                continue
            for i in range(b0, b1):
                if not ids.startswith(ZERO_ID, i * ID_LEN):
                    yield i


def _check_zero_markers(ids: bytes | bytearray, sizes: array[int]) -> None:
    """The all-zero id and a stored size of 0 mark the same chunks: whole blocks of zero ids
    are checked against the sizes at once."""
    sb = sizes.tobytes()
    n = len(sizes)

    def zero_sizes(first: int, end: int) -> bool:
        return sb.startswith(_ZERO_SIZES[: (end - first) * 4], first * 4)

    for s0, s1, zero in _zero_blocks(ids, 0, n, _SPAN):
        if zero and zero_sizes(s0, s1):
            continue
        for b0, b1, bzero in _zero_blocks(ids, s0, s1, _BLOCK):
            if bzero and zero_sizes(b0, b1):
                continue
            for i in range(b0, b1):
                if ids.startswith(ZERO_ID, i * ID_LEN) != (sizes[i] == 0):
                    raise ValueError(f"chunk {i}: zero marker and stored size disagree")


def encode(m: Manifest) -> bytes:
    return b"".join(encode_parts(m))


def encode_parts(m: Manifest) -> list[bytes | memoryview]:
    """`encode` in parts that join to it (`index.encode_parts`): the ids are not copied."""
    validate(m)
    _check_stats(m.stats)
    return index.encode_parts(MANIFEST_MAGIC, MANIFEST_VERSION, m.header(), m.ids, m.sizes)


def plaintext_size(peek: Callable[[int], bytes], what: str) -> int:
    """The exact size of a manifest's plaintext, from its start alone: 20 + header_len + 36 x
    count, where count must be ceil(size / chunk_size) of its header. What the envelope
    requires of a compressed manifest before decompressing it."""
    return _checked_head(peek, what).size


def cut(peek: Callable[[int], bytes], what: str) -> list[int]:
    """The lengths of the parts `decode_parts` takes, from the plaintext's start (checked as
    `plaintext_size` checks it)."""
    return index.cut(_checked_head(peek, what))


def _checked_head(peek: Callable[[int], bytes], what: str) -> index.Head:
    head = index.read_head(peek, MANIFEST_MAGIC, MANIFEST_VERSION, "manifest", what)
    try:
        size = _typed(head.header, "size", int)
        cs = _typed(head.header, "chunk_size", int)
    except (ValueError, KeyError) as e:
        raise FormatError(f"{what} is malformed: {e}") from None
    if size < 0 or cs < MIN_CHUNK_SIZE or cs > MAX_CHUNK_SIZE or cs & (cs - 1):
        raise FormatError(f"{what} is inconsistent: size {size}, chunk size {cs}")
    n = chunk_count(size, cs)
    if head.count != n:
        raise FormatError(f"{what} is inconsistent: {head.count} chunks listed, {n} expected "
                          f"for {size} bytes")
    return head


def decode(data: bytes, what: str) -> Manifest:
    """Parse a manifest body; `what` names it in errors. Rejects anything not exactly v1."""
    return _build(*index.decode(data, MANIFEST_MAGIC, MANIFEST_VERSION, "manifest", what), what)


def decode_parts(parts: list[bytes], what: str) -> Manifest:
    """`decode` of the plaintext in the parts `cut` names: its ids are kept, not copied."""
    return _build(*index.decode_parts(parts, MANIFEST_MAGIC, MANIFEST_VERSION, "manifest",
                                      what), what)


def _build(h: dict[str, Any], ids: bytes, sizes: array[int], what: str) -> Manifest:
    try:
        m = Manifest(
            volume=_typed(h, "volume", str),
            version=_typed(h, "version", str),
            size=_typed(h, "size", int),
            chunk_size=_typed(h, "chunk_size", int),
            created=_typed(h, "created", str),
            source=_typed(h, "source", str),
            parent=h["parent"] if h.get("parent") is None else _typed(h, "parent", str),
            ids=ids,
            sizes=sizes,
            labels=_typed(h, "labels", dict),
            stats=_typed(h, "stats", dict),
        )
        _check_stats(m.stats)
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{what} is malformed: {e}") from None
    try:
        validate(m)
    except (ValueError, UsageError) as e:
        raise FormatError(f"{what} is inconsistent: {e}") from None
    return m


def _typed(h: dict[str, Any], key: str, typ: type) -> Any:
    value = h[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ValueError(f"field {key!r} is not a {typ.__name__}")
    return value


_COUNTS = ("bytes_read", "chunks_read", "chunks_zero_read", "chunks_known", "chunks_existing",
           "chunks_new", "bytes_new", "bytes_new_stored", "workers")
_TEXTS = ("mode", "change_source", "fallback")


def _check_stats(stats: dict[str, Any]) -> None:
    """The statistics snapship writes must have their types (others are kept as they are):
    `show` and `versions` compute with them."""
    for key in _COUNTS:
        if key in stats and not _count(stats[key]):
            raise ValueError(f"stats field {key!r} is not a count")
    if "duration" in stats:
        v = stats["duration"]
        if (not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v)
                or v < 0):
            raise ValueError("stats field 'duration' is not a number of seconds")
    for key in _TEXTS:
        if key in stats and not isinstance(stats[key], str):
            raise ValueError(f"stats field {key!r} is not a string")
    if "free_space" in stats:
        _check_free_space(stats["free_space"])
    if "snapshot" in stats:
        _check_snapshot(stats["snapshot"])


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_snapshot(s: Any) -> None:
    """stats.snapshot (docs/format.md): the classic tracking snapshot, and the periods
    `--snapshot-size auto` sizes the next one from."""
    if not isinstance(s, dict):
        raise ValueError("stats field 'snapshot' is not an object")
    if "size" in s and not _count(s["size"]):
        raise ValueError("stats field 'snapshot.size' is not a count")
    for key in ("sizing", "requested", "placement", "note"):
        if key in s and not isinstance(s[key], str):
            raise ValueError(f"stats field 'snapshot.{key}' is not a string")
    if "pvs" in s and not (isinstance(s["pvs"], list)
                           and all(isinstance(p, str) for p in s["pvs"])):
        raise ValueError("stats field 'snapshot.pvs' is not a list of strings")
    periods = s.get("periods", [])
    if not isinstance(periods, list) or not all(
            isinstance(p, dict) and _count(p.get("cow_bytes"))
            and isinstance(p.get("seconds"), int | float) and not isinstance(p["seconds"], bool)
            and math.isfinite(p["seconds"]) and p["seconds"] > 0
            and isinstance(p.get("overflowed"), bool) for p in periods):
        raise ValueError("stats field 'snapshot.periods' is not a list of periods")


_FREE_COUNTS = ("hole_bytes", "free_bytes", "unmapped_bytes", "metadata_bytes_read",
                "chunks_skipped", "bytes_skipped", "bytes_zeroed")


def _check_free_space(f: Any) -> None:
    """stats.free_space (docs/format.md): what the backup knew to be zero and skipped."""
    if not isinstance(f, dict):
        raise ValueError("stats field 'free_space' is not an object")
    for key in _FREE_COUNTS:
        if key in f and not _count(f[key]):
            raise ValueError(f"stats field 'free_space.{key}' is not a count")
    if "note" in f and not isinstance(f["note"], str):
        raise ValueError("stats field 'free_space.note' is not a string")
    for key in ("skipped", "log_replayed"):
        if key in f and not isinstance(f[key], bool):
            raise ValueError(f"stats field 'free_space.{key}' is not a boolean")
    if "filesystem" in f and f["filesystem"] is not None and not isinstance(f["filesystem"], str):
        raise ValueError("stats field 'free_space.filesystem' is not a string or null")


def validate(m: Manifest) -> None:
    check_name("volume", m.volume)
    check_name("version", m.version)
    if m.size < 0:
        raise ValueError(f"negative size {m.size}")
    cs = m.chunk_size
    if cs < MIN_CHUNK_SIZE or cs > MAX_CHUNK_SIZE or cs & (cs - 1):
        raise ValueError(f"chunk size {cs} is not a power of two in 64 KiB..16 MiB")
    n = chunk_count(m.size, cs)
    if len(m.sizes) != n or len(m.ids) != n * ID_LEN:
        raise ValueError(f"{len(m.sizes)} chunks listed, {n} expected for {m.size} bytes")
    _check_zero_markers(m.ids, m.sizes)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in m.labels.items()):
        raise ValueError("labels must map strings to strings")
