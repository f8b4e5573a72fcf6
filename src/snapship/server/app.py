"""The API's request handling, between the HTTP layer and the repositories on disk.

For each request, in this order: who is asking (the token; 401 before anything else is looked
at), what is asked (`routes.route`), whether the token's scope and role allow it
(`policy.permission`, 403 and a log line if not), then the operation on the repository's
`RepoStore`. The HTTP layer asks `authenticate` as soon as a request's head is in (before it
reads any of the body, and before the connection may take one of the slots kept for token
holders), then gives `handle` the answer, the method, target and a way to read the body, and
gets back a `Response`; it never decides anything itself. Error messages for clients never
name the server's directories (`_public`); the log gets them whole.
"""

from __future__ import annotations

import functools
import hmac
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NoReturn, Protocol

from snapship.errors import (
    Busy,
    NotFound,
    ObjectNotFound,
    SnapshipError,
    StorageError,
    UsageError,
)
from snapship.formats import http_api as api
from snapship.repository import locks
from snapship.repository.layout import Kind, name_of
from snapship.server.metrics import CONTENT_TYPE as METRICS_TYPE
from snapship.server.metrics import ServerMetrics
from snapship.server.objects import (
    ExistsWithOtherContent,
    PutOutcome,
    Repositories,
    RepoStore,
)
from snapship.server.policy import Op, Permission, Role, permission
from snapship.server.routes import ApiError, Route, route, server_key
from snapship.server.tokens import Principal, TokenTable
from snapship.server.validate import Rejected, check_upload, require_owner

log = logging.getLogger("snapship.server")
_PREFIX = re.compile(r"[A-Za-z0-9._+/-]*")
_BODY_OPS = frozenset({Op.PUT, Op.MISSING, Op.RENAME, Op.MAINTAIN})


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    file: BinaryIO | None = None
    """A body to stream from an open file (`length` bytes); the HTTP layer closes it."""
    length: int | None = None
    """The body's length when it is not `body`: a streamed file, or the size a HEAD reports."""
    headers: list[tuple[str, str]] = field(default_factory=list)
    reason: str | None = None
    """The status line's reason phrase: an error's message, which a HEAD reply (no body)
    can carry only there."""


@dataclass
class _Seen:
    """What `handle` learnt of a request, for the metrics."""

    repo: str = ""
    op: str = "-"
    received: int = 0


class Maintenance(Protocol):
    """Server-side maintenance of one repository (server/maintenance.py)."""

    def run(self, task: str, repo: str, store: RepoStore, options: bytes) -> dict[str, Any]: ...


def error_response(code: str, message: str, headers: list[tuple[str, str]] | None = None
                   ) -> Response:
    reason = "".join(c if " " <= c <= "~" else "?" for c in message)[:300]
    return Response(api.STATUS[code], api.encode_error(code, message), api.JSON_TYPE,
                    headers=headers or [], reason=reason)


def _json(body: bytes, status: int = 200) -> Response:
    return Response(status, body, api.JSON_TYPE)


