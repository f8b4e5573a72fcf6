"""The changed-ranges file `snapship backup --changed-ranges FILE` reads (docs/changed-ranges.md).

One range per line, `START LENGTH` in bytes (decimal, or hex with 0x), separated by white space
or a comma; `#` starts a comment; blank lines are ignored. An optional first line
`# snapship-ranges 1` names the format version; any other version is refused.
"""

from __future__ import annotations

import re

from snapship.changes.ranges import coalesce
from snapship.errors import UsageError
from snapship.types import ByteRange

_HEADER = re.compile(r"#\s*snapship-ranges\s+(\S+)\s*")
_LINE = re.compile(r"\s*(0[xX][0-9a-fA-F]+|\d+)\s*[,\s]\s*(0[xX][0-9a-fA-F]+|\d+)\s*")


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
            raise UsageError(f"{source} line {n}: expected 'START LENGTH', got {raw.strip()!r}")
        start, length = int(m.group(1), 0), int(m.group(2), 0)
        out.append(ByteRange(start, start + length))
    return coalesce(out)
