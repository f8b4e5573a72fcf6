"""Live exports (`--writable --state-dir`): durable overlays and checkpoints, with real clients.

Every write acknowledged with FUA, or before a FLUSH was acknowledged, survives a SIGKILL of
the server and reads back after a restart on the same state directory; a full state directory
answers ENOSPC and loses nothing; checkpoints cut while a client stays connected restore to
the content of their moment.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import random
import re
import select
import shutil
import subprocess
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from snapship.nbd import protocol as p
from tests.clihelp import assert_verify_ok, ok, run_cli
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


def qemu_io_then_kill(server: Server, cmds: list[str]) -> None:
    """Run qemu-io's `cmds` and SIGKILL the server once qemu-io has printed every one as
    done (acknowledged), before qemu-io closes the export (which would send a FLUSH)."""
    master, slave = pty.openpty()  # a terminal: qemu-io prints each result as it comes
    # cache=unsafe: no FLUSH after each write (qemu-io's default is writethrough)
    args = [a for c in cmds for a in ("-c", c)]
    proc = subprocess.Popen(["qemu-io", "-t", "unsafe", "-f", "raw", *args,
                             "-c", "sleep 600000", server.uri("disk")],
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 60
        while len(re.findall(rb"^(wrote|discard) ", out, re.M)) < len(cmds):
            assert proc.poll() is None and time.monotonic() < deadline, out
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                out += os.read(master, 4096)
        assert b"failed" not in out, out
        kill(server)
    finally:
        proc.kill()
        proc.wait()
        os.close(master)


def test_unflushed_writes_survive_sigkill_and_are_dropped_after_a_reboot(
    repo: NbdRepo, state: Path, tmp_path: Path
) -> None:
    """The map journal: every acknowledged write is back after the server is SIGKILLed with no
    FLUSH (its page cache survives a process); after a reboot (another boot id, through the
    test-only SNAPSHIP_TEST_BOOT_ID) only what a FLUSH made durable is."""
    durable = bytearray(repo.latest("disk").data)
    with live(repo, state, tmp_path) as server:
        run_tool("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64k", "-c", "flush",
                 server.uri("disk"))
        durable[: 64 << 10] = b"\x11" * (64 << 10)
        everything = bytearray(durable)
        # qemu flushes when it closes the export: the server is killed while it is still open.
        # (None overwrites the flushed write: after a reboot such a range may read as either.)
        cmds = ["write -P 0x22 64k 100k", "write -z 2M 64k", "discard 3M 64k",
                "write -P 0x33 3M 4k", "write -P 0x44 4095k 1k"]
        qemu_io_then_kill(server, cmds)
        everything[64 << 10 : 164 << 10] = b"\x22" * (100 << 10)
        everything[2 * MiB : 2 * MiB + (64 << 10)] = bytes(64 << 10)
        everything[3 * MiB : 3 * MiB + (64 << 10)] = bytes(64 << 10)
        everything[3 * MiB : 3 * MiB + 4096] = b"\x33" * 4096
        everything[SIZE - 1024 :] = b"\x44" * 1024
    for _ in range(2):  # and a second kill, with nothing flushed in between, changes nothing
        with live(repo, state, tmp_path) as server:
            sha, _ = tool_stdout_sha("nbdcopy", server.uri("disk"), "-")
            assert sha == hashlib.sha256(everything).hexdigest()
            kill(server)
    # The same entries, read in another boot: not durable, so dropped; the flushed write stays.
    rebooted = {"SNAPSHIP_TEST_BOOT_ID": "0c2f3a52-7d0e-4c55-9a4b-3f1d1d7b0e11"}
    with serve(repo.path, "--writable", "--state-dir", str(state), log_dir=tmp_path,
               env=rebooted) as server:
        sha, _ = tool_stdout_sha("nbdcopy", server.uri("disk"), "-")
        assert sha == hashlib.sha256(durable).hexdigest()
        assert "5 map records not made durable" in server.log()
        # and it goes on as a normal export: a write, a flush, another boot: there
        run_tool("qemu-io", "-f", "raw", "-c", "write -P 0x55 1M 4k", "-c", "flush",
                 server.uri("disk"))
        durable[MiB : MiB + 4096] = b"\x55" * 4096
        kill(server)
    with serve(repo.path, "--writable", "--state-dir", str(state), log_dir=tmp_path,
               env={"SNAPSHIP_TEST_BOOT_ID": "5b0c6f0e-1b2a-4c3d-8e9f-a0b1c2d3e4f5"}) as server:
        sha, _ = tool_stdout_sha("nbdcopy", server.uri("disk"), "-")
        assert sha == hashlib.sha256(durable).hexdigest()


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


def wait_for_versions(repo: NbdRepo, count: int, server: Server) -> None:
    deadline = time.monotonic() + 60
    while len(versions(repo)) < count:  # polled: a timer-made version has no other signal
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)


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



# -- checkpoints ---------------------------------------------------------------------------


def checkpoint(state: Path, volume: str = "disk") -> dict[str, object]:
    r = ok(run_cli("nbd", "checkpoint", volume, "--state-dir", state, "--json"))
    result: dict[str, object] = json.loads(r.stdout)
    return result


def restored_sha(repo: NbdRepo, ref: str, tmp_path: Path) -> str:
    out = tmp_path / f"restored-{ref.replace('@', '-')}.img"
    ok(run_cli("restore", "--repo", repo.path, ref, out))
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return sha


class Writer(threading.Thread):
    """One client writing sequentially (each write acknowledged before the next), noting the
    content's checksum after every acknowledgement, until told to stop."""

    def __init__(self, server: Server, base: bytes, seed: int) -> None:
        super().__init__()
        self.client = connect(server)
        self.model = bytearray(base)
        self.rng = random.Random(seed)
        self.shas = [hashlib.sha256(self.model).hexdigest()]
        self.lock = threading.Condition()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            cookie = 0
            while not self.stop.is_set():
                cookie += 1
                n = self.rng.randrange(1, 100_000)
                off = self.rng.randrange(0, SIZE - n)
                data = self.rng.randbytes(n)
                assert write(self.client, off, data, cookie=cookie) == 0
                self.model[off : off + n] = data
                with self.lock:
                    self.shas.append(hashlib.sha256(self.model).hexdigest())
                    self.lock.notify_all()
        except BaseException as e:  # reported by the test
            self.error = e
            with self.lock:
                self.lock.notify_all()

    def wait_for(self, writes: int) -> None:
        """Until `writes` more writes are acknowledged (or the writer failed)."""
        with self.lock:
            target = len(self.shas) + writes
            assert self.lock.wait_for(
                lambda: len(self.shas) >= target or self.error is not None, 60)
        assert self.error is None, self.error

    def position(self) -> int:
        with self.lock:
            return len(self.shas)


