"""The fast paths of the backup and restore pipelines (docs/perf.md): a source that allows it
is read on the workers (a block device past the page cache), and a restore writes whole
blocks with O_DIRECT where the target takes it, falling back to the page cache where it does
not, with the same bytes either way."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapship.devices import DIRECT_ALIGN, Source, aligned_buffer
from snapship.engine.backup import run_backup
from snapship.engine.restore import run_restore
from snapship.errors import SourceError
from snapship.formats.constants import ENCRYPTION_AES_GCM
from snapship.formats.manifest import Manifest
from snapship.repository.repo import Repository
from snapship.storage.local import LocalStorage
from tests.clihelp import loop_device
from tests.conftest import CHUNK, make_repo, write_sparse_image

SIZE = 40 * CHUNK + 4096 + 123  # a short last chunk that is not a whole number of blocks


class _Recording:
    """A source that records the threads it is read from."""

    def __init__(self, inner: Source) -> None:
        self.inner, self.size, self.path = inner, inner.size, inner.path
        self.threads: set[int] = set()

    def read(self, offset: int, length: int) -> bytes:
        self.threads.add(threading.get_ident())
        return self.inner.read(offset, length)


class _RecordingInto(_Recording):
    """One that can also read into the engine's buffers, from several threads at once."""

    def read_into(self, buffer: mmap.mmap, offset: int, length: int) -> memoryview:
        self.threads.add(threading.get_ident())
        return self.inner.read_into(buffer, offset, length)


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.img"
    return path, write_sparse_image(path, SIZE, random.Random(16))


def _repo(tmp_path: Path) -> Repository:
    return make_repo(LocalStorage(str(tmp_path / "repo")), ENCRYPTION_AES_GCM)


def test_reads_run_on_the_workers_only_when_the_source_allows_it(
        tmp_path: Path, image: tuple[Path, bytes]) -> None:
    repo = _repo(tmp_path)
    with Source(str(image[0])) as src:
        serial = _Recording(src)
        a = run_backup(repo, serial, "serial", workers=3)
        parallel = _RecordingInto(src)
        b = run_backup(repo, parallel, "parallel", workers=3)
    assert serial.threads == {threading.get_ident()}
    assert threading.get_ident() not in parallel.threads and parallel.threads
    assert a.ids == b.ids and list(a.sizes) == list(b.sizes)
    assert a.stats["bytes_read"] == b.stats["bytes_read"]
    assert a.stats["chunks_zero_read"] == b.stats["chunks_zero_read"]


