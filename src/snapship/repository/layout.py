"""The key layout of a repository: every object's key, and what a given key names.

This module and the rest of `repository/` are the only code that knows key names
(docs/format.md, "Keys"; docs/gc.md, "Objects"); everything above works with chunk ids,
volume and version names, and the kinds below. `name_of` turns any key back into what it
names, which is all a storage server needs to decide who may write it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from snapship.formats.constants import ID_LEN
from snapship.formats.manifest import check_name

CONFIG_KEY = "config"
KEY_PREFIX = "keys/"
KEY_KEY = f"{KEY_PREFIX}repokey"
"""The one key file of a version-1 repository (docs/format.md, "Keys and cryptography")."""
V1_KEY_ID = "repokey"
CHUNK_PREFIX = "chunks/"
FOSSIL_PREFIX = "fossils/"
VERSION_PREFIX = "versions/"
REFS_PREFIX = "refs/"
SUMMARY_PREFIX = "summaries/"
LOCK_PREFIX = "locks/"
TOMBSTONE_PREFIX = f"{LOCK_PREFIX}stale/"
COLLECTION_KEY = "gc/collection"
PROTECTED_PREFIX = "protected/"
DAMAGED_PREFIX = "damaged/"
LOCK_KINDS = ("writer", "gc", "prune")

_ID = re.compile(rf"([0-9a-f]{{2}})/([0-9a-f]{{{2 * ID_LEN}}})")
_NAME = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"
_VERSION_KEY = re.compile(rf"({_NAME})/({_NAME})")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_LOCK = re.compile(rf"({'|'.join(LOCK_KINDS)})-([A-Za-z0-9._+-]+)")


class Kind(enum.Enum):
    CONFIG = "config"
    KEY_FILE = "key file"
    CHUNK = "chunk"
    FOSSIL = "fossil"
    MANIFEST = "manifest"
    REFS = "reference list"
    SUMMARY = "version summary"
    LOCK = "lock"
    TOMBSTONE = "tombstone"
    COLLECTION = "collection"
    PROTECTED = "protection mark"
    DAMAGED = "damage mark"
    OTHER = "other"


@dataclass(frozen=True)
class Name:
    """What a key names: its kind and, depending on it, a chunk id, a volume and version, or
    a lock's kind and session."""

    kind: Kind
    cid: bytes | None = None
    volume: str | None = None
    version: str | None = None
    lock_kind: str | None = None
    session: str | None = None
    key_id: str | None = None


def _key(prefix: str, volume: str, version: str) -> str:
    return f"{prefix}{check_name('volume', volume)}/{check_name('version', version)}"


def chunk_key(cid: bytes) -> str:
    h = cid.hex()
    return f"{CHUNK_PREFIX}{h[:2]}/{h}"


def fossil_key(cid: bytes) -> str:
    h = cid.hex()
    return f"{FOSSIL_PREFIX}{h[:2]}/{h}"


def manifest_key(volume: str, version: str) -> str:
    return _key(VERSION_PREFIX, volume, version)


def refs_key(volume: str, version: str) -> str:
    return _key(REFS_PREFIX, volume, version)


def summary_key(volume: str, version: str) -> str:
    return _key(SUMMARY_PREFIX, volume, version)


def protected_key(volume: str, version: str) -> str:
    return _key(PROTECTED_PREFIX, volume, version)


def damaged_key(volume: str, version: str) -> str:
    return _key(DAMAGED_PREFIX, volume, version)


def lock_key(kind: str, session: str) -> str:
    return f"{LOCK_PREFIX}{kind}-{session}"


def tombstone_key(lock_key_: str) -> str:
    return TOMBSTONE_PREFIX + lock_key_[len(LOCK_PREFIX) :]


def key_file_key(key_id: str) -> str:
    """`keys/<id>`: 16 hex digits, or `repokey` for a version-1 repository's key file."""
    if key_id != V1_KEY_ID and not _KEY_ID.fullmatch(key_id):
        raise ValueError(f"invalid key id {key_id!r}")
    return KEY_PREFIX + key_id


def is_key_id(text: str) -> bool:
    return text == V1_KEY_ID or _KEY_ID.fullmatch(text) is not None


def volume_prefix(prefix: str, volume: str | None) -> str:
    return prefix + (check_name("volume", volume) + "/" if volume else "")


def name_of(key: str) -> Name:
    """What `key` names (`Kind.OTHER` for a key no snapship object has)."""
    if key == CONFIG_KEY:
        return Name(Kind.CONFIG)
    if key.startswith(KEY_PREFIX):
        kid = key[len(KEY_PREFIX) :]
        return Name(Kind.KEY_FILE, key_id=kid) if is_key_id(kid) else Name(Kind.OTHER)
    if key == COLLECTION_KEY:
        return Name(Kind.COLLECTION)
    for prefix, kind in ((CHUNK_PREFIX, Kind.CHUNK), (FOSSIL_PREFIX, Kind.FOSSIL)):
        if key.startswith(prefix):
            m = _ID.fullmatch(key[len(prefix) :])
            if m and m.group(2).startswith(m.group(1)):
                return Name(kind, cid=bytes.fromhex(m.group(2)))
            return Name(Kind.OTHER)
    for prefix, kind in ((VERSION_PREFIX, Kind.MANIFEST), (REFS_PREFIX, Kind.REFS),
                         (SUMMARY_PREFIX, Kind.SUMMARY),
                         (PROTECTED_PREFIX, Kind.PROTECTED), (DAMAGED_PREFIX, Kind.DAMAGED)):
        if key.startswith(prefix):
            v = _VERSION_KEY.fullmatch(key[len(prefix) :])
            return Name(kind, volume=v.group(1), version=v.group(2)) if v else Name(Kind.OTHER)
    if key.startswith(TOMBSTONE_PREFIX):
        t = _LOCK.fullmatch(key[len(TOMBSTONE_PREFIX) :])
        return (Name(Kind.TOMBSTONE, lock_kind=t.group(1), session=t.group(2)) if t
                else Name(Kind.OTHER))
    if key.startswith(LOCK_PREFIX):
        lk = _LOCK.fullmatch(key[len(LOCK_PREFIX) :])
        return (Name(Kind.LOCK, lock_kind=lk.group(1), session=lk.group(2)) if lk
                else Name(Kind.OTHER))
    return Name(Kind.OTHER)


def chunk_id_of(key: str) -> bytes | None:
    """The id in a `chunks/` or `fossils/` key; None for anything else."""
    n = name_of(key)
    return n.cid if n.kind in (Kind.CHUNK, Kind.FOSSIL) else None
