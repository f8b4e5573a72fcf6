"""The one exception hierarchy of snapship.

Every error a user can cause or meet is a `SnapshipError` whose message is one line that names
what is wrong; the CLI prints it and exits non-zero. Anything else escaping is a bug.
"""

from __future__ import annotations


class SnapshipError(Exception):
    """Base of all expected failures. `exit_code` is what the CLI returns."""

    exit_code = 1


class UsageError(SnapshipError):
    """The user asked for something that cannot work (bad option, bad name)."""

    exit_code = 2


class NotFound(SnapshipError):
    """A repository, volume, version or object does not exist."""


class ObjectNotFound(NotFound):
    """A storage backend has no object under this key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object {key} not found")
        self.key = key


class AuthFailed(SnapshipError):
    """Wrong passphrase, a key file that does not belong to this repository, or a server that
    does not accept the token."""


class PermissionDenied(AuthFailed):
    """A server accepted the token but its role may not do this (HTTP 403)."""


class SetAside(PermissionDenied):
    """A server refused a chunk because gc has set aside a copy with other bytes under its
    name: only that copy's exact bytes may bring it back (docs/gc.md)."""


class Corrupt(SnapshipError):
    """Stored data failed its integrity check (tampered, truncated or damaged)."""


class FormatError(Corrupt):
    """Data is not in a format (or format version) this reader understands."""


class SourceError(SnapshipError):
    """The backup source cannot be opened or read."""


class TargetError(SnapshipError):
    """The restore target cannot be opened, is too small, or cannot be written."""


class StorageError(SnapshipError):
    """The storage backend failed in a way retrying will not fix."""


class TransientStorageError(StorageError):
    """The storage backend failed in a way that may succeed if retried. `problem` is the
    failure alone (without the operation and key), for a short "retrying" notice."""

    def __init__(self, message: str, problem: str | None = None) -> None:
        super().__init__(message)
        self.problem = problem or message


class Busy(SnapshipError):
    """Another process holds a lock this operation needs; trying again later will work."""

    exit_code = 75  # EX_TEMPFAIL: a scheduler may simply retry
