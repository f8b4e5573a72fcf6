"""What the server checks of an object before storing it (docs/http-api.md, "What the server
checks").

A `backup` token may only add, but what it adds is read by everyone else: gc, other backups,
restores. So every object a backup token puts is checked as far as the server can without the
repository key, and refused (400) if it is not what a backup writes: a chunk must be a
well-formed envelope of a plausible size under its id (in an unencrypted repository: its
checksum and content hash too), a reference list must decode and name itself, a manifest
must come after its reference list with a version id that is not far in the future, the
config and key file must parse. Locks, from any token, get the server's clock as their
heartbeat and the token's name as their owner: only that token (or an admin) may replace or
delete them afterwards.

A chunk that gc has set aside (a fossil) may only come back as the same bytes: then the
fossil itself is put back. Anything else under its name is refused, so a forged upload can
never make gc drop the original (docs/gc.md, "Fossils and uploads").
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
from dataclasses import dataclass

from snapship import crypto
from snapship.errors import Corrupt, ObjectNotFound, UsageError
from snapship.formats import envelope
from snapship.formats import manifest as manifest_codec
from snapship.formats import refs as refs_codec
from snapship.formats.config import RepoConfig, decode_config, decode_keyfile
from snapship.formats.constants import (
    CHECKSUM_LEN,
    CHUNK_PREFIX,
    CONFIG_KEY,
    FOSSIL_PREFIX,
    ID_LEN,
    KEY_KEY,
    KIND_CHUNK,
    KIND_MANIFEST,
    KIND_REFS,
    NONCE_LEN,
    OBJECT_HEADER_LEN,
    REFS_PREFIX,
    TAG_LEN,
    VERSION_PREFIX,
)
from snapship.repository import locks
from snapship.server.objects import RepoStore
from snapship.server.policy import Role
from snapship.server.tokens import Principal

_CHUNK = re.compile(rf"([0-9a-f]{{2}})/([0-9a-f]{{{2 * ID_LEN}}})")
_VERSION_ID = re.compile(r"(\d{8}-\d{6})\.\d{3}-[0-9a-f]{4}")
FUTURE_SLACK = dt.timedelta(days=1)
"""How far ahead of the server's clock a new version's id may be: more is not a clock that
is merely off, and would sort after every honest version forever."""


class Rejected(Exception):
    """The object is not stored. `forbidden`: the token may not do this (403, logged as a
    denial); otherwise the object itself is wrong (400)."""

    def __init__(self, message: str, forbidden: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.forbidden = forbidden


@dataclass(frozen=True)
class Upload:
    data: bytes
    """What to store under the key."""
    fossil: str | None = None
    """Put this fossil back under the key instead: the upload is byte for byte the fossil."""


def _config(store: RepoStore) -> RepoConfig:
    try:
        cfg, _mac = decode_config(store.local.get(CONFIG_KEY))
    except ObjectNotFound:
        raise Rejected("this repository has no config yet: run `snapship init` first") from None
    except Corrupt as e:
        raise Rejected(f"the repository's config is unreadable: {e}") from None
    return cfg


def _version_id(version: str, now: dt.datetime) -> None:
    m = _VERSION_ID.fullmatch(version)
    if m is None:
        raise Rejected(f"version id {version!r} is not of the form YYYYMMDD-HHMMSS.mmm-xxxx")
    try:
        when = dt.datetime.strptime(m.group(1), "%Y%m%d-%H%M%S").replace(tzinfo=dt.UTC)
    except ValueError:
        raise Rejected(f"version id {version!r} does not name a time") from None
    if when > now + FUTURE_SLACK:
        raise Rejected(f"version id {version!r} is more than a day ahead of the server's "
                       "clock (is the client's clock right?)")


def _volume_version(key: str, prefix: str) -> tuple[str, str]:
    parts = key[len(prefix) :].split("/")
    if len(parts) != 2:
        raise Rejected(f"the key is not {prefix}VOLUME/VERSION")
    try:
        manifest_codec.check_name("volume", parts[0])
        manifest_codec.check_name("version", parts[1])
    except UsageError as e:
        raise Rejected(str(e)) from None
    return parts[0], parts[1]


def check_chunk(store: RepoStore, key: str, data: bytes) -> Upload:
    m = _CHUNK.fullmatch(key[len(CHUNK_PREFIX) :])
    if m is None or not m.group(2).startswith(m.group(1)):
        raise Rejected("a chunk's key is chunks/HH/ID (ID: 64 hex digits starting with HH)")
    cid = bytes.fromhex(m.group(2))
    cfg = _config(store)
    problem = envelope.inspect(data, KIND_CHUNK, cfg.encrypted)
    overhead = OBJECT_HEADER_LEN + (NONCE_LEN + TAG_LEN if cfg.encrypted else CHECKSUM_LEN)
    if problem is None and not overhead < len(data) <= cfg.chunk_size + overhead:
        problem = (f"{len(data)} bytes; a chunk object of this repository has "
                   f"{overhead + 1} to {cfg.chunk_size + overhead}")
    if problem is None and not cfg.encrypted:
        try:
            plain = envelope.open_sealed(KIND_CHUNK, cid, data, None, cfg.chunk_size, "it")
            if crypto.chunk_id(plain, None) != cid:
                problem = "its content does not match its id"
        except Corrupt as e:
            problem = str(e)
    if problem is not None:
        raise Rejected(f"not a chunk object of this repository: {problem}")
    fossil = FOSSIL_PREFIX + key[len(CHUNK_PREFIX) :]
    try:
        held = store.local.get(fossil)
    except ObjectNotFound:
        return Upload(data)
    if held != data:
        raise Rejected(f"may not store {key}: gc set aside a copy with other content, which "
                       "only its own bytes may bring back", forbidden=True)
    return Upload(data, fossil)


def check_refs(store: RepoStore, key: str, data: bytes) -> Upload:
    volume, version = _volume_version(key, REFS_PREFIX)
    _version_id(version, dt.datetime.now(dt.UTC))
    what = "the reference list"
    try:
        body = envelope.open_sealed(KIND_REFS, key.encode(), data, None,
                                    refs_codec.max_plaintext(len(data)), what,
                                    lambda peek: refs_codec.plaintext_size(peek, what))
        r = refs_codec.decode(body, what)
    except Corrupt as e:
        raise Rejected(str(e)) from None
    if (r.volume, r.version) != (volume, version):
        raise Rejected(f"{what} names itself {r.volume}@{r.version}")
    return Upload(data)


def check_manifest(store: RepoStore, key: str, data: bytes) -> Upload:
    _volume, version = _volume_version(key, VERSION_PREFIX)
    _version_id(version, dt.datetime.now(dt.UTC))
    refs = REFS_PREFIX + key[len(VERSION_PREFIX) :]
    if store.stat(refs) is None:
        # A version gc cannot read without the key would stop every keyless gc: its
        # reference list comes first (docs/gc.md, "Writers").
        raise Rejected(f"the version has no reference list: store {refs} first")
    cfg = _config(store)
    problem = envelope.inspect(data, KIND_MANIFEST, cfg.encrypted)
    if problem is not None:
        raise Rejected(f"not a manifest of this repository: {problem}")
    return Upload(data)


def check_lock(store: RepoStore, who: Principal, key: str, data: bytes, now: float) -> Upload:
    """A lock gets the server's clock and its owner's name; a lock held by another token may
    not be replaced by a backup token."""
    try:
        info = locks.decode_lock(key, data)
    except Corrupt as e:
        raise Rejected(str(e)) from None
    require_owner(store, who, key, "replace")
    obj = json.loads(data)
    obj["heartbeat"] = now
    obj["owner"] = who.name
    assert info.key == key
    return Upload(json.dumps(obj, sort_keys=True).encode())


def require_owner(store: RepoStore, who: Principal, key: str, verb: str) -> None:
    """Refuse a backup token that would replace or delete another token's lock."""
    if who.role is Role.ADMIN:
        return
    try:
        existing = store.local.get(key)
    except ObjectNotFound:
        return
    owner = ""
    with contextlib.suppress(Corrupt):
        owner = locks.decode_lock(key, existing).owner
    if owner != who.name:
        held = f"token {owner}'s" if owner else "an unowned"
        raise Rejected(f"may not {verb} {key}: it is {held} lock", forbidden=True)


def check_upload(store: RepoStore, who: Principal, key: str, data: bytes, now: float
                 ) -> Upload:
    """The object to store for a PUT of `key` by `who`, or `Rejected`."""
    if locks.parse_lock_key(key) is not None:
        return check_lock(store, who, key, data, now)
    if who.role is Role.ADMIN:
        return Upload(data)
    if key.startswith(CHUNK_PREFIX):
        return check_chunk(store, key, data)
    if key.startswith(REFS_PREFIX):
        return check_refs(store, key, data)
    if key.startswith(VERSION_PREFIX):
        return check_manifest(store, key, data)
    try:
        if key == CONFIG_KEY:
            decode_config(data)
        elif key == KEY_KEY:
            decode_keyfile(data)
    except Corrupt as e:
        raise Rejected(str(e)) from None
    return Upload(data)
