"""Input that crashed the CLI (issue 10, item 9): each case now fails in one line, or works.

Changed-ranges lists with a leading zero or a 5000-digit number, a list that is a character
device or an endless stdin, a manifest whose statistics have the wrong types, and a COW store
under /proc that cannot even be sized. Every test drives the real CLI in a subprocess.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from snapship.formats import envelope
from snapship.formats.constants import KIND_MANIFEST, KIND_SUMMARY, MANIFEST_MAGIC
from tests.clihelp import (
    CHUNK,
    CLI,
    CLI_TIMEOUT,
    Result,
    assert_json_error,
    assert_one_line_error,
    backup,
    cli_env,
    copy_repo,
    describe,
    image_bytes,
    init_repo_fast_kdf,
    ok,
    run_cli,
    write_image,
)

# A runaway read must not take the machine with it while the old code is being tested.
LIMITED = ("prlimit", f"--as={2 << 30}", "--")


@pytest.fixture(scope="module")
def repo_with_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """An unencrypted repository holding one version of disk.img (8 chunks)."""
    work = tmp_path_factory.mktemp("hostile")
    repo, image = work / "repo", work / "disk.img"
    init_repo_fast_kdf(repo, "none")
    write_image(image, image_bytes(8 * CHUNK, seed=7))
    return repo, image, backup(repo, image, "disk")


def backup_with_ranges(repo: Path, image: Path, ranges: str | Path, stdin: Any = None,
                       timeout: float = CLI_TIMEOUT) -> Result:
    return subprocess.run(
        [*LIMITED, *CLI, "backup", "--repo", str(repo), str(image), "--volume", "disk",
         "--changed-ranges", str(ranges), "--json"],
        env=cli_env(), stdin=stdin if stdin is not None else subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout, check=False)


def versions_of(repo: Path) -> list[str]:
    return sorted(p.name for p in (repo / "versions" / "disk").iterdir())


# -- changed-ranges lists ---------------------------------------------------------------------


def test_changed_ranges_decimal_with_leading_zeros_is_decimal(
        repo_with_base: tuple[Path, Path, str], tmp_path: Path) -> None:
    base, image, _ = repo_with_base
    repo = copy_repo(base, tmp_path / "repo")
    ranges = tmp_path / "ranges"
    ranges.write_text(f"0100 4096\n{2 * CHUNK:08d} 010\n")  # 100.., and 131072..: decimal
    r = ok(backup_with_ranges(repo, image, ranges))
    stats = json.loads(r.stdout)["stats"]
    assert stats["mode"] == "incremental" and stats["chunks_read"] == 2, stats  # chunks 0, 2
    assert stats["bytes_read"] == 2 * CHUNK


@pytest.mark.parametrize("line", ["1" * 5000 + " 4096", "0 " + "9" * 5000, "0x" + "f" * 17 + " 1",
                                  f"{1 << 63} 1"])
def test_changed_ranges_number_too_large_is_one_line(repo_with_base: tuple[Path, Path, str],
                                                     tmp_path: Path, line: str) -> None:
    repo, image, _ = repo_with_base
    before = versions_of(repo)
    ranges = tmp_path / "ranges"
    ranges.write_text(f"# snapship-ranges 1\n0 1\n{line}\n")
    message = assert_json_error(backup_with_ranges(repo, image, ranges), "usage", 2, "line 3",
                                "too large")["error"]["message"]
    assert len(message) < 200, message
    assert versions_of(repo) == before


@pytest.mark.parametrize(("path", "kind"), [("/dev/zero", "character device"),
                                            (".", "directory")])
def test_changed_ranges_from_a_device_or_directory_is_refused(
        repo_with_base: tuple[Path, Path, str], path: str, kind: str) -> None:
    repo, image, _ = repo_with_base
    before = versions_of(repo)
    r = backup_with_ranges(repo, image, path, timeout=60)
    assert_json_error(r, "usage", 2, f"changed-ranges file {path}", kind)
    assert versions_of(repo) == before


def test_changed_ranges_endless_stdin_is_cut_off(repo_with_base: tuple[Path, Path, str]) -> None:
    repo, image, _ = repo_with_base
    before = versions_of(repo)
    with open("/dev/zero", "rb") as zero:
        r = backup_with_ranges(repo, image, "-", stdin=zero, timeout=60)
    assert_json_error(r, "usage", 2, "standard input", "larger than 256 MiB")
    assert versions_of(repo) == before


def test_changed_ranges_from_a_pipe_still_works(repo_with_base: tuple[Path, Path, str],
                                                tmp_path: Path) -> None:
    """Process substitution (`--changed-ranges <(tool)`) hands over a pipe: still accepted."""
    base, image, _ = repo_with_base
    repo = copy_repo(base, tmp_path / "repo")
    script = 'exec "$@" --changed-ranges <(printf "0 1\\n")'
    r = subprocess.run(["bash", "-c", script, "bash", *CLI, "backup", "--repo", str(repo),
                        str(image), "--volume", "disk", "--json"],
                       env=cli_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=CLI_TIMEOUT, check=False)
    assert json.loads(ok(r).stdout)["stats"]["chunks_read"] == 1


# -- manifest statistics ----------------------------------------------------------------------


def rewrite_stats(repo: Path, volume: str, version: str, **changes: Any) -> None:
    """Re-seal a manifest of an unencrypted repository, and its summary, with some stats
    fields changed: correct checksums, so only decoding can tell."""
    key = f"versions/{volume}/{version}"
    path = repo / key
    body = envelope.open_sealed(KIND_MANIFEST, key.encode(), path.read_bytes(), None, 1 << 30,
                                key)
    (header_len,) = struct.unpack_from("<I", body, 8)
    header = json.loads(body[12 : 12 + header_len])
    header["stats"].update(changes)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    new = struct.pack("<4sHHI", MANIFEST_MAGIC, 1, 0, len(text)) + text + body[12 + header_len :]
    path.write_bytes(envelope.seal(KIND_MANIFEST, key.encode(), new, None))
    # The version's summary says what its manifest says (a forger rewrites both).
    skey = f"summaries/{volume}/{version}"
    spath = repo / skey
    summary = json.loads(envelope.open_sealed(KIND_SUMMARY, skey.encode(), spath.read_bytes(),
                                              None, 1 << 30, skey))
    summary["stats"].update(changes)
    spath.write_bytes(envelope.seal(KIND_SUMMARY, skey.encode(), json.dumps(summary).encode(),
                                    None))


@pytest.mark.parametrize("change", [{"bytes_read": None}, {"bytes_new_stored": "12"},
                                    {"bytes_new_stored": 5, "bytes_new": None}],
                         ids=lambda c: ",".join(c))
def test_show_of_a_manifest_with_mistyped_stats_is_one_line(
        repo_with_base: tuple[Path, Path, str], tmp_path: Path, change: dict[str, Any]) -> None:
    base, _, ver = repo_with_base
    repo = copy_repo(base, tmp_path / "repo")
    rewrite_stats(repo, "disk", ver, **change)
    field = "bytes_new" if "bytes_new" in change else next(iter(change))
    assert_one_line_error(run_cli("show", "--repo", repo, f"disk@{ver}"),
                          f"manifest of disk@{ver}", field, code=1)


@pytest.mark.parametrize("change", [{"bytes_new_stored": None}, {"bytes_new_stored": "12"}],
                         ids=lambda c: ",".join(c))
def test_versions_lists_a_manifest_with_mistyped_stats_as_damaged(
        repo_with_base: tuple[Path, Path, str], tmp_path: Path, change: dict[str, Any]) -> None:
    base, image, ver = repo_with_base
    repo = copy_repo(base, tmp_path / "repo")
    newer = backup(repo, image, "disk")
    rewrite_stats(repo, "disk", ver, **change)
    r = run_cli("versions", "--repo", repo)
    assert r.returncode == 0 and r.stderr == "", describe(r)  # damage is listed, not an error
    lines = r.stdout.splitlines()
    assert len(lines) == 2, describe(r)
    assert lines[0].startswith(f"disk@{ver}  ") and (
        f"UNREADABLE: manifest of disk@{ver} is malformed") in lines[0]
    assert lines[1].startswith(f"disk@{newer}  ") and "DAMAGED" not in lines[1]


# -- cow inspect ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/proc/self/mem", "/proc/self/status"])
def test_cow_inspect_of_an_unsizable_proc_file_is_one_line(path: str) -> None:
    assert_one_line_error(run_cli("cow", "inspect", path), f"COW store {path}", "size",
                          code=1)
