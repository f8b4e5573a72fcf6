"""The storage contract (storage/base.py), run against every backend."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapship.errors import ObjectNotFound, StorageError, UsageError
from snapship.storage.base import Storage
from snapship.storage.local import LocalStorage
from snapship.storage.memory import MemoryStorage
from tests.serverproc import ServerProc, http_storage, running_server


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[ServerProc, dict[str, str]]]:
    with running_server(tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture(params=["memory", "local", "http"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "memory":
        yield MemoryStorage()
    elif request.param == "local":
        yield LocalStorage(str(tmp_path / "store"))
    else:
        server, tokens = request.getfixturevalue("http_server")
        # A fresh repository per test, through the admin token (the contract includes delete).
        s = http_storage(server, "t" + uuid.uuid4().hex[:12], tokens["ops"])
        yield s
        s.close()


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


def test_local_put_leaves_no_temp_files_and_listing_ignores_them(tmp_path: Path) -> None:
    s = LocalStorage(str(tmp_path))
    s.put("chunks/ab/x", b"1")
    (tmp_path / "chunks" / "ab" / ".tmp-deadbeef").write_bytes(b"partial")
    assert dict(s.list("chunks/")) == {"chunks/ab/x": 1}
    assert sorted(p.name for p in (tmp_path / "chunks" / "ab").iterdir()) == [
        ".tmp-deadbeef", "x"]


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
