"""The HTTP backend: a repository served by `snapship server` (docs/http-api.md).

Implements the storage contract over the v1 API (`stat_many` is the batch `missing`
request). Connections are kept alive in a pool shared by all threads (one request per
connection at a time; `http.client`, no extra dependency). Transient failures (no connection,
a dropped connection, 5xx, 408/429) raise `TransientStorageError`, which the CLI's
`RetryingStorage` wrapper retries (storage/retry.py); everything else becomes the one-line
error of its class at once, naming the server, the operation and the key.
"""

from __future__ import annotations

import http.client
import re
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from snapship.errors import (
    AuthFailed,
    Busy,
    NotFound,
    ObjectNotFound,
    PermissionDenied,
    SetAside,
    SnapshipError,
    StorageError,
    TransientStorageError,
    UsageError,
)
from snapship.formats import http_api as api
from snapship.formats.manifest import check_name
from snapship.storage.base import Capabilities, StorageDefaults, check_key
from snapship.storage.retry import RetryPolicy, run

DEFAULT_TIMEOUT = 60.0
PARALLELISM = 8
"""Requests worth having in flight: a put waits about 3 ms for the server to store and
fsync 0.4 MB on loopback, a stat 0.5 ms. With the engines' default of 2 workers per CPU a
backup over loopback ran at 53% of a local directory's speed with each core idle a third of
the time; 8 gave 68-71%, and 16 no more (67-69%, interleaved) for twice the connections, each
one of the server's `--max-connections` (docs/perf.md, "Remote repositories")."""
MAX_IDLE = 2 * PARALLELISM
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
          ConnectionAbortedError)

Connection = http.client.HTTPConnection
T = TypeVar("T")
_TOKEN = re.compile(r"[\x21-\x7e]{16,1024}")


def check_token_text(token: str, where: str) -> str:
    """A token must be sendable in a header: printable ASCII, no spaces, 16+ characters."""
    if not _TOKEN.fullmatch(token):
        raise UsageError(f"the token from {where} is not 16 to 1024 printable characters "
                         "without spaces")
    return token


@dataclass(frozen=True)
class RepoURL:
    scheme: str
    host: str
    port: int
    prefix: str
    name: str

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.prefix}/{self.name}"


