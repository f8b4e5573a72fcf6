"""The S3 backend against a real server (SeaweedFS), with faults injected by a proxy.

The storage contract itself runs in test_storage.py (the `s3` parameter); this file covers
what is S3's own: prefixes, paging, the client set-up from the AWS variables, error messages,
and the retry layer under 5xx bursts, dropped connections, stalls and damaged uploads.
"""

from __future__ import annotations

import base64
import random
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from snapship.cli.context import open_storage
from snapship.errors import (
    ObjectNotFound,
    StorageError,
    TransientStorageError,
    UsageError,
)
from snapship.storage.retry import Retry, RetryingStorage, RetryPolicy
from snapship.storage.s3 import PARALLELISM, S3Storage
from snapship.storage.s3_client import ClientOptions, make_client, parse_s3_url
from tests.s3faultproxy import FaultProxy, Rule, puts_under
from tests.seaweed import Bucket, use_endpoint

pytest_plugins = ("tests.s3server",)  # the weed, s3_bucket and proxy fixtures

FAST = RetryPolicy(budget=30.0, first_delay=0.05, max_delay=0.2, attempts=6)


def through(proxy: FaultProxy, bucket: Bucket, mp: pytest.MonkeyPatch, *,
            policy: RetryPolicy = FAST, read_timeout: float = 10.0) -> RetryingStorage:
    """An S3Storage whose requests all pass the proxy, retried as the CLI retries them."""
    use_endpoint(mp, proxy.endpoint)
    client, _ = make_client(ClientOptions(max_connections=16, connect_timeout=2,
                                          read_timeout=read_timeout))
    return RetryingStorage(S3Storage(client, parse_s3_url(bucket.url("r"))), policy)


# -- locations and client set-up ------------------------------------------------------------


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://bucket").prefix == ""
    assert parse_s3_url("s3://bucket/").prefix == ""
    loc = parse_s3_url("s3://my.bucket-1/a/b/")
    assert (loc.bucket, loc.prefix, loc.url("config")) == ("my.bucket-1", "a/b/",
                                                           "s3://my.bucket-1/a/b/config")
    for bad in ("s3://ab", "s3://Upper", "s3://-x-", "s3://a..b", "s3://b" * 30,
                "s3://bucket/a//b", "s3://bucket/a/../b", "s3://bucket/a b", "http://x"):
        with pytest.raises(UsageError):
            parse_s3_url(bad)


def test_client_follows_the_aws_variables(s3_bucket: Bucket, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    client, attempts = make_client()
    assert client.meta.endpoint_url == s3_bucket.endpoint
    config: Any = client.meta.config  # the stubs do not know these attributes
    assert config.s3["addressing_style"] == "path"  # a custom endpoint
    assert config.retries["total_max_attempts"] == 1  # retrying is ours alone
    assert attempts is None and S3Storage.open(s3_bucket.url()).policy == RetryPolicy()
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    assert make_client()[1] == 3
    assert S3Storage.open(s3_bucket.url(), retry=RetryPolicy(budget=7)).policy == RetryPolicy(
        budget=7, attempts=3)
    s = S3Storage.open(s3_bucket.url("x"))
    s.put("config", b"1")
    assert s3_bucket.keys() == {"x/config": 1}


def test_a_listing_lag_reaches_gc(s3_bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    assert open_storage(s3_bucket.url()).capabilities.list_lag == 0.0  # AWS, SeaweedFS, MinIO...
    monkeypatch.setenv("SNAPSHIP_S3_LIST_LAG", "2.5")
    assert open_storage(s3_bucket.url()).capabilities.list_lag == 2.5
    for bad in ("soon", "-1", "1e9"):
        monkeypatch.setenv("SNAPSHIP_S3_LIST_LAG", bad)
        with pytest.raises(UsageError, match="SNAPSHIP_S3_LIST_LAG"):
            open_storage(s3_bucket.url())


def test_prefixes_keep_repositories_apart(s3_bucket: Bucket) -> None:
    a, b = S3Storage.open(s3_bucket.url("one")), S3Storage.open(s3_bucket.url("one/two"))
    a.put("config", b"a")
    b.put("config", b"bb")
    assert dict(a.list("")) == {"config": 1, "two/config": 2}  # b lives inside a's prefix
    assert dict(b.list("")) == {"config": 2}
    assert s3_bucket.keys() == {"one/config": 1, "one/two/config": 2}
    assert a.describe() == f"s3://{s3_bucket.name}/one"


def test_list_pages_and_skips_foreign_keys(s3_bucket: Bucket) -> None:
    s = S3Storage.open(s3_bucket.url("r"))
    keys = {f"chunks/{i % 256:02x}/{i:06d}+x": i % 7 for i in range(2100)}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: s.put(kv[0], b"z" * kv[1]), keys.items()))
    raw = s3_bucket.server.client()
    for junk in ("r/chunks/", "r/chunks/00/.tmp-abc", "r/chunks/00/a b"):
        raw.put_object(Bucket=s3_bucket.name, Key=junk, Body=b"junk")
    listing = s.list("chunks/")
    assert isinstance(listing, Iterator)  # lazy: pages are fetched as they are consumed
    assert dict(listing) == keys  # three pages of at most 1000
    assert dict(s.list("chunks/0a/")) == {k: v for k, v in keys.items()
                                          if k.startswith("chunks/0a/")}


