"""Issue 11, section 2: the output defects of the `--json` contract, through the real CLI.

`versions` exits 0 and shows damage, date and size in each row (an unreadable manifest too);
`show` says whether a version is damaged and protected (with the note `protect --note`
stored); `protect --json` names the versions it resolved; `backup --json` says when and from
what, as `show` would. The schemas are checked in test_json_contract.py, errors under --json
in test_cli_json_errors.py.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tests.clihelp import (
    CHUNK,
    backup,
    describe,
    init_repo_fast_kdf,
    ok,
    run_cli,
    write_image,
)


@pytest.fixture
def history(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A repository with two versions of `disk`; returns it, the image and the version ids."""
    repo = tmp_path / "repo"
    init_repo_fast_kdf(repo)
    img = tmp_path / "disk.img"
    rng = random.Random(5)
    data = bytearray(rng.randbytes(8 * CHUNK))
    versions = []
    for _ in range(2):
        data[:CHUNK] = rng.randbytes(CHUNK)
        write_image(img, data)
        versions.append(backup(repo, img, "disk", "host=db1"))
    return repo, img, versions


def mark_damaged(repo: Path, version: str, chunks: int = 2) -> None:
    from snapship.repository.catalog import Catalog
    from snapship.storage.local import LocalStorage

    Catalog(LocalStorage(str(repo))).mark_damaged("disk", version,
                                                  [f"{i:02x}" * 32 for i in range(chunks)],
                                                  deep=True)


def manifest_path(repo: Path, version: str) -> Path:
    return repo / "versions" / "disk" / version


# -- versions -----------------------------------------------------------------------------


def test_versions_shows_damage_as_a_field_and_exits_0(history: tuple[Path, Path, list[str]]
                                                      ) -> None:
    repo, _img, (v1, v2) = history
    mark_damaged(repo, v1, chunks=2)
    r = run_cli("versions", "--repo", repo, "--json")
    assert r.returncode == 0 and r.stderr == "", describe(r)
    rows = {row["version_id"]: row for row in json.loads(r.stdout)["versions"]}
    assert rows[v1]["damaged"] == {"chunks": 2, "deep": True}
    assert rows[v2]["damaged"] is False
    for v in (v1, v2):
        assert rows[v]["unreadable"] is None and rows[v]["size"] == 8 * CHUNK
        assert rows[v]["created"].startswith("20") and rows[v]["ref"] == f"disk@{v}"
    r = run_cli("versions", "--repo", repo)
    assert r.returncode == 0, describe(r)
    line = next(line for line in r.stdout.splitlines() if line.startswith(f"disk@{v1}"))
    assert "DAMAGED" in line and "2 damaged chunk" in line and "512.0 KiB" in line, line
    assert rows[v1]["created"] in line, line


def test_versions_lists_an_unreadable_manifest_with_its_date(
        history: tuple[Path, Path, list[str]]) -> None:
    repo, _img, (v1, v2) = history
    manifest_path(repo, v1).write_bytes(b"not a manifest")
    r = run_cli("versions", "--repo", repo, "--json")
    assert r.returncode == 0 and r.stderr == "", describe(r)
    rows = {row["version_id"]: row for row in json.loads(r.stdout)["versions"]}
    bad = rows[v1]
    assert f"manifest of disk@{v1}" in bad["unreadable"] and bad["size"] is None
    expected = f"{v1[:4]}-{v1[4:6]}-{v1[6:8]}T{v1[9:11]}:{v1[11:13]}:{v1[13:15]}.{v1[16:19]}Z"
    assert bad["created"] == expected, bad
    assert rows[v2]["unreadable"] is None and rows[v2]["size"] == 8 * CHUNK
    r = run_cli("versions", "--repo", repo)
    assert r.returncode == 0, describe(r)
    line = next(line for line in r.stdout.splitlines() if line.startswith(f"disk@{v1}"))
    assert "UNREADABLE" in line and expected in line, line


# -- show, protect, backup ----------------------------------------------------------------


def test_show_says_damaged_and_protected_with_the_note(history: tuple[Path, Path, list[str]]
                                                        ) -> None:
    repo, _img, (v1, v2) = history
    ok(run_cli("protect", "--repo", repo, f"disk@{v1}", "--note", "audit 2026"))
    mark_damaged(repo, v1, chunks=3)
    info = json.loads(ok(run_cli("show", "--repo", repo, f"disk@{v1}", "--json")).stdout)
    assert info["protected"] == {"note": "audit 2026"}
    assert info["damaged"] == {"chunks": 3, "deep": True}
    text = ok(run_cli("show", "--repo", repo, f"disk@{v1}")).stdout
    assert "audit 2026" in text and "3 damaged chunk" in text, text
    info = json.loads(ok(run_cli("show", "--repo", repo, "disk", "--json")).stdout)
    assert info["version_id"] == v2 and info["protected"] is False and info["damaged"] is False
    text = ok(run_cli("show", "--repo", repo, "disk")).stdout
    protected = next(line for line in text.splitlines() if line.startswith("protected"))
    assert protected.split() == ["protected", "no"], text
    # The note is in the listing too.
    rows = json.loads(ok(run_cli("versions", "--repo", repo, "--json")).stdout)["versions"]
    assert [row["protected"] for row in rows] == [{"note": "audit 2026"}, False]
    assert "protected (audit 2026)" in ok(run_cli("versions", "--repo", repo)).stdout


def test_protect_json_names_the_resolved_versions(history: tuple[Path, Path, list[str]]
                                                  ) -> None:
    repo, _img, (v1, v2) = history
    r = ok(run_cli("protect", "--repo", repo, "disk", f"disk@{v1[:19]}", "--note",
                   "keep", "--json", passphrase=None))
    info = json.loads(r.stdout)
    assert info["protected"] == [f"disk@{v2}", f"disk@{v1}"] and info["note"] == "keep", info
    r = ok(run_cli("unprotect", "--repo", repo, "disk@latest", "--json", passphrase=None))
    assert json.loads(r.stdout)["unprotected"] == [f"disk@{v2}"]


def test_backup_json_says_when_and_from_what(history: tuple[Path, Path, list[str]]) -> None:
    repo, img, (v1, v2) = history
    r = ok(run_cli("backup", "--repo", repo, img, "--volume", "disk", "--label", "a=b",
                   "--json"))
    info = json.loads(r.stdout)
    assert info["version"] == 1 and info["command"] == "backup"
    assert info["source"] == os.path.abspath(img) and info["parent"] == v2
    assert info["created"].startswith("20") and info["labels"] == {"a": "b"}
    assert info["ref"] == f"disk@{info['version_id']}" and info["version_id"] > v2 > v1
    shown = json.loads(ok(run_cli("show", "--repo", repo, info["ref"], "--json")).stdout)
    assert {k: v for k, v in shown.items() if k != "command"} == \
        {k: v for k, v in info.items() if k != "command"}