def parse_repo_url(url: str, allow_insecure_http: bool = False) -> RepoURL:
    """`http(s)://HOST[:PORT][/PREFIX]/NAME`, checked: no credentials in it, and plain http
    only to a loopback address unless explicitly allowed."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"repository URL {url!r} must start with http:// or https://")
    if parts.username or parts.password:
        raise UsageError(f"repository URL {url!r} contains credentials: give the token with "
                         "SNAPSHIP_TOKEN or --token-file instead")
    if parts.query or parts.fragment:
        raise UsageError(f"repository URL {url!r} must not have a query or fragment")
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"repository URL {url!r} has an invalid port") from None
    host = parts.hostname
    if not host:
        raise UsageError(f"repository URL {url!r} has no host")
    path = parts.path.rstrip("/")
    prefix, _, name = path.rpartition("/")
    if not name:
        raise UsageError(f"repository URL {url!r} names no repository: add /NAME")
    check_name("repository", name)
    if any(c not in "/" and not (c.isalnum() or c in "._+-") for c in prefix):
        raise UsageError(f"repository URL {url!r} has an unusual path prefix {prefix!r}")
    if parts.scheme == "http" and not api.is_loopback(host) and not allow_insecure_http:
        raise UsageError(f"plain http:// would send the token to {host} unencrypted: use "
                         "https:// (or set SNAPSHIP_INSECURE_HTTP=1 on a trusted network)")
    default_port = 443 if parts.scheme == "https" else 80
    return RepoURL(parts.scheme, host, port or default_port, prefix, name)


@dataclass
class _Reply:
    status: int
    reason: str
    body: bytes
    length: int | None
    """The Content-Length header (what a HEAD reports)."""


class _Pool:
    """Idle kept-alive connections, shared by every thread (one user at a time each)."""

    def __init__(self, url: RepoURL, ctx: ssl.SSLContext | None, timeout: float) -> None:
        self._url = url
        self._ctx = ctx
        self._timeout = timeout
        self._idle: list[Connection] = []
        self._lock = threading.Lock()

    def get(self) -> tuple[Connection, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self.new(self._timeout), False

    def new(self, timeout: float | None) -> Connection:
        if self._ctx is not None:
            return http.client.HTTPSConnection(self._url.host, self._url.port, timeout=timeout,
                                               context=self._ctx)
        return http.client.HTTPConnection(self._url.host, self._url.port, timeout=timeout)

    def put(self, conn: Connection) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _is_permanent_tls_error(e: BaseException) -> bool:
    """Certificate and protocol mismatches: trying again gives the same answer."""
    return isinstance(e, ssl.SSLError) and not isinstance(
        e, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLWantReadError
        | ssl.SSLWantWriteError | ssl.SSLSyscallError)


class HttpStorage(StorageDefaults):
    capabilities = Capabilities(ordered_listing=True, parallelism=PARALLELISM)
    """The server lists in a fixed key order (docs/http-api.md), so a listing resumes."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None,
        ca_file: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        allow_insecure_http: bool = False,
    ) -> None:
        self.url = parse_repo_url(url, allow_insecure_http)
        self._where = str(self.url)
        self._base = api.repo_path(self.url.prefix, self.url.name)
        self._token = token
        self._retry = retry or RetryPolicy()
        ctx: ssl.SSLContext | None = None
        if self.url.scheme == "https":
            try:
                ctx = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as e:
                raise UsageError(f"cannot load CA file {ca_file}: "
                                 f"{getattr(e, 'strerror', None) or e}") from None
        self._pool = _Pool(self.url, ctx, timeout)
        self.page_size = api.MAX_LIST_LIMIT
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    # -- one request, with retries --------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes | bytearray | None, what: str,
                 *, long: bool = False) -> _Reply:
        """One request. A transient failure raises `TransientStorageError` at once (the
        caller's `RetryingStorage` waits and tries again); only a kept-alive connection the
        server had closed meanwhile is replaced on the spot. `long`: a request that may run
        for hours (maintenance) gets its own connection without a read timeout."""
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = api.JSON_TYPE if method == "POST" else api.OBJECT_TYPE
        stale_retried = False
        while True:
            conn, reused = (self._pool.new(None), False) if long else self._pool.get()
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                if _is_permanent_tls_error(e):
                    raise StorageError(f"{self._where}: {what}: TLS failed: {e} (is the "
                                       "server's CA given with --ca or SNAPSHIP_CA?)") from None
                if reused and not stale_retried and isinstance(e, _STALE):
                    stale_retried = True  # the server closed a kept-alive connection
                    continue
                problem = _describe_os_error(e)
                raise TransientStorageError(f"{self._where}: {what}: {problem}",
                                            problem) from None
            if resp.will_close or long:
                conn.close()
            else:
                self._pool.put(conn)
            if resp.status in api.RETRY_STATUSES:
                problem = self._server_message(resp.status, resp.reason, data)
                raise TransientStorageError(f"{self._where}: {what}: {problem}", problem)
            versions = api.api_versions(resp.getheader(api.API_HEADER))
            if versions is None:
                raise StorageError(f"{self._where}: {what}: HTTP {resp.status} from something "
                                   "that is not a snapship server")
            if api.API_VERSION not in versions:
                raise StorageError(f"{self._where}: the server speaks API version(s) "
                                   f"{sorted(versions)}; this client speaks {api.API_VERSION}")
            raw = resp.getheader("Content-Length")
            length = int(raw) if raw is not None and raw.isdigit() else None
            return _Reply(resp.status, resp.reason, data, length)

    @staticmethod
    def _server_message(status: int, reason: str, body: bytes) -> str:
        err = api.decode_error(body)
        if err:
            return err[1]
        standard = http.client.responses.get(status, "")
        return reason if reason and reason != standard else f"HTTP {status} {standard}".strip()

    def _fail(self, reply: _Reply, what: str, key: str | None = None) -> SnapshipError:
        """The error (for the caller to raise) for a reply that is not a success."""
        detail = self._server_message(reply.status, reply.reason, reply.body)
        message = f"{self._where}: {what}: {detail}"
        err = api.decode_error(reply.body)
        code = err[0] if err else None
        if reply.status == 401:
            return AuthFailed(
                f"{self._where}: {what}: the server refused the token" if self._token else
                f"{self._where}: {what}: the server needs a token: set SNAPSHIP_TOKEN or use "
                "--token-file")
        if reply.status == 403:  # the server's sentence says what was refused, and why
            message = f"{self._where}: {detail}"
            return SetAside(message) if code == api.SET_ASIDE else PermissionDenied(message)
        if reply.status == 409:
            return Busy(message)
        if reply.status == 404 and code == api.NOT_FOUND and key is not None:
            return ObjectNotFound(key)
        if reply.status == 404 and code == api.NO_REPOSITORY:
            return NotFound(message)
        return StorageError(message)

    def _object(self, key: str) -> str:
        return f"{self._base}/{api.OBJECTS}/{check_key(key)}"

    def _decode(self, decode: Callable[[bytes], T], body: bytes, what: str) -> T:
        try:
            return decode(body)
        except api.WireError as e:
            raise StorageError(f"{self._where}: {what}: malformed reply: {e}") from None

    # -- the storage contract -------------------------------------------------------------

    def put(self, key: str, data: bytes | bytearray) -> None:
        what = f"put {key}"
        reply = self._request("PUT", self._object(key), data, what)
        if reply.status not in (200, 201, 204):
            raise self._fail(reply, what, key)

    def get(self, key: str) -> bytes:
        what = f"get {key}"
        reply = self._request("GET", self._object(key), None, what)
        if reply.status != 200:
            raise self._fail(reply, what, key)
        return reply.body

    def stat(self, key: str) -> int | None:
        what = f"stat {key}"
        reply = self._request("HEAD", self._object(key), None, what)
        if reply.status == 404:
            return None
        if reply.status != 200:
            raise self._fail(reply, what, key)
        if reply.length is None:
            raise StorageError(f"{self._where}: {what}: the reply has no Content-Length")
        return reply.length

    def list(self, prefix: str, after: str | None = None) -> Iterator[tuple[str, int]]:
        what = f"list {prefix or '(everything)'}"
        while True:
            query = {"prefix": prefix, "limit": str(self.page_size)}
            if after is not None:
                query["after"] = after
            path = (f"{self._base}/{api.LIST}?"
                    + urllib.parse.urlencode(query, quote_via=urllib.parse.quote, safe="/"))
            reply = self._request("GET", path, None, what)
            if reply.status != 200:
                raise self._fail(reply, what)
            objects, after = self._decode(api.decode_list_page, reply.body, what)
            yield from objects
            if after is None:
                return

    def delete(self, key: str) -> None:
        what = f"delete {key}"
        reply = self._request("DELETE", self._object(key), None, what)
        if reply.status not in (200, 204):
            raise self._fail(reply, what, key)

    def rename(self, src: str, dst: str) -> None:
        what = f"rename {src} to {dst}"
        check_key(src)
        check_key(dst)
        reply = self._request("POST", f"{self._base}/{api.RENAME}", api.encode_rename(src, dst),
                              what)
        if reply.status in (200, 204):
            return
        raise self._fail(reply, what, src)

    def flush(self) -> None:
        reply = self._request("POST", f"{self._base}/{api.FLUSH}", b"", "flush")
        if reply.status not in (200, 204):
            raise self._fail(reply, "flush")

    def describe(self) -> str:
        return self._where

    # -- beyond the contract --------------------------------------------------------------

    def missing(self, keys: Iterable[str]) -> set[str]:
        """The keys among `keys` that do not exist: one request per thousand keys."""
        return {k for k, size in self.stat_many(keys).items() if size is None}

    def stat_many(self, keys: Iterable[str]) -> dict[str, int | None]:
        """`stat` of many keys at once (one request per thousand): key -> size or None."""
        todo = [check_key(k) for k in keys]
        out: dict[str, int | None] = {}
        for i in range(0, len(todo), api.MAX_MISSING_KEYS):
            batch = todo[i : i + api.MAX_MISSING_KEYS]
            what = f"missing ({len(batch)} keys)"
            reply = self._request("POST", f"{self._base}/{api.MISSING}",
                                  api.encode_missing_request(batch), what)
            if reply.status != 200:
                raise self._fail(reply, what)
            missing, present = self._decode(api.decode_missing_reply, reply.body, what)
            got: dict[str, int | None] = {k: None for k in missing}
            got.update(present)
            if set(got) != set(batch):
                raise StorageError(f"{self._where}: {what}: the reply does not answer for "
                                   "exactly the keys asked about")
            out.update(got)
        return out

    def whoami(self) -> tuple[str, str]:
        """(token name, role) as the server sees this client's token."""
        reply = run(self._retry, lambda: self._request("GET", self._base, None,
                                                      "check the token"))
        if reply.status != 200:
            raise self._fail(reply, "check the token")
        _repo, token, role = self._decode(api.decode_whoami, reply.body, "check the token")
        return token, role

    def maintenance(self, task: str, options: dict[str, Any]) -> dict[str, Any]:
        """Run a maintenance task on the server (admin tokens); its JSON report."""
        what = f"server-side {task}"
        reply = run(self._retry, lambda: self._request(
            "POST", f"{self._base}/{api.MAINTENANCE}/{task}", api.encode_json(options), what,
            long=True))
        if reply.status != 200:
            raise self._fail(reply, what)
        return self._decode(lambda b: api.decode_report(b, f"{task} report"), reply.body, what)

    def close(self) -> None:
        self._pool.close()


def _describe_os_error(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError):
        return "the connection was closed by the server"
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, http.client.IncompleteRead):
        return "the reply was cut short"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"
