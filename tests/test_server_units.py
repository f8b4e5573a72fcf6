"""The server's pure parts without a server: the role table, the token file, the URL grammar,
the wire codecs, the paged listing order and the retry backoff."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapship.errors import UsageError
from snapship.formats import http_api as api
from snapship.server.objects import sorted_objects
from snapship.server.policy import Op, Permission, Role, permission
from snapship.server.routes import ApiError, route
from snapship.server.tokens import HEADER, hash_token, new_token, parse_tokens, token_line
from snapship.storage.http import parse_repo_url
from snapship.storage.retry import Retry, RetryPolicy

A, D, C = Permission.ALLOW, Permission.DENY, Permission.CREATE_ONLY
CHUNK = "chunks/ab/" + "ab" * 32
LOCK = "locks/writer-1"
GC_LOCK = "locks/gc-1"


@pytest.mark.parametrize(
    ("op", "key", "dst", "read", "backup", "admin"),
    [
        (Op.GET, CHUNK, None, A, A, A),
        (Op.LIST, None, None, A, A, A),
        (Op.MISSING, None, None, A, A, A),
        (Op.PUT, CHUNK, None, D, C, A),
        (Op.PUT, "chunks/ab/abcd", None, D, D, A),  # no chunk's key
        (Op.PUT, "chunks/cd/" + "ab" * 32, None, D, D, A),  # in the wrong directory
        (Op.PUT, "versions/v/1", None, D, C, A),
        (Op.PUT, "config", None, D, C, A),
        (Op.PUT, "keys/repokey", None, D, C, A),
        (Op.PUT, "refs/v/1", None, D, C, A),
        (Op.PUT, "keys/other", None, D, D, A),
        # A layout-2 key file: created by a backup token only at init (server/validate.py
        # refuses it once the config exists); deleted by an admin only.
        (Op.PUT, "keys/0123456789abcdef", None, D, C, A),
        (Op.DELETE, "keys/0123456789abcdef", None, D, D, A),
        (Op.PUT, "gc/collection", None, D, D, A),
        (Op.PUT, "fossils/ab/abcd", None, D, D, A),
        (Op.PUT, "protected/v/1", None, D, D, A),
        (Op.PUT, "damaged/v/1", None, D, D, A),
        (Op.PUT, "anything", None, D, D, A),
        (Op.PUT, LOCK, None, D, A, A),
        (Op.PUT, LOCK + "/nested", None, D, D, A),
        (Op.PUT, "locks/stale/writer-1", None, D, D, A),  # a tombstone: gc's alone
        (Op.PUT, GC_LOCK, None, D, D, A),
        (Op.DELETE, CHUNK, None, D, D, A),
        (Op.DELETE, LOCK, None, D, A, A),
        (Op.DELETE, GC_LOCK, None, D, D, A),
        (Op.RENAME, CHUNK, "fossils/ab/abcd", D, D, A),
        (Op.RENAME, LOCK, "locks/writer-2", D, D, A),
        (Op.RENAME, LOCK, "locks/x", D, D, A),
        (Op.RENAME, LOCK, "chunks/ab/abcd", D, D, A),
        (Op.RENAME, "chunks/x", LOCK, D, D, A),
        (Op.FLUSH, None, None, D, A, A),
        (Op.MAINTAIN, None, None, D, D, A),
    ],
)
def test_role_table(op: Op, key: str | None, dst: str | None, read: Permission,
                    backup: Permission, admin: Permission) -> None:
    got = [permission(role, op, key, dst) for role in (Role.READ, Role.BACKUP, Role.ADMIN)]
    assert got == [read, backup, admin]


def test_token_file_round_trip_and_lookup() -> None:
    tokens = [new_token() for _ in range(3)]
    assert len(set(tokens)) == 3 and all(len(t) == 43 for t in tokens)
    text = (f"# comment\n\n{HEADER}\n"
            + token_line("a", Role.ADMIN, None, hash_token(tokens[0]))
            + token_line("b", Role.BACKUP, frozenset({"r1", "r2"}), hash_token(tokens[1])))
    table = parse_tokens(text, "t")
    a, b = table.lookup(tokens[0]), table.lookup(tokens[1])
    assert a is not None and (a.name, a.role, a.repos) == ("a", Role.ADMIN, None)
    assert b is not None and b.may_use("r2") and not b.may_use("r3")
    assert table.lookup(tokens[2]) is None and table.lookup("") is None
    assert tokens[0] not in text


H = "sha256:" + "0" * 64


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty token file"),
        ("snapship-tokens 2\n", "line 1: expected 'snapship-tokens 1'"),
        (f"{HEADER}\na admin *\n", "line 2: expected 'NAME ROLE"),
        (f"{HEADER}\na root * {H}\n", "unknown role 'root'"),
        (f"{HEADER}\n-a admin * {H}\n", "invalid token name"),
        (f"{HEADER}\na admin bad/name {H}\n", "invalid repository name"),
        (f"{HEADER}\na admin * sha256:00\n", "64 hex digits"),
        (f"{HEADER}\na admin * {H}\na read * {H[:-1]}1\n", "used twice"),
        (f"{HEADER}\na admin * {H}\nb read * {H}\n", "same token is listed twice"),
    ],
)
def test_bad_token_files_name_the_line(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_tokens(text, "tokens")


@pytest.mark.parametrize(
    ("method", "target", "op", "key"),
    [
        ("GET", "/v1/repos/db1", Op.INFO, None),
        ("GET", "/v1/repos/db1/objects/chunks/ab/abcd", Op.GET, "chunks/ab/abcd"),
        ("HEAD", "/v1/repos/db1/objects/config", Op.HEAD, "config"),
        ("PUT", "/v1/repos/db1/objects/a+b/c-d.e_f", Op.PUT, "a+b/c-d.e_f"),
        ("DELETE", "/v1/repos/db1/objects/x", Op.DELETE, "x"),
        ("GET", "/v1/repos/db1/list?prefix=a%2Bb&after=a%2Bb/c&limit=5", Op.LIST, None),
        ("POST", "/v1/repos/db1/missing", Op.MISSING, None),
        ("POST", "/v1/repos/db1/maintenance/gc", Op.MAINTAIN, None),
    ],
)
def test_routes(method: str, target: str, op: Op, key: str | None) -> None:
    r = route(method, target)
    assert (r.op, r.repo, r.key) == (op, "db1", key)
    if op is Op.LIST:
        assert r.query == {"prefix": "a+b", "after": "a+b/c", "limit": "5"}


@pytest.mark.parametrize(
    ("method", "target", "code"),
    [
        ("GET", "/v3/repos/db1", api.UNSUPPORTED_VERSION),
        ("GET", "/repos/db1", api.NO_SUCH_ENDPOINT),
        ("GET", "/v1/repos/db1/objects", api.NO_SUCH_ENDPOINT),
        ("GET", "/v1/repos/db1/objects/a//b", api.BAD_KEY),
        ("GET", "/v1/repos/db1/objects/a%2Fb", api.BAD_KEY),
        ("GET", "/v1/repos/db1/objects/.tmp-1", api.BAD_KEY),
        ("PUT", "/v1/repos/db1", api.METHOD_NOT_ALLOWED),
        ("GET", "/v1/repos/db1/flush", api.METHOD_NOT_ALLOWED),
        ("POST", "/v1/repos/db1/flush?x=1", api.BAD_REQUEST),
        ("GET", "/v1/repos/db1/list?prefix=a&prefix=b", api.BAD_REQUEST),
        ("POST", "/v1/repos/db1/maintenance/defrag", api.NO_SUCH_ENDPOINT),
        ("GET", "http://evil/v1/repos/db1", api.BAD_REQUEST),
    ],
)
def test_bad_routes(method: str, target: str, code: str) -> None:
    with pytest.raises(ApiError) as exc:
        route(method, target)
    assert exc.value.code == code


def test_wire_codecs_are_strict() -> None:
    assert api.decode_list_page(api.encode_list_page([("a", 1)], "a")) == ([("a", 1)], "a")
    assert api.decode_missing_request(api.encode_missing_request(["k"])) == ["k"]
    assert api.decode_rename(api.encode_rename("a", "b")) == ("a", "b")
    assert api.decode_missing_reply(api.encode_missing_reply(["a"], [("b", 3)])) == (
        ["a"], [("b", 3)])
    assert api.decode_error(api.encode_error("x", "two\nlines")) == ("x", "two lines")
    assert api.decode_error(b"<html>") is None
    for bad in (b'{"objects": [["a", -1]], "next": null}', b'{"objects": [["a", true]], '
                b'"next": null}', b'{"objects": [], "next": null, "more": 1}', b"[]", b"{"):
        with pytest.raises(api.WireError):
            api.decode_list_page(bad)
    with pytest.raises(api.WireError, match="1 to 1000"):
        api.decode_missing_request(api.encode_missing_request(["k"] * 1001))
    assert api.decode_options(b"", {"deep": bool}, "o") == {}
    with pytest.raises(api.WireError, match="unknown field"):
        api.decode_options(b'{"deeep": true}', {"deep": bool}, "o")
    assert api.api_versions("1, 2") == {1, 2} and api.api_versions(None) is None


@pytest.mark.parametrize(
    ("url", "fragment"),
    [("http://10.0.0.1:1/r", "unencrypted"), ("https://h/", "names no repository"),
     ("https://h:99999/r", "invalid port"), ("https://h/r?x=1", "query"),
     ("https://t@h/r", "credentials"), ("https:///r", "no host")],
)
def test_repository_urls(url: str, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        parse_repo_url(url)


def test_repository_url_parts() -> None:
    u = parse_repo_url("https://backup.example/proxy/path/db1")
    assert (u.host, u.port, u.prefix, u.name) == ("backup.example", 443, "/proxy/path", "db1")
    assert str(parse_repo_url("http://[::1]:8420/r")) == "http://[::1]:8420/r"
    assert parse_repo_url("http://10.0.0.1:1/r", allow_insecure_http=True).host == "10.0.0.1"


_SEGMENT = st.text("ab.+-_", min_size=1, max_size=3).filter(lambda s: s not in (".", ".."))


@settings(max_examples=40, deadline=None)
@given(keys=st.sets(st.lists(_SEGMENT, min_size=1, max_size=3).map("/".join), max_size=25),
       limit=st.integers(1, 6), prefix=st.sampled_from(["", "a", "a/", "b.", "a+"]))
def test_paged_listing_visits_every_key_once(tmp_path_factory: pytest.TempPathFactory,
                                             keys: set[str], limit: int, prefix: str) -> None:
    root = tmp_path_factory.mktemp("list")
    stored = set()
    for k in sorted(keys, key=len):
        path = Path(root, k)
        # A key cannot be both an object and a "directory" of other keys on a file system.
        if any(Path(root, *k.split("/")[:i]).is_file() for i in range(1, k.count("/") + 1)):
            continue
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * len(k))
        stored.add(k)
    (root / ".tmp-partial").write_bytes(b"")
    pages: list[str] = []
    after = None
    while True:
        page = list(sorted_objects(str(root), prefix, after))[:limit]
        pages += [k for k, _n in page]
        if len(page) < limit:
            break
        after = page[-1][0]
    assert sorted(pages) == sorted(k for k in stored if k.startswith(prefix))
    assert len(pages) == len(set(pages))


def test_retry_backoff_stays_within_the_budget() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s + 0.01  # each attempt costs a little too

    r = Retry(RetryPolicy(budget=10.0, first_delay=0.1, max_delay=2.0), clock=lambda: now[0],
              sleep=sleep, rand=lambda: 1.0)
    while r.again():
        pass
    assert slept[:5] == [0.1, 0.2, 0.4, 0.8, 1.6] and max(slept) == 2.0
    assert 9.9 <= now[0] <= 10.2 and r.attempts == len(slept) + 1
    r = Retry(RetryPolicy(budget=0.0), clock=lambda: 5.0, sleep=sleep)
    assert not r.again()
