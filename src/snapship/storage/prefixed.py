"""One repository inside a larger store: every key `K` of the view is `PREFIX/K` of the store.

`snapship server --root s3://BUCKET/PREFIX` keeps one repository per name under its root,
as it keeps one directory per name under a local root. One S3 client (its connection pool,
its retries) serves them all: a view costs nothing to make, so the server makes one per
request. The view keeps the contract of base.py as far as the store does: the same
capabilities, the same order of listing (a store's keys under one prefix are contiguous in
key order, so an ordered store lists the view in order too).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from snapship.errors import ObjectNotFound
from snapship.storage.base import Capabilities, CreateFn, Storage, check_key, creator


class PrefixedStorage:
    def __init__(self, store: Storage, name: str) -> None:
        self.store = store
        self.prefix = check_key(name) + "/"

    @property
    def capabilities(self) -> Capabilities:
        return self.store.capabilities

    def put(self, key: str, data: bytes | bytearray) -> None:
        self.store.put(self.prefix + key, data)

    def creator(self) -> CreateFn | None:
        inner = creator(self.store)
        if inner is None:
            return None
        return lambda key, data: inner(self.prefix + key, data)

    def get(self, key: str) -> bytes:
        try:
            return self.store.get(self.prefix + key)
        except ObjectNotFound:
            raise ObjectNotFound(key) from None

    def stat(self, key: str) -> int | None:
        return self.store.stat(self.prefix + key)

    def stat_many(self, keys: Iterable[str]) -> dict[str, int | None]:
        n = len(self.prefix)
        return {k[n:]: size for k, size in
                self.store.stat_many([self.prefix + k for k in keys]).items()}

    def list(self, prefix: str, after: str | None = None) -> Iterator[tuple[str, int]]:
        n = len(self.prefix)
        start = None if after is None else self.prefix + after
        for key, size in self.store.list(self.prefix + prefix, start):
            yield key[n:], size

    def delete(self, key: str) -> None:
        self.store.delete(self.prefix + key)

    def rename(self, src: str, dst: str) -> None:
        try:
            self.store.rename(self.prefix + src, self.prefix + dst)
        except ObjectNotFound:
            raise ObjectNotFound(src) from None

    def flush(self) -> None:
        self.store.flush()

    def remove_temporaries(self, older_than: float) -> int:
        # The stores a view is made over (S3) leave no partial objects behind; a sweep of
        # the whole store on behalf of one repository would be the wrong scope anyway.
        return 0

    def describe(self) -> str:
        return f"{self.store.describe().rstrip('/')}/{self.prefix.rstrip('/')}"


def names(store: Storage) -> Iterator[str]:
    """The first segments of the keys in an ordered store (the repositories of a server's
    root), each once, in order: one short listing per name, skipping past all of its keys.
    (Every key of a name sorts between `NAME/` and `NAME/~`: keys are made of characters
    below `~`.)"""
    if not store.capabilities.ordered_listing:
        raise ValueError(f"{store.describe()} does not list in order")
    after: str | None = None
    while True:
        found = next(iter(store.list("", after)), None)
        if found is None:
            return
        name, sep, _rest = found[0].partition("/")
        if sep:
            yield name
            after = name + "/~"
        else:
            after = name  # an object at the top, not a repository
