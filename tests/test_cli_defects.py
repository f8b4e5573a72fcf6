"""Issue 11, section 2: the smaller CLI defects, each through the real command line.

`init` into a directory that holds something else; `cow inspect` of a file that is no COW
store; a volume name that another source already uses (files and lvm: sources); role denials
as sentences. (The busy NBD port is in test_nbd_cli.py; which commands offer
--passphrase-file, and --token-file's help, in test_cli_parser.py.)
"""

from __future__ import annotations

import json
import os
from array import array
from pathlib import Path

import pytest

from snapship.errors import UsageError
from snapship.formats.manifest import Manifest
from tests.clihelp import (
    CHUNK,
    assert_one_line_error,
    describe,
    image_bytes,
    init_repo_fast_kdf,
    ok,
    run_cli,
    version_ids,
    write_image,
)
from tests.serverproc import (
    create_repo_fast_kdf,
    http_storage,
    run_cli_env,
    running_server,
    token_files,
)

# -- init ---------------------------------------------------------------------------------


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_init_refuses_a_directory_that_holds_something_else(tmp_path: Path) -> None:
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"\xff\xd8 not a repository")
    (target / "albums").mkdir()
    before = tree(target)
    r = run_cli("init", "--repo", target, "--encryption", "none")
    assert_one_line_error(r, str(target), "not empty", "holds no snapship repository",
                          "albums", code=2)
    assert tree(target) == before


@pytest.mark.parametrize("contents", ["missing", "empty", "lost+found", "unfinished init"])
def test_init_takes_an_empty_new_or_unfinished_directory(tmp_path: Path, contents: str) -> None:
    target = tmp_path / "repo"
    if contents != "missing":
        target.mkdir()
    if contents == "lost+found":
        (target / "lost+found").mkdir()
    if contents == "unfinished init":  # the key file is written first, the config last
        (target / "keys").mkdir()
        (target / "keys" / "repokey").write_bytes(b"left by a killed init")
    ok(run_cli("init", "--repo", target, "--encryption", "none", "--chunk-size", "64K"))
    assert (target / "config").is_file()


# -- cow inspect --------------------------------------------------------------------------


def test_cow_inspect_tells_a_never_initialised_store_from_something_else(tmp_path: Path
                                                                         ) -> None:
    zero = tmp_path / "new.cow"
    zero.write_bytes(bytes(64 << 10))
    assert_one_line_error(run_cli("cow", "inspect", zero), "never initialised")
    # A file system image: its first KiB is zero (the boot block), then comes data.
    fs = tmp_path / "ext4.img"
    fs.write_bytes(bytes(1024) + b"\x53\xef" + os.urandom(62 << 10))
    line = assert_one_line_error(run_cli("cow", "inspect", fs), "not a dm-snapshot COW store")
    assert "never initialised" not in line
    text = tmp_path / "notes.txt"
    text.write_text("shopping list\n" * 400)
    assert_one_line_error(run_cli("cow", "inspect", text), "not a dm-snapshot COW store")


# -- one volume, one source ---------------------------------------------------------------


@pytest.fixture
def two_disks(tmp_path: Path) -> tuple[Path, Path, Path]:
    repo = tmp_path / "repo"
    init_repo_fast_kdf(repo)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = tmp_path / "a" / "disk.img", tmp_path / "b" / "disk.img"
    write_image(a, image_bytes(4 * CHUNK, seed=1))
    write_image(b, image_bytes(4 * CHUNK, seed=2))
    return repo, a, b


def test_a_derived_volume_name_of_another_source_is_refused(two_disks: tuple[Path, Path, Path]
                                                            ) -> None:
    repo, a, b = two_disks
    ok(run_cli("backup", "--repo", repo, a))
    r = run_cli("backup", "--repo", repo, b)
    assert_one_line_error(r, "volume disk.img", str(a), str(b), "--volume", code=2)
    assert len(version_ids(repo)) == 1
    ok(run_cli("backup", "--repo", repo, a))  # the same source again: fine
    link = a.parent / "link.img"
    link.symlink_to(a)
    r = ok(run_cli("backup", "--repo", repo, link, "--volume", "disk.img"))
    assert r.stderr == "", describe(r)  # the same file through a symlink: no warning
    assert len(version_ids(repo)) == 3


