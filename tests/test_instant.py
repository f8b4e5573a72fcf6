"""Instant restore on the host: the tables it builds, dm-raid1's status as it reads it, and
the command line's refusals. The real thing (lvm2, dm-mirror, kernel NBD) runs in the VM:
tests/vm/test_vm_mount.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapship import instant
from tests.clihelp import init_repo_fast_kdf, run_cli

MiB_SECTORS = 2048


def test_regions_divide_the_mirror() -> None:
    assert instant.region_sectors(320 * MiB_SECTORS) == 2048
    assert instant.region_sectors(2048 + 512) == 512
    assert instant.region_sectors(8 * 3) == 8
    assert instant.region_sectors(320 * MiB_SECTORS, 128) == 128  # one 64 KiB chunk
    assert instant.region_sectors(320 * MiB_SECTORS, 8192) == 2048
    assert "core 1 128 2" in instant.mirror_table(8192, "/dev/nbd0", "254:1", 8192, 128)


def test_the_mirror_table_reads_from_the_source_and_maps_the_tail_straight() -> None:
    t = instant.mirror_table(1000 * MiB_SECTORS, "/dev/nbd1", "254:3", 1002 * MiB_SECTORS)
    mirror, tail = t.splitlines()
    assert mirror == (f"0 {1000 * MiB_SECTORS} mirror core 1 2048 2 /dev/nbd1 0 254:3 0 "
                      "1 handle_errors")
    assert tail == f"{1000 * MiB_SECTORS} {2 * MiB_SECTORS} linear 254:3 {1000 * MiB_SECTORS}"
    assert len(instant.mirror_table(8192, "/dev/nbd0", "254:1", 8192).splitlines()) == 1


@pytest.mark.parametrize(("text", "expected"), [
    ("0 655360 mirror 2 43:16 254:2 118/320 1 AA 1 core\n", (118, 320, "AA", False, False)),
    ("0 655360 mirror 2 43:16 254:2 320/320 1 AA 1 core\n"
     "655360 8192 linear \n", (320, 320, "AA", True, False)),
    ("0 655360 mirror 2 43:16 254:2 12/320 1 SA 1 core\n", (12, 320, "SA", False, True)),
    ("0 655360 mirror 2 43:16 254:2 320/320 1 DA 1 core\n", (320, 320, "DA", False, True)),
])
def test_mirror_status(text: str, expected: tuple[int, int, str, bool, bool]) -> None:
    s = instant.parse_mirror_status(text)
    assert s is not None
    assert (s.in_sync, s.regions, s.health, s.complete, s.failed) == expected


def test_a_plain_table_is_no_mirror() -> None:
    assert instant.parse_mirror_status("0 655360 linear \n") is None


def test_the_command_line_refuses_what_cannot_work(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo_fast_kdf(repo)
    cases: list[tuple[list[str | Path], str]] = [
        (["restore", "--repo", repo, "vol"], "restore needs a VOLUME[@VERSION] and a TARGET"),
        (["restore", "--repo", repo, "--instant", "vol", "disk.img"],
         "restores into a new LV, lvm:VG/LV (not 'disk.img')"),
        (["restore", "--repo", repo, "--instant", "vol"], "needs VOLUME[@VERSION] and lvm:"),
        (["restore", "--repo", repo, "--instant", "--status", "--finish", "lvm:vg/lv"],
         "--status and --finish exclude each other"),
        (["restore", "--repo", repo, "--instant", "--status", "vol", "lvm:vg/lv"],
         "takes the LV alone"),
        (["restore", "--repo", repo, "--instant", "--status", "lvm:vg"],
         "is not of the form lvm:VG/LV"),
    ]
    for argv, text in cases:
        r = run_cli(*argv)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and text in lines[0], (argv, r.stderr)
    r = run_cli("restore", "--repo", repo, "--instant", "--finish", "lvm:vg/lv")
    assert r.returncode == 1 and "no instant restore into lvm:vg/lv is under way" in r.stderr
