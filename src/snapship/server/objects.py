"""The server's repositories: one per name under its root, a directory or an object store.

Under a directory root each repository is a `LocalStorage` directory (temp file, fsync,
rename; syncfs on flush), so the server is exactly as crash-safe as a local repository; under
an object-store root (`--root s3://BUCKET/PREFIX`) each is a `PrefixedStorage` view of one
store, through whatever backend the server's entry point built for it. This module adds what
serving needs on top of either:

- create-only puts, checked and done under a per-key lock, so that "does it exist, and with
  these bytes" cannot race another writer of the same key in this process; a store that can
  create an object only if it is absent (S3's conditional PUT: storage/base.py, `creator`)
  makes that hold across every server of the store;
- GETs as open files (on a directory root), so large objects stream without being held in
  memory;
- a listing in a fixed order that resumes after any key, so it can be paged without the
  server remembering anything between pages.

Nothing about a repository is kept in memory between requests: its locks, sessions and gc
state are objects in the repository (docs/gc.md), so several servers may serve one store.
"""

from __future__ import annotations

import enum
import io
import itertools
import os
import threading
import zlib
from collections.abc import Iterator
from typing import BinaryIO

from snapship.errors import ObjectNotFound, StorageError
from snapship.repository.catalog import Catalog
from snapship.repository.layout import chunk_id_of
from snapship.storage.base import Storage, creator
from snapship.storage.local import TMP_PREFIX, LocalStorage
from snapship.storage.prefixed import PrefixedStorage, names

_STRIPES = 256


class PutOutcome(enum.Enum):
    CREATED = "created"
    REPLACED = "replaced"
    IDENTICAL = "identical"


class ExistsWithOtherContent(Exception):
    """A create-only put found the key holding other bytes."""


class RepoStore:
    """One repository. `stripes` are locks shared by every store of the server: puts and
    deletes of one key (in one repository) take the same one."""

    def __init__(self, storage: Storage, stripes: list[threading.Lock] | None = None) -> None:
        self.storage = storage
        self.root = storage.describe()
        self._stripes = stripes or [threading.Lock() for _ in range(_STRIPES)]
        self._create = creator(storage)

    def _lock(self, key: str) -> threading.Lock:
        return self._stripes[zlib.crc32(f"{self.root}/{key}".encode()) % len(self._stripes)]

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def put(self, key: str, data: bytes | bytearray, *, create_only: bool) -> PutOutcome:
        with self._lock(key):
            if create_only and self._create is not None:
                if self._create(key, data):
                    return PutOutcome.CREATED
                if self._same(key, data):
                    return PutOutcome.IDENTICAL
                raise ExistsWithOtherContent(key)
            size = self.stat(key)
            if size is not None and create_only:
                if size == len(data) and self._same(key, data):
                    return PutOutcome.IDENTICAL
                raise ExistsWithOtherContent(key)
            self.storage.put(key, data)
            return PutOutcome.CREATED if size is None else PutOutcome.REPLACED

    def put_back(self, key: str, data: bytes) -> bool:
        """Put the fossil of chunk `key` back if it still holds exactly `data`; False if it
        no longer does (gc settled it meanwhile: the caller then stores `data` as usual)."""
        cid = chunk_id_of(key)
        assert cid is not None
        catalog = Catalog(self.storage)
        with self._lock(key):
            try:
                if catalog.fossil_blob(cid) != data:
                    return False
                catalog.fossil_back(cid)
            except ObjectNotFound:
                return False
            return True

    def _same(self, key: str, data: bytes | bytearray) -> bool:
        try:
            return self.storage.get(key) == data
        except ObjectNotFound:
            return False

    def open(self, key: str) -> tuple[BinaryIO, int]:
        """The object as an open file and its size (the file stays whole if replaced); from
        an object store, the object read into memory."""
        if not isinstance(self.storage, LocalStorage):
            data = self.storage.get(key)
            return io.BytesIO(data), len(data)
        path = self._path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - the caller streams and closes it
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as e:
            raise StorageError(f"cannot read {path}: {e.strerror or e}") from None
        try:
            return f, os.fstat(f.fileno()).st_size
        except OSError as e:
            f.close()
            raise StorageError(f"cannot stat {path}: {e.strerror or e}") from None

    def stat(self, key: str) -> int | None:
        return self.storage.stat(key)

    def delete(self, key: str) -> None:
        with self._lock(key):
            self.storage.delete(key)

    def rename(self, src: str, dst: str) -> None:
        self.storage.rename(src, dst)

    def flush(self) -> None:
        self.storage.flush()

    def stat_many(self, keys: list[str]) -> tuple[list[str], list[tuple[str, int]]]:
        """(keys that do not exist, (key, size) of those that do), in the order given."""
        missing, present = [], []
        sizes = self.storage.stat_many(keys)  # an object store's HEADs run in parallel
        for k in keys:
            size = sizes[k]
            if size is None:
                missing.append(k)
            else:
                present.append((k, size))
        return missing, present

    def list_page(self, prefix: str, after: str | None, limit: int
                  ) -> tuple[list[tuple[str, int]], str | None]:
        """Up to `limit` (key, size) in listing order after `after`; the next cursor or None."""
        out: list[tuple[str, int]] = []
        items = (sorted_objects(self.root, prefix, after)
                 if isinstance(self.storage, LocalStorage)
                 else self.storage.list(prefix, after))
        for item in itertools.islice(items, limit):
            out.append(item)
            if len(out) == limit:
                return out, item[0]
        return out, None


