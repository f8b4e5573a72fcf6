"""An in-memory backend: the test double every engine test can use."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from snapship.errors import ObjectNotFound
from snapship.storage.base import Capabilities, StorageDefaults, check_key


class MemoryStorage(StorageDefaults):
    capabilities = Capabilities(ordered_listing=True)

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes | bytearray) -> None:
        check_key(key)
        with self._lock:
            self.objects[key] = bytes(data)

    def get(self, key: str) -> bytes:
        with self._lock:
            try:
                return self.objects[key]
            except KeyError:
                raise ObjectNotFound(key) from None

    def stat(self, key: str) -> int | None:
        with self._lock:
            data = self.objects.get(key)
        return None if data is None else len(data)

    def list(self, prefix: str, after: str | None = None) -> Iterator[tuple[str, int]]:
        with self._lock:
            items = sorted((k, len(v)) for k, v in self.objects.items()
                           if k.startswith(prefix) and (after is None or k > after))
        return iter(items)

    def delete(self, key: str) -> None:
        with self._lock:
            self.objects.pop(key, None)

    def rename(self, src: str, dst: str) -> None:
        check_key(dst)
        with self._lock:
            try:
                self.objects[dst] = self.objects.pop(src)
            except KeyError:
                raise ObjectNotFound(src) from None

    def flush(self) -> None:
        pass

    def describe(self) -> str:
        return "memory"
