"""The catalog scales: `versions` and `show` read one small summary per version, never whole
manifests (docs/format.md, "Version summary").

The repository: 1,000 versions of a 1 TiB sparse volume at 1 MiB chunks, each with a real
manifest of 1,048,576 zero chunks (36 MiB of plaintext; its zstd frame is built directly from
RLE blocks so the fixture takes seconds, not the minutes compressing 36 GB would take).
"""

from __future__ import annotations

import datetime as dt
import json
import struct
import subprocess
import time
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapship import crypto
from snapship.cli import main as cli_main
from snapship.formats import summary as summary_codec
from snapship.formats.constants import (
    FLAG_ENCRYPTED,
    FLAG_ZSTD,
    KIND_MANIFEST,
    MANIFEST_MAGIC,
    MANIFEST_VERSION,
    OBJECT_MAGIC,
    OBJECT_VERSION,
)
from snapship.formats.manifest import Manifest
from snapship.formats.refs import Refs
from snapship.repository.repo import Repository
from snapship.storage.local import LocalStorage
from tests.clihelp import CLI, PASSPHRASE, cli_env, init_repo_fast_kdf

VERSIONS = 1000
TIB = 1 << 40
CHUNK = 1 << 20
COUNT = TIB // CHUNK
RLE_MAX = 128 << 10


def zstd_frame_of(prefix: bytes, zeros: int) -> bytes:
    """A zstd frame of `prefix` followed by `zeros` zero bytes: a raw block, then RLE blocks
    (RFC 8878), with the content size declared as readers require."""
    total = len(prefix) + zeros
    out = [struct.pack("<IBB", 0xFD2FB528, 0xC0, 10 << 3), struct.pack("<Q", total)]
    blocks: list[tuple[int, int, bytes]] = [(0, len(prefix), prefix)]  # (type, size, content)
    while zeros:
        n = min(zeros, RLE_MAX)
        blocks.append((1, n, b"\0"))
        zeros -= n
    for i, (kind, size, content) in enumerate(blocks):
        header = (size << 3) | (kind << 1) | (i == len(blocks) - 1)
        out += [header.to_bytes(3, "little"), content]
    return b"".join(out)


def put_zero_version(repo: Repository, volume: str, version: str, parent: str | None,
                     ids: bytes, sizes: array[int], summary: bool) -> None:  # fmt: skip
    """A version of a 1 TiB volume with no data, as a backup stores it (reference list,
    manifest, summary), sealed with the repository's key."""
    header = {"volume": volume, "version": version, "size": TIB, "chunk_size": CHUNK,
              "created": f"{version[:4]}-{version[4:6]}-{version[6:8]}T{version[9:11]}:"
                         f"{version[11:13]}:{version[13:19]}Z",
              "source": "/dev/vg0/big", "parent": parent, "labels": {"host": "db1"},
              "stats": {"mode": "incremental", "bytes_new_stored": 0, "duration": 1.5}}
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    prefix = (struct.pack("<4sHHI", MANIFEST_MAGIC, MANIFEST_VERSION, 0, len(head)) + head
              + struct.pack("<Q", COUNT))
    frame = zstd_frame_of(prefix, 36 * COUNT)
    name = repo.catalog.manifest_name(volume, version)
    env = struct.pack("<4sBBBB", OBJECT_MAGIC, OBJECT_VERSION, KIND_MANIFEST,
                      FLAG_ZSTD | FLAG_ENCRYPTED, 0)
    assert repo.keys is not None
    blob = crypto.encrypt_after(env, repo.keys.aead, frame, env + name)
    repo.catalog.put_refs(Refs(volume, version, "synthetic", b"", array("I")))
    repo.catalog.put_manifest_blob(volume, version, blob)
    if summary:
        m = Manifest(volume, version, TIB, CHUNK, str(header["created"]), "/dev/vg0/big",
                     parent, ids, sizes, {"host": "db1"}, {"mode": "incremental",
                                                           "bytes_new_stored": 0, "duration": 1.5})
        repo.put_summary(summary_codec.from_manifest(m, (0, 0), len(blob)))


class UnsyncedStorage(LocalStorage):
    """Puts without fsync: the fixture writes 3,000 objects, durability is no concern."""

    def put(self, key: str, data: bytes | bytearray) -> None:
        path = Path(self.root) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def flush(self) -> None:
        pass


@pytest.fixture(scope="module")
def big_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    path = tmp_path_factory.mktemp("scale") / "repo"
    init_repo_fast_kdf(path, chunk_size=CHUNK)
    repo = Repository.open(UnsyncedStorage(str(path)), lambda: PASSPHRASE.encode())
    ids, sizes = bytes(32 * COUNT), array("I", bytes(4 * COUNT))
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    versions: list[str] = []
    for i in range(VERSIONS):
        t = start + dt.timedelta(hours=i)
        version = f"{t:%Y%m%d-%H%M%S}.000-{i:04x}"
        put_zero_version(repo, "big", version, versions[-1] if versions else None, ids, sizes,
                         summary=True)
        versions.append(version)
    yield path, versions


