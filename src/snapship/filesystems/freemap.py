"""What a free-space parser returns, and the error it raises; shared by the parsers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from snapship.errors import FormatError
from snapship.types import ByteRange

Read = Callable[[int, int], bytes]
"""read(offset, length) -> exactly `length` bytes of the device at `offset`."""


class FreeSpaceError(FormatError):
    """The filesystem's metadata is not what the parser understands, or is inconsistent."""


@dataclass(frozen=True)
class FreeMap:
    """A filesystem's verdict: `free` may be treated as zeroes only when `clean` is true."""

    filesystem: str | None
    """"ext4", "xfs", or None when no supported filesystem was recognised."""
    clean: bool
    reason: str
    """One line: what was found, or why the map must not be used."""
    free: list[ByteRange] = field(default_factory=list)
    """Free byte ranges, sorted and disjoint; empty unless `clean`."""

    @property
    def free_bytes(self) -> int:
        return sum(r.length for r in self.free)


def runs_from_bitmap(bitmap: bytes, nbits: int) -> list[tuple[int, int]]:
    """(first, count) of each run of clear bits among the first `nbits` (little-endian bit
    order within each byte, as ext4 keeps its bitmaps)."""
    out: list[tuple[int, int]] = []
    value = int.from_bytes(bitmap[: (nbits + 7) // 8], "little") & ((1 << nbits) - 1)
    value |= 1 << nbits  # a sentinel set bit: every run of clear bits ends by nbits
    i = 0
    while i < nbits:
        rest = value >> i
        if rest & 1:
            i += (~rest & (rest + 1)).bit_length() - 1  # the run of set bits
            continue
        zeros = (rest & -rest).bit_length() - 1
        out.append((i, zeros))
        i += zeros
    return out
