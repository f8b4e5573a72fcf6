"""The known-repositories file: what this machine has seen of each repository's config.

Whoever controls a repository's storage (a server, a bucket, a shared disk) controls its
`config`. An encrypted config carries a MAC that only the key can make, but a config claiming
`"encryption": "none"` has neither MAC nor key to check: edited to say so, with its `mac`
removed, it would make the next backup store plaintext. So the client remembers, per `repo_id`,
the encryption and chunk size it first saw (at `init`, or at the first open that passed every
check) and refuses a config that disagrees. `docs/format.md`, "The client's record", has the
rules; this module owns the file.

The file is `known-repositories.json` in `$SNAPSHIP_STATE_DIR`, else
`$XDG_STATE_HOME/snapship`, else `~/.local/state/snapship`: state the machine keeps for itself
(not configuration a person edits, not a cache that may be thrown away). Readers read it
without a lock (it is only ever replaced whole, by rename); writers take an fcntl lock on
`known-repositories.json.lock` beside it, re-read, add their entry, and replace the file by a
synced temporary file and a rename, so parallel commands never lose each other's entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from snapship.cli.output import warn
from snapship.errors import Corrupt
from snapship.formats.config import RepoConfig

STATE_ENV = "SNAPSHIP_STATE_DIR"
FILE_NAME = "known-repositories.json"
FORMAT = "snapship known repositories"
VERSION = 1


class StateUnavailable(Exception):
    """There is no place for the file (no home directory, say)."""


@dataclass(frozen=True)
class Known:
    """A repository as this machine first saw it."""

    encryption: str
    chunk_size: int
    location: str
    recorded: str

    def describe(self) -> str:
        return f"encryption {self.encryption}, chunk size {self.chunk_size}"


def state_dir() -> Path:
    """$SNAPSHIP_STATE_DIR, else $XDG_STATE_HOME/snapship, else ~/.local/state/snapship."""
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec: relative paths are to be ignored
        return Path(xdg) / "snapship"
    try:
        return Path.home() / ".local" / "state" / "snapship"
    except (RuntimeError, KeyError):
        raise StateUnavailable(f"no home directory to keep state in: set {STATE_ENV}") from None


def state_file(directory: Path | None = None) -> Path:
    return (directory or state_dir()) / FILE_NAME


def load(path: Path) -> dict[str, Known]:
    """Every entry of the file (none if it does not exist). A file that exists but cannot be
    read or parsed is refused: the entry that matters may be in it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise Corrupt(f"cannot read known-repositories file {path}: "
                      f"{getattr(e, 'strerror', None) or e}") from None
    try:
        obj = json.loads(text)
        if obj.get("format") != FORMAT or obj.get("version") != VERSION:
            raise ValueError(f"not a version {VERSION} known-repositories file")
        out: dict[str, Known] = {}
        for repo_id, entry in obj["repositories"].items():
            known = Known(entry["encryption"], entry["chunk_size"], entry["location"],
                          entry["recorded"])
            if not (isinstance(known.encryption, str) and isinstance(known.chunk_size, int)
                    and isinstance(known.location, str) and isinstance(known.recorded, str)):
                raise ValueError(f"entry {repo_id} is mistyped")
            out[repo_id] = known
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise Corrupt(f"known-repositories file {path} is damaged ({e}): repair or remove it "
                      "(removing it forgets what this machine knows of its repositories)"
                      ) from None
    return out


def vouch(cfg: RepoConfig, location: str, *, passphrase_configured: bool) -> None:
    """After an open that passed the repository's own checks: refuse a config that disagrees
    with what this machine knows of it, or an unencrypted one met for the first time while a
    passphrase is configured; record a repository met for the first time."""
    try:
        path: Path | None = state_file()
    except StateUnavailable as e:
        path, unavailable = None, str(e)
    known = load(path).get(cfg.repo_id) if path else None
    if path and known is not None:
        _compare(known, cfg, location, path)
        return
    if not cfg.encrypted and passphrase_configured:
        raise Corrupt(
            f"repository {location} says it is not encrypted, but a passphrase is configured "
            "and this machine has not met the repository before: its config may have been "
            "altered to switch encryption off. If it really is unencrypted, run one command on "
            "it without SNAPSHIP_PASSPHRASE, SNAPSHIP_PASSPHRASE_FILE, --passphrase-file or "
            "--passphrase-command; it is then remembered as such"
        )
    if path is None:
        warn(f"{unavailable}; a later change of this repository's config will not be noticed")
        return
    remember(cfg, location, path)


def check(cfg: RepoConfig, location: str) -> None:
    """For commands that open no key (prune, gc, locks...): refuse a config that disagrees
    with what this machine knows; record nothing (the config was not authenticated)."""
    try:
        path = state_file()
    except StateUnavailable:
        return
    known = load(path).get(cfg.repo_id)
    if known is not None:
        _compare(known, cfg, location, path)


def remember(cfg: RepoConfig, location: str, path: Path | None = None) -> None:
    """Add the repository to the file, unless it is there already. A failure to write is a
    warning: the command itself succeeded."""
    try:
        path = path or state_file()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(path):
            try:  # again, under the lock: a command beside us may have written
                entries = load(path)
            except Corrupt as e:
                warn(f"{e}; repository {cfg.repo_id} was not recorded")
                return
            if cfg.repo_id in entries:
                _compare(entries[cfg.repo_id], cfg, location, path)
                return
            from snapship.repository.repo import now_iso  # the key's code: only to record

            entries[cfg.repo_id] = Known(cfg.encryption, cfg.chunk_size, location, now_iso())
            obj = {"format": FORMAT, "version": VERSION,
                   "repositories": {k: asdict(v) for k, v in sorted(entries.items())}}
            replace_file(path, json.dumps(obj, indent=1) + "\n")
    except StateUnavailable as e:
        warn(f"{e}; a later change of this repository's config will not be noticed")
    except OSError as e:
        warn(f"cannot record repository {cfg.repo_id} in {path}: {e.strerror or e}; a later "
             "change of its config will not be noticed")


def _compare(known: Known, cfg: RepoConfig, location: str, path: Path) -> None:
    now = Known(cfg.encryption, cfg.chunk_size, location, "")
    if (known.encryption, known.chunk_size) != (now.encryption, now.chunk_size):
        raise Corrupt(
            f"repository config was altered: repository {cfg.repo_id} had {known.describe()} "
            f"when this machine first met it at {known.location} ({known.recorded}), its "
            f"config at {location} now says {now.describe()}; refusing it (record: {path})"
        )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def replace_file(path: Path, text: str) -> None:
    """Put `text` in place of `path` whole or not at all, durably (temporary file, fsync,
    rename, fsync of the directory)."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

