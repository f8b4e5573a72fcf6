"""`Repository`: a repository's catalog plus its key; opens and creates repositories.

It turns plaintext chunks into sealed objects under content addresses and back, and keeps the
write order that makes a repository crash-safe: chunks, then `flush()`, then the reference list
and the manifest, then `flush()` again. A manifest is therefore only ever visible when every
chunk it lists is durable. Where objects live is the catalog's business (catalog.py).
"""

from __future__ import annotations

import contextlib
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
from snapship.formats.config import (
    KeyFile,
    RepoConfig,
    decode_keyfile,
    encode_config,
    encode_keyfile,
)
from snapship.formats.constants import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_ZSTD_LEVEL,
    ENCRYPTION_AES_GCM,
    ENCRYPTION_NONE,
    ENCRYPTIONS,
    KIND_CHUNK,
    KIND_MANIFEST,
    MAX_CHUNK_SIZE,
    MAX_ZSTD_LEVEL,
    MIN_CHUNK_SIZE,
)
from snapship.formats.manifest import Manifest
from snapship.repository.catalog import Catalog
from snapship.repository.layout import KEY_KEY
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
    def __init__(self, catalog: Catalog, config: RepoConfig, keys: Keys | None) -> None:
        self.catalog = catalog
        self.storage = catalog.storage
        self.config = config
        self.keys = keys
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
    ) -> Repository:
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
        if encryption != ENCRYPTION_NONE:
            if passphrase is None:
                raise UsageError("an encrypted repository needs a passphrase")
            keys = Keys.generate()
            params = (kdf or ScryptParams()).with_new_salt()
            kek = crypto.derive_kek(passphrase(), params)
            nonce, wrapped = crypto.wrap(kek, keys.master, _key_aad(cfg.repo_id))
            keyfile = KeyFile("scrypt", params.n, params.r, params.p, params.salt, nonce, wrapped)
            catalog.put_key_file(encode_keyfile(keyfile))
            mac = keys.mac(cfg.signed_part())
        # The config goes last: a repository without one was never finished and can be re-made.
        catalog.flush()
        catalog.put_config(encode_config(cfg, mac))
        catalog.flush()
        return cls(catalog, cfg, keys)

    @classmethod
    def open(cls, storage: Storage, passphrase: PassphraseSource | None = None) -> Repository:
        catalog = Catalog(storage)
        cfg, mac = catalog.config_and_mac()
        if not cfg.encrypted:
            if catalog.has_key_file():
                # `create` writes no key file for an unencrypted repository: one beside a
                # config that says "none" means the config was altered to switch encryption off.
                raise Corrupt("repository config was altered: it says the repository is not "
                              f"encrypted, but its key file {KEY_KEY} exists; refusing to read "
                              "or write it as unencrypted")
            return cls(catalog, cfg, None)
        if passphrase is None:
            raise AuthFailed("this repository is encrypted: a passphrase is needed")
        keyfile = decode_keyfile(catalog.key_file())
        params = ScryptParams(keyfile.n, keyfile.r, keyfile.p, keyfile.salt)
        kek = crypto.derive_kek(passphrase(), params)
        keys = Keys(crypto.unwrap(kek, keyfile.nonce, keyfile.wrapped, _key_aad(cfg.repo_id)))
        if mac != keys.mac(cfg.signed_part()):
            raise Corrupt("repository config was altered (its MAC does not match)")
        return cls(catalog, cfg, keys)

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
        The caller has confirmed the session's lease just before (engine/backup.py)."""
        if not session.lock.lease_intact():
            raise LeaseLost(f"{session.command}: {session.lapse()}; the version was not "
                            "written")
        self.put_refs(m, session)
        name = self.catalog.manifest_name(m.volume, m.version)
        blob = envelope.seal(KIND_MANIFEST, name, manifest_codec.encode(m), self._aead)
        self.catalog.flush()
        self.catalog.put_manifest_blob(m.volume, m.version, blob)
        self.catalog.flush()

    def put_refs(self, m: Manifest, session: WriterSession) -> None:
        self.catalog.put_refs(refs_codec.from_manifest(m, session.id))

    def has_refs(self, m: Manifest) -> bool:
        return self.catalog.has_refs(m.volume, m.version)

    def load_manifest(self, volume: str, version: str) -> Manifest:
        blob = self.catalog.manifest_blob(volume, version)
        what = f"manifest of {volume}@{version}"
        body = envelope.open_sealed(KIND_MANIFEST, self.catalog.manifest_name(volume, version),
                                    blob, self._aead, _MAX_MANIFEST, what,
                                    lambda peek: manifest_codec.plaintext_size(peek, what))
        m = manifest_codec.decode(body, what)
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


def _key_aad(repo_id: str) -> bytes:
    return b"snapship key v1 " + repo_id.encode()
