"""The edge to block devices and image files: opening, sizing, reading and writing them.

Everything that touches a backup source or a restore target goes through here, so the engines
can be tested against plain files and the errors users see name the path and the offset.
"""

from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass
from typing import Self

from snapship.errors import SourceError, TargetError

_ZERO_BLOCK = bytes(1 << 20)


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISBLK(mode):
        return "block device"
    return None


class _ReadOnlyDevice:
    """A regular file or block device opened read-only; anything else (a directory, a FIFO, a
    character device) is refused, without blocking on it first."""

    def __init__(self, path: str, flags: int = 0, what: str = "source") -> None:
        self.path = path
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer before we can refuse it.
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | flags)
        except OSError as e:
            raise SourceError(f"cannot open {what} {path}: {e.strerror or e}") from None
        kind = _kind(os.fstat(self.fd).st_mode)
        if kind is None:
            os.close(self.fd)
            raise SourceError(f"{what} {path} is not a regular file or a block device")
        self.kind = kind
        try:
            os.set_blocking(self.fd, True)
            # Files under /proc (e.g. /proc/self/mem) pass as regular and cannot be sized.
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as e:
            os.close(self.fd)
            raise SourceError(f"cannot use {what} {path}: its size cannot be determined "
                              f"({e.strerror or e})") from None

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Source(_ReadOnlyDevice):
    """A file or block device opened for reading whole chunks by offset."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset` (pread releases the GIL)."""
        try:
            data = os.pread(self.fd, length, offset)
            while len(data) < length:
                more = os.pread(self.fd, length - len(data), offset + len(data))
                if not more:
                    raise SourceError(
                        f"source {self.path} ended at {offset + len(data)}, "
                        f"before its size {self.size} (did it shrink during the backup?)"
                    )
                data += more
        except OSError as e:
            raise SourceError(
                f"cannot read source {self.path} at offset {offset}: {e.strerror or e}"
            ) from None
        return data


@dataclass
class Target:
    """A restore target: a regular file made sparse, or a block device written in full."""

    path: str
    fd: int
    is_block: bool

    @classmethod
    def open(cls, path: str, size: int) -> Target:
        try:
            st: os.stat_result | None = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise TargetError(f"cannot open target {path}: {e.strerror or e}") from None
        if st is not None and _kind(st.st_mode) is None:
            raise TargetError(f"target {path} is not a regular file or a block device")
        is_block = st is not None and stat.S_ISBLK(st.st_mode)
        try:
            if is_block:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                dev_size = os.lseek(fd, 0, os.SEEK_END)
                if dev_size < size:
                    os.close(fd)
                    raise TargetError(
                        f"target device {path} is too small: {dev_size} bytes, need {size}"
                    )
            else:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
                # Emptying first leaves holes wherever the image has zero chunks.
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
        except OSError as e:
            raise TargetError(f"cannot prepare target {path}: {e.strerror or e}") from None
        return cls(path, fd, is_block)

    def write(self, offset: int, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:
            raise TargetError(
                f"cannot write target {self.path} at offset {offset}: {e.strerror or e}"
            ) from None

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a range. Files already read as zero there (holes); devices must be written."""
        if not self.is_block:
            return
        while length:
            n = min(length, len(_ZERO_BLOCK))
            self.write(offset, _ZERO_BLOCK[:n] if n < len(_ZERO_BLOCK) else _ZERO_BLOCK)
            offset, length = offset + n, length - n

    def close(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise TargetError(f"cannot flush target {self.path}: {e.strerror or e}") from None
        finally:
            os.close(self.fd)


class UncachedReader(_ReadOnlyDevice):
    """Reads a device or file bypassing the page cache (O_DIRECT), for the COW table: the
    kernel writes it through its own path, so a cached copy may be stale. Where O_DIRECT is
    refused (tmpfs, some file systems) the cache for the file is dropped before each read."""

    ALIGN = 4096

    def __init__(self, path: str) -> None:
        self.direct = True
        try:
            super().__init__(path, os.O_DIRECT, "COW store")
        except SourceError:
            self.direct = False
            super().__init__(path, 0, "COW store")

    def read(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset` (fewer only at the end)."""
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        start = offset - offset % self.ALIGN
        end = -(-(offset + length) // self.ALIGN) * self.ALIGN
        try:
            if not self.direct:
                os.posix_fadvise(self.fd, start, end - start, os.POSIX_FADV_DONTNEED)
                return os.pread(self.fd, length, offset)
            with mmap.mmap(-1, end - start) as buf:  # page-aligned, as O_DIRECT requires
                try:
                    got = os.preadv(self.fd, [buf], start)
                except OSError:
                    # Some file systems accept O_DIRECT at open and refuse the read itself.
                    self.direct = False
                    return self.read(offset, length)
                return bytes(buf[offset - start : min(offset - start + length, got)])
        except OSError as e:
            raise SourceError(f"cannot read {self.path} at offset {offset}: {e.strerror}") from None