class App:
    def __init__(
        self,
        repos: Repositories,
        tokens: Callable[[], TokenTable],
        *,
        max_object_size: int = api.DEFAULT_MAX_OBJECT_SIZE,
        maintenance: Maintenance | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.repos = repos
        self.tokens = tokens
        self.max_object_size = max_object_size
        self.maintenance = maintenance
        self.metrics = metrics

    def handle(
        self,
        method: str,
        target: str,
        who: Principal | None,
        body_length: int | None,
        read_body: Callable[[], bytes],
        client: str,
    ) -> Response:
        """Answer one request from `who` (`authenticate`'s answer; None gets the 401).
        `read_body()` returns the whole body (`body_length` bytes); what is not read is the
        HTTP layer's to skip, or to end the connection over."""
        seen = _Seen()

        def read() -> bytes:
            data = read_body()
            seen.received = len(data)
            return data

        resp = self._handle(method, target, who, body_length, read, client, seen)
        if self.metrics is not None:
            sent = 0 if method == "HEAD" else (
                resp.length if resp.length is not None else len(resp.body))
            self.metrics.request(seen.repo, seen.op, resp.status, seen.received, sent)
            if resp.status == api.STATUS[api.UNAUTHORIZED]:
                self.metrics.unauthorized.inc()
        return resp

    def _handle(self, method: str, target: str, who: Principal | None,
                body_length: int | None, read_body: Callable[[], bytes], client: str,
                seen: _Seen) -> Response:
        repo: str | None = None
        try:
            if who is None:
                return error_response(
                    api.UNAUTHORIZED,
                    "a valid token is needed (Authorization: Bearer TOKEN)",
                    [("WWW-Authenticate", 'Bearer realm="snapship"')],
                )
            r = route(method, target)
            repo = r.repo
            seen.repo, seen.op = r.repo, r.op.value
            if r.op is Op.METRICS:
                return self._metrics(who, r, client)
            if not who.may_use(r.repo):
                self._deny(who, r, r.key, client, f"may not use repository {r.repo}",
                           public=f"token {who.name} may not use repository {r.repo}: it "
                           "was made for other repositories (see `snapship token --repos`)")
            if r.op in _BODY_OPS:
                if body_length is None:
                    raise ApiError(api.LENGTH_REQUIRED, "a request body needs a Content-Length")
                if body_length > self.max_object_size:
                    raise ApiError(api.TOO_LARGE, f"the body has {body_length} bytes; this "
                                   f"server takes at most {self.max_object_size}")
            return self._dispatch(who, r, read_body, client)
        except ApiError as e:
            return error_response(e.code, self._public(e.message, repo))
        except ObjectNotFound as e:
            return error_response(api.NOT_FOUND, f"object {e.key} not found")
        except StorageError as e:
            log.error("storage failed: %s %s: %s", method, target, e)
            return error_response(api.STORAGE_FAILED, self._public(str(e), repo))
        except SnapshipError as e:
            log.error("%s %s failed: %s", method, target, e)
            return error_response(api.INTERNAL, self._public(str(e), repo))

    def _public(self, message: str, repo: str | None) -> str:
        """`message` without the server's directories, for a client: a path in repository
        `repo` becomes its key, the repository's own directory the repository's name. (The
        log keeps the message as it was.)"""

        def local(m: re.Match[str]) -> str:
            name, key = m.group(1), m.group(2)
            if name is None:
                return "the server's root"
            if key:
                return key if name == repo else f"{key} in repository {name}"
            return f"repository {name}"

        return _root_path(self.repos.root).sub(local, message)

    def authenticate(self, authorization: str | None, client: str) -> Principal | None:
        """Who the `Authorization` header says is asking; None (and a log line) for no token
        or an unknown one. Cheap: the HTTP layer asks before it reads any body."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if not hmac.compare_digest(scheme.lower(), "bearer") or not token:
            log.info("unauthorized request from %s: no token", client)
            return None
        who = self.tokens().lookup(token)
        if who is None:
            log.warning("unauthorized request from %s: unknown token", client)
        return who

    def _metrics(self, who: Principal, r: Route, client: str) -> Response:
        """The counters name every repository: only an admin token for all of them reads
        them."""
        if who.role is not Role.ADMIN or who.repos is not None:
            self._deny(who, r, None, client, "may not read the server's metrics",
                       public=f"token {who.name} may not read the server's metrics: that "
                       "needs an admin token for every repository")
        if self.metrics is None:
            raise ApiError(api.NO_SUCH_ENDPOINT, "this server keeps no metrics")
        body = self.metrics.render()
        return Response(200, body, METRICS_TYPE)

    def _deny(self, who: Principal, r: Route, key: str | None, client: str, what: str,
              code: str | None = None, public: str | None = None) -> NoReturn:
        """Log the refusal (with the key), count it and raise the 403; the client reads
        `public`, a plain sentence, if given, else the same as the log."""
        if self.metrics is not None:
            self.metrics.refused(who.role.value, r.op.value)
        message = f"token {who.name} (role {who.role.value}) {what}"
        log.warning("denied: %s [op %s, repository %s, key %s, from %s]", message, r.op.value,
                    r.repo, key or "-", client)
        raise ApiError(code or api.FORBIDDEN, public or message)

    def _check(self, who: Principal, r: Route, key: str | None, client: str,
               dst: str | None = None) -> Permission:
        p = permission(who.role, r.op, key, dst)
        if p is Permission.DENY:
            target = f" {key}" if key else ""
            onto = f" to {dst}" if dst else ""
            self._deny(who, r, key, client, f"may not {r.op.value}{target}{onto}",
                       public=role_refusal(who, r, key))
        return p

    def _dispatch(self, who: Principal, r: Route, read_body: Callable[[], bytes],
                  client: str) -> Response:
        store = self.repos.get(r.repo)
        op = r.op
        if op is Op.INFO:
            return _json(api.encode_whoami(r.repo, who.name, who.role.value))
        if op is Op.GET:
            assert r.key is not None
            f, size = store.open(r.key)
            return Response(200, content_type=api.OBJECT_TYPE, file=f, length=size)
        if op is Op.HEAD:
            assert r.key is not None
            found = store.stat(r.key)
            if found is None:
                raise ObjectNotFound(r.key)
            return Response(200, content_type=api.OBJECT_TYPE, length=found)
        if op is Op.LIST:
            return self._list(store, r.query)
        if op is Op.MISSING:
            keys = [server_key(k) for k in _wire(api.decode_missing_request, read_body())]
            return _json(api.encode_missing_reply(*store.stat_many(keys)))
        if op is Op.PUT:
            assert r.key is not None
            p = self._check(who, r, r.key, client)
            data = read_body()
            try:
                upload = check_upload(store, who, r.key, data, time.time())
            except Rejected as e:
                if e.forbidden:
                    self._deny(who, r, r.key, client, e.message,
                               code=api.SET_ASIDE if name_of(r.key).kind is Kind.CHUNK
                               else None)
                raise ApiError(api.BAD_REQUEST, e.message) from None
            if upload.fossil and store.put_back(r.key, data):
                return Response(201)
            try:
                outcome = store.put(r.key, upload.data,
                                    create_only=p is Permission.CREATE_ONLY)
            except ExistsWithOtherContent:
                self._deny(who, r, r.key, client,
                           f"may not overwrite {r.key} (it exists with other content)")
            return Response(201 if outcome is PutOutcome.CREATED else 204)
        if op is Op.DELETE:
            assert r.key is not None
            self._check(who, r, r.key, client)
            try:
                require_owner(store, who, r.key, "delete")
            except Rejected as e:
                self._deny(who, r, r.key, client, e.message)
            store.delete(r.key)
            return Response(204)
        if op is Op.RENAME:
            src, dst = (server_key(k) for k in _wire(api.decode_rename, read_body()))
            self._check(who, r, src, client, dst)
            store.rename(src, dst)
            return Response(204)
        if op is Op.FLUSH:
            self._check(who, r, None, client)
            store.flush()
            return Response(204)
        if op is Op.MAINTAIN:
            assert r.task is not None
            self._check(who, r, None, client)
            if self.maintenance is None:
                raise ApiError(api.NO_SUCH_ENDPOINT, "this server runs no maintenance")
            options = read_body()
            log.info("maintenance: %s of %s started by token %s", r.task, r.repo, who.name)
            try:
                report = self.maintenance.run(r.task, r.repo, store, options)
            except (api.WireError, UsageError) as e:
                raise ApiError(api.BAD_REQUEST, str(e)) from None
            except Busy as e:
                raise ApiError(api.CONFLICT, str(e)) from None
            except NotFound as e:
                raise ApiError(api.NO_REPOSITORY, str(e)) from None
            log.info("maintenance: %s of %s finished", r.task, r.repo)
            return _json(api.encode_json(report))
        raise AssertionError(f"unhandled operation {op}")

    def _list(self, store: RepoStore, query: dict[str, str]) -> Response:
        prefix = query.get("prefix", "")
        if not _PREFIX.fullmatch(prefix):
            raise ApiError(api.BAD_REQUEST, f"invalid prefix {prefix!r}")
        after = query.get("after")
        if after is not None:
            after = server_key(after)
        raw_limit = query.get("limit", str(api.MAX_LIST_LIMIT))
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= api.MAX_LIST_LIMIT:
            raise ApiError(api.BAD_REQUEST, f"limit must be 1 to {api.MAX_LIST_LIMIT}")
        items, nxt = store.list_page(prefix, after, int(raw_limit))
        return _json(api.encode_list_page(items, nxt))


_ADMIN_ACTIONS: tuple[tuple[Op, Kind | None, str | None, str], ...] = (
    # (operation, what the key names or None for any, lock kind, what the client was doing)
    (Op.DELETE, Kind.MANIFEST, None, "forgetting versions (prune, forget)"),
    (Op.DELETE, Kind.REFS, None, "forgetting versions (prune, forget)"),
    (Op.DELETE, Kind.SUMMARY, None, "forgetting versions (prune, forget)"),
    (Op.DELETE, Kind.CHUNK, None, "gc"),
    (Op.DELETE, Kind.FOSSIL, None, "gc"),
    (Op.RENAME, None, None, "gc"),
    (Op.PUT, Kind.FOSSIL, None, "gc"),
    (Op.PUT, Kind.COLLECTION, None, "gc"),
    (Op.DELETE, Kind.COLLECTION, None, "gc"),
    (Op.PUT, Kind.LOCK, locks.GC, "gc"),
    (Op.PUT, Kind.LOCK, locks.PRUNE, "prune (like forget, protect and unprotect)"),
    (Op.PUT, Kind.TOMBSTONE, None, "clearing stale locks (locks --clear-stale)"),
    (Op.DELETE, Kind.LOCK, None, "clearing stale locks (locks --clear-stale)"),
    (Op.PUT, Kind.PROTECTED, None, "protect"),
    (Op.DELETE, Kind.PROTECTED, None, "unprotect"),
    (Op.PUT, Kind.DAMAGED, None, "verify (marking damaged versions)"),
    (Op.DELETE, Kind.DAMAGED, None, "verify (clearing damage marks)"),
)


def role_refusal(who: Principal, r: Route, key: str | None) -> str:
    """What a client is told when its token's role does not allow an operation: a sentence
    naming what the role may do and which token the job needs, not storage keys (the
    server's log keeps those)."""
    action: str | None = None
    name = name_of(key) if key else None
    if r.op is Op.MAINTAIN:
        action = f"{r.task or 'maintenance'} on the server"
    else:
        for op, kind, lock_kind, what in _ADMIN_ACTIONS:
            if op is r.op and (kind is None or (name is not None and name.kind is kind and (
                    lock_kind is None or name.lock_kind == lock_kind))):
                action = what
                break
    if who.role is Role.READ:
        may = "may only read"
        if action is None:  # what a backup does
            return f"token {who.name} {may}; backup (and init) needs a backup or admin token"
    else:
        may = "may only add backups"
        if action is None:
            action = f"{r.op.value} {key}" if key else r.op.value
    return f"token {who.name} {may}; {action} needs an admin token"


@functools.cache
def _root_path(root: str) -> re.Pattern[str]:
    """A path under `root`: the repository's name and the key below it, if any."""
    return re.compile(re.escape(root) + r"(?:/([A-Za-z0-9._+-]+)(?:/([A-Za-z0-9._+/-]*))?)?"
                      r"(?![A-Za-z0-9._+-])")


def _wire(decode: Callable[[bytes], Any], body: bytes) -> Any:
    try:
        return decode(body)
    except api.WireError as e:
        raise ApiError(api.BAD_REQUEST, str(e)) from None
