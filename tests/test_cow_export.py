"""`cow export`: a store that, applied like a snapshot target over NEW, reads as OLD."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from snapship.changes.cow import parse_bytes
from snapship.devices import Source
from snapship.engine.backup import run_backup
from snapship.engine.cow_export import export_cow
from snapship.errors import UsageError
from snapship.formats.manifest import Manifest
from snapship.repository.repo import Repository
from snapship.storage.memory import MemoryStorage
from tests.conftest import CHUNK, make_repo


def snapshot_view(origin: bytes, store: bytes) -> bytes:
    """What a dm `snapshot` target shows: the origin, with excepted chunks from the store."""
    table = parse_bytes(store, origin_size=len(origin))
    c = table.header.chunk_size
    view = bytearray(origin)
    for old, new in table.exceptions:
        n = min(c, len(origin) - old * c)
        view[old * c : old * c + n] = store[new * c : new * c + n]
    return bytes(view)


def backup(repo: Repository, path: Path, data: bytes) -> Manifest:
    path.write_bytes(data)
    with Source(str(path)) as src:
        return run_backup(repo, src, "disk", workers=2)


@pytest.mark.parametrize("cow_chunk", [4096, 16384, CHUNK])
def test_exported_store_turns_new_into_old(tmp_path: Path, cow_chunk: int) -> None:
    rng = random.Random(cow_chunk)
    repo = make_repo(MemoryStorage(), "aes-256-gcm")
    size = 20 * CHUNK + 5000
    old_data = bytearray(rng.randbytes(size))
    old_data[3 * CHUNK : 6 * CHUNK] = bytes(3 * CHUNK)  # zero chunks on the old side
    new_data = bytearray(old_data)
    for _ in range(30):
        off, n = rng.randrange(size - 100), rng.randrange(1, 100)
        new_data[off : off + n] = b"\xaa" * n
    new_data[10 * CHUNK : 11 * CHUNK] = bytes(CHUNK)  # zero chunk on the new side
    new_data[-10:] = b"end-change"
    old = backup(repo, tmp_path / "img", bytes(old_data))
    new = backup(repo, tmp_path / "img", bytes(new_data))
    pieces: list[bytes] = []
    stats = export_cow(repo, new, old, pieces.append, cow_chunk)
    store = b"".join(pieces)
    assert stats.store_bytes == len(store) and stats.exceptions > 0
    assert snapshot_view(bytes(new_data), store) == bytes(old_data)
    assert parse_bytes(b"".join(_export(repo, old, old, cow_chunk))).exceptions == ()


def _export(repo: Repository, a: Manifest, b: Manifest, c: int) -> list[bytes]:
    out: list[bytes] = []
    export_cow(repo, a, b, out.append, c)
    return out


def test_export_refuses_other_sizes_and_bad_chunk_sizes(tmp_path: Path) -> None:
    repo = make_repo(MemoryStorage(), "none")
    a = backup(repo, tmp_path / "img", b"a" * CHUNK)
    b = backup(repo, tmp_path / "img", b"b" * (CHUNK + 1))
    with pytest.raises(UsageError, match="cannot show"):
        export_cow(repo, a, b, lambda _: None)
    for bad in [512, 3 * 4096, 2 * CHUNK]:
        with pytest.raises(UsageError, match="power of two"):
            export_cow(repo, a, a, lambda _: None, bad)