def _versions_json(repo: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.monotonic()
    r = subprocess.run([*CLI, "versions", "--repo", str(repo), "--json"], env=cli_env(),
                       capture_output=True, text=True, timeout=300, check=False)
    return time.monotonic() - start, r


def test_a_synthetic_version_is_a_real_one(big_repo: tuple[Path, list[str]]) -> None:
    path, versions = big_repo
    repo = Repository.open(LocalStorage(str(path)), lambda: PASSPHRASE.encode())
    m = repo.load_manifest("big", versions[-1])  # the slow way, once
    assert (m.size, m.count, m.sizes.count(0)) == (TIB, COUNT, COUNT)
    assert repo.load_summary("big", versions[-1]) == summary_codec.from_manifest(
        m, None, repo.catalog.manifest_size("big", versions[-1]) or 0)


def test_versions_of_a_thousand_1tib_versions_takes_under_2_s(
        big_repo: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Timed in-process: the command from opening the repository to its last line."""
    path, versions = big_repo
    for key, value in cli_env().items():
        monkeypatch.setenv(key, value)
    cli_main.main(["--repo", str(path), "locks"])  # the modules imported, the cache warm
    capsys.readouterr()
    start, cpu = time.monotonic(), time.process_time()
    assert cli_main.main(["--repo", str(path), "versions", "--json"]) == 0
    elapsed, cpu = time.monotonic() - start, time.process_time() - cpu
    out = capsys.readouterr()
    assert out.err == "", out.err
    rows = json.loads(out.out)["versions"]
    assert [row["version_id"] for row in rows] == versions
    assert all(row["size"] == TIB and row["labels"] == {"host": "db1"} and
               row["unreadable"] is None for row in rows)
    # CPU time: what the command costs, whatever else runs on the machine (the wall time is
    # printed; the figures in the report come from bench/catalog.py).
    print(f"versions of {VERSIONS} x 1 TiB: {elapsed:.2f} s wall, {cpu:.2f} s CPU")
    assert cpu < 2.0, f"versions of {VERSIONS} versions took {cpu:.2f} s of CPU"


def test_versions_and_show_read_no_manifest(big_repo: tuple[Path, list[str]],
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path, versions = big_repo
    for key, value in cli_env().items():
        monkeypatch.setenv(key, value)

    def no_manifest(self: Repository, volume: str, version: str) -> Manifest:
        raise AssertionError(f"read the manifest of {volume}@{version}")

    monkeypatch.setattr(Repository, "load_manifest", no_manifest)
    assert cli_main.main(["--repo", str(path), "versions", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["versions"]) == VERSIONS
    assert cli_main.main(["--repo", str(path), "show", "big", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["version_id"], shown["chunks"], shown["zero_chunks"], shown["data_bytes"],
            shown["stored_bytes"]) == (versions[-1], COUNT, COUNT, 0, 0)


def test_versions_without_summaries_are_listed_from_their_manifests(
        big_repo: tuple[Path, list[str]], tmp_path: Path) -> None:
    path, versions = big_repo
    _, before = _versions_json(path)
    missing, forged = versions[10], versions[20]
    summaries = path / "summaries" / "big"
    saved = {v: (summaries / v).read_bytes() for v in (missing, forged)}
    try:
        (summaries / missing).unlink()  # an old version, or a backup killed before it
        # Another version's summary moved here: authentic, but not this version's.
        (summaries / forged).write_bytes(saved[missing])
        _, r = _versions_json(path)
    finally:
        for v, blob in saved.items():
            (summaries / v).write_bytes(blob)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads(before.stdout)
    lines = r.stderr.splitlines()
    assert len(lines) == 2, r.stderr
    assert f"summary of big@{forged} is damaged" in lines[0], lines
    assert "2 version(s) have no readable summary" in lines[1], lines


def test_a_replaced_manifest_is_listed_as_unreadable(big_repo: tuple[Path, list[str]]) -> None:
    path, versions = big_repo
    manifest = path / "versions" / "big" / versions[5]
    saved = manifest.read_bytes()
    try:
        manifest.write_bytes(saved[:-100])  # its summary is intact; its size says otherwise
        _, r = _versions_json(path)
    finally:
        manifest.write_bytes(saved)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    row = json.loads(r.stdout)["versions"][5]
    assert row["size"] is None and f"manifest of big@{versions[5]}" in row["unreadable"], row
