"""The storage-backend contract every backend (directory, memory, HTTP, S3) implements.

Objects are immutable byte strings under `/`-separated keys made of `[A-Za-z0-9._+-]`
segments. The contract is deliberately small so an object store can meet it:

- `put(key, data)`: after it returns, `get(key)` returns exactly `data`; a reader never sees a
  partial object. Putting a key that exists with the same content is allowed and harmless
  (content-addressed chunks race this way). An empty object is an object. Durability is only
  promised after `flush()`.
- `get(key)`: the whole object, or `ObjectNotFound`.
- `stat(key)`: the object's size, or None if there is no object under that key (a key that
  is only a prefix of other keys, a "directory", is not an object).
- `stat_many(keys)`: `stat` of each key (a backend may answer many in one request).
- `list(prefix, after=None)`: every (key, size) whose key starts with `prefix` (a plain string
  prefix, possibly empty, possibly matching nothing) and, with `after`, is greater than
  `after`; in ascending key order if `capabilities.ordered_listing`, else in no particular
  order. Objects put before the call started are listed, objects put or deleted while it runs
  may or may not be.
- `delete(key)`: removes the object; deleting a missing key is not an error.
- `rename(src, dst)`: moves an object to a new key, replacing `dst` if it exists; afterwards
  `src` is gone and `dst` holds the whole object (gc uses it to set chunks aside as fossils, see
  docs/gc.md). A missing `src` raises `ObjectNotFound`. It need not be atomic: a crash may leave
  both keys, never neither.
- `flush()`: every put that returned before the call is durable when it returns.
- `remove_temporaries(older_than)`: delete what killed writers left behind (partial files
  older than `older_than` seconds); returns how many. Backends that leave none return 0.
- `capabilities`: what the engines may rely on (below).

Optional: `creator()`, on a backend that can store an object only if its key is free,
atomically for every client of the store (S3's conditional PUT), returns the function that
does (`create(key, data)`: True if it stored it, False if an object was there, left as it
was). Wrappers pass it through. `creator(storage)` below asks for it.

Methods may be called from many threads at once. Failures raise `StorageError` (permanent) or
`TransientStorageError` (retrying may help); a missing object raises `ObjectNotFound`.
Backends do not retry themselves: `storage/retry.py`'s `RetryingStorage` wraps one that talks
to a network, as restic's backends are wrapped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from snapship.errors import UsageError

_KEY = re.compile(r"[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*")


def check_key(key: str) -> str:
    if not _KEY.fullmatch(key) or any(part in (".", "..") for part in key.split("/")):
        raise UsageError(f"invalid object key {key!r}")
    return key


@dataclass(frozen=True)
class Capabilities:
    parallelism: int = 0
    """Requests worth having in flight at once: a backend whose requests wait on a network
    round trip asks for more workers than there are CPUs (engine/pipeline.py)."""
    list_lag: float = 0.0
    """Seconds a new object may take to appear in listings; gc waits that long (docs/gc.md,
    "Listing lag"). 0 for every store that lists after write."""
    ordered_listing: bool = False
    """Whether `list` gives keys in ascending order (so a listing that failed part-way can
    resume `after` the last key it gave)."""


LOCAL = Capabilities()


class Storage(Protocol):
    @property
    def capabilities(self) -> Capabilities: ...

    def put(self, key: str, data: bytes | bytearray) -> None: ...

    def get(self, key: str) -> bytes: ...

    def stat(self, key: str) -> int | None: ...

    def stat_many(self, keys: Iterable[str]) -> dict[str, int | None]: ...

    def list(self, prefix: str, after: str | None = None) -> Iterator[tuple[str, int]]: ...

    def delete(self, key: str) -> None: ...

    def rename(self, src: str, dst: str) -> None: ...

    def flush(self) -> None: ...

    def remove_temporaries(self, older_than: float) -> int: ...

    def describe(self) -> str:
        """Where the objects live, for messages (a path or URL)."""
        ...


CreateFn = Callable[[str, bytes | bytearray], bool]


def creator(storage: Storage) -> CreateFn | None:
    """The backend's atomic create-if-absent, if it has one (see the module's docstring)."""
    get: Callable[[], CreateFn | None] | None = getattr(storage, "creator", None)
    return get() if get is not None else None


class StorageDefaults:
    """The parts of the contract most backends share: no special capabilities, `stat_many`
    as one `stat` per key, nothing temporary left behind."""

    capabilities = LOCAL

    def stat(self, key: str) -> int | None:
        raise NotImplementedError

    def stat_many(self, keys: Iterable[str]) -> dict[str, int | None]:
        return {k: self.stat(k) for k in keys}

    def remove_temporaries(self, older_than: float) -> int:
        return 0
