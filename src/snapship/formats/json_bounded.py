"""JSON read from storage or the network, with its size and nesting bounded.

`json.loads` has no limits of its own: a few hundred kilobytes of `[` drive it into a
`RecursionError`, and a document nested a few hundred levels deep parses but then breaks
whatever walks it recursively (`json.dumps`, a comparison). Every reader of JSON that someone
else wrote (manifest and reference-list headers, `config`, the key file, locks, markers, HTTP
bodies) goes through `load_object`, which refuses such input in one line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from snapship.errors import FormatError
from snapship.formats.constants import MAX_JSON_DEPTH


def depth(value: Any) -> int:
    """How deeply `value` nests lists and objects (a scalar is 0, `{}` and `[]` are 1);
    iterative, so no input can exhaust the stack."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children
                     if isinstance(child, dict | list))
    return deepest


def load_object(
    data: bytes | bytearray | memoryview | str,
    what: str,
    max_bytes: int,
    max_depth: int = MAX_JSON_DEPTH,
    error: Callable[[str], Exception] = FormatError,
) -> dict[str, Any]:
    """The JSON object in `data`, at most `max_bytes` long and `max_depth` levels deep.

    Anything else raises `error(message)` (a `FormatError` unless the caller wants its own,
    e.g. the HTTP API's `WireError`) with a one-line message starting with `what`, e.g.
    `load_object(blob, f"lock {key}", 64 << 10, 4)`.
    """
    if len(data) > max_bytes:
        raise error(f"{what} is too large ({len(data)} bytes, at most {max_bytes})")
    if isinstance(data, memoryview | bytearray):
        data = bytes(data)
    try:
        obj = json.loads(data)
    except RecursionError:
        raise error(f"{what} is nested more than {max_depth} levels deep") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, too many int digits
        raise error(f"{what} is not valid JSON: {_one_line(e)}") from None
    if not isinstance(obj, dict):
        raise error(f"{what} is not a JSON object")
    if depth(obj) > max_depth:
        raise error(f"{what} is nested more than {max_depth} levels deep")
    return obj


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
