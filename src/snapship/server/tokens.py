"""The server's token file, format version 1 (docs/http-api.md, "Token file").

Each line names a token, its role and the repositories it may use, and holds only the SHA-256
of the token: a leaked file gives no token away. Tokens are 32 random bytes, so a fast hash
cannot be brute-forced. Parsing is pure; `TokenFile` re-reads the file when it changes.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass

from snapship.errors import UsageError
from snapship.formats.manifest import check_name
from snapship.server.policy import Role

MAGIC = "snapship-tokens"
VERSION = 1
HEADER = f"{MAGIC} {VERSION}"
HASH_PREFIX = "sha256:"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_HASH = re.compile(r"sha256:[0-9a-f]{64}")
log = logging.getLogger("snapship.server")


@dataclass(frozen=True)
class Principal:
    """Who a request is from: a token's name, role and scope (None: every repository)."""

    name: str
    role: Role
    repos: frozenset[str] | None

    def may_use(self, repo: str) -> bool:
        return self.repos is None or repo in self.repos


def new_token() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def hash_token(token: str) -> str:
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def token_line(name: str, role: Role, repos: frozenset[str] | None, token_hash: str) -> str:
    scope = "*" if repos is None else ",".join(sorted(repos))
    return f"{name}\t{role.value}\t{scope}\t{token_hash}\n"


class TokenTable:
    def __init__(self, by_hash: dict[str, Principal]) -> None:
        self._by_hash = by_hash

    def lookup(self, token: str) -> Principal | None:
        return self._by_hash.get(hash_token(token))

    def names(self) -> set[str]:
        return {p.name for p in self._by_hash.values()}

    def __len__(self) -> int:
        return len(self._by_hash)


def parse_tokens(text: str, source: str) -> TokenTable:
    by_hash: dict[str, Principal] = {}
    names: set[str] = set()
    seen_header = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number}"
        if not seen_header:
            if line.split() != [MAGIC, str(VERSION)]:
                raise UsageError(f"{where}: expected '{HEADER}' (a token file of another "
                                 "version, or not a token file)")
            seen_header = True
            continue
        fields = line.split()
        if len(fields) != 4:
            raise UsageError(f"{where}: expected 'NAME ROLE REPOSITORIES sha256:HASH'")
        name, role, scope, token_hash = fields
        if not _NAME.fullmatch(name):
            raise UsageError(f"{where}: invalid token name {name!r}")
        if name in names:
            raise UsageError(f"{where}: token name {name!r} is used twice")
        try:
            parsed_role = Role(role)
        except ValueError:
            raise UsageError(f"{where}: unknown role {role!r}; use read, backup or admin"
                             ) from None
        repos: frozenset[str] | None = None
        if scope != "*":
            try:
                repos = frozenset(check_name("repository", r) for r in scope.split(","))
            except UsageError as e:
                raise UsageError(f"{where}: {e}") from None
        if not _HASH.fullmatch(token_hash):
            raise UsageError(f"{where}: the token hash must be 'sha256:' and 64 hex digits")
        if token_hash in by_hash:
            raise UsageError(f"{where}: the same token is listed twice")
        names.add(name)
        by_hash[token_hash] = Principal(name, parsed_role, repos)
    if not seen_header:
        raise UsageError(f"{source}: empty token file (its first line must be '{HEADER}')")
    return TokenTable(by_hash)


def read_token_file(path: str) -> TokenTable:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read token file {path}: {getattr(e, 'strerror', None) or e}"
                         ) from None
    return parse_tokens(text, f"token file {path}")


class TokenFile:
    """The token table of a file, re-read when the file changes (checked once a second at
    most); a broken new version is logged and the last good table kept."""

    CHECK_EVERY = 1.0

    def __init__(self, path: str) -> None:
        self.path = path
        self._table = read_token_file(path)
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def _file_stamp(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def table(self) -> TokenTable:
        now = time.monotonic()
        if now - self._checked < self.CHECK_EVERY:
            return self._table
        with self._lock:
            if now - self._checked < self.CHECK_EVERY:
                return self._table
            self._checked = now
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._table = read_token_file(self.path)
                    log.info("token file %s reloaded: %d tokens", self.path, len(self._table))
                except UsageError as e:
                    log.error("%s; keeping the previous tokens", e)
        return self._table
