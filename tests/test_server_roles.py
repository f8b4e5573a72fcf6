"""Tokens and roles against a real server: what each role may do, and what no token gets.

A backup token adds and never destroys: overwriting, deleting or renaming chunks and manifests
is refused with 403 and logged; only its lock objects are its own. A read token writes
nothing. Without a valid token nothing is readable, not even whether a repository exists.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from snapship.errors import AuthFailed, ObjectNotFound, PermissionDenied, StorageError
from snapship.formats import http_api as api
from snapship.formats.config import RepoConfig
from snapship.repository.catalog import Catalog
from snapship.repository.repo import Repository
from snapship.storage.memory import MemoryStorage
from tests.forge import Forge, lock_object
from tests.serverproc import ServerProc, create_repo_fast_kdf, http_storage, running_server

# Unencrypted, so the objects are the same in every repository of this chunk size.
FORGE = Forge(Repository(Catalog(MemoryStorage()), RepoConfig("0" * 32, 64 * 1024, "none", ""),
                         None))
# The same chunk sealed without compression: valid, and other bytes under the same name.
PLAIN = Forge(Repository(Catalog(MemoryStorage()), RepoConfig("0" * 32, 64 * 1024, "none", "",
                                                              compression_level=0), None))
CHUNK_KEY, CHUNK_BLOB, _ = FORGE.chunk(b"chunk bytes" * 100)
OTHER_KEY, OTHER_BLOB, _ = FORGE.chunk(b"other bytes" * 100)
VERSION = FORGE.version("disk", [b"chunk bytes" * 100])
REFS_KEY, REFS_BLOB = FORGE.refs(VERSION)
MANIFEST_KEY, MANIFEST_BLOB = FORGE.manifest(VERSION)
LOCK_KEY, LOCK_BLOB = lock_object("20261126T093000-0123456789ab")


def init(server: ServerProc, repo: str, token: str) -> None:
    create_repo_fast_kdf(http_storage(server, repo, token), encryption="none")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProc, dict[str, str]]]:
    with running_server(tmp_path_factory.mktemp("roles"),
                        extra=["--max-object-size", "1M", "--body-memory", "4M"]) as running:
        server, tokens = running
        init(server, "db1", tokens["ops"])
        admin = http_storage(server, "db1", tokens["ops"])
        admin.put(CHUNK_KEY, CHUNK_BLOB)
        admin.put(REFS_KEY, REFS_BLOB)
        admin.put(MANIFEST_KEY, MANIFEST_BLOB)
        yield running


def raw(server: ServerProc, method: str, path: str, token: str | None = None,
        body: bytes | None = None, headers: dict[str, str] | None = None
        ) -> tuple[int, http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=h)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp, data


def error_code(body: bytes) -> str:
    err = api.decode_error(body)
    assert err is not None, body
    return err[0]


def test_backup_token_adds_but_never_destroys(srv: tuple[ServerProc, dict[str, str]]) -> None:
    server, tokens = srv
    s = http_storage(server, "db1", tokens["db1-backup"])
    assert s.whoami() == ("db1-backup", "backup")
    s.put(OTHER_KEY, OTHER_BLOB)  # creating is allowed
    s.put(OTHER_KEY, OTHER_BLOB)  # so is putting the same bytes again (a retried or raced put)
    s.put(CHUNK_KEY, CHUNK_BLOB)
    s.flush()
    damaged = CHUNK_BLOB[:-1] + bytes([CHUNK_BLOB[-1] ^ 1])
    refused: list[tuple[Callable[[], object], str, str]] = [
        (lambda: s.put(CHUNK_KEY, PLAIN.chunk(b"chunk bytes" * 100)[1]), "overwrite", CHUNK_KEY),
        (lambda: s.put(MANIFEST_KEY, MANIFEST_BLOB[:-1] + b"x"), "overwrite", MANIFEST_KEY),
        (lambda: s.delete(CHUNK_KEY), "delete", CHUNK_KEY),
        (lambda: s.delete(MANIFEST_KEY), "delete", MANIFEST_KEY),
        (lambda: s.rename(CHUNK_KEY, "fossils/ab/" + "ab" * 32), "rename", CHUNK_KEY),
        (lambda: s.rename(MANIFEST_KEY, "locks/x"), "rename", MANIFEST_KEY),
        # Nor may it touch gc's state, marks or other locks (a forged collection or gc lock
        # could stall backups or gc).
        (lambda: s.put("gc/collection", b"{}"), "put", "gc/collection"),
        (lambda: s.put("protected/disk/v", b"{}"), "put", "protected/disk/v"),
        (lambda: s.put("locks/gc-20261126T093000-0123456789ab", b"{}"), "put",
         "locks/gc-20261126T093000-0123456789ab"),
        (lambda: s.maintenance("verify", {}), "maintain", "-"),
    ]
    for attempt, verb, key in refused:
        with pytest.raises(PermissionDenied) as exc:
            attempt()
        message = str(exc.value)
        assert "\n" not in message
        assert server.url("db1") in message and "db1-backup" in message, message
        line = server.wait_for_log(f"[op {'put' if verb in ('put', 'overwrite') else verb}, "
                                   f"repository db1, key {key}")
        assert "denied: token db1-backup (role backup)" in line
    # Nothing changed.
    admin = http_storage(server, "db1", tokens["ops"])
    assert admin.get(CHUNK_KEY) == CHUNK_BLOB
    assert admin.get(MANIFEST_KEY) == MANIFEST_BLOB
    assert admin.stat("fossils/ab/" + "ab" * 32) is None
    assert damaged != CHUNK_BLOB


def test_backup_token_owns_its_locks(srv: tuple[ServerProc, dict[str, str]]) -> None:
    """A writer lock is its token's: the server stamps it with its own clock and the token's
    name, and no other backup token may replace or delete it (an admin may)."""
    server, tokens = srv
    s = http_storage(server, "db1", tokens["db1-backup"])
    key, blob = lock_object("20261201T000000-00000000000a", heartbeat=time.time() + 1e9)
    before = time.time()
    s.put(key, blob)
    stored = json.loads(s.get(key))
    assert stored["owner"] == "db1-backup"
    assert before - 5 < stored["heartbeat"] < time.time() + 5  # the server's clock
    s.put(key, blob)  # heartbeats replace the lock object
    s.delete(key)
    assert s.stat(key) is None
    s.put(key, blob)
    thief = http_storage(server, "db1", tokens["db1-backup-2"])
    attempts: list[Callable[[], None]] = [lambda: thief.put(key, blob),
                                          lambda: thief.delete(key)]
    for attempt in attempts:
        with pytest.raises(PermissionDenied, match="db1-backup's lock"):
            attempt()
    assert json.loads(s.get(key))["owner"] == "db1-backup"
    http_storage(server, "db1", tokens["ops"]).delete(key)  # an admin may
    with pytest.raises(PermissionDenied):
        s.rename(CHUNK_KEY, "locks/writer-stolen")  # out of locks/ is not its own
    with pytest.raises(PermissionDenied):
        s.put(key, blob)
        s.rename(key, key + "-moved")  # no rename for a backup token at all
    with pytest.raises(PermissionDenied):
        s.delete("locks/prune-20261126T093000-0123456789ab")
    for junk in (b'{"heartbeat": 1}', b"[" * 100_000, b"not json",
                 lock_object("20261201T000000-00000000000b", heartbeat=1e18)[1]):
        with pytest.raises(StorageError,
                           match=r"lock .* (malformed|version|JSON|nested|too large)"):
            s.put(key.replace("00a", "00b"), junk)


def test_read_token_reads_and_writes_nothing(srv: tuple[ServerProc, dict[str, str]]) -> None:
    server, tokens = srv
    s = http_storage(server, "db1", tokens["restorer"])
    assert s.get(CHUNK_KEY) == CHUNK_BLOB
    assert s.stat(MANIFEST_KEY) == len(MANIFEST_BLOB)
    assert dict(s.list("versions/")) == {MANIFEST_KEY: len(MANIFEST_BLOB)}
    assert s.missing([CHUNK_KEY, "chunks/ee/ee"]) == {"chunks/ee/ee"}
    attempts: list[Callable[[], object]] = [
        lambda: s.put("chunks/ff/ff", b"x"), lambda: s.delete(CHUNK_KEY),
        lambda: s.put(LOCK_KEY, b"x"), s.flush, lambda: s.rename(LOCK_KEY, LOCK_KEY + "x")]
    for attempt in attempts:
        with pytest.raises(PermissionDenied, match=r"token restorer may only read; .* needs "
                           r"(a backup or admin|an admin) token"):
            attempt()
    server.wait_for_log("denied: token restorer (role read) may not put chunks/ff/ff")
    assert http_storage(server, "db1", tokens["ops"]).stat("chunks/ff/ff") is None


def test_scoped_token_cannot_touch_other_repositories(
        srv: tuple[ServerProc, dict[str, str]]) -> None:
    server, tokens = srv
    assert http_storage(server, "r1", tokens["only-r1"]).whoami() == ("only-r1", "backup")
    s = http_storage(server, "db1", tokens["only-r1"])
    for attempt in (lambda: s.get(CHUNK_KEY), lambda: s.stat(CHUNK_KEY),
                    lambda: list(s.list("")), s.whoami):
        with pytest.raises(PermissionDenied, match="may not use repository db1"):
            attempt()
    server.wait_for_log("denied: token only-r1 (role backup) may not use repository db1")


ENDPOINTS = [
    ("GET", "/v1/repos/db1"),
    ("GET", f"/v1/repos/db1/objects/{CHUNK_KEY}"),
    ("HEAD", f"/v1/repos/db1/objects/{CHUNK_KEY}"),
    ("GET", "/v1/repos/db1/objects/config"),
    ("PUT", "/v1/repos/db1/objects/chunks/00/0000"),
    ("DELETE", f"/v1/repos/db1/objects/{CHUNK_KEY}"),
    ("GET", "/v1/repos/db1/list?prefix="),
    ("GET", "/v1/repos/nonexistent/list?prefix="),
    ("POST", "/v1/repos/db1/missing"),
    ("POST", "/v1/repos/db1/rename"),
    ("POST", "/v1/repos/db1/flush"),
    ("POST", "/v1/repos/db1/maintenance/verify"),
    ("GET", "/v1/repos"),
    ("GET", "/"),
    ("GET", "/v2/repos/db1"),
]


@pytest.mark.parametrize("token", [None, "wrong-token-wrong-token-wrong", "Basic abc"])
def test_no_or_wrong_token_gets_401_on_everything(srv: tuple[ServerProc, dict[str, str]],
                                                  token: str | None) -> None:
    server, tokens = srv
    for method, path in ENDPOINTS:
        headers = {"Authorization": token} if token and token.startswith("Basic") else {}
        body = json.dumps({"keys": [CHUNK_KEY]}).encode() if method in ("POST", "PUT") else None
        status, resp, data = raw(server, method, path,
                                 None if token is None or headers else token, body, headers)
        assert status == 401, (method, path, status, data)
        assert resp.getheader("WWW-Authenticate") == 'Bearer realm="snapship"'
        assert resp.getheader(api.API_HEADER) == "1"
        if method != "HEAD":
            assert error_code(data) == api.UNAUTHORIZED
            assert CHUNK_BLOB not in data and b"db1" not in data
    assert http_storage(server, "db1", tokens["ops"]).stat("chunks/00/0000") is None
    with pytest.raises(AuthFailed, match="refused the token"):
        http_storage(server, "db1", "wrong-token-wrong-token-wrong").get(CHUNK_KEY)
    with pytest.raises(AuthFailed, match="needs a token"):
        http_storage(server, "db1", None).stat(CHUNK_KEY)


def test_protocol_errors_are_json_with_the_right_status(
        srv: tuple[ServerProc, dict[str, str]]) -> None:
    server, tokens = srv
    admin = tokens["ops"]
    cases: list[tuple[str, str, bytes | None, int, str]] = [
        ("GET", "/v2/repos/db1", None, 404, api.UNSUPPORTED_VERSION),
        ("GET", "/v1/repos", None, 404, api.NO_SUCH_ENDPOINT),
        ("GET", "/v1/repos/db1/objects/chunks/%61b", None, 400, api.BAD_KEY),
        ("GET", "/v1/repos/db1/objects/chunks/../config", None, 400, api.BAD_KEY),
        ("PUT", "/v1/repos/db1/objects/chunks/ab/.tmp-x", b"x", 400, api.BAD_KEY),
        ("GET", "/v1/repos/db1/objects/chunks/99/nothing", None, 404, api.NOT_FOUND),
        ("POST", "/v1/repos/db1/objects/config", b"", 405, api.METHOD_NOT_ALLOWED),
        ("GET", "/v1/repos/db1/list?prefix=&colour=red", None, 400, api.BAD_REQUEST),
        ("GET", "/v1/repos/db1/list?limit=0", None, 400, api.BAD_REQUEST),
        ("POST", "/v1/repos/db1/missing", b'{"keys": [], "x": 1}', 400, api.BAD_REQUEST),
        ("POST", "/v1/repos/db1/missing", b'{"keys": [1]}', 400, api.BAD_REQUEST),
        ("POST", "/v1/repos/db1/rename", b'{"from": "config"}', 400, api.BAD_REQUEST),
        ("POST", "/v1/repos/db1/rename", b'{"from": "no/such", "to": "x"}', 404, api.NOT_FOUND),
        ("PUT", "/v1/repos/db1/objects/big", b"x" * (1 << 20 | 1), 413, api.TOO_LARGE),
        ("GET", "/v1/repos/bad%20name", None, 400, api.BAD_REQUEST),
    ]
    for method, path, body, status, code in cases:
        got, resp, data = raw(server, method, path, admin, body)
        assert (got, error_code(data)) == (status, code), (method, path, data)
        assert resp.getheader(api.API_HEADER) == "1"
    got, _resp, data = raw(server, "PUT", "/v1/repos/db1/objects/chunked", admin,
                           headers={"Transfer-Encoding": "chunked"}, body=b"1\r\nx\r\n0\r\n\r\n")
    assert (got, error_code(data)) == (411, api.LENGTH_REQUIRED)
    got, _resp, _data = raw(server, "BREW", "/v1/repos/db1", admin)
    assert got == 501
    # The connection survives an error: keep-alive goes on after a 4xx with a body drained.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    auth = {"Authorization": f"Bearer {tokens['restorer']}"}
    conn.request("PUT", "/v1/repos/db1/objects/chunks/11/11", body=b"y" * 5000, headers=auth)
    first = conn.getresponse()
    first.read()
    conn.request("GET", "/v1/repos/db1/objects/config", headers=auth)
    second = conn.getresponse()
    config = http_storage(server, "db1", tokens["ops"]).get("config")
    assert (first.status, second.status, second.read()) == (403, 200, config)
    conn.close()


def test_missing_and_paged_list(srv: tuple[ServerProc, dict[str, str]]) -> None:
    server, tokens = srv
    s = http_storage(server, "paging", tokens["ops"])
    keys = {f"chunks/{i % 7:02x}/{i:064x}": i % 5 for i in range(150)}
    keys.update({"a.x": 1, "a/b": 2, "a+b/c": 3, "a-b": 4, "config": 5})
    for k, n in keys.items():
        s.put(k, b"z" * n)
    s.page_size = 7
    assert dict(s.list("")) == keys
    assert sorted(k for k, _ in s.list("")) == sorted(keys)  # each key once
    assert dict(s.list("chunks/0")) == {k: v for k, v in keys.items() if k.startswith("chunks/0")}
    assert dict(s.list("a")) == {"a.x": 1, "a/b": 2, "a+b/c": 3, "a-b": 4}
    assert dict(s.list("a+")) == {"a+b/c": 3}
    absent = {f"chunks/ee/{i:064x}" for i in range(2100)}
    present = set(list(keys)[:40])
    assert s.missing(sorted(absent | present)) == absent
    sizes = s.stat_many(sorted(absent | present))
    assert sizes == {**{k: None for k in absent}, **{k: keys[k] for k in present}}
    with pytest.raises(ObjectNotFound):
        s.get("chunks/ee/" + "0" * 64)


def test_backups_racing_on_one_chunk_all_succeed(srv: tuple[ServerProc, dict[str, str]]) -> None:
    """Two backups storing the same new chunk at once: both puts succeed (same bytes), one
    object results; another writer's different bytes under that name are refused."""
    server, tokens = srv
    init(server, "race", tokens["db1-backup"])
    s = http_storage(server, "race", tokens["db1-backup"])
    key, blob, _cid = FORGE.chunk(bytes(range(256)) * 256)
    errors: list[BaseException] = []

    def put() -> None:
        try:
            s.put(key, blob)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert dict(s.list("chunks/")) == {key: len(blob)}
    damaged = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(StorageError, match="checksum"):
        s.put(key, damaged)  # not even a chunk: refused before anything is looked up
    assert s.get(key) == blob
