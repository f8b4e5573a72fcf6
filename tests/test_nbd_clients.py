"""Read-only serving, checked with real clients only: nbdinfo, nbdcopy, nbd-client -l, qemu-nbd,
qemu-img, qemu-io, and `nbdkit file` serving a restored copy as the reference for maps.

One server (a real `snapship nbd serve` process) serves a repository with several versions:
a volume changed and then grown, a size that is not a multiple of 512, a larger volume for
concurrent multi-connection copies.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clihelp import ok, run_cli
from tests.nbdhelp import (
    CHUNK,
    NbdRepo,
    Server,
    image_data,
    make_test_repo,
    nbdinfo_map,
    nbdkit_file,
    qemu_map,
    run_tool,
    serve,
    tool_stdout_sha,
)

MiB = 1 << 20


def _images() -> list[tuple[str, bytes]]:
    v1 = image_data(6 * MiB, 1)
    v2 = bytearray(v1)
    v2[MiB + 5 : MiB + 9000] = b"changed!" * 1124  # inside a data chunk, unaligned
    v2[3 * MiB : 4 * MiB] = bytes(MiB)  # whole chunks become holes
    v2[5 * MiB : 5 * MiB + CHUNK] = b"\x5a" * CHUNK  # a hole becomes data
    v3 = v2 + image_data(MiB + 4096, 3)  # grown
    return [("disk", bytes(v1)), ("disk", bytes(v2)), ("disk", bytes(v3)),
            ("odd", bytes(image_data(1_000_003, 4))), ("big", bytes(image_data(40 * MiB, 5)))]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> NbdRepo:
    return make_test_repo(tmp_path_factory.mktemp("nbd-clients"), _images())


@pytest.fixture(scope="module")
def server(repo: NbdRepo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(repo.path, log_dir=tmp_path_factory.mktemp("nbd-clients-logs")) as s:
        yield s
        s.assert_alive()


def all_names(repo: NbdRepo) -> set[str]:
    return {v.name for v in repo.versions} | {v.volume for v in repo.versions}


def test_nbdinfo_lists_every_version_and_volume(repo: NbdRepo, server: Server) -> None:
    listing = json.loads(run_tool("nbdinfo", "--list", "--json", server.uri()).stdout)
    exports = listing["exports"]
    uris = {e["uri"] for e in exports}
    assert {server.uri(n) for n in all_names(repo)} <= uris, uris
    # nbdinfo shows each export under its canonical name: a volume's is its newest version.
    by_uri = {e["uri"]: e for e in exports}
    for volume in ("disk", "odd", "big"):
        latest = repo.latest(volume)
        assert by_uri[server.uri(volume)]["export-name"] == latest.name
        assert by_uri[server.uri(volume)]["export-size"] == len(latest.data)
    for v in repo.versions:
        e = by_uri[server.uri(v.name)]
        assert e["export-size"] == len(v.data)
        assert e["is_read_only"] is True and e["can_multi_conn"] is True
        assert "base:allocation" in e["contexts"]
        when = f"{v.version[:4]}-{v.version[4:6]}-{v.version[6:8]} {v.version[9:11]}:"
        assert e["description"].startswith(f"{v.volume} as of {when}"), e["description"]
    assert listing["structured"] is True
    # one export's own information describes it in full (NBD_INFO_DESCRIPTION)
    v = repo.versions[1]
    info = json.loads(run_tool("nbdinfo", "--json", server.uri(v.name)).stdout)["exports"][0]
    assert info["description"].startswith("6.0 MiB, created ")
    assert f"parent {repo.versions[0].version}" in info["description"]


def test_nbd_client_lists_every_version(repo: NbdRepo, server: Server) -> None:
    out = run_tool("nbd-client", "-l", "127.0.0.1", str(server.port)).stdout.decode()
    names = {line.split(":", 1)[0] for line in out.splitlines()[1:] if ":" in line}
    assert names == all_names(repo), out


def test_qemu_nbd_lists_every_version(repo: NbdRepo, server: Server) -> None:
    out = run_tool("qemu-nbd", "-L", "-b", "127.0.0.1", "-p", str(server.port)).stdout.decode()
    assert f"exports available: {len(all_names(repo))}" in out, out
    assert set(re.findall(r"^ export: '([^']*)'$", out, re.M)) == all_names(repo)
    assert out.count("base:allocation") == len(all_names(repo))


@pytest.mark.parametrize("extents", [True, False], ids=["extents", "no-extents"])
def test_nbdcopy_reads_every_version_exactly(repo: NbdRepo, server: Server,
                                             extents: bool) -> None:  # fmt: skip
    flags = [] if extents else ["--no-extents"]
    for v in repo.versions:
        sha, n = tool_stdout_sha("nbdcopy", *flags, server.uri(v.name), "-")
        assert (sha, n) == (v.sha, len(v.data)), v.name
    latest = repo.latest("disk")
    assert tool_stdout_sha("nbdcopy", *flags, server.uri("disk"), "-")[0] == latest.sha


def test_qemu_img_convert_matches_every_version(repo: NbdRepo, server: Server,
                                                tmp_path: Path) -> None:  # fmt: skip
    for i, v in enumerate(repo.versions):
        out = tmp_path / f"{i}.raw"
        run_tool("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri(v.name), out)
        got = out.read_bytes()
        # qemu rounds an export's size up to 512 bytes; what it adds reads as zeroes.
        assert len(got) == -(-len(v.data) // 512) * 512
        assert hashlib.sha256(got[: len(v.data)]).hexdigest() == v.sha, v.name
        assert got[len(v.data) :] == bytes(len(got) - len(v.data))
        out.unlink()


def test_maps_match_nbdkit_serving_a_restored_copy(repo: NbdRepo, server: Server,
                                                   tmp_path: Path) -> None:  # fmt: skip
    holes_seen = 0
    for i, v in enumerate(repo.versions[:4]):
        restored = tmp_path / f"restored-{i}.img"
        ok(run_cli("restore", "--repo", repo.path, v.name, restored))
        with nbdkit_file(restored, tmp_path) as reference:
            ours = nbdinfo_map(server.uri(v.name))
            assert ours == nbdinfo_map(reference), v.name
            holes_seen += sum(1 for _, _, kind in ours if kind == 3)
            if len(v.data) % 512 == 0:  # qemu's map of an odd size ends in its own padding
                assert qemu_map(server.uri(v.name)) == qemu_map(reference), v.name
        # and the holes are where the image has whole zero chunks, nowhere else
        zero_chunks = [i for i in range(0, len(v.data), CHUNK)
                       if v.data[i : i + CHUNK].count(0) == len(v.data[i : i + CHUNK])]
        holes = [(s, n) for s, n, kind in ours if kind == 3]
        assert sum(n for _, n in holes) == sum(min(CHUNK, len(v.data) - z) for z in zero_chunks)
        restored.unlink()
    assert holes_seen > 3


def test_three_nbdcopy_with_four_connections_at_once(repo: NbdRepo, server: Server,
                                                     tmp_path: Path) -> None:  # fmt: skip
    big = repo.latest("big")
    before = server.log().count(f"serving {big.name} ")
    procs = [
        subprocess.Popen(["nbdcopy", "--connections=4", "--threads=4", server.uri("big"),
                          str(tmp_path / f"{i}")],
                         stderr=subprocess.PIPE)
        for i in range(3)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    for i in range(3):
        assert hashlib.sha256((tmp_path / f"{i}").read_bytes()).hexdigest() == big.sha
    # each copy really used four connections (multi-conn), all served at once
    assert server.log().count(f"serving {big.name} ") - before >= 12


def test_versions_by_prefix_and_latest(repo: NbdRepo, server: Server) -> None:
    first = repo.versions[0]
    others = [v.version for v in repo.versions[1:] if v.volume == "disk"]
    prefix = next(first.version[:n] for n in range(1, 40)
                  if not any(o.startswith(first.version[:n]) for o in others))
    for name in (f"disk@{prefix}", first.name):
        assert tool_stdout_sha("nbdcopy", server.uri(name), "-")[0] == first.sha
    assert tool_stdout_sha("nbdcopy", server.uri("disk@latest"), "-")[0] == repo.latest("disk").sha


def test_unknown_export_is_refused_with_its_name(server: Server) -> None:
    r = run_tool("nbdinfo", server.uri("nosuchvolume"), check=False)
    assert r.returncode != 0
    # libnbd maps NBD_REP_ERR_UNKNOWN to ENOENT
    assert "No such file or directory for export: nosuchvolume" in r.stderr.decode()
    r = run_tool("nbdinfo", server.uri(""), check=False)  # several volumes: no default export
    assert r.returncode != 0


def test_read_only_exports_say_so_and_refuse_writes(repo: NbdRepo, server: Server,
                                                    tmp_path: Path) -> None:  # fmt: skip
    info = json.loads(run_tool("nbdinfo", "--json", server.uri("odd")).stdout)["exports"][0]
    assert info["is_read_only"] is True
    assert not info["can_trim"] and not info["can_zero"]
    r = run_tool("qemu-io", "-f", "raw", "-c", "write 0 4k", server.uri("odd"), check=False)
    assert r.returncode != 0 and b"Permission denied" in r.stderr + r.stdout
    src = tmp_path / "src.img"
    src.write_bytes(b"\1" * 1_000_003)
    r = run_tool("nbdcopy", src, server.uri("odd"), check=False)
    assert r.returncode != 0 and b"read-only" in r.stderr
    # qemu-io reading with a read-only open works, unaligned too
    r = run_tool("qemu-io", "-r", "-f", "raw", "-c", "read -v 100 16", server.uri("odd"))
    expected = repo.latest("odd").data[100:116].hex()
    assert expected[:8] in r.stdout.decode().replace(" ", "")
