"""Issue 12: interrupted restores leave nothing that looks complete (real processes).

The restores run through a real `snapship server` with `--limit-download`, so that one takes
seconds and is caught mid-way deterministically: the test polls the target until a chunk well
inside the image holds its data, then SIGKILLs the restore (stopped first, so that it cannot
finish between the check and the kill). The image is a real ext4 file system (mkfs.ext4 -d
with a file of random data), so "does not look complete" is what blkid and mount say too.

- A file restore killed: the target name holds what it held before (here: nothing, or an old
  file, untouched); only a clearly named temporary is left, and the next restore removes it
  and succeeds.
- A file restore onto a full file system (a small tmpfs): exit 1, one line naming the full
  disk, no file at the target name and no temporary left.
- A device restore (a loop device) killed: blkid finds no file system, mount fails, the first
  chunk carries the INCOMPLETE marker, `verify --against`, a `backup` of it and the next
  `restore` say the device holds an incomplete restore; `restore --differential` then
  writes only what is missing, and a plain rerun restores it whole.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snapship.devices import INCOMPLETE_MARK
from tests.clihelp import (
    CHUNK,
    Result,
    assert_json_error,
    assert_one_line_error,
    can_use_loop_devices,
    describe,
    loop_device,
    sha256_file,
    wait_for,
)
from tests.serverproc import (
    ServerProc,
    create_repo_fast_kdf,
    http_storage,
    run_cli_env,
    running_server,
    start_cli_env,
)

MiB = 1 << 20
SIZE = 8 * MiB
RATE = "2M"  # an 8 MiB image, ~6 MiB of it data: about 3 s per restore
CAUGHT_AT = 2 * MiB  # the chunk at this offset must have arrived before the kill


class Repo:
    def __init__(self, server: ServerProc, token: str, image: Path) -> None:
        self.url = server.url("r")
        self.env = {"SNAPSHIP_TOKEN": token}
        self.image = image
        self.image_bytes = image.read_bytes()
        self.sha = sha256_file(image)

    def run(self, *args: str | os.PathLike[str]) -> Result:
        return run_cli_env(*args, "--repo", self.url, env=self.env)

    def start(self, *args: str | os.PathLike[str]) -> subprocess.Popen[str]:
        return start_cli_env(*args, "--repo", self.url, env=self.env)

    def data_chunk_offset(self) -> int:
        """The offset of the first chunk from CAUGHT_AT on that is not all zeroes."""
        off = CAUGHT_AT
        while self.image_bytes[off:off + CHUNK].count(0) == CHUNK:
            off += CHUNK
        assert off + CHUNK < SIZE - MiB, "the image has no data where the kill is placed"
        return off


def make_ext4_image(path: Path, work: Path) -> None:
    """An 8 MiB ext4 image holding a 6 MiB file of random data (mkfs.ext4 -d: no mount)."""
    tree = work / "tree"
    tree.mkdir()
    (tree / "random.bin").write_bytes(os.urandom(6 * MiB))
    with open(path, "wb") as f:
        f.truncate(SIZE)
    r = subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), "-L", "orig", str(path)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Repo]:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 (e2fsprogs) is not installed")
    tmp = tmp_path_factory.mktemp("interrupted")
    image = tmp / "disk.img"
    make_ext4_image(image, tmp)
    with running_server(tmp / "srv") as (server, tokens):
        create_repo_fast_kdf(http_storage(server, "r", tokens["ops"]))
        r = Repo(server, tokens["ops"], image)
        b = r.run("backup", image, "--volume", "disk")
        assert b.returncode == 0, describe(b)
        yield r


def kill_when(proc: subprocess.Popen[str], arrived: Callable[[], bool], what: str) -> str:
    """SIGKILL `proc` once `arrived()` holds (it must still be running then); its stderr."""
    try:
        wait_for(lambda: proc.poll() is not None or arrived(), what)
        proc.send_signal(signal.SIGSTOP)
        assert proc.poll() is None, "the restore finished before it could be killed: " + \
            (proc.communicate()[1] or "")
        proc.send_signal(signal.SIGKILL)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
        return err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def holds(path: Path, offset: int, expected: bytes) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        return os.pread(fd, len(expected), offset) == expected
    finally:
        os.close(fd)


def temporaries(directory: Path, name: str) -> list[Path]:
    return sorted(directory.glob(f".{name}.snapship-restore-*"))


def blkid_type(dev: Path) -> str | None:
    r = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", str(dev)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode in (0, 2), r.stderr
    return r.stdout.strip() or None


def test_a_killed_file_restore_leaves_only_a_named_temporary_and_the_rerun_works(
        repo: Repo, tmp_path: Path) -> None:
    off = repo.data_chunk_offset()
    expected = repo.image_bytes[off:off + CHUNK]
    for old in (None, b"an older copy, kept until a restore completes\n"):
        out = tmp_path / "out.img"
        if old is not None:
            out.write_bytes(old)
        proc = repo.start("restore", "disk", out, "--limit-download", RATE)
        kill_when(proc, lambda: any(holds(t, off, expected)
                                    for t in temporaries(tmp_path, "out.img")),
                  "the restore's temporary file to hold data past 2 MiB")
        # The target name is as it was; the only other file is the clearly named temporary.
        if old is None:
            assert not out.exists()
        else:
            assert out.read_bytes() == old
        left = temporaries(tmp_path, "out.img")
        assert len(left) == 1, left
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [left[0].name] + (["out.img"] if old is not None else []))

        r = repo.run("restore", "disk", out)
        assert r.returncode == 0, describe(r)
        assert sha256_file(out) == repo.sha
        # The rerun removed what the killed one left (no restore held it any more).
        assert temporaries(tmp_path, "out.img") == [], describe(r)
        assert f"removed {left[0].name}" in r.stderr, describe(r)
        out.unlink()


def test_a_restore_onto_a_full_file_system_fails_in_one_line_and_leaves_nothing(
        repo: Repo, tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)],
                       capture_output=True, text=True, timeout=60, check=False)
    if m.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {m.stderr.strip()}")
    try:
        r = repo.run("restore", "disk", mnt / "out.img")
        line = assert_one_line_error(r, "no space left", str(mnt / "out.img"), code=1)
        assert "full" in line.lower(), line
        assert list(mnt.iterdir()) == [], "a full disk left a file behind"
        # --json says the same, as an error object.
        assert_json_error(repo.run("restore", "disk", mnt / "out.img", "--json"),
                          "target", 1, "no space left", "full")
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False, timeout=60)


loop_reason = can_use_loop_devices()


@pytest.mark.skipif(loop_reason is not None, reason=loop_reason or "")
def test_a_killed_device_restore_says_it_is_incomplete(repo: Repo, tmp_path: Path) -> None:
    if shutil.which("blkid") is None:
        pytest.skip("blkid (util-linux) is not installed")
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(SIZE)
    off = repo.data_chunk_offset()
    expected = repo.image_bytes[off:off + CHUNK]
    with loop_device(backing) as dev:
        for rerun in ("differential", "plain"):
            proc = repo.start("restore", "disk", dev, "--limit-download", RATE)
            kill_when(proc, lambda: holds(dev, off, expected),
                      "the device to hold data past 2 MiB")
            # Not a file system to anyone: the first chunk is the marker, not ext4's.
            with open(dev, "rb") as f:
                head = f.read(CHUNK)
            assert head.startswith(INCOMPLETE_MARK + b"disk@"), head[:80]
            assert head[512:] == bytes(CHUNK - 512)
            assert blkid_type(dev) is None
            mnt = tmp_path / "mnt"
            mnt.mkdir(exist_ok=True)
            m = subprocess.run(["mount", "-o", "ro", str(dev), str(mnt)],
                               capture_output=True, text=True, timeout=60, check=False)
            if m.returncode == 0:
                subprocess.run(["umount", str(mnt)], check=False, timeout=60)
            assert m.returncode != 0, "a half-restored device mounted"
            # What the user runs next says so.
            v = repo.run("verify", "disk", "--against", dev)
            assert v.returncode == 1, describe(v)
            assert "incomplete restore of disk@" in v.stdout, describe(v)
            vj = json.loads(repo.run("verify", "disk", "--against", dev, "--json").stdout)
            assert vj["incomplete_restore"].startswith("disk@"), vj
            assert vj["ok"] is False and 0 in [d["first"] for d in vj["differing"]], vj
            if rerun == "differential":  # a backup of it says so too
                b = repo.run("backup", dev, "--volume", "half")
                assert b.returncode == 0, describe(b)
                assert f"source {dev} holds an incomplete restore of disk@" in b.stderr, \
                    describe(b)

            if rerun == "differential":
                # No --force needed (the marker is no signature); only the missing chunks go.
                r = repo.run("restore", "--differential", "disk", dev, "--json")
                assert r.returncode == 0, describe(r)
                stats = json.loads(r.stdout)
                data_chunks = sum(1 for i in range(0, SIZE, CHUNK)
                                  if repo.image_bytes[i:i + CHUNK].count(0) != CHUNK)
                assert 0 < stats["chunks_written"] < data_chunks, stats
            else:
                r = repo.run("restore", "disk", dev)
                assert r.returncode == 0, describe(r)
            assert "holds an incomplete restore of disk@" in r.stderr, describe(r)
            assert sha256_file(dev, SIZE) == repo.sha
            assert blkid_type(dev) == "ext4"
            assert repo.run("verify", "disk", "--against", dev).returncode == 0
            # Blank it again for the next round (a signature would need --force).
            with open(dev, "r+b") as f:
                f.write(bytes(SIZE))
                os.fsync(f.fileno())
