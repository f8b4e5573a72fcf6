"""What the server checks of an object before storing it (docs/http-api.md, "What the server
checks").

A `backup` token may only add, but what it adds is read by everyone else: gc, other backups,
restores. So every object a backup token puts is checked as far as the server can without the
repository key, and refused (400) if it is not what a backup writes: a chunk must be a
well-formed envelope of a plausible size under its id (in an unencrypted repository: its
checksum and content hash too), a reference list must decode and name itself, a manifest
must come after its reference list with a version id that is not far in the future, a
version summary after its manifest, the config and key file must parse (and a key file is
added by a backup token only at `init`, before the config exists). Locks, from any token, get
the server's clock as their heartbeat and the token's name as their owner: only that token (or
an admin) may replace or delete them afterwards.

A chunk that gc has set aside (a fossil) may only come back as the same bytes: then the
fossil itself is put back. Anything else under its name is refused, so a forged upload can
never make gc drop the original (docs/gc.md, "Fossils and uploads").
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass

from snapship.errors import Corrupt, NotFound, ObjectNotFound
from snapship.formats.config import RepoConfig, decode_config, decode_keyfile
from snapship.repository import locks
from snapship.repository.catalog import Catalog, open_refs
from snapship.repository.layout import V1_KEY_ID, Kind, Name, name_of
from snapship.server.objects import RepoStore
from snapship.server.policy import Role
from snapship.server.tokens import Principal

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
    fossil: bool = False
    """Put the chunk's fossil back instead: the upload is byte for byte the fossil."""


def _config(catalog: Catalog) -> RepoConfig:
    try:
        return catalog.config()
    except NotFound:
        raise Rejected("this repository has no config yet: run `snapship init` first") from None
    except Corrupt as e:
        raise Rejected(f"the repository's config is unreadable: {e}") from None


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


def check_chunk(catalog: Catalog, key: str, cid: bytes, data: bytes) -> Upload:
    problem = catalog.inspect_chunk(cid, data, _config(catalog))
    if problem is not None:
        raise Rejected(f"not a chunk object of this repository: {problem}")
    try:
        held = catalog.fossil_blob(cid)
    except ObjectNotFound:
        return Upload(data)
    if held != data:
        raise Rejected(f"may not store {key}: gc set aside a copy with other content, which "
                       "only its own bytes may bring back", forbidden=True)
    return Upload(data, fossil=True)


def check_refs(name: Name, data: bytes) -> Upload:
    assert name.volume is not None and name.version is not None
    _version_id(name.version, dt.datetime.now(dt.UTC))
    try:
        open_refs(name.volume, name.version, data)
    except Corrupt as e:
        raise Rejected(str(e)) from None
    return Upload(data)


def check_manifest(catalog: Catalog, name: Name, data: bytes) -> Upload:
    assert name.volume is not None and name.version is not None
    _version_id(name.version, dt.datetime.now(dt.UTC))
    if not catalog.has_refs(name.volume, name.version):
        # A version gc cannot read without the key would stop every keyless gc: its
        # reference list comes first (docs/gc.md, "Writers").
        raise Rejected("the version has no reference list: store it first")
    problem = catalog.inspect_manifest(data, _config(catalog))
    if problem is not None:
        raise Rejected(f"not a manifest of this repository: {problem}")
    return Upload(data)


def check_summary(catalog: Catalog, name: Name, data: bytes) -> Upload:
    """A summary only for a version that exists (the manifest first: a backup writes it
    after), sealed as this repository seals objects. Its content is the key holder's to
    check: encrypted, a forged one fails its tag and readers fall back to the manifest."""
    assert name.volume is not None and name.version is not None
    if not catalog.has_manifest(name.volume, name.version):
        raise Rejected("the version has no manifest: a summary comes after it")
    problem = catalog.inspect_summary(data, _config(catalog))
    if problem is not None:
        raise Rejected(f"not a version summary of this repository: {problem}")
    return Upload(data)


def check_lock(store: RepoStore, who: Principal, key: str, data: bytes, now: float) -> Upload:
    """A lock gets the server's clock and its owner's name; a lock held by another token may
    not be replaced by a backup token."""
    try:
        locks.decode_lock(key, data)
    except Corrupt as e:
        raise Rejected(str(e)) from None
    require_owner(store, who, key, "replace")
    obj = json.loads(data)
    obj["heartbeat"] = now
    obj["owner"] = who.name
    return Upload(json.dumps(obj, sort_keys=True).encode())


def require_owner(store: RepoStore, who: Principal, key: str, verb: str) -> None:
    """Refuse a backup token that would replace or delete another token's lock."""
    name = name_of(key)
    if who.role is Role.ADMIN or name.kind is not Kind.LOCK:
        return
    assert name.lock_kind is not None and name.session is not None
    info = Catalog(store.storage).lock_info(name.lock_kind, name.session)
    if info is None and store.stat(key) is None:
        return  # no lock there: nothing of anyone's to protect
    owner = info.owner if info is not None else ""  # an unreadable one is nobody's
    if owner != who.name:
        held = f"token {owner}'s" if owner else "an unowned"
        raise Rejected(f"may not {verb} {key}: it is {held} lock", forbidden=True)


def check_upload(store: RepoStore, who: Principal, key: str, data: bytes, now: float
                 ) -> Upload:
    """The object to store for a PUT of `key` by `who`, or `Rejected`."""
    name = name_of(key)
    if name.kind is Kind.LOCK:
        return check_lock(store, who, key, data, now)
    if who.role is Role.ADMIN:
        return Upload(data)
    catalog = Catalog(store.storage)
    if name.kind is Kind.CHUNK:
        assert name.cid is not None
        return check_chunk(catalog, key, name.cid, data)
    if name.kind is Kind.REFS:
        return check_refs(name, data)
    if name.kind is Kind.MANIFEST:
        return check_manifest(catalog, name, data)
    if name.kind is Kind.SUMMARY:
        return check_summary(catalog, name, data)
    if name.kind is Kind.KEY_FILE and catalog.exists():
        # Key files steer who can read everything: past `init`, only an admin adds them.
        raise Rejected(f"may not store {key}: key files of an existing repository change "
                       "only with an admin token", forbidden=True)
    try:
        if name.kind is Kind.CONFIG:
            decode_config(data)
        elif name.kind is Kind.KEY_FILE:
            kf = decode_keyfile(data)
            if (kf.version == 1) != (name.key_id == V1_KEY_ID) or \
                    (kf.version >= 2 and kf.id != name.key_id):
                raise Rejected(f"key file {key} names itself {kf.id!r} (version {kf.version})")
    except Corrupt as e:
        raise Rejected(str(e)) from None
    return Upload(data)
