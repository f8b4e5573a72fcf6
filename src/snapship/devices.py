"""The edge to block devices and image files: opening, sizing, reading and writing them.

Everything that touches a backup source or a restore target goes through here, so the engines
can be tested against plain files and the errors users see name the path and the offset.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from typing import Self

from snapship.errors import SourceError, TargetError

_ZERO_BLOCK = bytes(1 << 20)
DIRECT_ALIGN = 4096
"""Offset, length and address alignment of an O_DIRECT write: the largest logical block size
of a Linux block device, so it suits every device and file system that takes O_DIRECT."""


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned buffer, as O_DIRECT needs: an anonymous mapping."""
    return mmap.mmap(-1, size)


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
        # A block device again (by descriptor, never by name), for reads that bypass the page
        # cache. Only a device: what a backup reads from one (a snapshot, an unmounted
        # volume) is in no one's cache, and caching it would only push out what is. A file
        # may well be cached (an image just written), and a copy out of the cache is cheaper
        # than reading the disk again.
        self._direct: int | None = None
        self._refused = False
        if self.kind == "block device":
            with contextlib.suppress(OSError):
                self._direct = os.open(f"/proc/self/fd/{self.fd}",
                                       os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)

    def close(self) -> None:
        if self._direct is not None:
            os.close(self._direct)
            self._direct = None
        super().close()

    def read_into(self, buffer: mmap.mmap, offset: int, length: int) -> memoryview:
        """Exactly `length` bytes at `offset`, read into `buffer` (page-aligned, as
        `aligned_buffer` makes it): the backup engine's read, safe from several threads at
        once. A block device's whole blocks are read with O_DIRECT: a backup then neither pays
        the kernel's copy out of the page cache (about a quarter of a full backup's CPU time
        on a cold source) nor pushes the host's working set out of the cache to make room for
        data read once. A file, the tail of a short read, and every read the device refuses
        O_DIRECT for go through the page cache."""
        view = memoryview(buffer)
        got = 0
        try:
            whole = -(-length // DIRECT_ALIGN) * DIRECT_ALIGN
            if (self._direct is not None and not self._refused and offset % DIRECT_ALIGN == 0
                    and whole <= len(view)):
                try:
                    got = min(length, os.preadv(self._direct, [view[:whole]], offset))
                except OSError as e:
                    if e.errno != errno.EINVAL:  # EINVAL: not for this source; the cache is
                        raise
                    # Not closed here: another worker may be reading through it right now.
                    self._refused = True
            while got < length:
                n = os.preadv(self.fd, [view[got:length]], offset + got)
                if not n:
                    raise self._ended(offset + got)
                got += n
        except OSError as e:
            raise self._failed(offset, e) from None
        return view[:length]

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset` (pread releases the GIL)."""
        try:
            data = os.pread(self.fd, length, offset)
            while len(data) < length:
                more = os.pread(self.fd, length - len(data), offset + len(data))
                if not more:
                    raise self._ended(offset + len(data))
                data += more
        except OSError as e:
            raise self._failed(offset, e) from None
        return data

    def _ended(self, at: int) -> SourceError:
        return SourceError(f"source {self.path} ended at {at}, before its size {self.size} "
                           "(did it shrink during the backup?)")

    def _failed(self, offset: int, e: OSError) -> SourceError:
        return SourceError(f"cannot read source {self.path} at offset {offset}: "
                           f"{e.strerror or e}")

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


Warn = Callable[[str], None]

STDOUT = "-"
"""The restore target name that means standard output."""

INCOMPLETE_MARK = b"SNAPSHIP INCOMPLETE RESTORE\n"
"""What the first chunk of a target written in place holds until the restore is complete:
no file system, partition table or other signature, so a half-restored device does not mount
(and carries no signature that a later restore would need --force for)."""


def incomplete_restore(head: bytes) -> str | None:
    """The version (VOL@VER) a target beginning with `head` was being restored from when
    that restore stopped, if it carries the INCOMPLETE marker; else None."""
    if not head.startswith(INCOMPLETE_MARK):
        return None
    what = head[len(INCOMPLETE_MARK):].split(b"\n", 1)[0]
    return what.decode("utf-8", "replace") or "an unknown version"


def read_head(path: str, length: int = 512) -> bytes:
    """The first bytes of a file or device, b"" when they cannot be read (for messages)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return b""
    try:
        return os.pread(fd, length, 0)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _say_incomplete(path: str, head: bytes, warn: Warn) -> None:
    what = incomplete_restore(head)
    if what is not None:
        warn(f"target {path} holds an incomplete restore of {what} (stopped before it "
             "finished): restoring over it")


class Target:
    """A restore target, written chunk by chunk and then `commit`ted (or `abort`ed).

    A block device is opened exclusively (O_EXCL): the kernel refuses that while the device
    is mounted, used as swap, or claimed by device-mapper, md or another exclusive opener, so
    a live file system is never written over; nobody can claim it either while the restore
    runs. Unless forced, one that carries a file-system, partition-table or other signature
    (as `blkid -p` finds it) is refused too, as mkfs would. It is written in place
    (`in_place`): the engine writes its first chunk last.

    A file is written under a temporary name in the target's directory (`.NAME.snapship-
    restore-XXXXXXXX`, sparse) and renamed over the target only by `commit`, once complete and
    synced: until then an existing file is untouched, and `abort` (or leaving the `with` block
    without a commit) removes the temporary file. A replaced file's permission bits are kept
    (and its owner, where the restoring user may set it); a new file is private (0600).

    `open_existing` opens a file or device to be compared and updated in place (a
    differential restore); `stdout` writes the image to standard output, in order.
    """

    def __init__(self, path: str, fd: int, is_block: bool, final_path: str | None = None,
                 temp_path: str | None = None, keep: os.stat_result | None = None,
                 *, in_place: bool | None = None, stream: bool = False) -> None:
        self.path = path
        self.fd = fd
        self.is_block = is_block
        self.in_place = is_block if in_place is None else in_place
        self.stream = stream
        self._final = final_path
        self._temp = temp_path
        self._keep = keep
        self._open = True
        self._done = False
        self._pos = 0
        self._direct: int | None = None
        self._zero_buf: mmap.mmap | None = None
        self.size: int | None = None
        """A device's size (it may be larger than what is restored)."""

    @classmethod
    def open(cls, path: str, size: int, *, force: bool = False,
             warn: Warn = lambda _m: None) -> Target:
        try:
            st: os.stat_result | None = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise TargetError(f"cannot open target {path}: {e.strerror or e}") from None
        if st is not None and _kind(st.st_mode) is None:
            raise TargetError(f"target {path} is not a regular file or a block device")
        if st is not None and stat.S_ISBLK(st.st_mode):
            fd = _open_device(path, st, size, os.O_WRONLY, warn)
            target = cls(path, fd, True)
            try:
                target.size = os.lseek(fd, 0, os.SEEK_END)
                _say_incomplete(path, read_head(path), warn)
                if not force:
                    _refuse_signature(path)
            except BaseException:
                target.abort()
                raise
            return target
        # A symlink is followed: the file it names is the one replaced.
        final = os.path.realpath(path)
        directory, name = os.path.split(final)
        _remove_stopped(directory, name, warn)
        temp = os.path.join(directory, _temp_name(name))
        _unfinished.add(temp)  # before it exists: see remove_unfinished
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            _unfinished.discard(temp)  # not ours (EEXIST) or never made
            raise TargetError(f"cannot create target {path}: {e.strerror or e}") from None
        target = cls(path, fd, False, final, temp, st)
        try:
            # Held until the rename: a later restore knows a temporary nobody holds is left
            # by one that was killed (see _remove_stopped). Before it has a size, so an empty
            # one is never taken for that.
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, size)  # holes wherever the image has zero chunks
            if st is not None and hasattr(os, "fchown"):
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, st.st_uid, st.st_gid)
        except OSError as e:
            target.abort()
            raise TargetError(f"cannot prepare target {path}: {e.strerror or e}"
                              + _full(e.errno)) from None
        except BaseException:
            target.abort()
            raise
        return target

    @classmethod
    def open_existing(cls, path: str, size: int, *, warn: Warn = lambda _m: None) -> Target:
        """An existing file or device, to be read and written in place. A device is opened
        exclusively (a busy one is refused) and must hold `size` bytes; a file is cut or
        extended to `size` (an extension reads as zeroes)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise TargetError(f"target {path} does not exist: a differential restore updates "
                              "an existing copy (restore without --differential to make one)"
                              ) from None
        except OSError as e:
            raise TargetError(f"cannot open target {path}: {e.strerror or e}") from None
        if _kind(st.st_mode) is None:
            raise TargetError(f"target {path} is not a regular file or a block device")
        if stat.S_ISBLK(st.st_mode):
            target = cls(path, _open_device(path, st, size, os.O_RDWR, warn), True)
            _say_incomplete(path, read_head(path), warn)
            return target
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise TargetError(f"cannot open target {path}: {e.strerror or e}") from None
        _say_incomplete(path, read_head(path), warn)
        target = cls(path, fd, False, in_place=True)
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            target.abort()
            raise TargetError(f"cannot prepare target {path}: {e.strerror or e}") from None
        return target

    @classmethod
    def stdout(cls) -> Target:
        """Standard output, written strictly in order (zeroes included): for pipes."""
        fd = sys.stdout.fileno()
        if os.isatty(fd):
            raise TargetError("refusing to write an image to a terminal: redirect standard "
                              "output to a file or a pipe")
        return cls("standard output", fd, False, stream=True)

    def read(self, offset: int, length: int) -> bytes:
        """What an in-place target holds at `offset` (for comparing)."""
        try:
            data = os.pread(self.fd, length, offset)
            while len(data) < length:
                more = os.pread(self.fd, length - len(data), offset + len(data))
                if not more:
                    raise TargetError(f"target {self.path} ended at {offset + len(data)}")
                data += more
        except OSError as e:
            raise TargetError(f"cannot read target {self.path} at offset {offset}: "
                              f"{e.strerror or e}") from None
        return data

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if self.stream:
            if offset != self._pos:
                raise AssertionError(f"stream written out of order: {offset} != {self._pos}")
            self._pos += len(data)
        try:
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view) if self.stream else os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:
            if self.stream:
                raise TargetError(f"cannot write to standard output after {offset} bytes: "
                                  f"{e.strerror or e}") from None
            raise TargetError(
                f"cannot write target {self.path} at offset {offset}: {e.strerror or e}"
                + _full(e.errno, self.is_block)
            ) from None

    @property
    def reads_zero(self) -> bool:
        """Whether what is not written reads as zero: a new file (holes). A device, a stream
        and a file updated in place must have their zeroes written."""
        return not (self.is_block or self.stream or self.in_place)

    def use_direct(self) -> bool:
        """Write whole aligned blocks from now on with O_DIRECT (`write_buffer`), past the
        page cache: no page is allocated and zeroed for what is written (the largest cost of
        a restore, docs/perf.md), none is left dirty for the final fsync, and a restore does
        not evict what the machine had cached. A second descriptor of the same open target
        (through /proc/self/fd: the same file even after a rename, a device's exclusive
        claim kept by the first). False, and nothing changes, where the file system refuses
        O_DIRECT (tmpfs) or for standard output."""
        if self.stream or not self._open:
            return False
        if self._direct is None:
            try:
                self._direct = os.open(f"/proc/self/fd/{self.fd}",
                                       os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                return False
        return True

    def write_buffer(self, offset: int, buf: mmap.mmap, length: int) -> None:
        """Write `buf[:length]` at `offset`; `buf` from `aligned_buffer`. With `use_direct`
        the whole blocks go past the page cache, the rest (a short last chunk) through it;
        if the kernel refuses a direct write (EINVAL: an alignment this target does not
        take), the target goes on without O_DIRECT."""
        view = memoryview(buf)[:length]
        done = 0
        if self._direct is not None and offset % DIRECT_ALIGN == 0:
            whole = length - length % DIRECT_ALIGN
            try:
                while done < whole:
                    n = os.pwrite(self._direct, view[done:whole], offset + done)
                    done += n
                    if n % DIRECT_ALIGN:
                        break  # a short, unaligned write: the rest goes through the cache
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise TargetError(f"cannot write target {self.path} at offset "
                                      f"{offset + done}: {e.strerror or e}") from None
                self._close_direct()
        if done < length:
            self.write(offset + done, view[done:])

    def write_zeroes(self, offset: int, length: int, *, always: bool = False) -> None:
        """Zero a range. A new file already reads as zero there (holes); a device, a stream
        and a file updated in place (`always`) must be written."""
        if not (self.is_block or self.stream or always):
            return
        if self._direct is not None and offset % DIRECT_ALIGN == 0:
            if self._zero_buf is None:
                self._zero_buf = aligned_buffer(len(_ZERO_BLOCK))
            while length >= DIRECT_ALIGN and self._direct is not None:
                n = min(length - length % DIRECT_ALIGN, len(self._zero_buf))
                self.write_buffer(offset, self._zero_buf, n)
                offset, length = offset + n, length - n
        while length:
            n = min(length, len(_ZERO_BLOCK))
            self.write(offset, _ZERO_BLOCK[:n] if n < len(_ZERO_BLOCK) else _ZERO_BLOCK)
            offset, length = offset + n, length - n

    def mark_incomplete(self, length: int, what: str) -> None:
        """Blank the first `length` bytes (with a marker naming `what`) and sync, before
        anything else is written in place."""
        head = (INCOMPLETE_MARK + what.encode()[:400] + b"\n")[:length]
        self.write(0, head)
        self.write_zeroes(len(head), length - len(head), always=True)
        self.sync()

    def sync(self) -> None:
        if self.stream:
            return
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise TargetError(f"cannot flush target {self.path}: {e.strerror or e}"
                              + _full(e.errno, self.is_block)) from None

    def commit(self) -> None:
        """Make the restore durable and, for a file, put it in place of the target."""
        if self.stream:
            self._done = True
            return
        try:
            if self._keep is not None:
                # After the writes, which may have cleared set-user-ID and set-group-ID bits.
                os.fchmod(self.fd, stat.S_IMODE(self._keep.st_mode))
            os.fsync(self.fd)
        except OSError as e:
            raise TargetError(f"cannot flush target {self.path}: {e.strerror or e}"
                              + _full(e.errno, self.is_block)) from None
        if self._temp is None or self._final is None:
            self._close()
            self._done = True
            return
        try:
            # Renamed while still open (and locked): closing first would let another
            # restore take the temporary for one left by a killed restore.
            os.rename(self._temp, self._final)
        except OSError as e:
            raise TargetError(f"cannot put target {self.path} in place: {e.strerror or e}"
                              ) from None
        self._close()
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
        self._close_direct()
        if self._open and not self.stream:  # standard output stays the process's own
            self._open = False
            with contextlib.suppress(OSError):
                os.close(self.fd)

    def _close_direct(self) -> None:
        if self._direct is not None:
            fd, self._direct = self._direct, None
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def _full(error: int | None, block: bool = False) -> str:
    """What a full disk adds to a write error (the restore then stops; a file restore removes
    its temporary, so nothing half-written is left under the target's name)."""
    if error not in (errno.ENOSPC, errno.EDQUOT):
        return ""
    if block:
        return " (the device's storage is full, e.g. its thin pool)"
    return " (the disk quota is used up)" if error == errno.EDQUOT else \
        " (the file system holding it is full)"


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


def _remove_stopped(directory: str, name: str, warn: Warn) -> None:
    """Remove the temporary files that restores to NAME left when they were killed: those no
    process holds a lock on (a running restore holds its own until the rename). One that is
    still empty may be in the instant between its creation and its lock: it is left alone."""
    stem = _temp_stem(name)
    try:
        entries = [e for e in os.scandir(directory)
                   if e.name.startswith(stem) and len(e.name) == len(stem) + _TEMP_RANDOM]
    except OSError:
        return
    for entry in entries:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a restore is writing it
            if os.fstat(fd).st_size == 0:
                continue
            os.unlink(entry.path)
            warn(f"removed {entry.name}, the temporary file of a restore to {name} that was "
                 "stopped before it finished")
        except OSError:
            continue
        finally:
            os.close(fd)


_TEMP_SUFFIX = ".snapship-restore-"
_TEMP_RANDOM = 8
"""Hex digits that end a temporary name."""


def _temp_stem(name: str) -> str:
    """`.NAME.snapship-restore-`, NAME shortened so that the whole name keeps within 255
    bytes: what every temporary of a restore to NAME begins with."""
    room = 255 - 1 - len(_TEMP_SUFFIX) - _TEMP_RANDOM
    return "." + os.fsdecode(os.fsencode(name)[:room]) + _TEMP_SUFFIX


def _temp_name(name: str) -> str:
    """`.NAME.snapship-restore-XXXXXXXX`."""
    return _temp_stem(name) + secrets.token_hex(_TEMP_RANDOM // 2)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_device(path: str, st: os.stat_result, size: int, mode: int, warn: Warn) -> int:
    try:
        fd = os.open(path, mode | os.O_EXCL | os.O_CLOEXEC)
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
    if dev_size > size:
        warn(f"target device {path} is {dev_size} bytes, larger than the version ({size}): "
             f"its last {dev_size - size} bytes keep their old data")
    return fd


def _blkid() -> str | None:
    return shutil.which("blkid", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def probe_signature(path: str) -> str | None:
    """What `blkid -p` (libblkid's low-level probe, no cache) finds on a device: e.g.
    "ext4 file system", "dos partition table", "LVM2_member", or None for nothing.

    libblkid rather than a signature check of our own: it knows every file system, RAID and
    LVM superblock and partition table (also those at the end of a device, like md 1.0 and
    GPT's backup), the same list mkfs and wipefs use, and util-linux is on every Linux
    system."""
    tool = _blkid()
    if tool is None:
        raise TargetError("blkid (util-linux) is not installed: it checks a device for a "
                          "file system before it is overwritten; install it, or give --force")
    try:
        p = subprocess.run([tool, "-p", "-o", "export", path], capture_output=True, text=True,
                           timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TargetError(f"cannot check {path} for a file system (blkid): {e}") from None
    if p.returncode == 2:  # nothing found
        return None
    if p.returncode == 8:
        return "more than one signature (ambivalent probe)"
    if p.returncode != 0:
        detail = (p.stderr.strip() or f"exit code {p.returncode}").splitlines()[-1]
        raise TargetError(f"cannot check {path} for a file system (blkid): {detail}")
    found = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    if "PTTYPE" in found and "TYPE" not in found:
        return f"{found['PTTYPE']} partition table"
    kind = found.get("TYPE", "unknown")
    usage = found.get("USAGE", "")
    return f"{kind} file system" if usage == "filesystem" else f"{kind} signature"


def _refuse_signature(path: str) -> None:
    found = probe_signature(path)
    if found is not None:
        article = "an" if found[:1].lower() in "aeiou" else "a"
        raise TargetError(f"target device {path} holds {article} {found}; nothing was written "
                          "(give --force to overwrite it)")


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
