"""The storage-backend contract every backend (directory, memory, HTTP, S3) implements.

Objects are immutable byte strings under `/`-separated keys made of `[A-Za-z0-9._+-]`
segments. The contract is deliberately small so an object store can meet it:

- `put(key, data)`: after it returns, `get(key)` returns exactly `data`; a reader never sees a
  partial object. Putting a key that exists with the same content is allowed and harmless
  (content-addressed chunks race this way). Durability is only promised after `flush()`.
- `get(key)`: the whole object, or `ObjectNotFound`.
- `stat(key)`: the object's size, or None if it does not exist.
- `list(prefix)`: every (key, size) whose key starts with `prefix`, in no particular order;
  objects put before the call started are listed.
- `delete(key)`: removes the object; deleting a missing key is not an error.
- `rename(src, dst)`: moves an object to a new key, replacing `dst` if it exists; afterwards
  `src` is gone and `dst` holds the whole object (gc uses it to set chunks aside as fossils, see
  docs/gc.md). A missing `src` raises `ObjectNotFound`. It need not be atomic: a crash may leave
  both keys, never neither.
- `flush()`: every put that returned before the call is durable when it returns.

Methods may be called from many threads at once. Failures raise `StorageError` (permanent) or
`TransientStorageError` (retrying may help); a missing object raises `ObjectNotFound`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Protocol

from snapship.errors import UsageError

_KEY = re.compile(r"[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*")


def check_key(key: str) -> str:
    if not _KEY.fullmatch(key) or any(part in (".", "..") for part in key.split("/")):
        raise UsageError(f"invalid object key {key!r}")
    return key


class Storage(Protocol):
    def put(self, key: str, data: bytes | bytearray) -> None: ...

    def get(self, key: str) -> bytes: ...

    def stat(self, key: str) -> int | None: ...

    def list(self, prefix: str) -> Iterator[tuple[str, int]]: ...

    def delete(self, key: str) -> None: ...

    def rename(self, src: str, dst: str) -> None: ...

    def flush(self) -> None: ...

    def describe(self) -> str:
        """Where the objects live, for messages (a path or URL)."""
        ...