@pytest.fixture
def direct_bytes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Bytes written through a descriptor opened with O_DIRECT, counted at os.pwrite."""
    counted = [0]
    real = os.pwrite

    def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        n = real(fd, data, offset)
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            assert offset % DIRECT_ALIGN == 0 and n % DIRECT_ALIGN == 0
            counted[0] += n
        return n

    monkeypatch.setattr(os, "pwrite", pwrite)
    yield counted


def _backed_up(tmp_path: Path, image: Path) -> tuple[Repository, Manifest]:
    repo = _repo(tmp_path)
    with Source(str(image)) as src:
        return repo, run_backup(repo, src, "disk")


def _data_blocks(data: bytes) -> int:
    """Bytes of the whole aligned blocks of the non-zero chunks: what goes past the cache."""
    total = 0
    for off in range(0, len(data), CHUNK):
        piece = data[off : off + CHUNK]
        if piece.count(0) != len(piece):
            total += len(piece) - len(piece) % DIRECT_ALIGN
    return total


def test_a_file_restore_writes_whole_blocks_past_the_page_cache(
        tmp_path: Path, image: tuple[Path, bytes], direct_bytes: list[int]) -> None:
    repo, m = _backed_up(tmp_path, image[0])
    out = tmp_path / "out.img"
    run_restore(repo, m, str(out))
    assert out.read_bytes() == image[1]
    assert direct_bytes[0] == _data_blocks(image[1]) > 0


@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_a_target_that_refuses_o_direct_is_written_through_the_cache(
        tmp_path: Path, image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch,
        refused_at: str) -> None:
    """As a file system without O_DIRECT does (tmpfs before Linux 6.6, some FUSE ones): at
    open, or accepting the open and refusing the write (EINVAL)."""
    repo, m = _backed_up(tmp_path, image[0])
    real_open, real_pwrite = os.open, os.pwrite
    refused = [0]

    def fake_open(path: str, flags: int, mode: int = 0o777) -> int:
        if refused_at == "open" and flags & os.O_DIRECT:
            refused[0] += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    def fake_pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        if refused_at == "write" and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused[0] += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "pwrite", fake_pwrite)
    out = tmp_path / "out.img"
    run_restore(repo, m, str(out))
    assert refused == [1]  # refused once, then never tried again
    assert out.read_bytes() == image[1]


def test_a_device_restore_writes_data_and_zeroes_past_the_page_cache(
        tmp_path: Path, image: tuple[Path, bytes], direct_bytes: list[int]) -> None:
    repo, m = _backed_up(tmp_path, image[0])
    backing = tmp_path / "device"
    device_size = -(-SIZE // CHUNK) * CHUNK
    backing.write_bytes(b"\xff" * device_size)  # old data: every zero chunk must be written
    with loop_device(backing) as dev:
        run_restore(repo, m, str(dev), force=True)
        with open(dev, "rb") as f:
            got = f.read(SIZE)
    assert got == image[1]
    # Everything but the short last chunk's tail and the first chunk's marker (the guard of
    # a restore in place, written through the cache) went past it.
    assert direct_bytes[0] >= SIZE - CHUNK - DIRECT_ALIGN


@pytest.fixture
def direct_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Bytes read through a descriptor opened with O_DIRECT, counted at os.preadv."""
    counted = [0]
    real = os.preadv

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        n = real(fd, buffers, offset)
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            assert offset % DIRECT_ALIGN == 0
            counted[0] += n
        return n

    monkeypatch.setattr(os, "preadv", preadv)
    yield counted


def test_a_device_is_read_past_the_page_cache_and_backs_up_as_its_file_does(
        tmp_path: Path, image: tuple[Path, bytes], direct_reads: list[int]) -> None:
    repo = _repo(tmp_path)
    with Source(str(image[0])) as src:
        from_file = run_backup(repo, src, "file")
    assert direct_reads[0] == 0  # a file is read through the cache
    backing = tmp_path / "device"
    backing.write_bytes(image[1])  # no holes: the device's every chunk is read
    with loop_device(backing) as dev, Source(str(dev)) as src:
        assert src.size == SIZE - SIZE % 512  # a loop device ends at a whole sector
        from_device = run_backup(repo, src, "device")
        got = src.read_into(aligned_buffer(CHUNK), src.size - 200, 200)
        assert bytes(got) == image[1][src.size - 200 : src.size]
    assert direct_reads[0] >= src.size - CHUNK
    n = src.size // CHUNK
    assert from_device.ids[: n * 32] == from_file.ids[: n * 32]
    assert from_device.stats["chunks_zero_read"] > 0  # read as zeroes, found zero


def test_a_device_that_refuses_o_direct_reads_is_read_through_the_cache(
        tmp_path: Path, image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    backing = tmp_path / "device"
    backing.write_bytes(image[1])
    real = os.preadv
    refused = [0]

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused[0] += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    buffer = aligned_buffer(CHUNK)
    with loop_device(backing) as dev, Source(str(dev)) as src:
        got = [bytes(src.read_into(buffer, off, CHUNK)) for off in (0, CHUNK, 2 * CHUNK)]
    assert refused == [1]  # refused once, then never tried again
    assert got == [image[1][off : off + CHUNK] for off in (0, CHUNK, 2 * CHUNK)]


def test_a_source_that_shrank_fails_its_read_with_a_message(tmp_path: Path) -> None:
    path = tmp_path / "shrinks.img"
    path.write_bytes(b"x" * (2 * CHUNK))
    with Source(str(path)) as src:
        path.write_bytes(b"x" * CHUNK)
        with pytest.raises(SourceError, match=r"ended at 65536, before its size 131072"):
            src.read_into(aligned_buffer(CHUNK), CHUNK, CHUNK)