def test_checkpoints_while_a_client_writes_restore_to_their_moment(
    repo: NbdRepo, state: Path, tmp_path: Path
) -> None:
    base = repo.latest("disk")
    with live(repo, state, tmp_path) as server:
        writer = Writer(server, base.data, seed=9)
        writer.start()
        cuts = []
        try:
            for _ in range(3):
                writer.wait_for(20)  # some writes between checkpoints
                before = writer.position()
                cp = checkpoint(state)
                cuts.append((cp, before, writer.position()))
        finally:
            writer.stop.set()
            writer.join()
        assert writer.error is None, writer.error
        # Each checkpoint is the content after some write acknowledged between its request
        # and its answer (the freeze is at a FLUSH boundary between two writes).
        refs = []
        for cp, before, after in cuts:
            assert cp["changed"] is True and int(str(cp["dirty_bytes"])) > 0, cp
            sha = restored_sha(repo, str(cp["ref"]), tmp_path)
            assert sha in writer.shas[before - 1 : after], (cp, before, after)
            refs.append(str(cp["ref"]))
        # One more, with the writer stopped: exactly the content.
        final = checkpoint(state)
        assert restored_sha(repo, str(final["ref"]), tmp_path) == writer.shas[-1]
        assert checkpoint(state)["changed"] is False  # nothing since: no new version
        writer.client.close()
        # The chain: each checkpoint's parent is the one before; the base moved along.
        shown = [json.loads(ok(run_cli("show", "--repo", repo.path, r, "--json")).stdout)
                 for r in [*refs, str(final["ref"])]]
        parents = [s["parent"] for s in shown]
        assert parents == [base.version, *[r.split("@")[1] for r in refs]], parents
        # Committed layers are dropped: one layer left, the overlay small again.
        layers = sorted(x.name for x in (state / "exports" / "disk").glob("layer-*"))
        assert len(layers) == 2, layers  # one .data, one .map
        doc = json.loads((state / "exports" / "disk" / "export.json").read_text())
        assert doc["base"] == str(final["version_id"]) and len(doc["layers"]) == 1
        c = connect(server)
        assert hashlib.sha256(read(c, 0, SIZE)).hexdigest() == writer.shas[-1]
        c.close()


