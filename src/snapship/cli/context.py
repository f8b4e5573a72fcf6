"""Builds what a command needs from its options: storage, passphrase, repository.

This is the only place that chooses a concrete storage backend.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

from snapship.cli import known_repos, output
from snapship.cli.signals import retry_cutoff
from snapship.engine.pipeline import default_workers
from snapship.errors import AuthFailed, UsageError
from snapship.storage import ratelimit
from snapship.storage.base import Storage
from snapship.storage.local import LocalStorage
from snapship.storage.retry import DEFAULT_RETRY_TIME, RetryingStorage, RetryPolicy

if TYPE_CHECKING:
    # http.client and ssl: imported by the commands that reach a server; the key's code
    # (and zstandard, cryptography, BLAKE3) by those that open the repository with it.
    from snapship.repository.repo import PassphraseSource, Repository
    from snapship.storage.http import HttpStorage

log = logging.getLogger("snapship.cli")


class RetryNotice:
    """Says "retrying ..." once an operation on `where` has failed for a few seconds (the
    retry policy's `on_slow`), instead of a silence as long as the retry time: on a terminal,
    or always under -v; never under -q. One line per outage, not one per request: workers
    failing together are told once, and again only after a retry time has passed."""

    def __init__(self, where: str, budget: float) -> None:
        self.where = where
        self.budget = budget
        self._lock = threading.Lock()
        self._last: float | None = None

    def __call__(self, problem: str, failing: float) -> None:
        settings = output.settings
        if settings.quiet and not settings.verbose:
            return
        if not (settings.verbose or output.is_terminal(sys.stderr)):
            return
        now = time.monotonic()
        with self._lock:
            if not settings.verbose and self._last is not None and \
                    now - self._last < self.budget:
                return
            self._last = now
        output.message(f"snapship: retrying: {self.where}: {problem} (failing for "
                       f"{failing:.0f} s; giving up after {self.budget:g} s; Ctrl-C to stop)")


def _retry_policy(where: str) -> RetryPolicy:
    budget = _retry_time()
    return RetryPolicy(budget=budget, on_slow=RetryNotice(where, budget), cutoff=retry_cutoff)


def open_storage(spec: str | None, args: argparse.Namespace | None = None) -> Storage:
    """A directory path (or file://), an S3 bucket (s3://BUCKET[/PREFIX], docs/s3.md), or a
    `snapship server` repository at http(s)://HOST:PORT/NAME (its token and CA from `args` or
    the environment)."""
    if not spec:
        raise UsageError("no repository given: use --repo PATH or set SNAPSHIP_REPO")
    if spec.startswith(("http://", "https://", "s3://")):
        # Outside the retries (S3's are built in): a request sent again is not counted again.
        return ratelimit.limited(_open_remote(spec, args),
                                 upload=getattr(args, "limit_upload", None),
                                 download=getattr(args, "limit_download", None))
    if spec.startswith("file://"):
        spec = spec[len("file://") :]
    elif "://" in spec:
        raise UsageError(f"unsupported repository location {spec!r}: give a directory path, "
                         "an s3:// or an http(s):// URL")
    return LocalStorage(spec)


def _open_remote(spec: str, args: argparse.Namespace | None) -> Storage:
    if spec.startswith(("http://", "https://")):
        return RetryingStorage(open_server(spec, args), _retry_policy(spec))
    if spec.startswith("s3://"):
        # boto3 takes a third of a second to import: only S3 repositories pay for it.
        from snapship.storage.s3 import PARALLELISM, S3Storage
        from snapship.storage.s3_client import ClientOptions

        # A connection for every request in flight: the engines' windows, gc's 32 threads.
        # Connections are opened on demand: a large pool costs nothing.
        workers = max(default_workers(), PARALLELISM)
        return S3Storage.open(spec, ClientOptions(max_connections=max(64, 4 * workers)),
                              retry=_retry_policy(spec), list_lag=s3_list_lag())
    raise UsageError(f"unsupported repository location {spec!r}")


def open_server(spec: str, args: argparse.Namespace | None) -> HttpStorage:
    """A `snapship server` repository, for what only a server does (maintenance); its
    token and CA from `args` or the environment."""
    from snapship.storage.http import HttpStorage

    return HttpStorage(
        spec,
        token=server_token(args),
        ca_file=getattr(args, "ca", None) or os.environ.get("SNAPSHIP_CA") or None,
        retry=_retry_policy(spec),
        allow_insecure_http=os.environ.get("SNAPSHIP_INSECURE_HTTP") == "1",
    )


def server_token(args: argparse.Namespace | None) -> str | None:
    """--token-file, else SNAPSHIP_TOKEN, else none (the server will say it needs one)."""
    from snapship.storage.http import check_token_text

    path = getattr(args, "token_file", None)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read token file {path}: "
                             f"{getattr(e, 'strerror', None) or e}") from None
        return check_token_text(token, f"token file {path}")
    env = os.environ.get("SNAPSHIP_TOKEN")
    return check_token_text(env.strip(), "SNAPSHIP_TOKEN") if env else None


def _seconds_from_env(name: str, default: float, most: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= most:
        raise UsageError(f"{name}={raw!r} is not a number of seconds (0..{most:g})")
    return value


def _retry_time() -> float:
    return _seconds_from_env("SNAPSHIP_RETRY_TIME", DEFAULT_RETRY_TIME, 86400)


def s3_list_lag() -> float:
    """`SNAPSHIP_S3_LIST_LAG`: seconds a store that lists late needs (docs/s3.md)."""
    return _seconds_from_env("SNAPSHIP_S3_LIST_LAG", 0.0, 3600)


def passphrase_configured(args: argparse.Namespace) -> bool:
    """A passphrase given without a prompt: --passphrase-file, --passphrase-command,
    SNAPSHIP_PASSPHRASE_FILE or SNAPSHIP_PASSPHRASE."""
    return bool(getattr(args, "passphrase_file", None)
                or getattr(args, "passphrase_command", None)
                or os.environ.get("SNAPSHIP_PASSPHRASE_FILE")
                or os.environ.get("SNAPSHIP_PASSPHRASE"))


def read_passphrase_file(path: str, what: str = "passphrase file") -> bytes:
    """The first line of `path`, without its line end; never empty."""
    try:
        with open(path, "rb") as f:
            value = f.readline().rstrip(b"\r\n")
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None
    if not value:
        raise UsageError(f"{what} {path} is empty")
    return value


def run_passphrase_command(command: str, what: str = "--passphrase-command") -> bytes:
    """The first line a command prints (split as a shell would, but run without one: the
    words are the user's, not something to expand again). Its stderr and terminal are the
    user's, so a command that asks (pass, a secret agent) can."""
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise UsageError(f"{what} {command!r} cannot be split into words: {e}") from None
    if not argv:
        raise UsageError(f"{what} is empty")
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, check=False)
    except OSError as e:
        raise UsageError(f"{what} {argv[0]!r} cannot be run: {e.strerror or e}") from None
    if done.returncode != 0:
        raise AuthFailed(f"{what} {argv[0]!r} failed (exit status {done.returncode}); no "
                         "passphrase")
    value = done.stdout.split(b"\n", 1)[0].rstrip(b"\r")
    if not value:
        raise UsageError(f"{what} {argv[0]!r} printed no passphrase")
    return value


def passphrase_source(args: argparse.Namespace, confirm: bool = False) -> PassphraseSource:
    """Where the passphrase comes from, first found: --passphrase-file, --passphrase-command,
    SNAPSHIP_PASSPHRASE_FILE, SNAPSHIP_PASSPHRASE, or a prompt.

    Returned as a callable so unencrypted repositories never ask for one.
    """

    def get() -> bytes:
        path = getattr(args, "passphrase_file", None)
        if path:
            return read_passphrase_file(path)
        command = getattr(args, "passphrase_command", None)
        if command:
            return run_passphrase_command(command)
        env_path = os.environ.get("SNAPSHIP_PASSPHRASE_FILE")
        if env_path:
            return read_passphrase_file(env_path, "SNAPSHIP_PASSPHRASE_FILE")
        env = os.environ.get("SNAPSHIP_PASSPHRASE")
        if env:
            return env.encode()
        return prompt("Repository passphrase: ", confirm)

    return get


def prompt(question: str, confirm: bool) -> bytes:
    if not sys.stdin.isatty():
        raise AuthFailed(
            "a passphrase is needed: set SNAPSHIP_PASSPHRASE or SNAPSHIP_PASSPHRASE_FILE, or "
            "use --passphrase-file or --passphrase-command"
        )
    first = getpass.getpass(question)
    if confirm and getpass.getpass("Repeat passphrase: ") != first:
        raise UsageError("the passphrases do not match")
    if not first:
        raise UsageError("an empty passphrase is not allowed")
    return first.encode()


def source_args(args: argparse.Namespace, location: str) -> argparse.Namespace:
    """The options for a second repository a command reads from (`copy --from`, `init
    --copy-key-from`): its own `--from-token-file` and `--from-passphrase-file/-command`
    where given, else the same credentials as the main repository's."""
    src = argparse.Namespace(**vars(args))
    src.repo = location
    if getattr(args, "from_token_file", None):
        src.token_file = args.from_token_file
    if getattr(args, "from_passphrase_file", None) or \
            getattr(args, "from_passphrase_command", None):
        src.passphrase_file = getattr(args, "from_passphrase_file", None)
        src.passphrase_command = getattr(args, "from_passphrase_command", None)
    return src


def open_repository(args: argparse.Namespace) -> Repository:
    from snapship.repository.repo import Repository

    repo = vouch_for(Repository.open(open_storage(args.repo, args), passphrase_source(args)),
                     args)
    log.debug("repository %s: id %s, encryption %s, chunk size %d", repo.storage.describe(),
              repo.config.repo_id, repo.config.encryption, repo.chunk_size)
    return repo


def vouch_for(repo: Repository, args: argparse.Namespace) -> Repository:
    """The edge's own check of a repository just opened, against what this machine knows of
    it (`known_repos`): refuses a config switched to no encryption or to another chunk size,
    and an unencrypted repository never met before while a passphrase is configured."""
    known_repos.vouch(repo.config, repo.storage.describe(),
                      passphrase_configured=passphrase_configured(args))
    return repo
