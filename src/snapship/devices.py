"""The edge to block devices and image files: opening, sizing, reading and writing them.

Everything that touches a backup source or a restore target goes through here, so the engines
can be tested against plain files and the errors users see name the path and the offset.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import secrets
import stat
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


    def data_ranges(self) -> list[tuple[int, int]] | None:
        """(start, end) of each run of data of a regular file, by SEEK_DATA/SEEK_HOLE: what is
        not in them is a hole and reads as zeroes. None for a block device (no holes) or a
        filesystem that cannot tell (EINVAL/ENXIO on SEEK_DATA at 0 of a non-empty file)."""
        if self.kind != "file":
            return None
        out: list[tuple[int, int]] = []
        offset = 0
        try:
            while offset < self.size:
                try:
                    start = os.lseek(self.fd, offset, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:  # nothing but a hole from here to the end
                        break
                    raise
                end = min(os.lseek(self.fd, start, os.SEEK_HOLE), self.size)
                if start >= self.size:
                    break
                out.append((start, end))
                offset = end
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return None
            raise SourceError(f"cannot find the data of {self.path}: {e.strerror or e}"
                              ) from None
        return out


class Target:
    """A restore target, written chunk by chunk and then `commit`ted (or `abort`ed).

    A block device is opened exclusively (O_EXCL): the kernel refuses that while the device
    is mounted, used as swap, or claimed by device-mapper, md or another exclusive opener, so
    a live file system is never written over; nobody can claim it either while the restore
    runs. It is written in place.

    A file is written under a temporary name in the target's directory (`.NAME.snapship-
    restore-XXXXXXXX`, sparse) and renamed over the target only by `commit`, once complete and
    synced: until then an existing file is untouched, and `abort` (or leaving the `with` block
    without a commit) removes the temporary file. A replaced file's permission bits are kept
    (and its owner, where the restoring user may set it); a new file is private (0600).
    """

    def __init__(self, path: str, fd: int, is_block: bool, final_path: str | None = None,
                 temp_path: str | None = None, keep: os.stat_result | None = None) -> None:
        self.path = path
        self.fd = fd
        self.is_block = is_block
        self._final = final_path
        self._temp = temp_path
        self._keep = keep
        self._open = True
        self._done = False

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
        if st is not None and stat.S_ISBLK(st.st_mode):
            return cls(path, _open_device(path, st, size), True)
        # A symlink is followed: the file it names is the one replaced.
        final = os.path.realpath(path)
        directory, name = os.path.split(final)
        temp = os.path.join(directory, _temp_name(name))
        _unfinished.add(temp)  # before it exists: see remove_unfinished
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            _unfinished.discard(temp)  # not ours (EEXIST) or never made
            raise TargetError(f"cannot create target {path}: {e.strerror or e}") from None
        target = cls(path, fd, False, final, temp, st)
        try:
            os.ftruncate(fd, size)  # holes wherever the image has zero chunks
            if st is not None and hasattr(os, "fchown"):
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, st.st_uid, st.st_gid)
        except OSError as e:
            target.abort()
            raise TargetError(f"cannot prepare target {path}: {e.strerror or e}") from None
        except BaseException:
            target.abort()
            raise
        return target

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

    def commit(self) -> None:
        """Make the restore durable and, for a file, put it in place of the target."""
        try:
            if self._keep is not None:
                # After the writes, which may have cleared set-user-ID and set-group-ID bits.
                os.fchmod(self.fd, stat.S_IMODE(self._keep.st_mode))
            os.fsync(self.fd)
        except OSError as e:
            raise TargetError(f"cannot flush target {self.path}: {e.strerror or e}") from None
        self._close()
        if self._temp is None or self._final is None:
            self._done = True
            return
        try:
            os.rename(self._temp, self._final)
        except OSError as e:
            raise TargetError(f"cannot put target {self.path} in place: {e.strerror or e}"
                              ) from None
        self._done = True
        _unfinished.discard(self._temp)
        try:
            _fsync_directory(os.path.dirname(self._final))
        except OSError as e:
            raise TargetError(f"restored {self.path}, but cannot sync its directory: "
                              f"{e.strerror or e}") from None

    def abort(self) -> None:
        """Give up: close, and remove the temporary file (an existing target is untouched)."""
        if self._done:
            return
        self._done = True
        self._close()
        if self._temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._temp)
            _unfinished.discard(self._temp)

    def _close(self) -> None:
        if self._open:
            self._open = False
            with contextlib.suppress(OSError):
                os.close(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


_unfinished: set[str] = set()
"""The temporary files of this process's file restores that are neither committed nor aborted."""


def remove_unfinished() -> None:
    """Remove the temporary file of every file target of this process that was neither
    committed nor aborted. An exception from a signal (KeyboardInterrupt, the CLI's
    Terminated) can strike between any two steps, also between creating a target and entering
    the `with` that would abort it: a command that restores calls this once it has stopped."""
    while _unfinished:
        with contextlib.suppress(OSError):
            os.unlink(_unfinished.pop())


def _temp_name(name: str) -> str:
    """`.NAME.snapship-restore-XXXXXXXX`, NAME shortened to keep within 255 bytes."""
    suffix = f".snapship-restore-{secrets.token_hex(4)}"
    room = 255 - 1 - len(suffix)
    return "." + os.fsdecode(os.fsencode(name)[:room]) + suffix


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_device(path: str, st: os.stat_result, size: int) -> int:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise TargetError(f"target device {path} {_device_user(st.st_rdev)}; "
                              "nothing was written") from None
        raise TargetError(f"cannot open target {path}: {e.strerror or e}") from None
    try:
        dev_size = os.lseek(fd, 0, os.SEEK_END)
    except OSError as e:
        os.close(fd)
        raise TargetError(f"cannot prepare target {path}: {e.strerror or e}") from None
    if dev_size < size:
        os.close(fd)
        raise TargetError(f"target device {path} is too small: {dev_size} bytes, need {size}")
    return fd


def _device_user(rdev: int) -> str:
    """Why an exclusive open of a device was refused, as far as /proc and /sys tell: where
    it (or a partition of it) is mounted, or what holds it."""
    number = f"{os.major(rdev)}:{os.minor(rdev)}"
    sysdir = f"/sys/dev/block/{number}"
    numbers = {number}
    holders = _listdir(os.path.join(sysdir, "holders"))
    for entry in _listdir(sysdir):  # partitions are subdirectories with a "partition" file
        part = os.path.join(sysdir, entry)
        if os.path.exists(os.path.join(part, "partition")):
            with contextlib.suppress(OSError), open(os.path.join(part, "dev"),
                                                    encoding="ascii") as f:
                numbers.add(f.read().strip())
            holders += _listdir(os.path.join(part, "holders"))
    mounts: list[str] = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8",
                                            errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[2] in numbers:
                mounts.append(_unescape_mount(fields[4]))
    if mounts:
        return f"is mounted on {', '.join(sorted(set(mounts)))}"
    if holders:
        return f"is in use by {', '.join(sorted(set(holders)))} (device-mapper, md or bcache)"
    return "is in use (mounted, swap, or held open exclusively by another program)"


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _unescape_mount(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


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
