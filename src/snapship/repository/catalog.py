"""`Catalog`: a repository without its key, the one object that knows where everything is.

Prune, gc, a keyless verify and a storage server work from this alone: the config, version
names, the unencrypted reference lists (`refs/`), the marker objects for protected and damaged
versions, the chunk and fossil store (set aside, put back, list), locks and gc's collection
state. Decrypting a manifest is never needed here; `Repository` (repo.py) is a catalog plus
the key. Key names come from `layout.py` and go no further up than this package.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

from snapship.errors import Corrupt, FormatError, NotFound, ObjectNotFound, UsageError
from snapship.formats import refs as refs_codec
from snapship.formats.config import RepoConfig, decode_config
from snapship.formats.constants import (
    CHECKSUM_LEN,
    KIND_CHUNK,
    KIND_MANIFEST,
    KIND_REFS,
    KIND_SUMMARY,
    MAX_MARKER_JSON,
    NONCE_LEN,
    OBJECT_HEADER_LEN,
    TAG_LEN,
)
from snapship.formats.json_bounded import load_object
from snapship.formats.refs import Refs
from snapship.repository import collection, locks, selection
from snapship.repository import layout as L
from snapship.repository.collection import Collection
from snapship.repository.session import WriterSession
from snapship.storage.base import Storage
from snapship.types import VersionRef

# The envelope and crypto modules (zstandard, cryptography, BLAKE3: about 17 ms of start-up)
# are imported where an object's envelope is read or sealed: `locks` and `prune` never do.


@dataclass(frozen=True)
class DamageMark:
    chunks: list[str]
    deep: bool
    """Whether a deep verify found it: only a complete deep verify may clear such a mark."""


def seal_refs(r: Refs) -> bytes | bytearray:
    from snapship.formats import envelope

    key = L.refs_key(r.volume, r.version)
    return envelope.seal(KIND_REFS, key.encode(), refs_codec.encode(r), None, 0)


def open_refs(volume: str, version: str, blob: bytes) -> Refs:
    """Decode a stored reference list of `volume@version`: `Corrupt` unless it is whole and
    names itself (decompression bounded by its own header, docs/format.md)."""
    from snapship.formats import envelope

    key = L.refs_key(volume, version)
    what = f"reference list of {volume}@{version}"
    body = envelope.open_sealed(KIND_REFS, key.encode(), blob, None,
                                refs_codec.max_plaintext(len(blob)), what,
                                lambda peek: refs_codec.plaintext_size(peek, what))
    r = refs_codec.decode(body, what)
    if (r.volume, r.version) != (volume, version):
        raise FormatError(f"{what} names itself {r.volume}@{r.version}")
    return r


def chunk_overhead(encrypted: bool) -> int:
    """Bytes a sealed chunk has beyond its payload."""
    return OBJECT_HEADER_LEN + (NONCE_LEN + TAG_LEN if encrypted else CHECKSUM_LEN)


class Catalog:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def describe(self) -> str:
        return self.storage.describe()

    def flush(self) -> None:
        self.storage.flush()

    # -- config and key file --------------------------------------------------------------

    def exists(self) -> bool:
        return self.storage.stat(L.CONFIG_KEY) is not None

    def config_and_mac(self) -> tuple[RepoConfig, bytes | None]:
        try:
            return decode_config(self.storage.get(L.CONFIG_KEY))
        except ObjectNotFound:
            raise NotFound(f"no snapship repository at {self.describe()}") from None

    def config(self) -> RepoConfig:
        """The repository's config (`NotFound` if there is no repository here)."""
        return self.config_and_mac()[0]

    def key_ids(self) -> list[str]:
        """The ids of every key file (`keys/<id>`, and a version-1 `keys/repokey`), sorted."""
        return sorted(n.key_id for n in (L.name_of(k) for k, _ in self.storage.list(L.KEY_PREFIX))
                      if n.kind is L.Kind.KEY_FILE and n.key_id is not None)

    def has_key_file(self) -> bool:
        return bool(self.key_ids())

    def key_file(self, key_id: str) -> bytes:
        key = L.key_file_key(key_id)
        try:
            return self.storage.get(key)
        except ObjectNotFound:
            raise NotFound(f"repository key file {key} is missing") from None

    def put_key_file(self, key_id: str, data: bytes) -> None:
        self.storage.put(L.key_file_key(key_id), data)

    def delete_key_file(self, key_id: str) -> None:
        self.storage.delete(L.key_file_key(key_id))

    @staticmethod
    def key_file_name(key_id: str) -> str:
        """The key file's object name, for messages (and what a v2 key file's AAD binds)."""
        return L.key_file_key(key_id)

    def put_config(self, data: bytes) -> None:
        self.storage.put(L.CONFIG_KEY, data)

    @staticmethod
    def left_by_init(top_level_name: str) -> bool:
        """Whether a top-level name (a directory entry) is one an unfinished `init` leaves."""
        return top_level_name in (L.CONFIG_KEY, L.KEY_KEY.split("/", 1)[0])

    def foreign_keys(self, limit: int = 1000) -> list[str]:
        """Up to `limit` keys under this location that are no part of a repository (nor of
        an unfinished `init`, which leaves the key file): what `init` must not mix with."""
        out = []
        for key, _size in self.storage.list(""):
            if L.name_of(key).kind not in (L.Kind.KEY_FILE, L.Kind.CONFIG):
                out.append(key)
                if len(out) >= limit:
                    break
        return out

    # -- versions -------------------------------------------------------------------------

    def _pairs(self, prefix: str, volume: str | None) -> list[tuple[str, str]]:
        out = []
        for key, _size in self.storage.list(L.volume_prefix(prefix, volume)):
            parts = key[len(prefix) :].split("/")
            if len(parts) == 2:
                out.append((parts[0], parts[1]))
        return sorted(out)

    def versions(self, volume: str | None = None) -> list[tuple[str, str]]:
        """(volume, version) pairs, sorted by volume then age."""
        return self._pairs(L.VERSION_PREFIX, volume)

    def manifest_sizes(self, volume: str | None = None) -> dict[tuple[str, str], int]:
        """The stored size of each version's manifest, from one listing, sorted as
        `versions`."""
        out = {}
        for key, size in self.storage.list(L.volume_prefix(L.VERSION_PREFIX, volume)):
            parts = key[len(L.VERSION_PREFIX) :].split("/")
            if len(parts) == 2:
                out[(parts[0], parts[1])] = size
        return dict(sorted(out.items()))

    def resolve(self, ref: VersionRef) -> tuple[str, str]:
        """Turn `volume@version` into an existing version: an id, a unique prefix, `latest`,
        `latest~N` or a local date/time (the rules are in selection.py)."""
        return ref.volume, selection.select(ref.volume, [v for _, v in self.versions(ref.volume)],
                                            ref.version)

    def manifest_name(self, volume: str, version: str) -> bytes:
        """What a manifest's envelope authenticates as its name."""
        return L.manifest_key(volume, version).encode()

    def manifest_blob(self, volume: str, version: str) -> bytes:
        try:
            return self.storage.get(L.manifest_key(volume, version))
        except ObjectNotFound:
            raise NotFound(f"volume {volume} has no version {version}") from None

    def manifest_size(self, volume: str, version: str) -> int | None:
        """The manifest's stored size; None if the version does not exist."""
        return self.storage.stat(L.manifest_key(volume, version))

    def has_manifest(self, volume: str, version: str) -> bool:
        return self.storage.stat(L.manifest_key(volume, version)) is not None

    def put_manifest_blob(self, volume: str, version: str, blob: bytes | bytearray) -> None:
        self.storage.put(L.manifest_key(volume, version), blob)

    def delete_version(self, volume: str, version: str) -> None:
        """The manifest first: a crash in between leaves a reference list without a version,
        which only keeps chunks alive until gc drops it, never a version without one. A
        summary left behind is never read: listings go by manifests."""
        self.storage.delete(L.manifest_key(volume, version))
        self.storage.flush()
        self.storage.delete(L.refs_key(volume, version))
        self.storage.delete(L.summary_key(volume, version))
        self.storage.delete(L.damaged_key(volume, version))

    # -- version summaries ----------------------------------------------------------------

    def summary_name(self, volume: str, version: str) -> bytes:
        """What a summary's envelope authenticates as its name."""
        return L.summary_key(volume, version).encode()

    def summary_blob(self, volume: str, version: str) -> bytes:
        """The stored summary (`ObjectNotFound` if the version has none)."""
        return self.storage.get(L.summary_key(volume, version))

    def put_summary_blob(self, volume: str, version: str, blob: bytes | bytearray) -> None:
        self.storage.put(L.summary_key(volume, version), blob)

    def inspect_summary(self, blob: bytes, config: RepoConfig) -> str | None:
        """What is wrong with a summary's envelope as far as it shows without the key."""
        from snapship.formats import envelope

        return envelope.inspect(blob, KIND_SUMMARY, config.encrypted)

    # -- reference lists ------------------------------------------------------------------

    def refs_listed(self) -> list[tuple[str, str]]:
        return self._pairs(L.REFS_PREFIX, None)

    def load_refs(self, volume: str, version: str) -> Refs:
        """The reference list; `ObjectNotFound` if there is none, `Corrupt` if damaged."""
        return open_refs(volume, version, self.storage.get(L.refs_key(volume, version)))

    def put_refs(self, r: Refs) -> None:
        self.storage.put(L.refs_key(r.volume, r.version), seal_refs(r))

    def has_refs(self, volume: str, version: str) -> bool:
        return self.storage.stat(L.refs_key(volume, version)) is not None

    def delete_refs(self, volume: str, version: str) -> None:
        self.storage.delete(L.refs_key(volume, version))

    # -- markers: protected and damaged versions ------------------------------------------

    def protected(self) -> set[tuple[str, str]]:
        return set(self._pairs(L.PROTECTED_PREFIX, None))

    def protection_note(self, volume: str, version: str) -> str | None:
        """The note of a protected version ("" for none); None if it is not protected."""
        key = L.protected_key(volume, version)
        try:
            d = load_object(self.storage.get(key), key, MAX_MARKER_JSON)
        except ObjectNotFound:
            return None
        except FormatError:
            return ""
        note = d.get("note", "")
        return note if isinstance(note, str) else ""

    def set_protected(self, volume: str, version: str, on: bool, note: str = "") -> None:
        key = L.protected_key(volume, version)
        if on:
            self.storage.put(key, json.dumps({"note": note}).encode())
            self.storage.flush()
        else:
            self.storage.delete(key)

    def damaged(self) -> dict[tuple[str, str], DamageMark]:
        """Versions verify found damaged, with the chunk ids it named."""
        out = {}
        for vol, ver in self._pairs(L.DAMAGED_PREFIX, None):
            mark = self.damage_mark(vol, ver)
            if mark is not None:
                out[(vol, ver)] = mark
        return out

    def damage_mark(self, volume: str, version: str) -> DamageMark | None:
        """The damage verify found in `volume@version`; None if it is not marked."""
        key = L.damaged_key(volume, version)
        try:
            d = load_object(self.storage.get(key), key, MAX_MARKER_JSON)
            return DamageMark([str(c) for c in d["chunks"]], bool(d["deep"]))
        except ObjectNotFound:
            return None
        except (FormatError, KeyError, TypeError):
            # Unreadable: still damaged, by chunks unknown; only a deep verify clears it.
            return DamageMark([], True)

    def mark_damaged(self, volume: str, version: str, chunks: list[str] | None,
                     deep: bool = False) -> None:
        """Record (or, with None, clear) that verify found `volume@version` damaged."""
        key = L.damaged_key(volume, version)
        if chunks is None:
            self.storage.delete(key)
        else:
            self.storage.put(key, json.dumps({"chunks": sorted(chunks), "deep": deep}).encode())

    # -- chunks and fossils ---------------------------------------------------------------

    def chunk_size_of(self, cid: bytes) -> int | None:
        """The stored size of chunk `cid` under `chunks/` (None if it is not there)."""
        return self.storage.stat(L.chunk_key(cid))

    def chunk_sizes(self, cids: list[bytes]) -> dict[bytes, int | None]:
        """`chunk_size_of` for many chunks (one request per thousand where the backend can)."""
        by_key = {L.chunk_key(c): c for c in cids}
        return {by_key[k]: n for k, n in self.storage.stat_many(list(by_key)).items()}

    def put_chunk_blob(self, cid: bytes, blob: bytes | bytearray) -> None:
        self.storage.put(L.chunk_key(cid), blob)

    def chunk_blob(self, cid: bytes) -> bytes:
        """The stored chunk; a chunk that a collection set aside is read from its fossil (a
        version written beside that collection may use it until gc puts it back)."""
        try:
            return self.storage.get(L.chunk_key(cid))
        except ObjectNotFound:
            try:
                return self.storage.get(L.fossil_key(cid))
            except ObjectNotFound:
                raise ObjectNotFound(L.chunk_key(cid)) from None

    def live_chunk_blob(self, cid: bytes) -> bytes:
        """The object under `chunks/` only (`ObjectNotFound` if there is none)."""
        return self.storage.get(L.chunk_key(cid))

    def fossil_blob(self, cid: bytes) -> bytes:
        return self.storage.get(L.fossil_key(cid))

    def _ids(self, prefix: str) -> Iterator[tuple[bytes, int]]:
        for key, size in self.storage.list(prefix):
            cid = L.chunk_id_of(key)
            if cid is not None:
                yield cid, size

    def chunks(self) -> Iterator[tuple[bytes, int]]:
        """(id, stored size) of every chunk under `chunks/`."""
        return self._ids(L.CHUNK_PREFIX)

    def fossils(self) -> Iterator[tuple[bytes, int]]:
        """(id, stored size) of every chunk set aside."""
        return self._ids(L.FOSSIL_PREFIX)

    def stored_chunks(self) -> dict[bytes, int]:
        """Every stored chunk id with its stored size, fossils included."""
        out = dict(self.fossils())
        out.update(self.chunks())
        return out

    def condemn(self, cid: bytes) -> bool:
        """Set a chunk aside as a fossil; False if it was gone already."""
        try:
            self.storage.rename(L.chunk_key(cid), L.fossil_key(cid))
        except ObjectNotFound:
            return False
        return True

    def fossil_back(self, cid: bytes) -> None:
        """Rename the fossil back to `chunks/` (replacing what is there). A fossil already put
        back meanwhile (a snapship server does that for a backup's upload) is fine."""
        try:
            self.storage.rename(L.fossil_key(cid), L.chunk_key(cid))
        except ObjectNotFound:
            if self.storage.stat(L.chunk_key(cid)) is None:
                raise

    def delete_fossil(self, cid: bytes) -> None:
        self.storage.delete(L.fossil_key(cid))

    def inspect_chunk(self, cid: bytes, blob: bytes, config: RepoConfig) -> str | None:
        """What is wrong with a chunk object as far as it shows without the key (everything,
        in an unencrypted repository); None if nothing is."""
        from snapship import crypto
        from snapship.formats import envelope

        problem = envelope.inspect(blob, KIND_CHUNK, config.encrypted)
        overhead = chunk_overhead(config.encrypted)
        if problem is None and not overhead < len(blob) <= config.chunk_size + overhead:
            problem = (f"{len(blob)} bytes; a chunk object of this repository has "
                       f"{overhead + 1} to {config.chunk_size + overhead}")
        if problem is None and not config.encrypted:
            try:
                plain = envelope.open_sealed(KIND_CHUNK, cid, blob, None, config.chunk_size,
                                             "it")
                if crypto.chunk_id(plain, None) != cid:
                    problem = "its content does not match its id"
            except Corrupt as e:
                problem = str(e)
        return problem

    def inspect_manifest(self, blob: bytes, config: RepoConfig) -> str | None:
        """What is wrong with a manifest's envelope as far as it shows without the key."""
        from snapship.formats import envelope

        return envelope.inspect(blob, KIND_MANIFEST, config.encrypted)

    # -- locks and gc state ---------------------------------------------------------------

    def list_locks(self, kind: str | None = None,
                   warn: locks.Warn | None = None) -> list[locks.LockInfo]:
        return locks.list_locks(self.storage, kind, warn)

    def lock_info(self, kind: str, session: str) -> locks.LockInfo | None:
        """The lock of `session`, if it exists and is readable."""
        key = L.lock_key(kind, session)
        try:
            return locks.decode_lock(key, self.storage.get(key))
        except (ObjectNotFound, FormatError, UsageError):
            return None

    def clear_stale(self, found: list[locks.LockInfo], warn: locks.Warn
                    ) -> list[locks.LockInfo]:
        return locks.clear_stale(self.storage, found, warn)

    def exclusive(self, kind: str, command: str, warn: locks.Warn
                  ) -> contextlib.AbstractContextManager[locks.Lock]:
        return locks.exclusive(self.storage, kind, command, warn)

    def remove_old_tombstones(self) -> int:
        return locks.remove_old_tombstones(self.storage)

    @contextlib.contextmanager
    def writer(self, command: str) -> Iterator[WriterSession]:
        """Register a backup for its whole life (docs/gc.md, "Writers")."""
        session = WriterSession(self.storage, command)
        try:
            yield session
        except BaseException as e:
            session.close(e)
            raise
        session.close(None)

    def collection(self) -> Collection | None:
        return collection.load(self.storage)

    def save_collection(self, c: Collection) -> None:
        collection.save(self.storage, c)

    def finish_collection(self) -> None:
        collection.finish(self.storage)

    def remove_temporaries(self, older_than: float) -> int:
        return self.storage.remove_temporaries(older_than)
