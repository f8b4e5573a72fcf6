"""Live exports (`--writable --state-dir`): durable overlays and checkpoints, with real clients.

Every write acknowledged with FUA, or before a FLUSH was acknowledged, survives a SIGKILL of
the server and reads back after a restart on the same state directory; a full state directory
answers ENOSPC and loses nothing; checkpoints cut while a client stays connected restore to
the content of their moment.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from snapship.nbd import protocol as p
from tests.clihelp import run_cli
from tests.nbdhelp import (
    NbdRepo,
    RawClient,
    Server,
    image_data,
    make_test_repo,
    run_tool,
    serve,
    tool_stdout_sha,
)

MiB = 1 << 20
SIZE = 4 * MiB


@pytest.fixture
def repo(tmp_path: Path) -> NbdRepo:
    return make_test_repo(tmp_path, [("disk", bytes(image_data(SIZE, 21)))])


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def live(repo: NbdRepo, state: Path, tmp_path: Path,
         *args: str) -> AbstractContextManager[Server]:
    return serve(repo.path, "--writable", "--state-dir", str(state), *args, log_dir=tmp_path)


def connect(server: Server, name: str = "disk") -> RawClient:
    c = RawClient(server.port)
    c.greet()
    c.go(name, structured=False)
    return c


def write(c: RawClient, offset: int, data: bytes, flags: int = 0, cookie: int = 1) -> int:
    c.request(p.CMD_WRITE, offset, len(data), flags, cookie, data)
    error, got = c.simple_reply()
    assert got == cookie
    return error


def flush(c: RawClient, cookie: int = 99) -> int:
    c.request(p.CMD_FLUSH, cookie=cookie)
    error, got = c.simple_reply()
    assert got == cookie
    return error


def read(c: RawClient, offset: int, length: int) -> bytes:
    c.request(p.CMD_READ, offset, length, cookie=7)
    error, _ = c.simple_reply()
    assert error == 0
    return c.recv(length)


def kill(server: Server) -> None:
    server.proc.kill()
    server.proc.wait()


def test_fua_and_flushed_writes_survive_sigkill_and_restart(
    repo: NbdRepo, state: Path, tmp_path: Path
) -> None:
    model = bytearray(repo.latest("disk").data)
    rng = random.Random(5)
    with live(repo, state, tmp_path) as server:
        c = connect(server)
        # Flushed: every write before an acknowledged FLUSH.
        for i in range(40):
            off = rng.randrange(0, SIZE - 70_000)
            data = rng.randbytes(rng.randrange(1, 70_000))
            assert write(c, off, data, cookie=i) == 0
            model[off : off + len(data)] = data
        c.request(p.CMD_WRITE_ZEROES, 3 * MiB, 100_000, cookie=50)
        assert c.simple_reply() == (0, 50)
        model[3 * MiB : 3 * MiB + 100_000] = bytes(100_000)
        c.request(p.CMD_TRIM, 10_000, 5000, cookie=51)
        assert c.simple_reply() == (0, 51)
        model[10_000:15_000] = bytes(5000)
        assert flush(c) == 0
        # FUA: acknowledged as durable on its own, no FLUSH after it.
        fua = b"\xf0" * 12345
        assert write(c, 2 * MiB + 17, fua, p.CMD_FLAG_FUA, cookie=60) == 0
        model[2 * MiB + 17 : 2 * MiB + 17 + len(fua)] = fua
        kill(server)  # no DISC, no shutdown: what is on disk is all there is
        c.close()
    with live(repo, state, tmp_path) as server:
        c = connect(server)
        assert read(c, 0, SIZE) == bytes(model)
        # a second name of the volume reaches the same live export
        c2 = connect(server, f"disk@{repo.latest('disk').version}")
        assert read(c2, 2 * MiB, 20_000) == bytes(model[2 * MiB : 2 * MiB + 20_000])
        c.close()
        c2.close()
    # The served version never changed.
    assert len(versions(repo)) == 1


def test_qemu_io_with_fua_and_flush_then_sigkill(repo: NbdRepo, state: Path,
                                                 tmp_path: Path) -> None:  # fmt: skip
    model = bytearray(repo.latest("disk").data)
    cmds = ["write -P 0xab 100 5000", "write -z 64k 128k", "discard 512k 64k", "flush",
            "write -f -P 0xcd 1M 4k"]
    model[100:5100] = b"\xab" * 5000
    model[64 << 10 : 192 << 10] = bytes(128 << 10)
    model[512 << 10 : 576 << 10] = bytes(64 << 10)
    model[MiB : MiB + 4096] = b"\xcd" * 4096
    with live(repo, state, tmp_path) as server:
        r = run_tool("qemu-io", "-f", "raw", *[a for c in cmds for a in ("-c", c)],
                     server.uri("disk"), check=False)
        assert r.returncode == 0 and b"failed" not in r.stdout + r.stderr, r
        kill(server)
    with live(repo, state, tmp_path) as server:
        sha, size = tool_stdout_sha("nbdcopy", server.uri("disk"), "-")
        assert size == SIZE and sha == hashlib.sha256(model).hexdigest()


def test_a_clean_stop_keeps_unflushed_writes_too(repo: NbdRepo, state: Path,
                                                 tmp_path: Path) -> None:  # fmt: skip
    with live(repo, state, tmp_path) as server:
        c = connect(server)
        assert write(c, 4096, b"unflushed" * 100) == 0
        server.stop()
        c.close()
    with live(repo, state, tmp_path) as server:
        c = connect(server)
        assert read(c, 4096, 900) == b"unflushed" * 100
        c.close()


def test_a_full_state_dir_answers_enospc_and_loses_nothing(repo: NbdRepo, tmp_path: Path
                                                           ) -> None:  # fmt: skip
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        state = mnt / "state"
        model = bytearray(repo.latest("disk").data)
        piece = 128 << 10
        with live(repo, state, tmp_path) as server:
            c = connect(server)
            early = b"durable before the disk filled" * 100
            assert write(c, SIZE - len(early), early) == 0 and flush(c) == 0
            model[SIZE - len(early) :] = early
            errors = []
            for i in range(16):  # 2 MiB into 1 MiB of room
                data = bytes([i + 1]) * piece
                errors.append(write(c, i * piece, data, cookie=i))
                if errors[-1] == 0:
                    model[i * piece : (i + 1) * piece] = data
            assert set(errors) == {0, p.ENOSPC} and errors[0] == 0, errors
            # Every acknowledged write reads back; the refused ones changed nothing.
            assert read(c, 0, SIZE) == bytes(model)
            assert flush(c) in (0, p.ENOSPC)
            assert read(c, 0, SIZE) == bytes(model)
            server.assert_alive()
            kill(server)
            c.close()
        # Restarting on the full file system works, and what was made durable is there.
        with live(repo, state, tmp_path) as server:
            c = connect(server)
            assert read(c, SIZE - len(early), len(early)) == early
            c.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def versions(repo: NbdRepo) -> list[str]:
    return [v for _, v in repo.open().list_versions("disk")]


def test_state_files_of_another_version_are_refused(repo: NbdRepo, state: Path,
                                                    tmp_path: Path) -> None:  # fmt: skip
    with live(repo, state, tmp_path) as server:
        c = connect(server)
        assert write(c, 0, b"x") == 0 and flush(c) == 0
        c.close()
    doc_path = state / "exports" / "disk" / "export.json"
    doc = json.loads(doc_path.read_text())
    doc["version"] = 2
    doc_path.write_text(json.dumps(doc))
    r = run_cli("nbd", "serve", "--repo", repo.path, "--writable", "--state-dir", state,
                "--listen", "127.0.0.1:0")
    assert r.returncode != 0 and "version 2 is not supported" in r.stderr, r
    doc["version"] = 1
    doc_path.write_text(json.dumps(doc))
    layer_map = state / "exports" / "disk" / "layer-1.map"
    blob = bytearray(layer_map.read_bytes())
    blob[16] = 9  # the map header's version
    layer_map.write_bytes(bytes(blob))
    r = run_cli("nbd", "serve", "--repo", repo.path, "--writable", "--state-dir", state,
                "--listen", "127.0.0.1:0")
    assert r.returncode != 0 and "overlay map version 9 is not supported" in r.stderr, r


def test_one_server_per_state_dir(repo: NbdRepo, state: Path, tmp_path: Path) -> None:
    with live(repo, state, tmp_path):
        r = run_cli("nbd", "serve", "--repo", repo.path, "--writable", "--state-dir", state,
                    "--listen", "127.0.0.1:0")
        assert r.returncode == 2 and "in use by another" in r.stderr, r
    bad = run_cli("nbd", "serve", "--repo", repo.path, "--state-dir", state)
    assert bad.returncode == 2 and "--state-dir need --writable" in bad.stderr

