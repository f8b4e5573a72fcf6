"""The repository's key files: unlocking the master secret with any one of them, and making,
listing and checking them (docs/format.md, "Keys and cryptography").

A repository has one master secret and any number of key files, each wrapping it under one
passphrase (one per administrator, an escrow key...). Changing a passphrase adds the new key
file before it removes the old one, so whenever a command stops, at least one of the two
passphrases opens the repository; nothing but key files (and, once, the config: the upgrade to
layout version 2) is rewritten. The Repository (repo.py) drives these steps; this module
knows how a key file is made and opened.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from snapship import crypto
from snapship.crypto import Keys, ScryptParams
from snapship.errors import AuthFailed, Corrupt, NotFound
from snapship.formats.config import KeyFile, RepoConfig, decode_keyfile, encode_keyfile
from snapship.repository.catalog import Catalog
from snapship.repository.layout import V1_KEY_ID


def _aad(repo_id: str, key_id: str, version: int) -> bytes:
    if version == 1:
        return b"snapship key v1 " + repo_id.encode()
    # The key file's own name is authenticated too: a key file copied under another id (or
    # into another repository) does not open.
    return b"snapship key v2 " + repo_id.encode() + b" " + key_id.encode()


def new_key_id() -> str:
    return secrets.token_hex(8)


def make_key_file(repo_id: str, master: bytes, passphrase: bytes, *, key_id: str, label: str,
                  created: str, kdf: ScryptParams | None = None) -> bytes:
    """A version-2 key file `keys/<key_id>` wrapping `master` under `passphrase`."""
    params = (kdf or ScryptParams()).with_new_salt()
    kek = crypto.derive_kek(passphrase, params)
    nonce, wrapped = crypto.wrap(kek, master, _aad(repo_id, key_id, 2))
    return encode_keyfile(KeyFile("scrypt", params.n, params.r, params.p, params.salt, nonce,
                                  wrapped, version=2, id=key_id, label=label, created=created))


def read_key_file(catalog: Catalog, key_id: str) -> KeyFile:
    """The key file `key_id`, checked to be what its name says (`Corrupt` if not)."""
    kf = decode_keyfile(catalog.key_file(key_id))
    name = catalog.key_file_name(key_id)
    if key_id == V1_KEY_ID:
        if kf.version != 1:
            raise Corrupt(f"key file {name} is of version {kf.version}; only a version-1 key "
                          "file has that name")
    elif kf.version != 2 or kf.id != key_id:
        raise Corrupt(f"key file {name} names itself {kf.id!r} (version {kf.version})")
    return kf


def key_ids(catalog: Catalog, cfg: RepoConfig) -> list[str]:
    """The key files a repository of this layout version has (layout 1: `repokey` only)."""
    if cfg.version < 2:
        return [V1_KEY_ID]
    return catalog.key_ids()


def unlock(catalog: Catalog, cfg: RepoConfig, passphrase: bytes) -> tuple[Keys, str]:
    """The repository's keys and the id of the key file that `passphrase` opens; one key
    derivation per key file tried. A damaged key file is skipped while another may open."""
    ids = key_ids(catalog, cfg)
    if not ids:
        raise Corrupt(f"repository at {catalog.describe()} has no key file")
    problems: list[Exception] = []
    for key_id in ids:
        try:
            kf = read_key_file(catalog, key_id)
        except (Corrupt, NotFound) as e:
            problems.append(e)
            continue
        kek = crypto.derive_kek(passphrase, ScryptParams(kf.n, kf.r, kf.p, kf.salt))
        try:
            master = crypto.unwrap(kek, kf.nonce, kf.wrapped, _aad(cfg.repo_id, key_id,
                                                                   kf.version))
        except AuthFailed:
            continue
        return Keys(master), key_id
    if len(problems) == len(ids):
        first = problems[0]
        raise Corrupt(str(first)) if isinstance(first, NotFound) else first
    several = f"none of its {len(ids)} key files opens" if len(ids) > 1 else "it does not open"
    raise AuthFailed(f"wrong passphrase ({several} the repository key)")


@dataclass(frozen=True)
class KeyInfo:
    """What `key list` shows of a key file (nothing of it is secret)."""

    id: str
    label: str
    created: str
    version: int
    kdf: str
    problem: str | None = None


def describe_keys(catalog: Catalog, cfg: RepoConfig) -> list[KeyInfo]:
    out = []
    for key_id in key_ids(catalog, cfg):
        try:
            kf = read_key_file(catalog, key_id)
        except (Corrupt, NotFound) as e:
            out.append(KeyInfo(key_id, "", "", 0, "", str(e)))
            continue
        out.append(KeyInfo(key_id, kf.label, kf.created, kf.version,
                           f"scrypt n={kf.n} r={kf.r} p={kf.p}"))
    return out
