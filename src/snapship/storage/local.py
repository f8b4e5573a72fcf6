"""The local-directory backend, the embedded default.

Each object is a file at `ROOT/<key>`; keys already fan out (`chunks/ab/<id>`), so no directory
grows huge. A put writes a uniquely named temporary file in the target directory and renames
it into place after an fsync: a process killed, or a machine losing power, at any moment leaves
either no object or the whole object under its name, plus at worst a `.tmp-*` file that listing
ignores (to be removed by gc). `flush()` calls syncfs(2) once to make the renames durable; the
repository calls it before writing a manifest, so no durable manifest can point at a chunk
whose name is not durable yet.

Once an object of `UNCACHED_MIN` bytes or more is durable, its pages are dropped from the
page cache (POSIX_FADV_DONTNEED; clean after the fsync, so nothing is written): a backup's
chunks are stored for the day they are needed, and keeping the gigabytes it writes cached
would push the host's own working set out. It also makes the backup cheaper: here the kernel
then reuses those pages instead of finding new ones for the next writes, and a 4 GiB backup
took 1.3-2.2 s of system time instead of 2.0-4.9 s (docs/perf.md). Small objects (locks,
markers, most manifests), read again soon, stay cached.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import stat
import time
from collections.abc import Iterator

from snapship.errors import ObjectNotFound, StorageError
from snapship.storage.base import StorageDefaults, check_key

TMP_PREFIX = ".tmp-"
UNCACHED_MIN = 64 << 10
_libc = ctypes.CDLL(None, use_errno=True)


class LocalStorage(StorageDefaults):
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, check_key(key))

    def put(self, key: str, data: bytes | bytearray) -> None:
        path = self._path(key)
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, TMP_PREFIX + secrets.token_hex(8))
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:
                os.makedirs(directory, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                if len(data) >= UNCACHED_MIN:
                    with contextlib.suppress(OSError):  # a hint: never a reason to fail
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StorageError(f"cannot write {path}: {e.strerror or e}") from None

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as e:
            raise StorageError(f"cannot read {path}: {e.strerror or e}") from None

    def stat(self, key: str) -> int | None:
        """The object's size; None if there is no file under that name (a directory that
        holds other keys is not an object)."""
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise StorageError(f"cannot stat {self._path(key)}: {e.strerror or e}") from None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def list(self, prefix: str, after: str | None = None) -> Iterator[tuple[str, int]]:
        # Walk only the directories that can hold keys with this prefix.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = os.path.join(self.root, base) if base else self.root
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(TMP_PREFIX)]
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel + "/"
            for name in filenames:
                key = rel + name
                if (name.startswith(TMP_PREFIX) or not key.startswith(prefix)
                        or (after is not None and key <= after)):
                    continue
                try:
                    size = os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    continue
                yield key, size

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            pass  # no object by that name (a directory of other keys is none)
        except OSError as e:
            raise StorageError(f"cannot delete {path}: {e.strerror or e}") from None

    def rename(self, src: str, dst: str) -> None:
        old, new = self._path(src), self._path(dst)
        if os.path.isdir(old):
            raise ObjectNotFound(src)  # a directory of other keys is no object to move
        try:
            try:
                os.rename(old, new)
            except FileNotFoundError:
                if not os.path.exists(old):
                    raise ObjectNotFound(src) from None
                os.makedirs(os.path.dirname(new), exist_ok=True)
                os.rename(old, new)
        except OSError as e:
            raise StorageError(f"cannot rename {old} to {new}: {e.strerror or e}") from None

    def remove_temporaries(self, older_than: float) -> int:
        """Delete partial files of writers that died more than `older_than` seconds ago."""
        removed = 0
        cutoff = time.time() - older_than
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                path = os.path.join(dirpath, name)
                with contextlib.suppress(FileNotFoundError):
                    if name.startswith(TMP_PREFIX) and os.stat(path).st_mtime < cutoff:
                        os.unlink(path)
                        removed += 1
        return removed

    def flush(self) -> None:
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return  # nothing was ever put here
        try:
            if _libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise StorageError(f"syncfs {self.root}: {os.strerror(err)}")
        finally:
            os.close(fd)

    def describe(self) -> str:
        return self.root

