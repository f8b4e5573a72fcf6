"""The changed-ranges file `snapship backup --changed-ranges FILE` reads (docs/changed-ranges.md).

One range per line, `START LENGTH` in bytes (decimal, leading zeros allowed, or hex with 0x),
each below 2^63, separated by white space or a comma; `#` starts a comment; blank lines are
ignored. An optional first line `# snapship-ranges 1` names the format version; any other
version is refused. A file holds at most `MAX_FILE_SIZE` bytes.
"""

from __future__ import annotations

import re

from snapship.changes.ranges import coalesce
from snapship.errors import UsageError
from snapship.types import ByteRange

MAX_FILE_SIZE = 256 << 20
"""The most a changed-ranges file (or standard input) may hold: millions of ranges, and still a
bound on what is read and kept in memory (docs/changed-ranges.md)."""
MAX_NUMBER = (1 << 63) - 1
"""Offsets and lengths must fit a signed 64-bit integer, as every block device size does."""

_NUM = r"0[xX][0-9a-fA-F]+|[0-9]+"
_HEADER = re.compile(r"#\s*snapship-ranges\s+(\S+)\s*")
_LINE = re.compile(rf"\s*({_NUM})\s*[,\s]\s*({_NUM})\s*", re.ASCII)


def _number(text: str, source: str, n: int) -> int:
    """Hex with 0x, else decimal (leading zeros allowed: `0100` is one hundred, not octal).
    Its digits are counted before converting, so no length of input is slow or an error
    other than this one."""
    hexa = text[:2] in ("0x", "0X")
    digits = (text[2:] if hexa else text).lstrip("0")
    if len(digits) <= (16 if hexa else 19):
        value = int(digits or "0", 16 if hexa else 10)
        if value <= MAX_NUMBER:
            return value
    shown = text if len(text) <= 24 else f"{text[:20]}... ({len(text)} digits)"
    raise UsageError(f"{source} line {n}: {shown} is too large (at most 2^63-1)")


def parse_ranges(text: str, source: str = "changed-ranges file") -> list[ByteRange]:
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        header = _HEADER.fullmatch(raw)
        if header:
            if header.group(1) != "1":
                raise UsageError(f"{source}: format version {header.group(1)} is not supported")
            continue
        line = raw.split("#", 1)[0]
        if not line.strip():
            continue
        m = _LINE.fullmatch(line)
        if not m:
            shown = raw.strip() if len(raw) <= 80 else raw.strip()[:60] + "..."
            raise UsageError(f"{source} line {n}: expected 'START LENGTH', got {shown!r}")
        start, length = _number(m.group(1), source, n), _number(m.group(2), source, n)
        out.append(ByteRange(start, start + length))
    return coalesce(out)
