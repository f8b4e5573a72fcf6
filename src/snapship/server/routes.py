"""Request targets to operations: the URL grammar of docs/http-api.md, without I/O.

`route(method, target)` turns a request line into a `Route` (operation, repository, key and
query) or raises `ApiError` with the status and code the client must get. Keys are checked
here, in their raw form: the API never percent-encodes a key, so a `%` is an error, not an
escape.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field

from snapship.errors import UsageError
from snapship.formats import http_api as api
from snapship.formats.manifest import check_name
from snapship.server.policy import Op
from snapship.storage.base import check_key

_VERSION = re.compile(r"v(\d+)")
TMP_PREFIX = ".tmp-"
METRICS = "metrics"
"""`GET /v1/metrics`: the server's counters (server/metrics.py), for admin tokens."""


class ApiError(Exception):
    """An error reply: its code fixes the status (formats.http_api.STATUS)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = api.STATUS[code]
        self.message = message


@dataclass(frozen=True)
class Route:
    op: Op
    repo: str
    key: str | None = None
    query: dict[str, str] = field(default_factory=dict)
    task: str | None = None
    """The maintenance task, for Op.MAINTAIN."""


def server_key(key: str) -> str:
    """A key a client may name: a storage key whose segments are not temporary files."""
    try:
        check_key(key)
    except UsageError:
        raise ApiError(api.BAD_KEY, f"invalid object key {key!r}") from None
    if any(part.startswith(TMP_PREFIX) for part in key.split("/")):
        raise ApiError(api.BAD_KEY, f"invalid object key {key!r}: {TMP_PREFIX}* names are "
                       "temporary files")
    return key


def _query(raw: str, allowed: tuple[str, ...]) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True, strict_parsing=True,
                                       errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise ApiError(api.BAD_REQUEST, "malformed query string") from None
    out: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            raise ApiError(api.BAD_REQUEST, f"unknown query parameter {name!r}")
        if name in out:
            raise ApiError(api.BAD_REQUEST, f"query parameter {name!r} given twice")
        out[name] = value
    return out


_ENDPOINTS: dict[tuple[str, str], Op] = {
    ("GET", api.LIST): Op.LIST,
    ("POST", api.MISSING): Op.MISSING,
    ("POST", api.RENAME): Op.RENAME,
    ("POST", api.FLUSH): Op.FLUSH,
}
_OBJECT_OPS = {"GET": Op.GET, "HEAD": Op.HEAD, "PUT": Op.PUT, "DELETE": Op.DELETE}


def route(method: str, target: str) -> Route:
    path, _, raw_query = target.partition("?")
    if not path.startswith("/"):
        raise ApiError(api.BAD_REQUEST, "the request target must be a path")
    parts = path[1:].split("/")
    version = _VERSION.fullmatch(parts[0])
    if version is None:
        raise ApiError(api.NO_SUCH_ENDPOINT, f"no such endpoint {path!r}")
    if int(version.group(1)) != api.API_VERSION:
        raise ApiError(api.UNSUPPORTED_VERSION,
                       f"this server speaks API version {api.API_VERSION}, not {parts[0]}")
    if len(parts) == 2 and parts[1] == METRICS:
        if method != "GET":
            raise ApiError(api.METHOD_NOT_ALLOWED, f"{method} is not allowed on {path!r}; "
                           "use GET")
        if raw_query:
            raise ApiError(api.BAD_REQUEST, "this endpoint takes no query parameters")
        return Route(Op.METRICS, "")
    if len(parts) < 3 or parts[1] != api.REPOS_SEGMENT:
        raise ApiError(api.NO_SUCH_ENDPOINT, f"no such endpoint {path!r}")
    try:
        repo = check_name("repository", parts[2])
    except UsageError as e:
        raise ApiError(api.BAD_REQUEST, str(e)) from None
    rest = parts[3:]

    def no_query() -> None:
        if raw_query:
            raise ApiError(api.BAD_REQUEST, "this endpoint takes no query parameters")

    def allowed(*methods: str) -> None:
        if method not in methods:
            raise ApiError(api.METHOD_NOT_ALLOWED,
                           f"{method} is not allowed on {path!r}; use {' or '.join(methods)}")

    if not rest:
        allowed("GET")
        no_query()
        return Route(Op.INFO, repo)
    if rest[0] == api.OBJECTS and len(rest) > 1:
        allowed(*_OBJECT_OPS)
        no_query()
        return Route(_OBJECT_OPS[method], repo, server_key("/".join(rest[1:])))
    if rest[0] == api.MAINTENANCE and len(rest) == 2 and rest[1] in api.MAINTENANCE_TASKS:
        allowed("POST")
        no_query()
        return Route(Op.MAINTAIN, repo, task=rest[1])
    if len(rest) == 1:
        ops = {m: op for (m, name), op in _ENDPOINTS.items() if name == rest[0]}
        if ops:
            allowed(*ops)
            if ops[method] is Op.LIST:
                return Route(Op.LIST, repo, query=_query(raw_query, ("prefix", "after", "limit")))
            no_query()
            return Route(ops[method], repo)
    raise ApiError(api.NO_SUCH_ENDPOINT, f"no such endpoint {path!r}")
