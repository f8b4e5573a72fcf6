"""The state of a garbage collection in progress: the `gc/collection` object (docs/gc.md).

While it exists, unreferenced chunks may have been set aside as fossils, and writers that
start meanwhile re-check the chunks they reuse. `writers` lists the writer sessions that were
live when the fossils were set aside; the collection finishes only after all of them have.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from snapship.errors import FormatError, ObjectNotFound
from snapship.formats.constants import COLLECTION_VERSION
from snapship.formats.json_bounded import load_object
from snapship.repository.layout import COLLECTION_KEY
from snapship.storage.base import Storage

CONDEMNING = "condemning"
CONDEMNED = "condemned"


@dataclass
class Collection:
    id: str
    started: str
    phase: str = CONDEMNING
    writers: list[str] = field(default_factory=list)
    fossils: int = 0


def load(storage: Storage) -> Collection | None:
    try:
        data = storage.get(COLLECTION_KEY)
    except ObjectNotFound:
        return None
    try:
        d: dict[str, Any] = load_object(data, COLLECTION_KEY, 16 << 20)
        if d.get("v") != COLLECTION_VERSION:
            raise FormatError(f"{COLLECTION_KEY} has version {d.get('v')!r}; this snapship reads 1")
        c = Collection(str(d["id"]), str(d["started"]), str(d["phase"]),
                       [str(w) for w in d["writers"]], int(d["fossils"]))
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{COLLECTION_KEY} is malformed: {e}") from None
    if c.phase not in (CONDEMNING, CONDEMNED):
        raise FormatError(f"{COLLECTION_KEY} has unknown phase {c.phase!r}")
    return c


def save(storage: Storage, c: Collection) -> None:
    storage.put(COLLECTION_KEY, json.dumps({"v": COLLECTION_VERSION, **asdict(c)}).encode())
    storage.flush()


def finish(storage: Storage) -> None:
    storage.delete(COLLECTION_KEY)
    storage.flush()
