"""The version summary: what `versions` and `show` report of a version, in a few hundred bytes.

A manifest lists every chunk (36 MiB for a 1 TiB volume); listing versions from manifests
grows with the volumes. The summary holds the manifest's header plus the counts `show`
derives from its chunk list, as one UTF-8 JSON object (docs/format.md, "Version summary"),
sealed in an object envelope of kind SUMMARY under `summaries/<volume>/<version>`, encrypted
and authenticated like the manifest. A repository written before summaries existed has none:
readers then derive one from the manifest (`from_manifest`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from snapship.errors import FormatError, UsageError
from snapship.formats.constants import (
    MAX_CHUNK_SIZE,
    MAX_MANIFEST_HEADER,
    MIN_CHUNK_SIZE,
    SUMMARY_VERSION,
)
from snapship.formats.json_bounded import load_object
from snapship.formats.manifest import Manifest, _check_stats, _typed, check_name, chunk_count

MAX_SUMMARY_JSON = MAX_MANIFEST_HEADER + (64 << 10)
"""A manifest's header (at most 1 MiB: labels and statistics) and a few counts."""

_COUNTS = ("size", "chunk_size", "chunks", "zero_chunks", "unique_chunks", "data_bytes",
           "stored_bytes", "manifest_bytes")


@dataclass(frozen=True)
class Summary:
    volume: str
    version: str
    size: int
    chunk_size: int
    created: str
    source: str
    parent: str | None
    labels: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    chunks: int = 0
    zero_chunks: int = 0
    """Chunks that are all zero (not stored)."""
    unique_chunks: int = 0
    """Distinct non-zero chunks: the version's reference list."""
    data_bytes: int = 0
    """Bytes of the volume in non-zero chunks."""
    stored_bytes: int = 0
    """Stored size of the distinct chunks: what the version costs alone."""
    manifest_bytes: int = 0
    """Stored size of the manifest object (0: not known, for a summary derived from the
    manifest): a listing compares it with the manifest's size, so a truncated or replaced
    manifest shows without being read."""


def from_manifest(m: Manifest, unique: tuple[int, int] | None = None,
                  manifest_bytes: int = 0) -> Summary:
    """The summary of `m`; `unique` (how many distinct chunks it has, and their stored size)
    when the caller knows it already (its reference list)."""
    if unique is None:
        distinct = m.unique_chunks()
        unique = len(distinct), sum(distinct.values())
    zero = m.zero_chunks()
    nonzero = m.count - zero
    data = nonzero * m.chunk_size
    if nonzero and m.sizes[m.count - 1]:  # the last chunk may be short
        data -= m.count * m.chunk_size - m.size
    return Summary(m.volume, m.version, m.size, m.chunk_size, m.created, m.source, m.parent,
                   dict(m.labels), dict(m.stats), m.count, zero, unique[0], data, unique[1],
                   manifest_bytes)


def encode(s: Summary) -> bytes:
    validate(s)
    _check_stats(s.stats)
    return json.dumps({"summary": SUMMARY_VERSION, **asdict(s)}, sort_keys=True,
                      separators=(",", ":")).encode()


def decode(data: bytes, what: str) -> Summary:
    """Parse a summary's plaintext; `what` names it in errors. Rejects anything not exactly
    version 1, mistyped or inconsistent fields."""
    d = load_object(data, what, MAX_SUMMARY_JSON)
    if d.get("summary") != SUMMARY_VERSION:
        raise FormatError(f"{what} has summary version {d.get('summary')!r}; this snapship "
                          f"reads {SUMMARY_VERSION}")
    try:
        counts = {k: _typed(d, k, int) for k in _COUNTS}
        parent = d["parent"] if d.get("parent") is None else _typed(d, "parent", str)
        s = Summary(volume=_typed(d, "volume", str), version=_typed(d, "version", str),
                    created=_typed(d, "created", str), source=_typed(d, "source", str),
                    parent=parent, labels=_typed(d, "labels", dict),
                    stats=_typed(d, "stats", dict), **counts)
        _check_stats(s.stats)
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{what} is malformed: {e}") from None
    try:
        validate(s)
    except (ValueError, UsageError) as e:
        raise FormatError(f"{what} is inconsistent: {e}") from None
    return s


def validate(s: Summary) -> None:
    check_name("volume", s.volume)
    check_name("version", s.version)
    if s.parent is not None:
        check_name("version", s.parent)
    cs = s.chunk_size
    if cs < MIN_CHUNK_SIZE or cs > MAX_CHUNK_SIZE or cs & (cs - 1):
        raise ValueError(f"chunk size {cs} is not a power of two in 64 KiB..16 MiB")
    if any(getattr(s, k) < 0 for k in _COUNTS):
        raise ValueError("a size or count is negative")
    if s.chunks != chunk_count(s.size, cs):
        raise ValueError(f"{s.chunks} chunks, {chunk_count(s.size, cs)} expected for "
                         f"{s.size} bytes")
    if s.zero_chunks > s.chunks or s.unique_chunks > s.chunks - s.zero_chunks:
        raise ValueError("more zero or distinct chunks than chunks")
    if s.data_bytes > s.size or (s.unique_chunks == 0) != (s.stored_bytes == 0):
        raise ValueError("data or stored bytes disagree with the chunk counts")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in s.labels.items()):
        raise ValueError("labels must map strings to strings")
