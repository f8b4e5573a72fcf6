"""Writable serving (`--writable`, `--commit`): copy-on-write overlays, checked with real clients.

The served versions never change. Writes, zeroes and trims land in an overlay that all
connections to the export share; block status shows them; on the last clean disconnect the
overlay is dropped, or stored as a new version with --commit (and only then).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapship.nbd import protocol as p
from tests.clihelp import assert_verify_ok, ok, run_cli
from tests.nbdhelp import (
    CHUNK,
    NbdRepo,
    RawClient,
    Server,
    image_data,
    make_test_repo,
    nbdinfo_map,
    run_tool,
    serve,
    structured_error,
    tool_stdout_sha,
)

MiB = 1 << 20
SIZE = 6 * MiB


@pytest.fixture
def repo(tmp_path: Path) -> NbdRepo:
    return make_test_repo(tmp_path, [("disk", bytes(image_data(SIZE, 11))),
                                     ("big", bytes(image_data(24 * MiB, 12)))])


def first_zero_chunk(data: bytes, after: int = 0) -> int:
    for off in range(after, len(data), CHUNK):
        if data[off : off + CHUNK].count(0) == CHUNK:
            return off
    raise AssertionError("no zero chunk")


def first_data_chunk(data: bytes, after: int = 0) -> int:
    for off in range(after, len(data), CHUNK):
        if data[off : off + CHUNK].count(0) < CHUNK // 2:
            return off
    raise AssertionError("no data chunk")


class Model:
    """What the export must read as after the qemu-io sequence below."""

    def __init__(self, base: bytes) -> None:
        self.data = bytearray(base)
        self.hole_at = first_zero_chunk(base, 2 * MiB)
        self.trim_at = first_data_chunk(base, 3 * MiB)

    def qemu_io_commands(self) -> list[str]:
        cmds = [
            "write -P 0xab 100 5000",           # unaligned write
            "write -z 64k 128k",                # zeroes (qemu sets NBD_CMD_FLAG_NO_HOLE)
            "write -z -u 256k 64k",             # zeroes that may punch a hole
            "discard 512k 64k",                 # NBD_CMD_TRIM
            "write -f -P 0xcd 1M 4k",           # FUA
            f"write -P 0xee {self.hole_at} 64k",  # data where the version has a hole
            f"discard {self.trim_at} 64k",
            "flush",
            "read -P 0xab 100 5000",
            "read -P 0 64k 128k",
            "read -P 0 256k 64k",
            "read -P 0 512k 64k",
            "read -P 0xcd 1M 4k",
            f"read -P 0xee {self.hole_at} 64k",
            f"read -P 0 {self.trim_at} 64k",
        ]  # fmt: skip
        d = self.data
        d[100:5100] = b"\xab" * 5000
        d[64 << 10 : 192 << 10] = bytes(128 << 10)
        d[256 << 10 : 320 << 10] = bytes(64 << 10)
        d[512 << 10 : 576 << 10] = bytes(64 << 10)
        d[MiB : MiB + 4096] = b"\xcd" * 4096
        d[self.hole_at : self.hole_at + CHUNK] = b"\xee" * CHUNK
        d[self.trim_at : self.trim_at + CHUNK] = bytes(CHUNK)
        return cmds

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def qemu_io(server: Server, export: str, commands: list[str]) -> None:
    args = [a for c in commands for a in ("-c", c)]
    r = run_tool("qemu-io", "-f", "raw", *args, server.uri(export), check=False)
    out = (r.stdout + r.stderr).decode()
    assert r.returncode == 0 and "failed" not in out, out


def versions_of(tr: NbdRepo, volume: str) -> list[str]:
    return [v for _, v in tr.open().list_versions(volume)]


def wait_for_versions(tr: NbdRepo, volume: str, count: int, server: Server) -> list[str]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = versions_of(tr, volume)
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no commit after 60 s:\n{server.log()}")


@pytest.fixture
def holder(request: pytest.FixtureRequest) -> Iterator[list[RawClient]]:
    """Connections kept open to an export (so its shared overlay lives), closed with DISC."""
    held: list[RawClient] = []
    yield held
    for c in held:
        c.request(p.CMD_DISC)
        c.close()


def hold(server: Server, export: str, held: list[RawClient]) -> None:
    c = RawClient(server.port)
    c.greet()
    c.go(export, structured=True)
    held.append(c)


def test_qemu_io_writes_read_back_and_show_in_block_status(
    repo: NbdRepo, tmp_path: Path, holder: list[RawClient]
) -> None:
    base = repo.versions[0]
    model = Model(base.data)
    with serve(repo.path, "--writable", log_dir=tmp_path) as server:
        hold(server, "disk", holder)  # keeps the overlay alive between the clients below
        info = run_tool("nbdinfo", "--json", server.uri("disk")).stdout.decode()
        assert '"is_read_only": false' in info and '"can_multi_conn": true' in info
        assert '"can_trim": true' in info and '"can_fast_zero": true' in info
        qemu_io(server, "disk", model.qemu_io_commands())
        # another client, another connection: it sees the writes, with and without extents
        assert tool_stdout_sha("nbdcopy", server.uri("disk"), "-")[0] == model.sha
        assert tool_stdout_sha("nbdcopy", "--no-extents", server.uri("disk"), "-")[0] == model.sha
        extents = nbdinfo_map(server.uri("disk"))

        def kind(start: int, length: int) -> object:
            found = {k for s, n, k in extents if s < start + length and start < s + n}
            assert len(found) == 1, (start, length, extents)
            return found.pop()

        assert kind(64 << 10, 128 << 10) == p.STATE_ZERO  # zeroed, NO_HOLE: allocated zeroes
        assert kind(256 << 10, CHUNK) == p.STATE_HOLE | p.STATE_ZERO
        assert kind(512 << 10, CHUNK) == p.STATE_HOLE | p.STATE_ZERO
        assert kind(model.hole_at, CHUNK) == 0  # the written hole is data now
        assert kind(model.trim_at, CHUNK) == p.STATE_HOLE | p.STATE_ZERO
        for c in holder:
            c.request(p.CMD_DISC)
            c.close()
        holder.clear()
        time.sleep(0.3)
        # last client gone, no --commit: the overlay is dropped; the version never changed
        assert tool_stdout_sha("nbdcopy", server.uri("disk"), "-")[0] == base.sha
        assert "discarded the overlay of " + base.name in server.log()
    assert versions_of(repo, "disk") == [base.version]


def test_commit_stores_what_qemu_io_wrote_as_a_new_version(repo: NbdRepo, tmp_path: Path) -> None:
    base = repo.versions[0]
    model = Model(base.data)
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    with serve(repo.path, "--writable", "--commit", "--label", "via=nbd",
               "--overlay-dir", str(overlays), log_dir=tmp_path) as server:  # fmt: skip
        qemu_io(server, "disk", model.qemu_io_commands())
        new = wait_for_versions(repo, "disk", 2, server)[-1]
        assert f"committed disk@{new} (parent {base.name}" in server.log()
        # `disk` now names the new version; the old one still reads as it was
        assert tool_stdout_sha("nbdcopy", server.uri("disk"), "-")[0] == model.sha
        assert tool_stdout_sha("nbdcopy", server.uri(base.name), "-")[0] == base.sha
        assert os.listdir(overlays) == []  # overlay files are anonymous: nothing left behind
    r = repo.open()
    m = r.load_manifest("disk", new)
    assert m.parent == base.version and m.labels == {"via": "nbd"}
    assert m.stats["change_source"] == "nbd overlay" and m.stats["mode"] == "incremental"
    out = tmp_path / "new.img"
    ok(run_cli("restore", "--repo", repo.path, f"disk@{new}", out))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == model.sha
    # zeroed and trimmed whole chunks are stored as zero chunks, not as data
    assert r.load_manifest("disk", new).chunk(model.trim_at // CHUNK) == bytes(32)
    assert_verify_ok(repo.path)


def test_nbdcopy_into_the_export_and_back(repo: NbdRepo, tmp_path: Path) -> None:
    base = repo.latest("big")
    # A different image: data where the version has holes and holes where it has data.
    new = bytearray(image_data(len(base.data), 99))
    src = tmp_path / "new.img"
    with open(src, "wb") as f:
        f.truncate(len(new))
        for off in range(0, len(new), CHUNK):
            piece = bytes(new[off : off + CHUNK])
            if piece.count(0) != len(piece):
                f.seek(off)
                f.write(piece)
    want = hashlib.sha256(new).hexdigest()
    with serve(repo.path, "--writable", "--commit", log_dir=tmp_path) as server:
        run_tool("nbdcopy", "--connections=4", "--threads=4", src, server.uri("big"))
        versions = wait_for_versions(repo, "big", 2, server)
        assert server.log().count(f"serving {base.name} as 'big' (writable)") >= 4
        for flags in ([], ["--no-extents"]):
            assert tool_stdout_sha("nbdcopy", *flags, server.uri("big"), "-")[0] == want
        assert tool_stdout_sha("nbdcopy", server.uri(base.name), "-")[0] == base.sha
    assert len(versions) == 2
    assert_verify_ok(repo.path)


def test_a_writer_killed_mid_transfer_commits_nothing(repo: NbdRepo, tmp_path: Path) -> None:
    base = repo.latest("big")
    with serve(repo.path, "--writable", "--commit", log_dir=tmp_path) as server:
        fds = server.open_fds()
        # nbdcopy copies its stdin into the export: it writes what it was given, then waits.
        proc = subprocess.Popen(["nbdcopy", "-", server.uri("big")], stdin=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        assert proc.stdin is not None
        proc.stdin.write(b"\x77" * (2 * MiB))
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while run_tool("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x77 0 1M",
                       server.uri("big"), check=False).returncode != 0:
            assert time.monotonic() < deadline, "the writes never showed"
            time.sleep(0.05)
        proc.kill()  # mid-transfer: no flush, no NBD_CMD_DISC
        proc.wait()
        proc.stdin.close()
        deadline = time.monotonic() + 30
        while "not committing" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "not committing the overlay of " + base.name in server.log(), server.log()
        server.assert_alive()
        assert tool_stdout_sha("nbdcopy", server.uri("big"), "-")[0] == base.sha
        assert server.open_fds() == fds
    assert versions_of(repo, "big") == [base.version]


def test_read_only_connections_to_a_writable_server_commit_nothing(
    repo: NbdRepo, tmp_path: Path
) -> None:
    base = repo.versions[0]
    with serve(repo.path, "--writable", "--commit", log_dir=tmp_path) as server:
        assert tool_stdout_sha("nbdcopy", server.uri("disk"), "-")[0] == base.sha
        run_tool("qemu-io", "-f", "raw", "-c", "read 0 64k", "-c", "flush", server.uri("disk"))
        time.sleep(0.3)
    assert versions_of(repo, "disk") == [base.version]


def test_serving_and_committing_beside_forget_and_gc(tmp_path: Path) -> None:
    v1 = bytes(image_data(SIZE, 51))
    v2 = bytearray(v1)
    unique = first_data_chunk(v1, MiB)  # a chunk only v1 has
    v2[unique : unique + CHUNK] = b"\x42" * CHUNK
    tr = make_test_repo(tmp_path, [("disk", v1), ("disk", bytes(v2))])
    old, new = tr.versions
    model = Model(new.data)
    with serve(tr.path, "--writable", "--commit", log_dir=tmp_path) as server:
        held = RawClient(server.port)  # a client still using the version about to go
        held.greet()
        held.go(old.name, structured=True)
        ok(run_cli("forget", "--repo", tr.path, old.name))
        ok(run_cli("gc", "--repo", tr.path))
        held.request(p.CMD_READ, unique, CHUNK, cookie=7)
        cookie, chunks = held.structured_reply()
        assert cookie == 7 and structured_error(chunks) == p.EIO
        assert f"of {old.name} at offset {unique}" in chunks[-1][2].decode(errors="replace")
        held.request(p.CMD_READ, 0, 4096, cookie=8)  # the connection goes on
        assert held.structured_reply()[0] == 8
        held.request(p.CMD_DISC)
        held.close()
        assert run_tool("nbdinfo", server.uri(old.name), check=False).returncode != 0
        qemu_io(server, "disk", model.qemu_io_commands())
        committed = wait_for_versions(tr, "disk", 2, server)[-1]
        ok(run_cli("gc", "--repo", tr.path))
        assert tool_stdout_sha("nbdcopy", server.uri("disk"), "-")[0] == model.sha
        assert tool_stdout_sha("nbdcopy", server.uri(new.name), "-")[0] == new.sha
    assert versions_of(tr, "disk") == [new.version, committed]
    assert_verify_ok(tr.path)