def test_an_explicit_volume_name_goes_on_with_a_warning(two_disks: tuple[Path, Path, Path]
                                                        ) -> None:
    repo, a, b = two_disks
    ok(run_cli("backup", "--repo", repo, a))
    r = run_cli("backup", "--repo", repo, b, "--volume", "disk.img", "--json")
    assert r.returncode == 0, describe(r)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapship: warning: volume disk.img"), \
        describe(r)
    assert str(a) in lines[0] and str(b) in lines[0]
    assert json.loads(r.stdout)["volume"] == "disk.img"
    r = ok(run_cli("backup", "--repo", repo, b))  # b is now the volume's source
    assert r.stderr == "", describe(r)


def test_an_lvm_source_is_refused_a_volume_a_file_uses_before_lvm_is_touched(
        two_disks: tuple[Path, Path, Path]) -> None:
    repo, a, _b = two_disks
    ok(run_cli("backup", "--repo", repo, a, "--volume", "vg0.root"))
    r = run_cli("backup", "--repo", repo, "lvm:vg0/root")  # no LVM here: refused before
    assert_one_line_error(r, "volume vg0.root", str(a), "lvm:vg0/root", "--volume", code=2)


def manifest_from(source: str) -> Manifest:
    return Manifest(volume="v", version="20260101-000000.000-abcd", size=0, chunk_size=CHUNK,
                    created="2026-01-01T00:00:00.000Z", source=source, parent=None, ids=b"",
                    sizes=array("I"))


def test_the_volume_check_for_lvm_sources() -> None:
    from snapship.engine.source_backup import check_volume_source, same_source

    warned: list[str] = []
    check_volume_source("vg0.root", "lvm:vg0/root", manifest_from("lvm:vg0/root"), False,
                        warned.append)
    with pytest.raises(UsageError, match="lvm:vg1/root"):
        check_volume_source("vg0.root", "lvm:vg0/root", manifest_from("lvm:vg1/root"), False,
                            warned.append)
    check_volume_source("v", "lvm:vg0/root", None, False, warned.append)  # a new volume
    assert warned == []
    check_volume_source("vg0.root", "lvm:vg0/root", manifest_from("/dev/vg0/root"), True,
                        warned.append)
    assert len(warned) == 1 and "/dev/vg0/root" in warned[0], warned
    assert not same_source("lvm:vg0/root", "/dev/vg0/root")


# -- role denials as sentences ------------------------------------------------------------


def test_role_denials_read_as_sentences(tmp_path: Path) -> None:
    with running_server(tmp_path / "srv") as (server, tokens):
        files = token_files(tmp_path / "tokens", tokens)
        create_repo_fast_kdf(http_storage(server, "db1", tokens["ops"]))
        url = server.url("db1")
        img = tmp_path / "disk.img"
        write_image(img, image_bytes(4 * CHUNK, seed=5))

        r = run_cli_env("prune", "--repo", url, "--keep-last", "1", "--token-file",
                        files["db1-backup"])
        line = assert_one_line_error(r, "token db1-backup may only add backups; prune",
                                     "needs an admin token")
        assert "locks/" not in line, line  # no storage keys
        server.wait_for_log("denied: token db1-backup (role backup) may not put locks/prune-")

        r = run_cli_env("backup", "--repo", url, img, "--token-file", files["restorer"])
        line = assert_one_line_error(r, "token restorer may only read; backup (and init) "
                                     "needs a backup or admin token")
        assert "chunks/" not in line and "locks/" not in line, line

        r = run_cli_env("gc", "--repo", url, "--on-server", "--token-file", files["restorer"])
        assert_one_line_error(r, "token restorer may only read; gc on the server needs an "
                              "admin token")

        r = run_cli_env("versions", "--repo", server.url("db2"), "--token-file",
                        files["only-r1"])
        assert_one_line_error(r, "token only-r1 may not use repository db2")
