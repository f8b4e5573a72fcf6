"""A real `snapship server` subprocess on a free loopback port, for the server tests.

A plain module (not a conftest): the test_server_*.py modules and test_storage.py import what
they need. The server is started as users start it (`python -m snapship.cli.main server`),
its log is collected line by line, and it can be stopped, killed and restarted on the same
port (to test clients riding through a restart).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from snapship.crypto import ScryptParams
from snapship.repository.repo import Repository
from snapship.server.policy import Role
from snapship.server.tokens import HEADER, hash_token, new_token, token_line
from snapship.storage.http import HttpStorage
from snapship.storage.retry import RetryPolicy
from tests.clihelp import CLI, CLI_TIMEOUT, PASSPHRASE, Result, cli_env, remember_repository

START_TIMEOUT = 30.0
_SERVING = re.compile(r"serving .* on (https?://\S+)")

# (name, role, scope) of the tokens every server test gets; scope None = every repository.
STANDARD_TOKENS: tuple[tuple[str, Role, frozenset[str] | None], ...] = (
    ("ops", Role.ADMIN, None),
    ("db1-backup", Role.BACKUP, None),
    ("db1-backup-2", Role.BACKUP, None),
    ("restorer", Role.READ, None),
    ("only-r1", Role.BACKUP, frozenset({"r1"})),
)


def write_tokens(path: Path,
                 entries: Sequence[tuple[str, Role, frozenset[str] | None]] = STANDARD_TOKENS
                 ) -> dict[str, str]:
    """A token file with these tokens; returns name -> token."""
    tokens = {name: new_token() for name, _role, _scope in entries}
    lines = [f"{HEADER}\n"] + [token_line(name, role, scope, hash_token(tokens[name]))
                               for name, role, scope in entries]
    path.write_text("".join(lines))
    return tokens


def token_files(directory: Path, tokens: dict[str, str]) -> dict[str, Path]:
    """One `--token-file` per token, named after it."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, token in tokens.items():
        out[name] = directory / f"{name}.token"
        out[name].write_text(token + "\n")
    return out


class ServerProc:
    """`snapship server` as a subprocess; use as a context manager."""

    def __init__(self, root: Path, tokens_file: Path, *, tls: tuple[Path, Path] | None = None,
                 root_url: str | None = None,
                 extra: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.root = root
        self.env = env or {}
        self.tokens_file = tokens_file
        self.tls = tls
        self.extra = list(extra)
        self.port = 0
        self.base_url = ""
        self.proc: subprocess.Popen[str] | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self.root_arg = root_url or str(root)
        """--root: the directory `root`, or an s3:// `root_url` (then `root` is unused)."""
        if root_url is None:
            root.mkdir(parents=True, exist_ok=True)

    def start(self) -> ServerProc:
        argv = [*CLI, "server", "--root", self.root_arg, "--tokens", str(self.tokens_file),
                "--listen", f"127.0.0.1:{self.port}", *self.extra]
        if self.tls:
            argv += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        self.proc = subprocess.Popen(argv, env={**cli_env(None), **self.env},
                                     stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        started = threading.Event()
        proc = self.proc

        def collect() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                with self._lock:
                    self._lines.append(line.rstrip("\n"))
                m = _SERVING.search(line)
                if m and not started.is_set():
                    self.base_url = m.group(1)
                    self.port = int(self.base_url.rsplit(":", 1)[1])
                    started.set()

        threading.Thread(target=collect, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while not started.wait(0.05):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError("snapship server did not start:\n" + self.log())
        return self

    def url(self, repo: str) -> str:
        return f"{self.base_url}/{repo}"

    def log(self) -> str:
        with self._lock:
            return "\n".join(self._lines)

    def wait_for_log(self, fragment: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for line in self._lines:
                    if fragment in line:
                        return line
            time.sleep(0.02)
        raise AssertionError(f"{fragment!r} not in the server log:\n{self.log()}")

    def stop(self) -> int:
        """SIGTERM and wait: the server finishes running requests and exits 0."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=40)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> ServerProc:
        """Start again on the same port (after a kill or stop)."""
        self.kill()
        return self.start()

    def __enter__(self) -> ServerProc:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.kill()


@contextlib.contextmanager
def running_server(tmp: Path, *, tls: tuple[Path, Path] | None = None,
                   extra: Sequence[str] = (), env: dict[str, str] | None = None
                   ) -> Iterator[tuple[ServerProc, dict[str, str]]]:
    """A server on `tmp/root` with the standard tokens; yields it and name -> token."""
    tmp.mkdir(parents=True, exist_ok=True)
    tokens = write_tokens(tmp / "tokens")
    with ServerProc(tmp / "root", tmp / "tokens", tls=tls, extra=extra, env=env) as server:
        yield server, tokens


def http_storage(server: ServerProc, repo: str, token: str | None, *,
                 retry_time: float = 5.0, ca: Path | None = None) -> HttpStorage:
    return HttpStorage(server.url(repo), token=token, retry=RetryPolicy(budget=retry_time),
                       ca_file=str(ca) if ca else None)


def create_repo_fast_kdf(storage: HttpStorage, encryption: str = "aes-256-gcm",
                         chunk_size: int = 64 * 1024) -> Repository:
    """As `snapship init`, with a cheap scrypt cost (later CLI calls unlock it quickly); it
    is recorded in the session's known-repositories file, as `init` records what it makes."""
    repo = Repository.create(storage, encryption=encryption, chunk_size=chunk_size,
                             passphrase=lambda: PASSPHRASE.encode(), kdf=ScryptParams(n=1 << 10))
    remember_repository(repo)
    return repo


def run_cli_env(*args: str | os.PathLike[str], env: dict[str, str] | None = None,
                timeout: float = CLI_TIMEOUT) -> Result:
    """`snapship ARGS...` with the test passphrase and extra environment variables."""
    full = cli_env()
    full.update(env or {})
    return subprocess.run([*CLI, *map(str, args)], env=full, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, check=False)


def start_cli_env(*args: str | os.PathLike[str], env: dict[str, str] | None = None
                  ) -> subprocess.Popen[str]:
    full = cli_env()
    full.update(env or {})
    return subprocess.Popen([*CLI, *map(str, args)], env=full, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