def test_errors_name_the_object(s3_bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    s = S3Storage.open(s3_bucket.url("r"))
    with pytest.raises(ObjectNotFound, match="versions/v/1"):
        s.get("versions/v/1")
    with pytest.raises(ObjectNotFound):
        s.rename("versions/v/1", "versions/v/2")
    assert s.stat("versions/v/1") is None
    s.delete("versions/v/1")
    missing = S3Storage.open("s3://no-such-bucket-here/r")
    with pytest.raises(StorageError, match="bucket no-such-bucket-here does not exist") as e:
        missing.get("config")
    assert "\n" not in str(e.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    started = time.monotonic()
    with pytest.raises(TransientStorageError) as e:
        S3Storage.open(s3_bucket.url("r")).put("config", b"1")
    message = str(e.value)
    assert message.startswith(f"cannot write s3://{s3_bucket.name}/r/config: ")
    assert "127.0.0.1:9" in message and "gave up after 2 attempts" in message
    assert "\n" not in message
    assert time.monotonic() - started < 10


# -- faults -----------------------------------------------------------------------------------


def test_5xx_bursts_are_retried(proxy: FaultProxy, s3_bucket: Bucket,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    s = through(proxy, s3_bucket, monkeypatch)
    for status, code in ((503, "SlowDown"), (500, "InternalError"), (502, "BadGateway")):
        proxy.add(Rule("status", status=status, code=code, count=3))
        s.put(f"chunks/aa/{status}", b"data")
        proxy.add(Rule("status", status=status, code=code, count=3))
        assert s.get(f"chunks/aa/{status}") == b"data"
    proxy.add(Rule("status", count=3))
    assert s.stat("chunks/aa/503") == 4
    proxy.add(Rule("status", count=3))
    assert len(dict(s.list("chunks/"))) == 3
    proxy.add(Rule("status", count=3))
    s.rename("chunks/aa/503", "fossils/aa/503")
    assert proxy.injected["status"] == 3 * 9
    assert s3_bucket.keys("r/fossils/") == {"r/fossils/aa/503": 4}


def test_permanent_errors_are_not_retried(proxy: FaultProxy, s3_bucket: Bucket,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    s = through(proxy, s3_bucket, monkeypatch)
    proxy.add(Rule("status", status=403, code="AccessDenied", count=None))
    before = proxy.requests
    with pytest.raises(StorageError) as e:
        s.put("config", b"1")
    assert not isinstance(e.value, TransientStorageError)
    assert proxy.requests - before == 1
    assert "HTTP 403 AccessDenied" in str(e.value) and "credentials" in str(e.value)


def test_unending_5xx_gives_up_with_one_line(proxy: FaultProxy, s3_bucket: Bucket,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    s = through(proxy, s3_bucket, monkeypatch)
    proxy.add(Rule("status", count=None))
    with pytest.raises(TransientStorageError) as e:
        s.get("config")
    assert str(e.value).startswith(f"cannot read s3://{s3_bucket.name}/r/config: HTTP 503 "
                                   "SlowDown")
    assert "gave up after 6 attempts" in str(e.value)
    assert proxy.injected["status"] == 6


def test_a_dropped_upload_leaves_nothing_and_is_retried(
        proxy: FaultProxy, s3_bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    s = through(proxy, s3_bucket, monkeypatch)
    data = random.Random(1).randbytes(3 << 20)
    proxy.add(Rule("drop_upload", match=puts_under("/chunks/"), after=1 << 20, count=None))
    with pytest.raises(TransientStorageError, match="chunks/ab/cut"):
        s.put("chunks/ab/cut", data)
    assert proxy.injected["drop_upload"] == FAST.attempts
    assert s3_bucket.keys() == {}  # the server kept none of the truncated bodies
    proxy.clear()
    proxy.add(Rule("drop_upload", match=puts_under("/chunks/"), after=2 << 20, count=2))
    s.put("chunks/ab/cut", data)
    assert s.get("chunks/ab/cut") == data
    assert s3_bucket.keys() == {"r/chunks/ab/cut": len(data)}


def test_a_damaged_upload_is_refused_by_its_checksum(
        proxy: FaultProxy, s3_bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    s = through(proxy, s3_bucket, monkeypatch)
    proxy.add(Rule("corrupt", match=puts_under("/chunks/"), count=None))
    with pytest.raises(TransientStorageError, match="BadDigest"):
        s.put("chunks/cd/bad", b"precious data")
    assert s3_bucket.keys() == {}
    proxy.clear()
    proxy.add(Rule("corrupt", match=puts_under("/chunks/"), count=1))
    s.put("chunks/cd/bad", b"precious data")
    assert s.get("chunks/cd/bad") == b"precious data"


def test_an_upload_is_one_request_with_its_crc32(
        proxy: FaultProxy, s3_bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    s = through(proxy, s3_bucket, monkeypatch)
    data = bytearray(random.Random(5).randbytes(2 << 20))  # what sealing a chunk gives
    s.put("chunks/ab/one", data)
    create = s.creator()
    assert create is not None and create("chunks/ab/two", b"small") is True
    puts = [headers for method, _path, headers in proxy.seen if method == "PUT"]
    bodies: list[bytes | bytearray] = [data, b"small"]
    assert len(puts) == 2
    for headers, body in zip(puts, bodies, strict=True):
        # No 100-continue round trip before the body, no MD5 or SHA-256 of it: one CRC32.
        assert "expect" not in headers and "content-md5" not in headers
        assert headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
        crc = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
        assert headers["x-amz-checksum-crc32"] == crc
        assert headers["content-length"] == str(len(body))
    assert s.get("chunks/ab/one") == data


def test_stat_many_overlaps_its_heads(proxy: FaultProxy, s3_bucket: Bucket,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    s = through(proxy, s3_bucket, monkeypatch)
    present = {f"chunks/0{i}/x": i + 1 for i in range(4)}
    for key, size in present.items():
        s.put(key, b"x" * size)
    keys = [*present, *(f"chunks/1{i}/absent" for i in range(2 * PARALLELISM - 4))]
    # Every HEAD takes 0.25 s: one after the other the batch would take 4 s.
    proxy.add(Rule("stall", match=lambda method, path: method == "HEAD", seconds=0.25,
                   count=None))
    started = time.monotonic()
    assert s.stat_many(keys) == {k: present.get(k) for k in keys}
    assert time.monotonic() - started < len(keys) * 0.25 / 2
    heads = [path for method, path, _headers in proxy.seen if method == "HEAD"]
    assert sorted(heads) == sorted(f"/{s3_bucket.name}/r/{k}" for k in keys)


def test_stat_many_asks_again_only_for_what_failed(
        proxy: FaultProxy, s3_bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    s = through(proxy, s3_bucket, monkeypatch)
    s.put("chunks/00/here", b"123")
    keys = ["chunks/00/here", *(f"chunks/{i:02x}/absent" for i in range(1, 20))]
    proxy.add(Rule("status", match=lambda method, path: method == "HEAD", count=3))
    assert s.stat_many(keys) == {k: (3 if k == "chunks/00/here" else None) for k in keys}
    assert proxy.injected["status"] == 3
    heads = [path for method, path, _headers in proxy.seen if method == "HEAD"]
    assert len(heads) == len(keys) + 3  # each failed HEAD once more, none of the others
    proxy.add(Rule("status", status=403, code="AccessDenied", match=lambda method, path:
                   method == "HEAD", count=None))
    with pytest.raises(StorageError, match="HTTP 403") as e:
        s.stat_many(keys)
    assert not isinstance(e.value, TransientStorageError)


def test_a_download_that_breaks_off_is_retried(
        proxy: FaultProxy, s3_bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    s = through(proxy, s3_bucket, monkeypatch)
    data = random.Random(3).randbytes(1 << 20)
    s.put("chunks/12/big", data)
    proxy.add(Rule("cut_response", match=lambda method, path: method == "GET", count=2))
    assert s.get("chunks/12/big") == data
    assert proxy.injected["cut_response"] == 2


def test_lost_answers_and_stalls_are_retried(
        proxy: FaultProxy, s3_bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    s = through(proxy, s3_bucket, monkeypatch, read_timeout=1.0)
    proxy.add(Rule("drop_response", count=2))
    s.put("chunks/ef/x", b"once")  # stored by the first try, whose answer was lost
    assert s.get("chunks/ef/x") == b"once"
    proxy.add(Rule("stall", seconds=2.5, count=1))
    started = time.monotonic()
    assert s.get("chunks/ef/x") == b"once"
    assert time.monotonic() - started >= 1.0
    assert proxy.injected == {"drop_response": 2, "stall": 1}


def test_a_listing_resumes_at_the_failed_page(
        proxy: FaultProxy, s3_bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    s = through(proxy, s3_bucket, monkeypatch)
    direct = S3Storage.open(s3_bucket.url("r"))
    keys = {f"versions/v/{i:05d}": 1 for i in range(1500)}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: direct.put(k, b"x"), keys))
    is_list = lambda method, path: method == "GET" and "list-type=2" in path  # noqa: E731
    proxy.add(Rule("status", match=is_list, skip=1, count=2))  # the second page fails twice
    got = list(s.list("versions/"))
    assert dict(got) == keys and len(got) == len(keys)  # nothing twice, nothing missed
    assert proxy.injected["status"] == 2


# -- the retry policy (no I/O) -----------------------------------------------------------------


def test_aws_max_attempts_caps_the_tries_within_the_budget() -> None:
    now = [100.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    retry = Retry(RetryPolicy(budget=1000, first_delay=1, max_delay=1, attempts=3),
                  clock=lambda: now[0], sleep=sleep, rand=lambda: 1.0)
    assert [retry.again() for _ in range(3)] == [True, True, False]  # 3 tries in all
    assert retry.attempts == 3 and retry.elapsed() == 2.0
    unlimited = Retry(RetryPolicy(budget=10, first_delay=1, max_delay=1),
                      clock=lambda: now[0], sleep=sleep, rand=lambda: 1.0)
    assert sum(unlimited.again() for _ in range(50)) == 10  # the budget alone stops it