def test_gc_and_prune_beside_a_live_export_with_checkpoints(repo: NbdRepo, state: Path,
                                                            tmp_path: Path) -> None:  # fmt: skip
    base = repo.latest("disk")
    with live(repo, state, tmp_path) as server:
        writer = Writer(server, base.data, seed=10)
        writer.start()
        try:
            for _ in range(2):
                writer.wait_for(10)
                checkpoint(state)
                ok(run_cli("prune", "--repo", repo.path, "--keep-last", "1"))
                ok(run_cli("gc", "--repo", repo.path))
        finally:
            writer.stop.set()
            writer.join()
        assert writer.error is None, writer.error
        ok(run_cli("gc", "--repo", repo.path))  # a second gc deletes what the first set aside
        last = checkpoint(state)
        ok(run_cli("prune", "--repo", repo.path, "--keep-last", "1"))
        ok(run_cli("gc", "--repo", repo.path))
        assert versions(repo) == [str(last["version_id"])]
        assert restored_sha(repo, str(last["ref"]), tmp_path) == writer.shas[-1]
        c = connect(server)
        assert hashlib.sha256(read(c, 0, SIZE)).hexdigest() == writer.shas[-1]
        c.close()
        writer.client.close()
    assert_verify_ok(repo.path)


def test_checkpoint_triggers_and_a_restart_with_a_frozen_layer(repo: NbdRepo, state: Path,
                                                               tmp_path: Path) -> None:  # fmt: skip
    with live(repo, state, tmp_path, "--checkpoint-on-flush",
              "--checkpoint-min-interval", "0.1") as server:
        c = connect(server)
        assert write(c, 0, b"on flush" * 512) == 0 and flush(c) == 0
        wait_for_versions(repo, 2, server)
        c.close()
    with live(repo, state, tmp_path, "--checkpoint-every", "1s") as server:
        c = connect(server)
        assert write(c, 8192, b"on a timer" * 100) == 0
        wait_for_versions(repo, 3, server)
        c.close()
    # A layer frozen when the server died (a checkpoint cut short): listed in the state,
    # committed first by the next checkpoint, which then takes the current content too.
    d = state / "exports" / "disk"
    doc = json.loads((d / "export.json").read_text())
    (n,) = doc["layers"]
    model = bytearray(repo.open().load_manifest("disk", doc["base"]).size)
    with live(repo, state, tmp_path) as server:
        c = connect(server)
        model[:] = read(c, 0, SIZE)
        assert write(c, 100, b"frozen" * 10, p.CMD_FLAG_FUA) == 0
        model[100:160] = b"frozen" * 10
        kill(server)
        c.close()
    # simulate the freeze's durable state: the old layer frozen, a fresh one active
    fresh = n + 1
    for kind in ("data", "map"):
        shutil.copy(d / f"layer-{n}.{kind}", d / f"layer-{fresh}.{kind}")
    from snapship.nbd.durable import DurableLayer
    layer = DurableLayer(d, fresh, SIZE, create=False)
    layer.journal(0, SIZE, 2)  # the fresh layer: everything zero, on top
    layer.flush_blocking()
    layer.close()
    doc.update(layers=[n, fresh], next_layer=fresh + 1)
    (d / "export.json").write_text(json.dumps(doc))
    with live(repo, state, tmp_path) as server:
        c = connect(server)
        assert read(c, 0, SIZE) == bytes(SIZE)
        cp = checkpoint(state)
        assert restored_sha(repo, str(cp["ref"]), tmp_path) == hashlib.sha256(
            bytes(SIZE)).hexdigest()
        both = versions(repo)[-2:]  # the frozen layer's version, then the current content
        assert restored_sha(repo, f"disk@{both[0]}", tmp_path) == hashlib.sha256(
            model).hexdigest()
        assert both[1] == cp["version_id"]
        c.close()


def test_a_state_dir_too_long_for_a_socket_path_still_takes_checkpoints(
    repo: NbdRepo, tmp_path: Path
) -> None:
    state = tmp_path / ("long-" * 24) / "state"  # past the 108 bytes of a socket address
    assert len(str(state / "control.sock")) > 108
    with live(repo, state, tmp_path) as server:
        c = connect(server)
        assert write(c, 0, b"long" * 1024) == 0
        cp = checkpoint(state)
        assert cp["changed"] is True and cp["dirty_bytes"] == 4096
        c.close()
