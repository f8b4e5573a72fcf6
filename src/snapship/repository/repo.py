"""`Repository`: opens or creates a repository and reads and writes its objects.

It turns plaintext chunks into sealed objects under content addresses and back, and keeps the
write order that makes a repository crash-safe: chunks, then `flush()`, then the manifest, then
`flush()` again. A manifest is therefore only ever visible when every chunk it lists is durable.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
import time
import uuid
from collections.abc import Callable, Iterator

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
    decode_config,
    decode_keyfile,
    encode_config,
    encode_keyfile,
)
from snapship.formats.constants import (
    CHUNK_PREFIX,
    CONFIG_KEY,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_ZSTD_LEVEL,
    ENCRYPTION_AES_GCM,
    ENCRYPTION_NONE,
    ENCRYPTIONS,
    FOSSIL_PREFIX,
    ID_LEN,
    KEY_KEY,
    KIND_CHUNK,
    KIND_MANIFEST,
    MAX_CHUNK_SIZE,
    MAX_ZSTD_LEVEL,
    MIN_CHUNK_SIZE,
)
from snapship.formats.manifest import Manifest
from snapship.repository import catalog, collection
from snapship.repository.locks import WRITER, LeaseLost, Lock
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


class WriterSession:
    """A running backup, registered so gc knows about it (docs/gc.md, "Writers" and "Leases").

    It holds a writer lock whose lease the backup must confirm before and after it writes its
    version. A lease that was lost cannot be trusted again: `renew` registers the backup anew
    (a new lock, a new session), after which the backup must re-check every chunk it relies
    on, as a writer that started during a collection does."""

    def __init__(self, storage: Storage, command: str) -> None:
        self._storage = storage
        self.command = command
        self.lock = Lock(storage, WRITER, command).acquire()
        self.collection_at_start: str | None = None
        """Id of the collection that had set chunks aside when this session began: reused
        chunks must then be re-checked before the manifest is written."""
        self.renewals = 0
        try:
            self._load_collection()
        except BaseException as e:
            self.lock.release_after(e)
            raise

    def _load_collection(self) -> None:
        pending = collection.load(self._storage)
        self.collection_at_start = pending.id if pending else None

    @property
    def id(self) -> str:
        return self.lock.session

    def confirm(self) -> bool:
        """Whether the lease has held without a gap up to now (a heartbeat is made first)."""
        return self.lock.confirm()

    def lapse(self) -> str:
        return self.lock.lapse()

    def renew(self) -> None:
        """Register again under a new session, after the lease was lost."""
        old = self.lock
        self.lock = Lock(self._storage, WRITER, self.command).acquire()
        self.renewals += 1
        old.release_after(None if old.lost is None else LeaseLost(old.lost))
        self._load_collection()

    def close(self, exc: BaseException | None) -> None:
        self.lock.release_after(exc)


def chunk_key(cid: bytes, prefix: str = CHUNK_PREFIX) -> str:
    h = cid.hex()
    return f"{prefix}{h[:2]}/{h}"


def parse_chunk_key(key: str) -> bytes | None:
    """The id in `chunks/hh/<id>` or `fossils/hh/<id>`; None for anything else."""
    name = key.rsplit("/", 1)[-1]
    if len(name) != 2 * ID_LEN:
        return None
    try:
        return bytes.fromhex(name)
    except ValueError:
        return None


class Repository:
    def __init__(self, storage: Storage, config: RepoConfig, keys: Keys | None) -> None:
        self.storage = storage
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
        if storage.stat(CONFIG_KEY) is not None:
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
            storage.put(KEY_KEY, encode_keyfile(keyfile))
            mac = keys.mac(cfg.signed_part())
        # The config goes last: a repository without one was never finished and can be re-made.
        storage.flush()
        storage.put(CONFIG_KEY, encode_config(cfg, mac))
        storage.flush()
        return cls(storage, cfg, keys)

    @classmethod
    def open(cls, storage: Storage, passphrase: PassphraseSource | None = None) -> Repository:
        try:
            cfg, mac = decode_config(storage.get(CONFIG_KEY))
        except ObjectNotFound:
            raise NotFound(f"no snapship repository at {storage.describe()}") from None
        if not cfg.encrypted:
            _check_no_key_file(storage)
            return cls(storage, cfg, None)
        if passphrase is None:
            raise AuthFailed("this repository is encrypted: a passphrase is needed")
        try:
            keyfile = decode_keyfile(storage.get(KEY_KEY))
        except ObjectNotFound:
            raise Corrupt(f"repository key file {KEY_KEY} is missing") from None
        params = ScryptParams(keyfile.n, keyfile.r, keyfile.p, keyfile.salt)
        kek = crypto.derive_kek(passphrase(), params)
        keys = Keys(crypto.unwrap(kek, keyfile.nonce, keyfile.wrapped, _key_aad(cfg.repo_id)))
        if mac != keys.mac(cfg.signed_part()):
            raise Corrupt("repository config was altered (its MAC does not match)")
        return cls(storage, cfg, keys)

    # -- chunks ---------------------------------------------------------------------------

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        return crypto.chunk_id(data, self._id_key)

    chunk_key = staticmethod(chunk_key)

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
        return self.storage.stat(self.chunk_key(cid))

    def put_chunk(self, cid: bytes, blob: bytes | bytearray) -> int:
        """Store a sealed chunk; returns the size of what is stored under its name (the
        copy gc had set aside, when a server insists on that one)."""
        try:
            self.storage.put(self.chunk_key(cid), blob)
            return len(blob)
        except SetAside:
            # gc set aside a copy with other bytes (sealed by an older snapship, or forged):
            # bring that copy back as it is, once the key confirms it is this chunk.
            try:
                held = self.storage.get(chunk_key(cid, FOSSIL_PREFIX))
            except ObjectNotFound:
                held = b""  # settled meanwhile: our own bytes go in
            if held:
                try:
                    self.open_chunk(cid, held)
                except Corrupt as e:
                    raise Corrupt(f"chunk {cid.hex()} cannot be stored: the copy gc set aside "
                                  f"is not it ({e}); an administrator's gc settles it") from None
            self.storage.put(self.chunk_key(cid), held or blob)
            return len(held or blob)

    def get_chunk(self, cid: bytes) -> bytes:
        return self.open_chunk(cid, self.get_chunk_blob(cid))

    def get_chunk_blob(self, cid: bytes) -> bytes:
        """The stored object; a chunk that a collection set aside is read from its fossil
        (a version written beside that collection may use it until gc puts it back)."""
        try:
            return self.storage.get(self.chunk_key(cid))
        except ObjectNotFound:
            try:
                return self.storage.get(chunk_key(cid, FOSSIL_PREFIX))
            except ObjectNotFound:
                raise ObjectNotFound(self.chunk_key(cid)) from None

    def list_chunks(self) -> dict[bytes, int]:
        """Every stored chunk id with its stored size, fossils included."""
        out: dict[bytes, int] = {}
        for prefix in (FOSSIL_PREFIX, CHUNK_PREFIX):
            for key, size in self.storage.list(prefix):
                cid = parse_chunk_key(key)
                if cid is not None:
                    out[cid] = size
        return out

    # -- writers --------------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self, command: str) -> Iterator[WriterSession]:
        """Register a backup for its whole life: enter before loading its base version."""
        session = WriterSession(self.storage, command)
        try:
            yield session
        except BaseException as e:
            session.close(e)
            raise
        session.close(None)

    # -- manifests ------------------------------------------------------------------------

    manifest_key = staticmethod(catalog.manifest_key)

    def save_manifest(self, m: Manifest, session: WriterSession) -> None:
        """The reference list, a flush (now every chunk and the list are durable), the
        manifest, a flush: a durable version always has durable chunks and references.
        The caller has confirmed the session's lease just before (engine/backup.py)."""
        if not session.lock.lease_intact():
            raise LeaseLost(f"{session.command}: {session.lapse()}; the version was not "
                            "written")
        self.put_refs(m, session)
        key = self.manifest_key(m.volume, m.version)
        blob = envelope.seal(KIND_MANIFEST, key.encode(), manifest_codec.encode(m), self._aead)
        self.storage.flush()
        self.storage.put(key, blob)
        self.storage.flush()

    def put_refs(self, m: Manifest, session: WriterSession) -> None:
        self.storage.put(catalog.refs_key(m.volume, m.version),
                         catalog.seal_refs(refs_codec.from_manifest(m, session.id)))

    def has_refs(self, m: Manifest) -> bool:
        return self.storage.stat(catalog.refs_key(m.volume, m.version)) is not None

    def load_manifest(self, volume: str, version: str) -> Manifest:
        key = self.manifest_key(volume, version)
        try:
            blob = self.storage.get(key)
        except ObjectNotFound:
            raise NotFound(f"volume {volume} has no version {version}") from None
        what = f"manifest of {volume}@{version}"
        body = envelope.open_sealed(KIND_MANIFEST, key.encode(), blob, self._aead, _MAX_MANIFEST,
                                    what, lambda peek: manifest_codec.plaintext_size(peek, what))
        m = manifest_codec.decode(body, what)
        if (m.volume, m.version) != (volume, version):
            raise Corrupt(f"{what} names itself {m.volume}@{m.version}")
        if m.chunk_size != self.chunk_size:
            raise Corrupt(f"{what} has chunk size {m.chunk_size}, repository {self.chunk_size}")
        return m

    def list_versions(self, volume: str | None = None) -> list[tuple[str, str]]:
        """(volume, version) pairs, sorted by volume then age, without reading manifests."""
        return catalog.list_versions(self.storage, volume)

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
        """Turn `volume@version` into an existing version; accepts a unique id prefix."""
        return catalog.resolve(self.storage, ref)


def _check_no_key_file(storage: Storage) -> None:
    """An unencrypted repository never has a key file (`create` writes none): one beside a
    config that says "none" means the config was altered to switch encryption off."""
    if storage.stat(KEY_KEY) is not None:
        raise Corrupt(f"repository config was altered: it says the repository is not encrypted, "
                      f"but its key file {KEY_KEY} exists; refusing to read or write it as "
                      "unencrypted")


def _key_aad(repo_id: str) -> bytes:
    return b"snapship key v1 " + repo_id.encode()
