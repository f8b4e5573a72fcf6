"""The one exception hierarchy of snapship.

Every error a user can cause or meet is a `SnapshipError` whose message is one line that names
what is wrong; the CLI prints it and exits non-zero. Anything else escaping is a bug.

Each class has a `kind`, the stable name of what went wrong that `--json` gives scripts
(`error.kind`, docs/json.md); a subclass without a kind of its own has its base's. Renaming a
kind breaks scripts: add a new one instead.
"""

from __future__ import annotations


class SnapshipError(Exception):
    """Base of all expected failures. `exit_code` is what the CLI returns."""

    exit_code = 1
    kind = "error"


class UsageError(SnapshipError):
    """The user asked for something that cannot work (bad option, bad name)."""

    exit_code = 2
    kind = "usage"


class NotFound(SnapshipError):
    """A repository, volume, version or object does not exist."""

    kind = "not-found"


class ObjectNotFound(NotFound):
    """A storage backend has no object under this key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object {key} not found")
        self.key = key


class AuthFailed(SnapshipError):
    """Wrong passphrase, a key file that does not belong to this repository, or a server that
    does not accept the token."""

    kind = "auth"


class PermissionDenied(AuthFailed):
    """A server accepted the token but its role may not do this (HTTP 403)."""

    kind = "permission"


class SetAside(PermissionDenied):
    """A server refused a chunk because gc has set aside a copy with other bytes under its
    name: only that copy's exact bytes may bring it back (docs/gc.md)."""

    kind = "set-aside"


class Corrupt(SnapshipError):
    """Stored data failed its integrity check (tampered, truncated or damaged)."""

    kind = "corrupt"


class FormatError(Corrupt):
    """Data is not in a format (or format version) this reader understands."""

    kind = "format"


class SourceError(SnapshipError):
    """The backup source cannot be opened or read."""

    kind = "source"


class TargetError(SnapshipError):
    """The restore target cannot be opened, is too small, or cannot be written."""

    kind = "target"


class StorageError(SnapshipError):
    """The storage backend failed in a way retrying will not fix."""

    kind = "storage"


class TransientStorageError(StorageError):
    """The storage backend failed in a way that may succeed if retried. `problem` is the
    failure alone (without the operation and key), for a short "retrying" notice."""

    kind = "transient"

    def __init__(self, message: str, problem: str | None = None) -> None:
        super().__init__(message)
        self.problem = problem or message


class Busy(SnapshipError):
    """Another process holds a lock this operation needs; trying again later will work."""

    exit_code = 75  # EX_TEMPFAIL: a scheduler may simply retry
    kind = "busy"
