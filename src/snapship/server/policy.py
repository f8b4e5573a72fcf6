"""Who may do what: the role table of docs/http-api.md as one pure function.

A `backup` token adds and never destroys: it may create what a backup writes (chunks,
reference lists, manifests, and at `init` the config and key file), re-put such an object only
with the bytes it already holds, and manage only writer locks (`locks/writer-*`, which a
backup replaces every minute and deletes at the end; the server also makes sure each lock is
replaced or deleted only by the token that stored it, server/validate.py). Nothing else: not
gc's state, not protection or damage marks, not another kind of lock, no rename. The server
asks `permission` before touching storage; `CREATE_ONLY` leaves the "does it exist, and with
which bytes" part to the object store, which checks it under a lock.
"""

from __future__ import annotations

import enum

from snapship.repository.layout import Kind, name_of
from snapship.repository.locks import WRITER


class Role(enum.StrEnum):
    READ = "read"
    BACKUP = "backup"
    ADMIN = "admin"


class Op(enum.StrEnum):
    INFO = "info"
    GET = "get"
    HEAD = "head"
    LIST = "list"
    MISSING = "missing"
    PUT = "put"
    DELETE = "delete"
    RENAME = "rename"
    FLUSH = "flush"
    MAINTAIN = "maintain"
    METRICS = "metrics"
    """The server's own counters (`GET /v1/metrics`): no repository's; admin tokens only."""


class Permission(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    CREATE_ONLY = "create-only"
    """Allowed if the key does not exist, or already holds exactly the bytes being put."""


READ_OPS = frozenset({Op.INFO, Op.GET, Op.HEAD, Op.LIST, Op.MISSING})
BACKUP_CREATES = frozenset({Kind.CHUNK, Kind.REFS, Kind.MANIFEST, Kind.SUMMARY, Kind.CONFIG,
                            Kind.KEY_FILE})
"""What a backup token may create: what a backup (and `init`) writes."""


def _is_writer_lock(key: str | None) -> bool:
    if key is None:
        return False
    name = name_of(key)
    return name.kind is Kind.LOCK and name.lock_kind == WRITER


def permission(role: Role, op: Op, key: str | None = None, dst: str | None = None) -> Permission:
    """May a token of `role` do `op` on `key` (and, for a rename, onto `dst`)?"""
    if op in READ_OPS or role is Role.ADMIN:
        return Permission.ALLOW
    if role is Role.READ:
        return Permission.DENY
    if op is Op.PUT:
        if _is_writer_lock(key):
            return Permission.ALLOW
        if key is not None and name_of(key).kind in BACKUP_CREATES:
            return Permission.CREATE_ONLY
        return Permission.DENY
    if op is Op.DELETE:
        return Permission.ALLOW if _is_writer_lock(key) else Permission.DENY
    if op is Op.FLUSH:
        return Permission.ALLOW
    return Permission.DENY
