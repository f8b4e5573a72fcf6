"""The one printer of each maintenance report, for the local run and the run on a server.

gc and verify report the same fields wherever they ran (engine/gc.py's `GcReport` with the
warnings it gave, engine/verify.py's `VerifyReport.to_json()`); a server sends them as JSON,
and its log uses the same words (engine `describe`). So every variant of a command prints
through one function, from the same dict.
"""

from __future__ import annotations

from typing import Any

from snapship.cli.output import print_json
from snapship.engine import gc, verify


def print_gc(r: dict[str, Any], *, json: bool, where: str = "gc") -> None:
    if json:
        print_json(r)
    else:
        print("\n".join(gc.describe(r, where)))


def print_verify(r: dict[str, Any], *, json: bool, where: str = "verify") -> int:
    """Print the report; the exit code it means (0 ok, 1 damage found)."""
    if json:
        print_json(r)
    else:
        print("\n".join(verify.describe(r, where)))
    return 0 if r["ok"] else 1
