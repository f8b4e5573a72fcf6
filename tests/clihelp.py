"""Helpers for the tests that drive the `snapship` command line as a subprocess.

A plain module (not a conftest): test_cli_errors.py, test_crash_safety.py and
test_concurrency.py import what they need from here.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from snapship.repository.repo import Repository

PASSPHRASE = "correct horse battery staple"
STATE_ENV = "SNAPSHIP_STATE_DIR"
CHUNK = 64 * 1024
CLI = [sys.executable, "-m", "snapship.cli.main"]
CLI_TIMEOUT = 120.0

Result = subprocess.CompletedProcess[str]
Args = list[str | Path]


_state_dir: Path | None = None


def use_state_dir(path: Path) -> None:
    """Make `path` this test session's SNAPSHIP_STATE_DIR (conftest does, at the start)."""
    global _state_dir
    _state_dir = path
    os.environ[STATE_ENV] = str(path)  # for in-process code, and subprocesses that inherit


def state_dir() -> Path:
    """Where this test session's CLI calls keep their known-repositories file: a temporary
    directory for the session, never the real home (see use_state_dir)."""
    if _state_dir is None:  # outside pytest: a directory of our own
        path = Path(tempfile.mkdtemp(prefix="snapship-test-state-"))
        atexit.register(shutil.rmtree, path, True)
        use_state_dir(path)
    assert _state_dir is not None
    return _state_dir


def cli_env(passphrase: str | None = PASSPHRASE, state: Path | None = None) -> dict[str, str]:
    """The environment of a CLI call: ours minus any SNAPSHIP_* setting, plus the passphrase
    and the session's state directory (or `state`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPSHIP_")}
    if passphrase is not None:
        env["SNAPSHIP_PASSPHRASE"] = passphrase
    env[STATE_ENV] = str(state or state_dir())
    return env


def run_cli(
    *args: str | os.PathLike[str],
    passphrase: str | None = PASSPHRASE,
    timeout: float = CLI_TIMEOUT,
    prefix: Sequence[str] = (),
    state: Path | None = None,
) -> Result:
    """Run `snapship ARGS...` to completion; stdin is /dev/null so it never prompts."""
    return subprocess.run(
        [*prefix, *CLI, *map(str, args)],
        env=cli_env(passphrase, state),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


_LAUNCHER = """
import os, sys
report = int(sys.argv[1])
pid = os.fork()
if pid == 0:
    os.close(report)
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
os.write(report, str(usage.ru_maxrss).encode())
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_cli_peak_rss(
    *args: str | os.PathLike[str],
    passphrase: str | None = PASSPHRASE,
    timeout: float = CLI_TIMEOUT,
) -> tuple[Result, int]:
    """`run_cli`, plus the command's own peak resident memory in bytes.

    The kernel's peak (ru_maxrss) survives fork and exec: a child of this test process would
    report at least this process's own size. So a small launcher forks the command and reports
    the rusage of exactly that grandchild (os.wait4; ru_maxrss is in KiB on Linux)."""
    read_end, write_end = os.pipe()
    try:
        r = subprocess.run([sys.executable, "-c", _LAUNCHER, str(write_end), *CLI,
                            *map(str, args)],
                           env=cli_env(passphrase), stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=timeout, check=False,
                           pass_fds=(write_end,))
        os.close(write_end)
        write_end = -1
        with os.fdopen(read_end, "rb") as f:
            read_end = -1
            peak_kib = int(f.read() or b"0")
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    return r, peak_kib * 1024


