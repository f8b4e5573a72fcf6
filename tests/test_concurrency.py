"""Backups running at the same time into one repository.

Two `snapship backup` processes are started together on images that share chunks at the
same offsets, so they race to store the same chunk objects. Both must succeed, the repository
must verify, every chunk must be stored exactly once under its id, and each version must
restore byte-identical — for two volumes and for two versions of the same volume.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.clihelp import (
    CHUNK,
    Args,
    assert_restores,
    assert_verify_ok,
    backup,
    check_every_chunk_file_decodes,
    chunk_files,
    image_bytes,
    init_repo,
    init_repo_fast_kdf,
    start_cli,
    version_ids,
    write_image,
)

SIZE = 32 << 20
CHUNKS = SIZE // CHUNK


def racing_images(seed: int) -> tuple[bytearray, bytearray]:
    """Two images that race for the same chunk objects.

    They are equal at every even chunk (same offsets: both reach them at about the same
    time), with zero chunks; and each repeats, near its end, odd chunks that the other has near
    its start (the other one gets there first, whichever of them is ahead)."""
    zeros = range(0, CHUNKS, 50)
    a = image_bytes(SIZE, seed, zero_chunks=zeros)
    b = image_bytes(SIZE, seed + 1, zero_chunks=zeros)

    def chunk(img: bytearray, i: int) -> bytearray:
        return img[i * CHUNK : (i + 1) * CHUNK]

    for i in range(0, CHUNKS, 2):
        b[i * CHUNK : (i + 1) * CHUNK] = chunk(a, i)
    for i in range(1, CHUNKS // 4, 4):
        j = CHUNKS - i
        b[j * CHUNK : (j + 1) * CHUNK] = chunk(a, i)
        a[(j - 2) * CHUNK : (j - 1) * CHUNK] = chunk(b, i + 2)
    return a, b


def distinct_nonzero_chunks(*images: bytes | bytearray) -> int:
    seen: set[bytes] = set()
    for img in images:
        for off in range(0, len(img), CHUNK):
            piece = bytes(img[off : off + CHUNK])
            if piece.count(0) != len(piece):
                seen.add(piece)
    return len(seen)


def run_together(*commands: Args) -> list[dict[str, object]]:
    """Start every backup command at once, wait for all; each must succeed."""
    procs: list[subprocess.Popen[str]] = [start_cli(*cmd) for cmd in commands]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"exit {proc.returncode}: {err}"
            # Each image is a file of its own: a backup may say its volume's source changed.
            assert all("was last backed up from" in line for line in err.splitlines()), err
            results.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.mark.parametrize("encryption", ["aes-256-gcm", "none"])
def test_concurrent_backups_of_two_volumes(tmp_path: Path, encryption: str) -> None:
    repo = tmp_path / "repo"
    if encryption == "none":
        init_repo_fast_kdf(repo, encryption)
    else:
        init_repo(repo, encryption)  # the default scrypt cost: both unlock it for ~0.3 s
    a, b = racing_images(seed=7)
    sha_a = write_image(tmp_path / "a.img", a)
    sha_b = write_image(tmp_path / "b.img", b)

    res_a, res_b = run_together(
        ["backup", "--repo", repo, tmp_path / "a.img", "--volume", "alpha", "--json"],
        ["backup", "--repo", repo, tmp_path / "b.img", "--volume", "beta", "--json"],
    )
    va, vb = str(res_a["version_id"]), str(res_b["version_id"])
    assert version_ids(repo) == [("alpha", va), ("beta", vb)]

    # Each distinct chunk is stored exactly once, whoever won the race for it.
    assert len(chunk_files(repo)) == distinct_nonzero_chunks(a, b)
    report = assert_verify_ok(repo, deep=True)
    assert report["versions"] == 2 and report["chunks"] == distinct_nonzero_chunks(a, b)
    check_every_chunk_file_decodes(repo)
    assert_restores(repo, f"alpha@{va}", tmp_path / "ra.img", sha_a)
    assert_restores(repo, f"beta@{vb}", tmp_path / "rb.img", sha_b)


def test_concurrent_backups_of_the_same_volume(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo_fast_kdf(repo, "none")
    base, _ = racing_images(seed=11)
    sha0 = write_image(tmp_path / "day0.img", base)
    v0 = backup(repo, tmp_path / "day0.img", "disk")
    a, b = racing_images(seed=21)
    sha_a = write_image(tmp_path / "a.img", a)
    sha_b = write_image(tmp_path / "b.img", b)

    res_a, res_b = run_together(
        ["backup", "--repo", repo, tmp_path / "a.img", "--volume", "disk", "--json"],
        ["backup", "--repo", repo, tmp_path / "b.img", "--volume", "disk", "--json"],
    )
    va, vb = str(res_a["version_id"]), str(res_b["version_id"])
    assert va != vb
    assert sorted(v for _, v in version_ids(repo, "disk")) == sorted([v0, va, vb])
    assert len(chunk_files(repo)) == distinct_nonzero_chunks(base, a, b)
    report = assert_verify_ok(repo, deep=True)
    assert report["versions"] == 3
    check_every_chunk_file_decodes(repo)
    assert_restores(repo, f"disk@{v0}", tmp_path / "r0.img", sha0)
    assert_restores(repo, f"disk@{va}", tmp_path / "ra.img", sha_a)
    assert_restores(repo, f"disk@{vb}", tmp_path / "rb.img", sha_b)
    # `latest` is whichever of the two sorts last; it must be one of them, intact.
    latest = max(va, vb)
    assert_restores(repo, "disk", tmp_path / "rl.img", sha_a if latest == va else sha_b)
