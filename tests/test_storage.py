"""The storage contract (storage/base.py), run against every backend: memory, a local
directory, a snapship server, S3 (SeaweedFS), and a flaky backend behind the retrying wrapper
(storage/retry.py), which must keep the contract for what it wraps, and the server behind the
bandwidth limiter (storage/ratelimit.py, at a fast limit), which must too."""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from snapship.errors import ObjectNotFound, StorageError, TransientStorageError, UsageError
from snapship.storage.base import Capabilities, Storage, creator
from snapship.storage.local import LocalStorage
from snapship.storage.memory import MemoryStorage
from snapship.storage.prefixed import PrefixedStorage, names
from snapship.storage.ratelimit import RateLimitedStorage, TokenBucket
from snapship.storage.retry import PartlyAnswered, RetryingStorage, RetryPolicy
from snapship.storage.s3 import S3Storage
from tests.seaweed import Bucket
from tests.serverproc import ServerProc, http_storage, running_server

pytest_plugins = ("tests.s3server",)  # the weed and s3_bucket fixtures


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[ServerProc, dict[str, str]]]:
    with running_server(tmp_path_factory.mktemp("server")) as running:
        yield running


class Flaky(MemoryStorage):
    """Fails every other request transiently (before or after doing it): what a network does,
    on demand. The contract holds only through `RetryingStorage`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.capabilities = Capabilities(ordered_listing=True)

    def _maybe_fail(self, after: bool) -> None:
        self.calls += 1
        if self.calls % 2 == int(after):
            raise TransientStorageError(f"flaky: request {self.calls} lost")

    def put(self, key: str, data: bytes | bytearray) -> None:
        self._maybe_fail(False)
        super().put(key, data)
        self._maybe_fail(True)

    def get(self, key: str) -> bytes:
        self._maybe_fail(False)
        return super().get(key)

    def stat(self, key: str) -> int | None:
        self._maybe_fail(False)
        return super().stat(key)

    def stat_many(self, keys: Iterable[str]) -> dict[str, int | None]:
        self._maybe_fail(False)  # one request for all, as a server's batch is
        return {k: MemoryStorage.stat(self, k) for k in keys}

    def delete(self, key: str) -> None:
        super().delete(key)
        self._maybe_fail(True)

    def rename(self, src: str, dst: str) -> None:
        super().rename(src, dst)
        self._maybe_fail(True)  # done, but the answer is lost: the retry finds src gone

    def list(self, prefix: str, after: str | None = None) -> Iterator[tuple[str, int]]:
        for n, item in enumerate(super().list(prefix, after)):
            if n == 2:
                self._maybe_fail(False)
            yield item


BACKENDS = ["memory", "local", "http", "s3", "retrying-flaky", "rate-limited-http",
            "prefixed-s3"]


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "memory":
        yield MemoryStorage()
    elif request.param == "retrying-flaky":
        yield RetryingStorage(Flaky(), RetryPolicy(budget=10, first_delay=0.001,
                                                   max_delay=0.001))
    elif request.param == "local":
        yield LocalStorage(str(tmp_path / "store"))
    elif request.param in ("http", "rate-limited-http"):
        server, tokens = request.getfixturevalue("http_server")
        # A fresh repository per test, through the admin token (the contract includes delete).
        s = http_storage(server, "t" + uuid.uuid4().hex[:12], tokens["ops"])
        if request.param == "http":
            yield s
        else:
            yield RateLimitedStorage(s, upload=TokenBucket(64 << 20),
                                     download=TokenBucket(64 << 20))
        s.close()
    elif request.param == "prefixed-s3":
        # One repository of a server's S3 root, among neighbours whose names it starts
        # with or sorts beside: none of theirs may show through the view.
        bucket = request.getfixturevalue("s3_bucket")
        store = S3Storage.open(bucket.url("root"))
        for key in ("repo-x/chunks/00/00aa", "repo/config", "repo-", "rep/config",
                    "repo-a0/config", "repo-a-b/versions/disk/v1"):
            store.put(key, b"neighbour")
        yield PrefixedStorage(store, "repo-a")
    else:
        bucket = request.getfixturevalue("s3_bucket")
        yield S3Storage.open(bucket.url("some/prefix"))


def test_server_root_names_and_conditional_create(s3_bucket: Bucket) -> None:
    """What `snapship server --root s3://...` needs of its store beyond the contract: the
    repository names under the root, and a create that only one writer of a key wins."""
    store = S3Storage.open(s3_bucket.url("root"))
    for key in ("b/config", "a-b/config", "a/chunks/00/00aa", "a/config", "stray", "c.d/x/y"):
        store.put(key, b"x")
    assert list(names(store)) == ["a", "a-b", "b", "c.d"]
    create = creator(PrefixedStorage(store, "a"))
    assert create is not None
    assert create("versions/v1", b"first") is True
    assert create("versions/v1", b"second") is False
    assert store.get("a/versions/v1") == b"first"
    assert creator(MemoryStorage()) is None


def test_put_get_stat_delete(storage: Storage) -> None:
    assert storage.stat("chunks/ab/abcd") is None
    with pytest.raises(ObjectNotFound):
        storage.get("chunks/ab/abcd")
    storage.put("chunks/ab/abcd", b"hello")
    assert storage.get("chunks/ab/abcd") == b"hello"
    assert storage.stat("chunks/ab/abcd") == 5
    storage.put("chunks/ab/abcd", b"hello")  # idempotent re-put
    storage.flush()
    storage.delete("chunks/ab/abcd")
    storage.delete("chunks/ab/abcd")  # deleting a missing key is fine
    assert storage.stat("chunks/ab/abcd") is None


def test_rename_moves_and_replaces(storage: Storage) -> None:
    storage.put("chunks/ab/abcd", b"hello")
    storage.rename("chunks/ab/abcd", "fossils/ab/abcd")
    assert storage.stat("chunks/ab/abcd") is None
    assert storage.get("fossils/ab/abcd") == b"hello"
    storage.put("chunks/ab/abcd", b"other")
    storage.rename("fossils/ab/abcd", "chunks/ab/abcd")
    assert storage.get("chunks/ab/abcd") == b"hello"
    assert list(storage.list("fossils/")) == []
    with pytest.raises(ObjectNotFound):
        storage.rename("fossils/ab/abcd", "chunks/ab/abcd")
    assert storage.get("chunks/ab/abcd") == b"hello"


def test_list_by_prefix(storage: Storage) -> None:
    keys = {"config": 1, "versions/disk/v1": 2, "versions/disk/v2": 3, "versions/dusk/v1": 4,
            "chunks/00/00aa": 5, "chunks/ff/ffbb": 6}
    for k, n in keys.items():
        storage.put(k, b"x" * n)
    assert dict(storage.list("versions/disk/")) == {"versions/disk/v1": 2, "versions/disk/v2": 3}
    assert dict(storage.list("versions/d")) == {k: v for k, v in keys.items()
                                                if k.startswith("versions/")}
    assert dict(storage.list("chunks/")) == {"chunks/00/00aa": 5, "chunks/ff/ffbb": 6}
    assert dict(storage.list("")) == keys
    assert list(storage.list("nothing/")) == []


@pytest.mark.parametrize("key", ["../x", "a//b", "/abs", "a/../b", "a b", "", "a/./b"])
def test_bad_keys_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(UsageError):
        storage.put(key, b"x")


def test_concurrent_puts_of_the_same_key(storage: Storage) -> None:
    data = os.urandom(1 << 20)
    threads = [threading.Thread(target=storage.put, args=("chunks/aa/same", data))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert storage.get("chunks/aa/same") == data
    assert dict(storage.list("chunks/")) == {"chunks/aa/same": len(data)}


def test_an_empty_object_is_an_object(storage: Storage) -> None:
    storage.put("refs/v/empty", b"")
    assert storage.get("refs/v/empty") == b""
    assert storage.stat("refs/v/empty") == 0
    assert dict(storage.list("refs/")) == {"refs/v/empty": 0}


def test_missing_objects(storage: Storage) -> None:
    with pytest.raises(ObjectNotFound) as exc:
        storage.get("versions/v/none")
    assert exc.value.key == "versions/v/none"
    assert storage.stat("versions/v/none") is None
    storage.delete("versions/v/none")
    assert storage.stat_many(["versions/v/none"]) == {"versions/v/none": None}


def test_a_prefix_of_other_keys_is_no_object(storage: Storage) -> None:
    storage.put("a/b/c", b"deep")
    assert storage.stat("a/b") is None and storage.stat("a") is None
    with pytest.raises(ObjectNotFound):
        storage.get("a/b")
    storage.delete("a/b")  # nothing by that name: nothing happens
    with pytest.raises(ObjectNotFound):
        storage.rename("a/b", "x/y")
    assert storage.get("a/b/c") == b"deep"
    assert dict(storage.list("a/b")) == {"a/b/c": 4}


def test_listing_a_prefix_that_matches_nothing(storage: Storage) -> None:
    assert list(storage.list("nothing/")) == []
    assert list(storage.list("")) == []
    storage.put("config", b"1")
    assert list(storage.list("conf")) == [("config", 1)]
    assert list(storage.list("config/")) == []


def test_listing_after_a_key(storage: Storage) -> None:
    keys = [f"locks/k{i:02d}" for i in range(12)]
    for k in keys:
        storage.put(k, b"x")
    assert sorted(k for k, _ in storage.list("locks/", "locks/k05")) == keys[6:]
    assert sorted(k for k, _ in storage.list("locks/", "locks/k055")) == keys[6:]
    assert list(storage.list("locks/", "locks/k11")) == []
    assert sorted(k for k, _ in storage.list("locks/", "a")) == keys


def test_an_ordered_listing_is_in_key_order(storage: Storage) -> None:
    keys = ["chunks/ff/ff", "chunks/0a/0a", "chunks/0a/0b", "chunks/ab/a+b", "chunks/ab/a-b",
            "chunks/ab/a.b", "chunks/ab/a_b", "chunks/ab/aB", "chunks/ab/ab"]
    for k in keys:
        storage.put(k, b"x")
    listed = [k for k, _ in storage.list("chunks/")]
    assert sorted(listed) == sorted(keys)
    if storage.capabilities.ordered_listing:
        assert listed == sorted(keys)


def test_a_listing_spans_many_pages(storage: Storage) -> None:
    keys = {f"chunks/{i % 3:02x}/{i:064x}": i % 7 for i in range(1203)}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: storage.put(kv[0], b"z" * kv[1]), keys.items()))
    assert dict(storage.list("chunks/")) == keys


def test_listing_while_writing(storage: Storage) -> None:
    before = {f"versions/v/{i:03d}": 1 for i in range(40)}
    for k in before:
        storage.put(k, b"1")
    seen = {}
    for n, (key, size) in enumerate(storage.list("versions/")):
        seen[key] = size
        if n % 5 == 0:  # puts and deletes while the listing is under way
            storage.put(f"versions/w/{n:03d}", b"22")
            if n > 30:
                storage.delete(f"versions/v/{39 - n:03d}")
    # Everything stored before the listing began and still there is listed; the rest may be.
    assert {k for k in before if storage.stat(k) is not None} <= set(seen)
    assert all(seen[k] == 1 for k in seen if k.startswith("versions/v/"))


def test_rename_of_a_missing_object_changes_nothing(storage: Storage) -> None:
    storage.put("fossils/ab/abcd", b"there")
    with pytest.raises(ObjectNotFound):
        storage.rename("chunks/ab/abcd", "fossils/ab/abcd")
    assert storage.get("fossils/ab/abcd") == b"there"


def test_rename_into_a_new_prefix(storage: Storage) -> None:
    storage.put("chunks/ab/abcd", b"moving")
    storage.rename("chunks/ab/abcd", "fossils/zz/deep/abcd")
    assert storage.get("fossils/zz/deep/abcd") == b"moving"
    assert storage.stat("chunks/ab/abcd") is None


def test_a_put_replaces(storage: Storage) -> None:
    storage.put("protected/v/1", b"first")
    storage.put("protected/v/1", b"second, longer")
    assert storage.get("protected/v/1") == b"second, longer"
    assert storage.stat("protected/v/1") == 14


def test_stat_many(storage: Storage) -> None:
    storage.put("refs/a/1", b"12")
    storage.put("refs/a/3", b"")
    assert storage.stat_many(["refs/a/1", "refs/a/2", "refs/a/3"]) == {
        "refs/a/1": 2, "refs/a/2": None, "refs/a/3": 0}
    assert storage.stat_many([]) == {}


def test_every_byte_and_a_large_object(storage: Storage) -> None:
    data = bytes(range(256)) * 4096 + os.urandom(3 << 20)
    storage.put("chunks/00/big", data)
    assert storage.get("chunks/00/big") == data
    assert storage.stat("chunks/00/big") == len(data)


def test_every_key_character(storage: Storage) -> None:
    key = "A-Z.a_z+0-9/x.y_z+w-v/Q"
    storage.put(key, b"k")
    assert storage.get(key) == b"k"
    assert dict(storage.list("A-Z.a_z+0")) == {key: 1}
    storage.delete(key)
    assert storage.stat(key) is None


def test_concurrent_puts_of_many_keys(storage: Storage) -> None:
    keys = [f"chunks/{i:02x}/{i:064x}" for i in range(64)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: storage.put(k, k.encode()), keys))
    assert dict(storage.list("chunks/")) == {k: len(k) for k in keys}
    assert all(storage.get(k) == k.encode() for k in keys)


def test_rename_onto_itself_keeps_it(storage: Storage) -> None:
    storage.put("fossils/ab/self", b"me")
    storage.rename("fossils/ab/self", "fossils/ab/self")
    assert storage.get("fossils/ab/self") == b"me"


def test_delete_then_put_again(storage: Storage) -> None:
    storage.put("versions/v/again", b"one")
    storage.delete("versions/v/again")
    assert storage.stat("versions/v/again") is None
    storage.put("versions/v/again", b"two!")
    assert storage.get("versions/v/again") == b"two!"
    assert dict(storage.list("versions/v/")) == {"versions/v/again": 4}


def test_listed_sizes_follow_replacements(storage: Storage) -> None:
    storage.put("damaged/v/1", b"x" * 10)
    storage.put("damaged/v/1", b"x" * 3)
    storage.put("damaged/v/2", b"")
    assert dict(storage.list("damaged/")) == {"damaged/v/1": 3, "damaged/v/2": 0}


def test_flush_describe_and_temporaries(storage: Storage) -> None:
    storage.flush()  # also on a store that holds nothing yet
    storage.put("config", b"{}")
    storage.flush()
    assert storage.describe()
    assert storage.remove_temporaries(3600) == 0
    assert storage.capabilities.parallelism >= 0 and storage.capabilities.list_lag >= 0


def test_local_put_leaves_no_temp_files_and_listing_ignores_them(tmp_path: Path) -> None:
    s = LocalStorage(str(tmp_path))
    s.put("chunks/ab/x", b"1")
    (tmp_path / "chunks" / "ab" / ".tmp-deadbeef").write_bytes(b"partial")
    assert dict(s.list("chunks/")) == {"chunks/ab/x": 1}
    assert sorted(p.name for p in (tmp_path / "chunks" / "ab").iterdir()) == [
        ".tmp-deadbeef", "x"]


def test_local_chunks_leave_the_page_cache_and_small_objects_stay(tmp_path: Path) -> None:
    s = LocalStorage(str(tmp_path))
    chunk, lock = os.urandom(1 << 20), b'{"version": 1}' * 100
    s.put("chunks/ab/x", chunk)
    s.put("locks/l", lock)

    def cached(key: str) -> int:  # util-linux's fincore: bytes of the file in the page cache
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                              str(tmp_path / key)], check=True, capture_output=True, text=True)
        return int(out.stdout)

    assert cached("chunks/ab/x") == 0 and cached("locks/l") >= len(lock)  # whole pages
    assert s.get("chunks/ab/x") == chunk


def test_local_write_failure_is_a_storage_error(tmp_path: Path) -> None:
    s = LocalStorage(str(tmp_path))
    (tmp_path / "chunks").write_bytes(b"a file where a directory must be")
    with pytest.raises(StorageError, match="cannot write"):
        s.put("chunks/ab/x", b"1")


def test_local_full_disk_is_a_storage_error_and_leaves_nothing(tmp_path: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.fail("/dev/full is needed to simulate a full disk")
    s = LocalStorage(str(tmp_path))
    (tmp_path / "chunks" / "ab").mkdir(parents=True)

    real_open = os.open

    def open_full(path: str, flags: int, mode: int = 0o777) -> int:
        if ".tmp-" in str(path):
            return real_open("/dev/full", os.O_WRONLY)
        return real_open(path, flags, mode)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "open", open_full)
        with pytest.raises(StorageError, match="No space left on device"):
            s.put("chunks/ab/x", b"data")
    assert s.stat("chunks/ab/x") is None


class HalfAnswers(MemoryStorage):
    """A batch `stat_many` whose every other key fails the first time it is asked for (one
    request per key, as S3's): it says what the rest answered."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[list[str]] = []

    def stat_many(self, keys: Iterable[str]) -> dict[str, int | None]:
        todo = list(keys)
        self.asked.append(todo)
        failed = todo[::2] if len(self.asked) == 1 else []
        answered = {k: MemoryStorage.stat(self, k) for k in todo if k not in failed}
        if failed:
            raise PartlyAnswered(f"lost {len(failed)}", "lost", answered)
        return answered


def test_a_partly_answered_batch_is_asked_again_only_for_the_rest() -> None:
    inner = HalfAnswers()
    inner.put("refs/a/1", b"12")
    keys = [f"refs/a/{i}" for i in range(6)]
    s = RetryingStorage(inner, RetryPolicy(budget=10, first_delay=0.001, max_delay=0.001))
    assert s.stat_many(keys) == {k: (2 if k == "refs/a/1" else None) for k in keys}
    assert inner.asked == [keys, keys[::2]]
