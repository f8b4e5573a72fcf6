"""The lifecycle commands as a user runs them: prune, forget, protect, gc, locks, verify marks."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from tests.clihelp import (
    CHUNK,
    assert_one_line_error,
    assert_restores,
    assert_verify_ok,
    backup,
    chunk_files,
    init_repo_fast_kdf,
    ok,
    run_cli,
    verify,
    version_ids,
    write_image,
)


def make_history(tmp_path: Path, n: int = 4) -> tuple[Path, Path, list[tuple[str, str]]]:
    """A repository with `n` versions of `disk`, each changing 4 of 32 chunks; returns the
    repository, the image and (version, sha256) newest last."""
    repo = tmp_path / "repo"
    init_repo_fast_kdf(repo)
    img = tmp_path / "disk.img"
    rng = random.Random(11)
    data = bytearray(rng.randbytes(32 * CHUNK))
    out = []
    for _ in range(n):
        for i in rng.sample(range(32), 4):
            data[i * CHUNK : (i + 1) * CHUNK] = rng.randbytes(CHUNK)
        sha = write_image(img, data)
        out.append((backup(repo, img, "disk"), sha))
    return repo, img, out


def test_prune_dry_run_explains_and_changes_nothing(tmp_path: Path) -> None:
    repo, _img, hist = make_history(tmp_path)
    r = ok(run_cli("prune", "--repo", repo, "--keep-last", "2", "--dry-run", "--json",
                   passphrase=None))
    info = json.loads(r.stdout)
    rows = info["volumes"]["disk"]
    assert [row["version_id"] for row in rows] == [v for v, _ in reversed(hist)]
    assert [row["reasons"] for row in rows] == [["last 2"], ["last 2"], [], []]
    assert info["forgotten"] == [f"disk@{v}" for v, _ in reversed(hist[:2])]
    # Versions 1 and 2 each hold 4 chunks nobody else uses (version 2's may overlap 1's
    # positions, but new random data is always new chunks).
    assert info["chunks_freeable"] == 8 and info["bytes_freeable"] > 8 * CHUNK // 2
    assert len(version_ids(repo)) == 4

    r = ok(run_cli("prune", "--repo", repo, "--keep-last", "2", passphrase=None))
    assert "forget  disk@" + hist[0][0] in r.stdout and "keep    disk@" + hist[3][0] in r.stdout
    assert "forgot 2 version(s)" in r.stdout and "run `snapship gc`" in r.stdout
    assert version_ids(repo) == [("disk", v) for v, _ in hist[2:]]
    before = len(chunk_files(repo))
    r = ok(run_cli("gc", "--repo", repo, "--json", passphrase=None))
    assert json.loads(r.stdout)["chunks_freed"] == 8
    assert len(chunk_files(repo)) == before - 8
    for v, sha in hist[2:]:
        assert_restores(repo, f"disk@{v}", tmp_path / "out.img", sha)
    assert_verify_ok(repo)


def test_protected_and_newest_versions_are_not_forgotten(tmp_path: Path) -> None:
    repo, _img, hist = make_history(tmp_path, 3)
    oldest, newest = hist[0][0], hist[-1][0]
    ok(run_cli("protect", "--repo", repo, f"disk@{oldest}", "--note", "audit"))
    r = ok(run_cli("prune", "--repo", repo, "--keep-last", "1"))
    assert f"keep    disk@{oldest}  (protected)" in r.stdout
    assert version_ids(repo) == [("disk", oldest), ("disk", newest)]
    r = ok(run_cli("versions", "--repo", repo))
    assert "protected" in r.stdout.splitlines()[0]

    assert_one_line_error(run_cli("forget", "--repo", repo, f"disk@{oldest}"),
                          "protected", "unprotect it first", code=2)
    assert_one_line_error(run_cli("forget", "--repo", repo, f"disk@{newest}"),
                          "newest version", "--allow-newest", code=2)
    assert_one_line_error(run_cli("forget", "--repo", repo, "disk"), "VOLUME@VERSION", code=2)
    ok(run_cli("unprotect", "--repo", repo, f"disk@{oldest}"))
    ok(run_cli("forget", "--repo", repo, f"disk@{oldest}"))
    assert version_ids(repo) == [("disk", newest)]


def test_prune_needs_a_rule_and_a_real_volume(tmp_path: Path) -> None:
    repo, _img, _hist = make_history(tmp_path, 1)
    assert_one_line_error(run_cli("prune", "--repo", repo), "no retention rule", code=2)
    assert_one_line_error(run_cli("prune", "--repo", repo, "--keep-within", "3x"),
                          "invalid duration", code=2)
    assert_one_line_error(run_cli("prune", "--repo", repo, "--keep-last", "1", "--volume",
                                  "nope"), "volume nope has no versions", code=1)
    assert_one_line_error(run_cli("gc", "--repo", tmp_path / "none"), "no snapship repository")


def test_verify_marks_damage_backup_heals_it_and_verify_clears_the_mark(
    tmp_path: Path
) -> None:
    repo, img, hist = make_history(tmp_path, 2)
    from snapship.repository import catalog
    from snapship.storage.local import LocalStorage

    # A chunk the image still has, so that the next backup meets it.
    newest = catalog.Catalog(LocalStorage(str(repo))).load_refs("disk", hist[-1][0])
    victim = repo / "chunks" / newest.ids[:1].hex() / newest.ids[:32].hex()
    blob = bytearray(victim.read_bytes())
    blob[-1] ^= 0x40  # same size: only a deep verify sees it
    victim.write_bytes(bytes(blob))

    code, report = verify(repo, deep=True)
    assert code == 1 and victim.name in report["bad_chunks"]
    affected = set(report["affected_versions"])
    assert affected
    r = run_cli("versions", "--repo", repo)
    assert r.returncode == 0  # damage is listed, not an error (verify's exit 1 says it)
    assert sum("damaged chunk" in line for line in r.stdout.splitlines()) == len(affected)

    # The source still has the data: the next backup stores the damaged chunk again.
    backup(repo, img, "disk")
    r = ok(run_cli("verify", "--repo", repo, "--deep"))
    assert r.stdout.count("healed disk@") == len(affected)
    assert ok(run_cli("versions", "--repo", repo)).stdout.count("damaged") == 0
    for v, sha in hist:
        assert_restores(repo, f"disk@{v}", tmp_path / "out.img", sha)


def test_sampled_deep_verify_reads_a_share_of_the_chunks(tmp_path: Path) -> None:
    repo, _img, _hist = make_history(tmp_path, 2)
    r = ok(run_cli("verify", "--repo", repo, "--deep", "--sample", "25", "--json"))
    info = json.loads(r.stdout)
    assert info["ok"] and info["chunks"] == 36 and info["chunks_deep_checked"] == 9
    assert_one_line_error(run_cli("verify", "--repo", repo, "--sample", "5"), "--deep", code=2)
    assert_one_line_error(run_cli("verify", "--repo", repo, "--deep", "--sample", "0"),
                          "percentage", code=2)


def test_locks_lists_and_clears_a_dead_backups_lock(tmp_path: Path) -> None:
    repo, _img, _hist = make_history(tmp_path, 1)
    from snapship.repository import locks

    session = "20260101T000000-deadbeef0000"
    (repo / "locks").mkdir(exist_ok=True)
    (repo / "locks" / f"writer-{session}").write_text(json.dumps({
        "v": 1, "kind": "writer", "session": session, "machine": locks.MACHINE,
        "pid": 4_000_001, "pid_start": "1", "started": "2026-01-01T00:00:00+00:00",
        "heartbeat": 0.0, "command": "backup disk"}))
    r = ok(run_cli("locks", "--repo", repo, passphrase=None))
    assert "backup disk  pid 4000001" in r.stdout and "STALE" in r.stdout
    r = run_cli("locks", "--repo", repo, "--clear-stale", passphrase=None)
    assert r.returncode == 0
    assert "removed the stale writer lock of backup disk (pid 4000001" in r.stderr
    assert ok(run_cli("locks", "--repo", repo)).stdout.strip() == "no locks"


def test_a_second_gc_or_prune_exits_75_naming_the_first(tmp_path: Path) -> None:
    repo, _img, _hist = make_history(tmp_path, 1)
    from snapship.repository import locks
    from snapship.storage.local import LocalStorage

    storage = LocalStorage(str(repo))
    with locks.Lock(storage, locks.GC, "gc").acquire():
        assert_one_line_error(run_cli("gc", "--repo", repo), "gc is already running",
                              f"pid {os.getpid()}", "try again", code=75)
    with locks.Lock(storage, locks.PRUNE, "prune").acquire():
        assert_one_line_error(run_cli("prune", "--repo", repo, "--keep-last", "1"),
                              "prune is already running", code=75)
        ok(run_cli("gc", "--repo", repo))  # gc and prune may run together
