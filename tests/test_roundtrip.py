"""Engine round trips: every version of random sparse images restores byte-identical."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapship.changes.ranges import coalesce, touched_chunks
from snapship.devices import Source
from snapship.engine.backup import run_backup
from snapship.engine.restore import run_restore
from snapship.engine.verify import run_verify
from snapship.errors import UsageError
from snapship.repository.repo import Repository, new_version_id
from snapship.storage.memory import MemoryStorage
from snapship.types import ZERO_ID, ByteRange, VersionRef
from tests.conftest import CHUNK, make_repo, write_sparse_image

ODD_SIZES = [0, 1, 4095, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 12345, 17 * CHUNK]


def backup_file(repo: Repository, path: Path, volume: str = "disk",
                changed: list[ByteRange] | None = None) -> str:
    """A backup on top of the newest version: of everything, or of `changed` only."""
    with Source(str(path)) as src:
        return run_backup(repo, src, volume, changed=changed, workers=2).version


def restored(repo: Repository, volume: str, version: str, target: Path) -> bytes:
    run_restore(repo, repo.load_manifest(volume, version), str(target), workers=2)
    return target.read_bytes()


@pytest.mark.parametrize("size", ODD_SIZES)
def test_every_version_restores_byte_identical(local_repo: Repository, tmp_path: Path,
                                               size: int) -> None:
    rng = random.Random(size)
    images = []
    versions = []
    for day in range(3):
        path = tmp_path / f"day{day}.img"
        images.append(write_sparse_image(path, size + day * 1000 * (size % 2), rng))
        versions.append(backup_file(local_repo, path))
    reopened = Repository.open(local_repo.storage, lambda: b"test passphrase")
    for day, version in enumerate(versions):
        assert restored(reopened, "disk", version, tmp_path / f"out{day}") == images[day]
    assert run_verify(reopened.catalog, reopened, deep=True).ok


def test_restore_makes_holes_and_overwrites_existing_file(local_repo: Repository,
                                                         tmp_path: Path) -> None:
    img = tmp_path / "img"
    data = write_sparse_image(img, 40 * CHUNK, random.Random(1))
    version = backup_file(local_repo, img)
    target = tmp_path / "target"
    target.write_bytes(b"\xff" * (50 * CHUNK))  # longer, and non-zero where the image has holes
    assert restored(local_repo, "disk", version, target) == data
    m = local_repo.load_manifest("disk", version)
    zero_chunks = sum(1 for i in range(m.count) if m.chunk(i) == ZERO_ID)
    assert zero_chunks > 3
    allocated = target.stat().st_blocks * 512
    assert allocated <= (m.count - zero_chunks + 1) * CHUNK  # file systems may round up


def test_dedup_stores_identical_chunks_once_across_volumes(local_repo: Repository,
                                                          tmp_path: Path) -> None:
    block = random.Random(2).randbytes(CHUNK)
    img = tmp_path / "img"
    img.write_bytes(block * 10 + bytes(CHUNK) * 5 + block)
    backup_file(local_repo, img, "a")
    backup_file(local_repo, img, "b")
    assert len(local_repo.catalog.stored_chunks()) == 1
    m = local_repo.load_manifest(*local_repo.list_versions("b")[0])
    assert m.stats["chunks_new"] == 0 and m.stats["chunks_existing"] == 1


def apply_changes(data: bytearray, ranges: list[ByteRange], rng: random.Random) -> None:
    for r in ranges:
        if rng.random() < 0.3:
            data[r.start : r.end] = bytes(r.length)
        else:
            data[r.start : r.end] = rng.randbytes(r.length)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.integers(1, 12 * CHUNK),
    spans=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 3 * CHUNK)), max_size=6),
    seed=st.integers(0, 2**32),
)
def test_incremental_from_changed_ranges_equals_full_backup(
    tmp_path: Path, size: int, spans: list[tuple[float, int]], seed: int
) -> None:
    rng = random.Random(seed)
    repo = make_repo(MemoryStorage(), "aes-256-gcm")
    img = tmp_path / "inc.img"
    data = bytearray(write_sparse_image(img, size, rng))
    repo.load_manifest("disk", backup_file(repo, img))
    ranges = [ByteRange(s, min(size, s + n)) for f, n in spans for s in [int(f * (size - 1))]]
    apply_changes(data, ranges, rng)
    img.write_bytes(data)
    inc = repo.load_manifest("disk", backup_file(repo, img, changed=ranges))
    touched = touched_chunks(ranges, CHUNK, size)
    assert inc.stats["mode"] == "incremental"
    assert inc.stats["chunks_read"] == len(touched)
    assert inc.stats["bytes_read"] == sum(min(CHUNK, size - i * CHUNK) for i in touched)
    full = repo.load_manifest("disk", backup_file(repo, img))
    assert inc.ids == full.ids and inc.sizes == full.sizes
    assert restored(repo, "disk", inc.version, tmp_path / "inc.out") == bytes(data)


def test_incremental_with_no_changes_reads_nothing(tmp_path: Path) -> None:
    repo = make_repo(MemoryStorage(), "none")
    img = tmp_path / "img"
    write_sparse_image(img, 9 * CHUNK + 5, random.Random(3))
    base = repo.load_manifest("disk", backup_file(repo, img))
    inc = repo.load_manifest("disk", backup_file(repo, img, changed=[]))
    assert inc.stats["chunks_read"] == 0 and inc.stats["bytes_read"] == 0
    assert inc.ids == base.ids and inc.parent == base.version


@pytest.mark.parametrize("new_size", [3 * CHUNK, 7 * CHUNK + 1, 12 * CHUNK + 99])
def test_incremental_after_resize_rereads_the_tail(tmp_path: Path, new_size: int) -> None:
    repo = make_repo(MemoryStorage(), "none")
    img = tmp_path / "img"
    write_sparse_image(img, 7 * CHUNK + 100, random.Random(4))
    repo.load_manifest("disk", backup_file(repo, img))
    data = bytearray(img.read_bytes()[:new_size].ljust(new_size, b"\x07"))
    img.write_bytes(data)
    inc = backup_file(repo, img, changed=[])
    assert restored(repo, "disk", inc, tmp_path / "out") == bytes(data)


def test_change_set_beyond_the_volume_is_refused(tmp_path: Path) -> None:
    repo = make_repo(MemoryStorage(), "none")
    img = tmp_path / "img"
    img.write_bytes(b"x" * CHUNK)
    with pytest.raises(UsageError, match="needs an earlier version"):
        backup_file(repo, img, changed=[])
    backup_file(repo, img)
    with pytest.raises(UsageError, match="beyond the volume"):
        backup_file(repo, img, changed=[ByteRange(0, CHUNK + 1)])


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**5))))
def test_coalesce_covers_exactly_the_same_bytes(pairs: list[tuple[int, int]]) -> None:
    ranges = [ByteRange(s, s + n) for s, n in pairs]
    merged = coalesce(ranges)
    covered = {b for r in ranges for b in range(r.start, r.end)} if sum(
        n for _, n in pairs) < 200_000 else None
    for a, b in itertools.pairwise(merged):
        assert a.end < b.start
    if covered is not None:
        assert covered == {b for r in merged for b in range(r.start, r.end)}


def test_resolve_latest_prefix_and_unknown(tmp_path: Path) -> None:
    repo = make_repo(MemoryStorage(), "none")
    img = tmp_path / "img"
    img.write_bytes(b"a" * 100)
    v1 = backup_file(repo, img)
    v2 = backup_file(repo, img)
    assert repo.resolve(VersionRef("disk")) == ("disk", v2)
    assert repo.resolve(VersionRef("disk", "latest")) == ("disk", v2)
    assert repo.resolve(VersionRef("disk", v1)) == ("disk", v1)
    assert repo.resolve(VersionRef("disk", v1[:-2])) == ("disk", v1)
    with pytest.raises(Exception, match="no version"):
        repo.resolve(VersionRef("disk", "nope"))
    with pytest.raises(Exception, match="no versions"):
        repo.resolve(VersionRef("other"))


def test_version_ids_sort_after_the_previous_one_even_within_a_millisecond() -> None:
    ids = [new_version_id()]
    for _ in range(200):
        ids.append(new_version_id(ids[-1]))
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