def sorted_objects(root: str, prefix: str, after: str | None) -> Iterator[tuple[str, int]]:
    """Objects under `root` whose key starts with `prefix`, ordered by key segments, starting
    after `after`. Directories wholly before `after`, or that cannot hold the prefix, are not
    read: each page costs the directories it touches, not the whole repository."""
    cursor = after.split("/") if after else None

    def walk(dirpath: str, rel: list[str]) -> Iterator[tuple[str, int]]:
        try:
            with os.scandir(dirpath) as it:
                entries = sorted(it, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as e:
            raise StorageError(f"cannot list {dirpath}: {e.strerror or e}") from None
        for entry in entries:
            if entry.name.startswith(TMP_PREFIX):
                continue
            parts = [*rel, entry.name]
            key = "/".join(parts)
            if entry.is_dir(follow_symlinks=False):
                if cursor is not None and parts < cursor[: len(parts)]:
                    continue
                if (key + "/").startswith(prefix) or prefix.startswith(key + "/"):
                    yield from walk(entry.path, parts)
            elif entry.is_file(follow_symlinks=False):
                if (cursor is not None and parts <= cursor) or not key.startswith(prefix):
                    continue
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
                yield key, size

    yield from walk(root, [])


class Repositories:
    """Every repository under the server's root, by name (created on first write): the
    directories under a local directory, or the prefixes of an object store (`store`, which
    must list in key order). Nothing is kept per repository, so asking for many names costs
    no memory."""

    def __init__(self, root: str | Storage) -> None:
        self.store: Storage | None = None
        if isinstance(root, str):
            self.root = os.path.abspath(root)
        else:
            if not root.capabilities.ordered_listing:
                raise StorageError(f"{root.describe()} does not list in key order: it cannot "
                                   "hold a server's repositories")
            self.store = root
            self.root = root.describe().rstrip("/")
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]

    def get(self, name: str) -> RepoStore:
        if self.store is None:
            return RepoStore(LocalStorage(os.path.join(self.root, name)), self._stripes)
        return RepoStore(PrefixedStorage(self.store, name), self._stripes)

    def names(self) -> list[str]:
        """The names that hold objects (directories, under a local root), in order."""
        if self.store is None:
            try:
                return sorted(e.name for e in os.scandir(self.root) if e.is_dir())
            except OSError as e:
                raise StorageError(f"cannot list {self.root}: {e.strerror or e}") from None
        return list(names(self.store))
