"""What versions exist and which chunks they reference, readable without the repository key.

Prune, gc and a storage server work from this alone: version keys, the unencrypted reference
lists (`refs/`), and the small marker objects for protected and damaged versions. Decrypting a
manifest is never needed here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from snapship.errors import FormatError, NotFound, ObjectNotFound, UsageError
from snapship.formats import envelope
from snapship.formats import refs as refs_codec
from snapship.formats.constants import (
    DAMAGED_PREFIX,
    KIND_REFS,
    MAX_MARKER_JSON,
    PROTECTED_PREFIX,
    REFS_PREFIX,
    VERSION_PREFIX,
)
from snapship.formats.json_bounded import load_object
from snapship.formats.manifest import check_name
from snapship.formats.refs import Refs
from snapship.storage.base import Storage
from snapship.types import VersionRef


def _key(prefix: str, volume: str, version: str) -> str:
    return f"{prefix}{check_name('volume', volume)}/{check_name('version', version)}"


def manifest_key(volume: str, version: str) -> str:
    return _key(VERSION_PREFIX, volume, version)


def refs_key(volume: str, version: str) -> str:
    return _key(REFS_PREFIX, volume, version)


def _pairs(storage: Storage, prefix: str, volume: str | None) -> list[tuple[str, str]]:
    full = prefix + (check_name("volume", volume) + "/" if volume else "")
    out = []
    for key, _size in storage.list(full):
        parts = key[len(prefix) :].split("/")
        if len(parts) == 2:
            out.append((parts[0], parts[1]))
    return sorted(out)


def list_versions(storage: Storage, volume: str | None = None) -> list[tuple[str, str]]:
    """(volume, version) pairs, sorted by volume then age."""
    return _pairs(storage, VERSION_PREFIX, volume)


def resolve(storage: Storage, ref: VersionRef) -> tuple[str, str]:
    """Turn `volume@version` into an existing version; accepts a unique id prefix."""
    versions = [v for _, v in list_versions(storage, ref.volume)]
    if not versions:
        raise NotFound(f"volume {ref.volume} has no versions in this repository")
    if ref.version in (None, "latest"):
        return ref.volume, versions[-1]
    assert ref.version is not None
    if ref.version in versions:
        return ref.volume, ref.version
    matches = [v for v in versions if v.startswith(ref.version)]
    if len(matches) == 1:
        return ref.volume, matches[0]
    if matches:
        raise UsageError(f"version {ref.version!r} of {ref.volume} is ambiguous")
    raise NotFound(f"volume {ref.volume} has no version {ref.version}")


def list_refs(storage: Storage) -> list[tuple[str, str]]:
    return _pairs(storage, REFS_PREFIX, None)


def seal_refs(r: Refs) -> bytes | bytearray:
    key = refs_key(r.volume, r.version)
    return envelope.seal(KIND_REFS, key.encode(), refs_codec.encode(r), None, 0)


def load_refs(storage: Storage, volume: str, version: str) -> Refs:
    """The reference list; `ObjectNotFound` if there is none, `Corrupt` if it is damaged."""
    key = refs_key(volume, version)
    what = f"reference list of {volume}@{version}"
    blob = storage.get(key)
    body = envelope.open_sealed(KIND_REFS, key.encode(), blob, None,
                                refs_codec.max_plaintext(len(blob)), what,
                                lambda peek: refs_codec.plaintext_size(peek, what))
    r = refs_codec.decode(body, what)
    if (r.volume, r.version) != (volume, version):
        raise FormatError(f"{what} names itself {r.volume}@{r.version}")
    return r


def delete_version(storage: Storage, volume: str, version: str) -> None:
    """The manifest first: a crash in between leaves a reference list without a version,
    which only keeps chunks alive until gc drops it, never a version without one."""
    storage.delete(manifest_key(volume, version))
    storage.flush()
    storage.delete(refs_key(volume, version))
    storage.delete(_key(DAMAGED_PREFIX, volume, version))


# -- markers: protected and damaged versions -------------------------------------------------


def protected(storage: Storage) -> set[tuple[str, str]]:
    return set(_pairs(storage, PROTECTED_PREFIX, None))


def set_protected(storage: Storage, volume: str, version: str, on: bool, note: str = "") -> None:
    key = _key(PROTECTED_PREFIX, volume, version)
    if on:
        storage.put(key, json.dumps({"note": note}).encode())
        storage.flush()
    else:
        storage.delete(key)


@dataclass(frozen=True)
class DamageMark:
    chunks: list[str]
    deep: bool
    """Whether a deep verify found it: only a complete deep verify may clear such a mark."""


def damaged(storage: Storage) -> dict[tuple[str, str], DamageMark]:
    """Versions verify found damaged, with the chunk ids it named."""
    out = {}
    for vol, ver in _pairs(storage, DAMAGED_PREFIX, None):
        key = _key(DAMAGED_PREFIX, vol, ver)
        try:
            d = load_object(storage.get(key), key, MAX_MARKER_JSON)
            out[(vol, ver)] = DamageMark([str(c) for c in d["chunks"]], bool(d["deep"]))
        except ObjectNotFound:
            continue
        except (FormatError, KeyError, TypeError):
            # Unreadable: still damaged, by chunks unknown, and only a deep verify may clear it.
            out[(vol, ver)] = DamageMark([], True)
    return out


def mark_damaged(storage: Storage, volume: str, version: str, chunks: list[str] | None,
                 deep: bool = False) -> None:
    """Record (or, with None, clear) that verify found `volume@version` damaged."""
    key = _key(DAMAGED_PREFIX, volume, version)
    if chunks is None:
        storage.delete(key)
    else:
        storage.put(key, json.dumps({"chunks": sorted(chunks), "deep": deep}).encode())
