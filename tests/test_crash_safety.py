"""A backup killed with SIGKILL at any moment leaves a valid repository.

Rounds of: change the image, start `snapship backup`, SIGKILL it after a seeded random delay
(or shortly after it starts storing chunks), then check the repository. Every version that
exists must restore byte-identical, `verify --deep` must pass, every chunk file (referenced or
left over by the killed run) must be complete, and the next backup must succeed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.clihelp import (
    CHUNK,
    assert_one_line_error,
    assert_restores,
    assert_verify_ok,
    backup,
    check_every_chunk_file_decodes,
    chunk_files,
    image_bytes,
    init_repo_fast_kdf,
    run_cli,
    start_cli,
    version_ids,
    write_image,
)

SEED = 20261126
IMAGE_SIZE = 64 << 20
CHUNKS = IMAGE_SIZE // CHUNK
ROUNDS = 6


def rewrite_chunks(data: bytearray, rng: random.Random, fraction: float) -> None:
    """Replace `fraction` of the chunks with new random data (new chunks for the backup)."""
    picked = rng.sample(range(CHUNKS), int(CHUNKS * fraction))
    fresh = rng.randbytes(len(picked) * CHUNK)
    for n, i in enumerate(picked):
        data[i * CHUNK : (i + 1) * CHUNK] = fresh[n * CHUNK : (n + 1) * CHUNK]


def wait_for_new_chunks(repo: Path, before: int, timeout: float = 20.0) -> bool:
    """Poll until the running backup has stored at least one new chunk."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(chunk_files(repo)) > before:
            return True
        time.sleep(0.005)
    return False


def test_sigkilled_backups_leave_the_repository_valid(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    repo = tmp_path / "repo"
    init_repo_fast_kdf(repo, "aes-256-gcm")
    img = tmp_path / "disk.img"
    # Mostly random data, some zero chunks, one chunk repeated: every kind of chunk.
    data = image_bytes(IMAGE_SIZE, seed=SEED, zero_chunks=range(0, CHUNKS, 29))
    data[CHUNK : 2 * CHUNK] = data[5 * CHUNK : 6 * CHUNK]
    sha = write_image(img, data)
    started = time.monotonic()
    expected: dict[str, str] = {backup(repo, img, "disk", "before=crashes"): sha}
    # How long a backup of new data takes here: kills are spread over that much time.
    run_time = time.monotonic() - started
    checked = check_every_chunk_file_decodes(repo)

    killed_mid_write = 0
    outcomes: list[str] = []
    for rnd in range(ROUNDS):
        rewrite_chunks(data, rng, 0.75)
        sha = write_image(img, data)
        chunks_before = {p.name for p in chunk_files(repo)}

        proc = start_cli("backup", "--repo", repo, img, "--volume", "disk", "--json")
        try:
            if rnd % 2 == 0:
                # Anywhere: startup, storing chunks, writing the manifest, exiting.
                delay = rng.uniform(0.05, 1.1 * run_time)
            else:
                assert wait_for_new_chunks(repo, len(chunks_before)), "backup stored nothing"
                delay = rng.uniform(0.0, 0.35 * run_time)  # while chunks are being stored
            time.sleep(delay)
        finally:
            proc.kill()
            out, err = proc.communicate(timeout=60)

        listed = version_ids(repo)
        assert {vol for vol, _ in listed} == {"disk"}
        assert set(expected) <= {v for _, v in listed}, "an earlier version disappeared"
        new_versions = [v for _, v in listed if v not in expected]
        assert len(new_versions) <= 1, new_versions
        if proc.returncode == 0:
            # It finished before the kill: its version is complete and listed.
            assert new_versions == [json.loads(out)["version_id"]], (out, err)
        else:
            assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
        if new_versions:
            expected[new_versions[0]] = sha
        new_chunks = {p.name for p in chunk_files(repo)} - chunks_before
        if proc.returncode != 0 and not new_versions and new_chunks:
            killed_mid_write += 1
        outcomes.append(
            f"round {rnd}: run time {run_time:.2f}s, delay {delay:.2f}s exit {proc.returncode} "
            f"+{len(new_chunks)} chunks +{len(new_versions)} version"
        )

        # The repository is valid after every kill, and nothing partial is visible in it.
        report = assert_verify_ok(repo, deep=True)
        assert report["versions"] == len(expected), outcomes
        checked = check_every_chunk_file_decodes(repo, skip=checked)

    # The run must really have exercised an interrupted backup, not only clean exits.
    assert killed_mid_write >= 1, outcomes

    # The next backup succeeds (on top of whatever the killed runs left behind).
    rewrite_chunks(data, rng, 0.25)
    sha = write_image(img, data)
    final = backup(repo, img, "disk", "after=crashes")
    expected[final] = sha
    assert [v for _, v in version_ids(repo, "disk")] == sorted(expected)
    assert_verify_ok(repo, deep=True)
    check_every_chunk_file_decodes(repo)  # all of them again, nothing skipped

    # Every version, the first and the final one included, restores byte-identical.
    target = tmp_path / "restored.img"
    for version, digest in expected.items():
        assert_restores(repo, f"disk@{version}", target, digest)


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_torn_leftover_chunk_is_not_trusted_by_the_next_backup(tmp_path: Path, damage: str) -> None:
    """After a power loss, a chunk renamed into place may exist with its data never written.

    SIGKILL cannot produce this (the page cache survives), a power loss can: LocalStorage
    renames chunk files without fsync and only syncs before writing the manifest, so an
    interrupted backup can leave unreferenced chunk files that are empty or short. The next
    backup must not build a version on them.
    """
    repo = tmp_path / "repo"
    init_repo_fast_kdf(repo, "none")
    img = tmp_path / "disk.img"
    sha = write_image(img, image_bytes(6 * CHUNK, seed=3))
    # The state a power loss mid-backup leaves: chunks under their names, no manifest.
    lost = backup(repo, img, "disk")
    (repo / "versions" / "disk" / lost).unlink()
    torn = chunk_files(repo)[2]
    os.truncate(torn, 0 if damage == "empty" else torn.stat().st_size // 2)

    r = run_cli("backup", "--repo", repo, img, "--volume", "disk", "--json")
    if r.returncode != 0:  # refusing is acceptable, crashing is not
        assert_one_line_error(r)
        return
    version = json.loads(r.stdout)["version_id"]
    assert_verify_ok(repo, deep=False)
    assert_verify_ok(repo, deep=True)
    assert_restores(repo, f"disk@{version}", tmp_path / "out.img", sha)
