"""Small value types shared by every layer; this module imports nothing from snapship."""

from __future__ import annotations

from dataclasses import dataclass

ChunkId = bytes
"""A 32-byte content address. `ZERO_ID` stands for an all-zero chunk that is never stored."""

ZERO_ID: ChunkId = bytes(32)


@dataclass(frozen=True, order=True)
class ByteRange:
    """A half-open range [start, end) of byte offsets in a volume."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end < self.start:
            raise ValueError(f"invalid byte range [{self.start}, {self.end})")

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class VersionRef:
    """Names one version of one volume: `volume@version`; version None means the latest."""

    volume: str
    version: str | None = None

    def __str__(self) -> str:
        return f"{self.volume}@{self.version or 'latest'}"