def start_cli(
    *args: str | os.PathLike[str], passphrase: str | None = PASSPHRASE,
    state: Path | None = None,
) -> subprocess.Popen[str]:
    """Start `snapship ARGS...` without waiting; the caller must wait() or kill() it."""
    return subprocess.Popen(
        [*CLI, *map(str, args)],
        env=cli_env(passphrase, state),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def describe(r: Result) -> str:
    return f"exit {r.returncode}\n--- stdout\n{r.stdout}--- stderr\n{r.stderr}"


def ok(r: Result) -> Result:
    """Assert a call succeeded quietly (no warnings or errors on stderr)."""
    assert r.returncode == 0, describe(r)
    assert "error" not in r.stderr.lower(), describe(r)
    return r


def assert_one_line_error(r: Result, *fragments: str, code: int | None = None) -> str:
    """A user error: non-zero exit, exactly one `snapship: error:` line, no traceback.

    Every fragment must occur in the message (case-insensitive); returns the line.
    """
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0, describe(r)
    if code is not None:
        assert r.returncode == code, describe(r)
    assert len(lines) == 1, describe(r)
    line = lines[0]
    assert line.startswith("snapship: error: "), describe(r)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, describe(r)
    for fragment in fragments:
        assert fragment.lower() in line.lower(), f"{fragment!r} not in {line!r}"
    return line


def assert_json_error(r: Result, kind: str, code: int, *fragments: str) -> dict[str, Any]:
    """The error object an --json command printed: nothing on stdout, stderr's last line the
    object (and the only line that is JSON), the exit code it names."""
    assert r.returncode == code, describe(r)
    assert r.stdout == "", describe(r)
    lines = r.stderr.strip().splitlines()
    assert lines, describe(r)
    assert [line for line in lines[:-1] if line.startswith("{")] == [], describe(r)
    obj: dict[str, Any] = json.loads(lines[-1])
    assert obj["version"] == 1, obj
    assert obj["error"]["kind"] == kind, obj
    assert obj["error"]["exit_code"] == code, obj
    assert "\n" not in obj["error"]["message"], obj
    for fragment in fragments:
        assert fragment.lower() in obj["error"]["message"].lower(), obj
    return obj


# -- repository operations through the CLI ------------------------------------------------


def init_repo(repo: Path, encryption: str = "aes-256-gcm", chunk_size: str = "64K") -> None:
    """`snapship init`, with the real scrypt cost (about 0.3 s per later command)."""
    ok(run_cli("init", "--repo", repo, "--encryption", encryption, "--chunk-size", chunk_size))


def init_repo_fast_kdf(
    repo: Path, encryption: str = "aes-256-gcm", chunk_size: int = CHUNK, *,
    remember: bool = True,
) -> None:
    """Create a repository as `init` does, but with a cheap scrypt cost in its key file.

    Every later CLI command unlocks it in milliseconds instead of 0.3 s; nothing else differs
    (the cost parameters are stored in the key file, the CLI reads them from there). Like
    `init`, it records the repository in the session's known-repositories file, so CLI calls
    with the test passphrase accept it, unencrypted too (`remember=False`: a repository this
    machine has never met).
    """
    from snapship.crypto import ScryptParams
    from snapship.repository.repo import Repository
    from snapship.storage.local import LocalStorage

    r = Repository.create(
        LocalStorage(str(repo)),
        encryption=encryption,
        chunk_size=chunk_size,
        passphrase=lambda: PASSPHRASE.encode(),
        kdf=ScryptParams(n=1 << 10),
    )
    if remember:
        remember_repository(r)


def remember_repository(repo: Repository, state: Path | None = None) -> None:
    """Record a repository made through the Python API as `snapship init` records the ones it
    makes, in the session's state directory (or `state`)."""
    from snapship.cli import known_repos

    known_repos.remember(repo.config, repo.storage.describe(),
                         known_repos.state_file(state or state_dir()))


def backup(repo: Path, source: Path, volume: str, *labels: str) -> str:
    """Back up `source` as a new version of `volume`; returns the version id."""
    label_args = [a for label in labels for a in ("--label", label)]
    r = ok(run_cli("backup", "--repo", repo, source, "--volume", volume, *label_args, "--json"))
    info = json.loads(r.stdout)
    assert info["volume"] == volume
    version: str = info["version_id"]
    return version


def restore(repo: Path, ref: str, target: Path) -> None:
    ok(run_cli("restore", "--repo", repo, ref, target))


def verify(repo: Path, deep: bool = True) -> tuple[int, dict[str, Any]]:
    """(exit code, JSON report) of `snapship verify`."""
    r = run_cli("verify", "--repo", repo, "--json", *(["--deep"] if deep else []))
    assert r.returncode in (0, 1), describe(r)
    assert r.stderr == "", describe(r)
    report: dict[str, Any] = json.loads(r.stdout)
    assert report["ok"] is (r.returncode == 0), describe(r)
    return r.returncode, report


def assert_verify_ok(repo: Path, deep: bool = True) -> dict[str, Any]:
    code, report = verify(repo, deep)
    assert code == 0 and report["ok"] is True, report
    assert not report["bad_chunks"] and not report["bad_versions"], report
    return report


def version_ids(repo: Path, volume: str | None = None) -> list[tuple[str, str]]:
    """(volume, version) of every version, as `snapship versions --json` lists them."""
    extra = ["--volume", volume] if volume else []
    r = ok(run_cli("versions", "--repo", repo, "--json", *extra))
    return [(row["volume"], row["version_id"]) for row in json.loads(r.stdout)["versions"]]


# -- files, images and loop devices -------------------------------------------------------


def sha256_file(path: Path, length: int | None = None) -> str:
    """SHA-256 of a file or block device, or of its first `length` bytes."""
    h = hashlib.sha256()
    remaining = length
    with open(path, "rb") as f:
        while remaining is None or remaining > 0:
            want = 1 << 20 if remaining is None else min(1 << 20, remaining)
            block = f.read(want)
            if not block:
                break
            h.update(block)
            if remaining is not None:
                remaining -= len(block)
    if remaining:
        raise AssertionError(f"{path} ended {remaining} bytes early")
    return h.hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_bytes(size: int, seed: int, zero_chunks: Sequence[int] = ()) -> bytearray:
    """Deterministic random data of `size` bytes with the given 64K chunks zeroed."""
    data = bytearray(random.Random(seed).randbytes(size))
    for i in zero_chunks:
        data[i * CHUNK : (i + 1) * CHUNK] = bytes(len(data[i * CHUNK : (i + 1) * CHUNK]))
    return data


def write_image(path: Path, data: bytes | bytearray) -> str:
    """Write an image file; returns its SHA-256."""
    path.write_bytes(data)
    return sha256(bytes(data))


def assert_restores(repo: Path, ref: str, target: Path, expected_sha: str) -> None:
    """`restore` of `ref` produces exactly the image with SHA-256 `expected_sha`."""
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    restore(repo, ref, target)
    assert sha256_file(target) == expected_sha, f"{ref} did not restore byte-identical"


def copy_repo(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def can_use_loop_devices() -> str | None:
    """None if loop devices can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "loop devices need root"
    if shutil.which("losetup") is None:
        return "losetup is not installed"
    return None


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    """Attach `backing` to a free loop device for the duration of the block."""
    r = subprocess.run(
        ["losetup", "-f", "--show", str(backing)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if r.returncode != 0:
        import pytest

        pytest.skip(f"cannot attach a loop device: {r.stderr.strip()}")
    dev = Path(r.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False, timeout=30)


def chunk_files(repo: Path) -> list[Path]:
    """Every complete chunk object file (temporary `.tmp-*` files left out)."""
    return sorted(
        p for p in (repo / "chunks").glob("*/*") if p.is_file() and not p.name.startswith(".tmp-")
    )


def check_every_chunk_file_decodes(
    repo: Path, passphrase: str = PASSPHRASE, skip: set[str] | None = None
) -> set[str]:
    """Open every chunk file under chunks/ with the Python API: each must be whole and correct.

    Referenced or not: an interrupted backup must not leave a partial object under a real
    name. Returns the names checked (plus `skip`, the names already known good).
    """
    from snapship.repository.repo import Repository
    from snapship.storage.local import LocalStorage

    r = Repository.open(LocalStorage(str(repo)), lambda: passphrase.encode())
    seen = set(skip or ())
    for path in chunk_files(repo):
        if path.name in seen:
            continue
        assert path.parent.name == path.name[:2], f"chunk {path} is in the wrong directory"
        cid = bytes.fromhex(path.name)
        data = r.get_chunk(cid)  # raises Corrupt on a partial or damaged object
        assert 0 < len(data) <= r.chunk_size
        seen.add(path.name)
    return seen


# -- watching and pausing processes ----------------------------------------------------------


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def new_chunks(repo: Path, before: set[str]) -> int:
    """Chunk files stored since `before` was taken (the image's new chunks come after the
    reused ones, so by then those were all found by stat)."""
    n = 0
    if not (repo / "chunks").is_dir():
        return 0
    for d in os.scandir(repo / "chunks"):
        n += sum(1 for e in os.scandir(d.path) if e.name not in before
                 and not e.name.startswith(".tmp-"))
    return n


PID_NAMESPACE = [
    "unshare", "-p", "--fork", "--mount-proc", "sh", "-c",
    # The new mount namespace starts as a copy of this one, other tests' loop mounts too; held
    # here, they would outlive those tests' umount unwritten (tests/fsimages.py): let go.
    'findmnt -rn -o TARGET | grep "^/tmp/pytest-of-" | sort -r | while read -r m; do '
    'umount -l "$m" || true; done; exec "$@"', "sh"]
"""A command prefix: what follows runs as pid 1 of a PID namespace, with its own /proc, as
in a container."""


def child_pid(pid: int) -> int:
    """The one child of `pid` (what `unshare --fork` runs)."""
    def children() -> list[int]:
        found = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
        return found

    wait_for(children, "unshare to start its child")
    return children()[0]
