"""`Repository`: a repository's catalog plus its key; opens and creates repositories.

It turns plaintext chunks into sealed objects under content addresses and back, and keeps the
write order that makes a repository crash-safe: chunks, then `flush()`, then the reference list
and the manifest, then `flush()` again. A manifest is therefore only ever visible when every
chunk it lists is durable. Where objects live is the catalog's business (catalog.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import secrets
import time
import uuid
from collections.abc import Callable

from snapship import crypto
from snapship.crypto import Keys, ScryptParams
from snapship.errors import (
    AuthFailed,
    Corrupt,
    NotFound,
    ObjectNotFound,
    SetAside,
    UsageError,
)
from snapship.formats import envelope
from snapship.formats import manifest as manifest_codec
from snapship.formats import refs as refs_codec
from snapship.formats import summary as summary_codec
from snapship.formats.config import RepoConfig, encode_config
from snapship.formats.constants import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_ZSTD_LEVEL,
    ENCRYPTION_AES_GCM,
    ENCRYPTION_NONE,
    ENCRYPTIONS,
    FORMAT_VERSION,
    KIND_CHUNK,
    KIND_MANIFEST,
    KIND_SUMMARY,
    MAX_CHUNK_SIZE,
    MAX_ZSTD_LEVEL,
    MIN_CHUNK_SIZE,
)
from snapship.formats.manifest import Manifest
from snapship.formats.summary import Summary
from snapship.repository import keyring
from snapship.repository.catalog import Catalog
from snapship.repository.locks import LeaseLost
from snapship.repository.session import WriterSession
from snapship.storage.base import Storage
from snapship.types import VersionRef

PassphraseSource = Callable[[], bytes]
_MAX_MANIFEST = 1 << 34
"""A sanity cap only (a volume of about 450 TiB at 1 MiB chunks): what bounds a manifest is
the exact size its own header implies (`manifest.plaintext_size`)."""


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_version_id(after: str | None = None) -> str:
    """Sortable by time to the millisecond, unique by a random suffix, and greater than
    `after` (the version it is based on), so `latest` is never the older of two."""
    for _ in range(1000):  # a clock set back by more than a second is not waited out
        t = dt.datetime.now(dt.UTC)
        vid = f"{t:%Y%m%d-%H%M%S}.{t.microsecond // 1000:03d}-{secrets.token_hex(2)}"
        if after is None or vid[:19] > after[:19]:
            break
        time.sleep(0.001)
    return vid


class Repository:
    def __init__(self, catalog: Catalog, config: RepoConfig, keys: Keys | None,
                 key_id: str | None = None) -> None:
        self.catalog = catalog
        self.storage = catalog.storage
        self.config = config
        self.keys = keys
        self.key_id = key_id
        """The key file the passphrase opened (None for an unencrypted repository)."""
        self._aead = keys.aead if keys else None
        self._id_key = keys.id_key if keys else None
        self._nonce_key = keys.nonce_key if keys else None

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    # -- creating and opening -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        storage: Storage,
        *,
        encryption: str = ENCRYPTION_AES_GCM,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        compression_level: int = DEFAULT_ZSTD_LEVEL,
        passphrase: PassphraseSource | None = None,
        kdf: ScryptParams | None = None,
        key_label: str = "",
        master: bytes | None = None,
    ) -> Repository:
        """`master`: the master secret of another repository, to share its keys (chunk ids,
        encryption: `init --copy-key-from`, so `copy` moves chunks between the two as they
        are); a new random one if None."""
        if encryption not in ENCRYPTIONS:
            raise UsageError(f"unknown encryption {encryption!r}; use {' or '.join(ENCRYPTIONS)}")
        cs = chunk_size
        if cs < MIN_CHUNK_SIZE or cs > MAX_CHUNK_SIZE or cs & (cs - 1):
            raise UsageError(f"chunk size {cs} is not a power of two between 64K and 16M")
        if not 0 <= compression_level <= MAX_ZSTD_LEVEL:
            raise UsageError(f"compression level {compression_level} is not in 0..{MAX_ZSTD_LEVEL}")
        catalog = Catalog(storage)
        if catalog.exists():
            raise UsageError(f"a repository already exists at {storage.describe()}")
        cfg = RepoConfig(
            repo_id=uuid.uuid4().hex,
            chunk_size=cs,
            encryption=encryption,
            created=now_iso(),
            compression_level=compression_level,
        )
        keys: Keys | None = None
        mac: bytes | None = None
        key_id: str | None = None
        if master is not None and encryption == ENCRYPTION_NONE:
            raise UsageError("an unencrypted repository has no key to share")
        if encryption != ENCRYPTION_NONE:
            if passphrase is None:
                raise UsageError("an encrypted repository needs a passphrase")
            keys = Keys(master) if master is not None else Keys.generate()
            key_id = keyring.new_key_id()
            catalog.put_key_file(key_id, keyring.make_key_file(
                cfg.repo_id, keys.master, passphrase(), key_id=key_id, label=key_label,
                created=cfg.created, kdf=kdf))
            mac = keys.mac(cfg.signed_part())
        # The config goes last: a repository without one was never finished and can be re-made.
        catalog.flush()
        catalog.put_config(encode_config(cfg, mac))
        catalog.flush()
        return cls(catalog, cfg, keys, key_id)

    @classmethod
    def open(cls, storage: Storage, passphrase: PassphraseSource | None = None) -> Repository:
        catalog = Catalog(storage)
        cfg, mac = catalog.config_and_mac()
        if not cfg.encrypted:
            if catalog.has_key_file():
                # `create` writes no key file for an unencrypted repository: one beside a
                # config that says "none" means the config was altered to switch encryption off.
                names = ", ".join(catalog.key_file_name(k) for k in catalog.key_ids())
                raise Corrupt("repository config was altered: it says the repository is not "
                              f"encrypted, but it has key files ({names}); refusing to read "
                              "or write it as unencrypted")
            return cls(catalog, cfg, None)
        if passphrase is None:
            raise AuthFailed("this repository is encrypted: a passphrase is needed")
        keys, key_id = keyring.unlock(catalog, cfg, passphrase())
        if mac != keys.mac(cfg.signed_part()):
            raise Corrupt("repository config was altered (its MAC does not match)")
        return cls(catalog, cfg, keys, key_id)

    # -- key files (docs/format.md, "Keys and cryptography") ----------------------------

    def _unlocked(self) -> Keys:
        if self.keys is None:
            raise UsageError("this repository is not encrypted: it has no keys")
        return self.keys

    def _upgrade_layout(self) -> None:
        """Layout 1 has one key file by definition: before a second one appears, the config
        says version 2, so an older snapship refuses the repository instead of missing keys.
        One atomic put: a crash before or after it leaves a readable repository."""
        if self.config.version >= FORMAT_VERSION:
            return
        keys = self._unlocked()
        new = dataclasses.replace(self.config, version=FORMAT_VERSION)
        self.catalog.put_config(encode_config(new, keys.mac(new.signed_part())))
        self.catalog.flush()
        self.config = new

    def add_key(self, passphrase: bytes, label: str = "", kdf: ScryptParams | None = None
                ) -> str:
        """A new key file for `passphrase`, durable when this returns; returns its id."""
        keys = self._unlocked()
        self._upgrade_layout()
        key_id = keyring.new_key_id()
        self.catalog.put_key_file(key_id, keyring.make_key_file(
            self.config.repo_id, keys.master, passphrase, key_id=key_id, label=label,
            created=now_iso(), kdf=kdf))
        self.catalog.flush()
        return key_id

    def remove_key(self, key_id: str) -> None:
        """Remove a key file other than the last one and the one this was opened with."""
        self._unlocked()
        ids = keyring.key_ids(self.catalog, self.config)
        if key_id not in ids:
            raise NotFound(f"this repository has no key {key_id!r} (see `snapship key list`)")
        if ids == [key_id]:
            raise UsageError(f"refusing to remove key {key_id}: it is the repository's last "
                             "key, and without one nothing in it can ever be read")
        if key_id == self.key_id:
            raise UsageError(f"refusing to remove key {key_id}: it is the one this command "
                             "was opened with; open the repository with another passphrase "
                             "to remove it")
        self.catalog.delete_key_file(key_id)
        self.catalog.flush()

    def change_passphrase(self, passphrase: bytes, kdf: ScryptParams | None = None) -> str:
        """Replace the key file this was opened with by one for `passphrase` (same label):
        the new one is durable before the old one goes. Returns the new key's id."""
        old = self.key_id
        if old is None:
            raise UsageError("this repository is not encrypted: it has no passphrase")
        label = keyring.read_key_file(self.catalog, old).label
        new = self.add_key(passphrase, label, kdf)
        self.catalog.delete_key_file(old)
        self.catalog.flush()
        self.key_id = new
        return new

    def describe_keys(self) -> list[keyring.KeyInfo]:
        return keyring.describe_keys(self.catalog, self.config)

    # -- chunks ---------------------------------------------------------------------------

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        return crypto.chunk_id(data, self._id_key)

    def seal_chunk(self, cid: bytes, data: bytes | memoryview) -> bytes | bytearray:
        # Deterministic, so a chunk stored twice is the same object twice (docs/gc.md).
        return envelope.seal(KIND_CHUNK, cid, data, self._aead, self.config.compression_level,
                             self._nonce_key)

    def open_chunk(self, cid: bytes, blob: bytes) -> bytes:
        """Decode a stored chunk and check it really is the chunk `cid` names."""
        what = f"chunk {cid.hex()}"
        data = envelope.open_sealed(KIND_CHUNK, cid, blob, self._aead, self.chunk_size, what)
        if self.chunk_id(data) != cid:
            raise Corrupt(f"{what} is damaged: its content does not match its id")
        return data

    def stat_chunk(self, cid: bytes) -> int | None:
        return self.catalog.chunk_size_of(cid)

    def put_chunk(self, cid: bytes, blob: bytes | bytearray) -> int:
        """Store a sealed chunk; returns the size of what is stored under its name (the
        copy gc had set aside, when a server insists on that one)."""
        try:
            self.catalog.put_chunk_blob(cid, blob)
            return len(blob)
        except SetAside:
            # gc set aside a copy with other bytes (sealed by an older snapship, or forged):
            # bring that copy back as it is, once the key confirms it is this chunk.
            try:
                held = self.catalog.fossil_blob(cid)
            except ObjectNotFound:
                held = b""  # settled meanwhile: our own bytes go in
            if held:
                try:
                    self.open_chunk(cid, held)
                except Corrupt as e:
                    raise Corrupt(f"chunk {cid.hex()} cannot be stored: the copy gc set aside "
                                  f"is not it ({e}); an administrator's gc settles it") from None
            self.catalog.put_chunk_blob(cid, held or blob)
            return len(held or blob)

    def get_chunk(self, cid: bytes) -> bytes:
        return self.open_chunk(cid, self.catalog.chunk_blob(cid))

    # -- writers --------------------------------------------------------------------------

    def writer(self, command: str) -> contextlib.AbstractContextManager[WriterSession]:
        """Register a backup for its whole life: enter before loading its base version."""
        return self.catalog.writer(command)

    # -- manifests ------------------------------------------------------------------------

    def save_manifest(self, m: Manifest, session: WriterSession) -> None:
        """The reference list, a flush (now every chunk and the list are durable), the
        manifest, a flush: a durable version always has durable chunks and references.
        Then its summary, made durable by the flush: the version exists without it (the
        manifest is what makes it), and a version whose summary is missing or unreadable is
        listed from its manifest. The caller has confirmed the session's lease just before
        (engine/backup.py)."""
        if not session.lock.lease_intact():
            raise LeaseLost(f"{session.command}: {session.lapse()}; the version was not "
                            "written")
        refs = self.put_refs(m, session)
        name = self.catalog.manifest_name(m.volume, m.version)
        blob = envelope.seal_parts(KIND_MANIFEST, name, manifest_codec.encode_parts(m),
                                   self._aead)
        summary = summary_codec.from_manifest(m, (refs.count, sum(refs.sizes)), len(blob))
        self.catalog.flush()
        self.catalog.put_manifest_blob(m.volume, m.version, blob)
        self.catalog.flush()
        self.put_summary(summary)
        self.catalog.flush()

    def put_refs(self, m: Manifest, session: WriterSession) -> refs_codec.Refs:
        r = refs_codec.from_manifest(m, session.id)
        self.catalog.put_refs(r)
        return r

    def put_summary(self, s: Summary) -> None:
        name = self.catalog.summary_name(s.volume, s.version)
        self.catalog.put_summary_blob(s.volume, s.version,
                                      envelope.seal(KIND_SUMMARY, name, summary_codec.encode(s),
                                                    self._aead))

    def load_summary(self, volume: str, version: str) -> Summary:
        """The version's summary: `ObjectNotFound` if it has none (written before snapship
        wrote summaries, or lost before its flush), `Corrupt` if it is damaged or forged."""
        blob = self.catalog.summary_blob(volume, version)
        what = f"summary of {volume}@{version}"
        body = envelope.open_sealed(KIND_SUMMARY, self.catalog.summary_name(volume, version),
                                    blob, self._aead, summary_codec.MAX_SUMMARY_JSON, what)
        s = summary_codec.decode(body, what)
        if (s.volume, s.version) != (volume, version):
            raise Corrupt(f"{what} names itself {s.volume}@{s.version}")
        if s.chunk_size != self.chunk_size:
            raise Corrupt(f"{what} has chunk size {s.chunk_size}, repository {self.chunk_size}")
        return s

    def summary(self, volume: str, version: str, manifest_size: int | None = None,
                warn: Callable[[str], None] | None = None) -> tuple[Summary, bool]:
        """The version's summary and whether it was read from the manifest instead: for a
        version without one, whose summary cannot be read (said through `warn`), or whose
        manifest is not the size its summary recorded (`manifest_size`, from a listing, else
        asked of the storage), so a truncated or replaced manifest is found without reading
        it. The manifest is the version: its errors (`NotFound`, `Corrupt`) are raised (and
        then no word of the summary: one error is enough)."""
        damaged: Corrupt | None = None
        try:
            s = self.load_summary(volume, version)
            if manifest_size is None:
                manifest_size = self.catalog.manifest_size(volume, version)
            if manifest_size is None:
                raise NotFound(f"volume {volume} has no version {version}")
            if not s.manifest_bytes or s.manifest_bytes == manifest_size:
                return s, False
        except ObjectNotFound:
            pass
        except Corrupt as e:  # FormatError included
            damaged = e
        m = self.load_manifest(volume, version)
        if damaged is not None and warn is not None:
            warn(f"{damaged}: read its manifest instead")
        return summary_codec.from_manifest(m), True

    def has_refs(self, m: Manifest) -> bool:
        return self.catalog.has_refs(m.volume, m.version)

    def load_manifest(self, volume: str, version: str) -> Manifest:
        blob = self.catalog.manifest_blob(volume, version)
        what = f"manifest of {volume}@{version}"
        parts = envelope.open_sealed_parts(
            KIND_MANIFEST, self.catalog.manifest_name(volume, version), blob, self._aead,
            _MAX_MANIFEST, what, lambda peek: manifest_codec.cut(peek, what))
        del blob  # a 4 TiB volume's manifest: the ids are held once, not alongside the blob
        m = manifest_codec.decode_parts(parts, what)
        if (m.volume, m.version) != (volume, version):
            raise Corrupt(f"{what} names itself {m.volume}@{m.version}")
        if m.chunk_size != self.chunk_size:
            raise Corrupt(f"{what} has chunk size {m.chunk_size}, repository {self.chunk_size}")
        return m

    def list_versions(self, volume: str | None = None) -> list[tuple[str, str]]:
        """(volume, version) pairs, sorted by volume then age, without reading manifests."""
        return self.catalog.versions(volume)

    def latest_manifest(self, volume: str, warn: Callable[[str], None] | None = None
                        ) -> Manifest | None:
        """The newest version of `volume`, or None if it has none yet. With `warn`, a
        damaged newest version is skipped (and reported) for the newest readable one: one bad
        object must not stop every later backup of the volume."""
        for vol, ver in reversed(self.list_versions(volume)):
            try:
                return self.load_manifest(vol, ver)
            except NotFound:
                continue  # forgotten meanwhile
            except Corrupt as e:
                if warn is None:
                    raise
                warn(f"{e}: not using {vol}@{ver} as the base of this backup")
        return None

    def resolve(self, ref: VersionRef) -> tuple[str, str]:
        """Turn `volume@version` into an existing version (`Catalog.resolve`)."""
        return self.catalog.resolve(ref)

