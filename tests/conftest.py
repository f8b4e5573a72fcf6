"""Shared fixtures: repositories on memory and directory storage, with a cheap KDF."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings

from snapship.crypto import ScryptParams
from snapship.formats.constants import ENCRYPTION_AES_GCM, ENCRYPTION_NONE
from snapship.repository.repo import Repository
from snapship.storage.local import LocalStorage
from snapship.storage.memory import MemoryStorage
from tests.clihelp import use_state_dir

# Hypothesis' per-example deadline measures the machine's load, not the code: a shared 2-core
# box running qemu beside the suite made examples slow enough to fail. Examples still count.
settings.register_profile("snapship", deadline=None)
settings.load_profile("snapship")

def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The VM tests first: each boots a kernel under emulation for minutes, so in a parallel run
    (`make unit`) the host tests fill the other workers around them instead of the VM tests
    trailing at the end."""
    items.sort(key=lambda item: not item.nodeid.startswith("tests/vm/"))


@pytest.fixture(scope="session", autouse=True)
def _hermetic_state_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every CLI call of the session, and the test helpers, keep the known-repositories file
    in a temporary directory of the session, never in the real home."""
    use_state_dir(tmp_path_factory.mktemp("snapship-state"))


FAST_KDF = ScryptParams(n=1 << 10, r=8, p=1)
CHUNK = 64 * 1024

RepoFactory = Callable[..., Repository]


def make_repo(storage: LocalStorage | MemoryStorage, encryption: str, chunk_size: int = CHUNK
              ) -> Repository:
    return Repository.create(
        storage,
        encryption=encryption,
        chunk_size=chunk_size,
        passphrase=lambda: b"test passphrase",
        kdf=FAST_KDF,
    )


@pytest.fixture(params=[ENCRYPTION_AES_GCM, ENCRYPTION_NONE])
def encryption(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def local_repo(tmp_path: Path, encryption: str) -> Repository:
    return make_repo(LocalStorage(str(tmp_path / "repo")), encryption)


def write_sparse_image(path: Path, size: int, rng: random.Random, chunk: int = CHUNK) -> bytes:
    """A file of `size` bytes mixing holes, zero runs, random and repeated data; returns it."""
    data = bytearray(size)
    pos = 0
    pattern = rng.randbytes(chunk)
    while pos < size:
        n = min(size - pos, rng.choice([1, 100, 4096, chunk // 2, chunk, 3 * chunk + 7]))
        kind = rng.random()
        if kind < 0.35:
            pass  # zeroes
        elif kind < 0.7:
            data[pos : pos + n] = rng.randbytes(n)
        elif kind < 0.85:
            data[pos : pos + n] = (pattern * (n // chunk + 1))[:n]
        else:
            data[pos : pos + n] = bytes([rng.randrange(256)]) * n
        pos += n
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, chunk):
            piece = bytes(data[off : off + chunk])
            if piece.count(0) != len(piece):
                f.seek(off)
                f.write(piece)
    assert os.path.getsize(path) == size
    return bytes(data)
