"""The S3 backend: repository objects as objects of one bucket, under an optional prefix.

A repository key `K` is the S3 object `PREFIX + K`. What the contract in `base.py` needs, S3
gives directly (docs/s3.md has the details and the consistency each step relies on):

- `put` is a single PutObject with a CRC32 of the body (`x-amz-checksum-crc32`): S3 stores
  the whole object or nothing, and refuses a body that arrives short or altered, so no
  reader ever sees half an object.
- `flush` does nothing: a PUT that returned success is durable.
- `stat_many` is one HeadObject per key, `PARALLELISM` at a time (S3 has no batch HEAD).
- `list` pages through ListObjectsV2 lazily, one page of at most 1000 keys at a time.
- `rename` is CopyObject then DeleteObject (a crash between them leaves both, as allowed).

Failures are classified here, once, into `TransientStorageError` (5xx, throttling, timeouts,
dropped connections, a body cut short: `S3Storage.open` wraps the backend in
`storage/retry.py`'s `RetryingStorage`, which retries them), `ObjectNotFound`, and
`StorageError` (anything else: not retried), each with a one-line message naming the request
and the `s3://` URL of the object.
"""

from __future__ import annotations

import base64
import dataclasses
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar, cast

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)

from snapship.errors import ObjectNotFound, StorageError, TransientStorageError, UsageError
from snapship.storage.base import Capabilities, CreateFn, StorageDefaults, check_key
from snapship.storage.local import TMP_PREFIX
from snapship.storage.retry import PartlyAnswered, RetryingStorage, RetryPolicy
from snapship.storage.s3_client import ClientOptions, S3Location, make_client, parse_s3_url

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

T = TypeVar("T")

MAX_PUT = 5 << 30
"""The largest object a single PutObject (and CopyObject) may create."""
NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})
TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
    "ThrottledException", "RequestThrottled", "RequestThrottledException",
    "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "ProvisionedThroughputExceededException", "RequestTimeout", "RequestTimeoutException",
    "PriorRequestNotComplete", "EC2ThrottledException", "IDPCommunicationError",
    # the body was damaged on the way: sending it again fixes it
    "BadDigest", "IncompleteBody", "XAmzContentChecksumMismatch", "XAmzContentSHA256Mismatch",
})
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
ACCESS_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem",
})


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


PARALLELISM = 8
"""Requests worth running at once (engine/pipeline.py): each waits a round trip."""


class S3Storage(StorageDefaults):
    def __init__(self, client: S3Client, location: S3Location, list_lag: float = 0.0) -> None:
        self.client = client
        self.location = location
        self.bucket = location.bucket
        self.prefix = location.prefix
        # S3 lists keys in ascending (UTF-8 binary) order; ours are ASCII. A store that lists
        # late declares it (docs/gc.md, "Listing lag"); AWS S3 itself lists after write.
        self.capabilities = Capabilities(parallelism=PARALLELISM, list_lag=list_lag,
                                         ordered_listing=True)

    @classmethod
    def open(cls, url: str, options: ClientOptions | None = None, retry: RetryPolicy | None = None,
             list_lag: float = 0.0) -> RetryingStorage:
        """The repository at `s3://BUCKET[/PREFIX]`, reached as the AWS configuration says,
        with its transient failures retried under `retry` (`AWS_MAX_ATTEMPTS`, if set, caps
        the tries)."""
        location = parse_s3_url(url)
        client, max_attempts = make_client(options or ClientOptions())
        retry = retry or RetryPolicy()
        if max_attempts:
            retry = dataclasses.replace(retry, attempts=max_attempts)
        return RetryingStorage(cls(client, location, list_lag), retry)

    # -- the contract -----------------------------------------------------------------------

    def put(self, key: str, data: bytes | bytearray) -> None:
        name = self._name(key)
        if len(data) > MAX_PUT:
            raise StorageError(f"cannot write {self.location.url(key)}: {len(data)} bytes is "
                               "more than one S3 PUT can store (5 GiB)")
        crc = _crc32(data)
        body = _as_body(data)

        def put() -> None:
            self.client.put_object(Bucket=self.bucket, Key=name, Body=body, ChecksumCRC32=crc)

        self._request("write", key, put)

    def creator(self) -> CreateFn | None:
        return self.create

    def create(self, key: str, data: bytes | bytearray) -> bool:
        """`put`, only if no object is under the key (`If-None-Match: *`): whether it was
        stored. The store decides, so this holds across every client of the bucket."""
        name = self._name(key)
        crc = _crc32(data)
        body = _as_body(data)

        def put() -> bool:
            try:
                self.client.put_object(Bucket=self.bucket, Key=name, Body=body, ChecksumCRC32=crc,
                                       IfNoneMatch="*")
            except ClientError as e:
                if _code(e) == "PreconditionFailed" or _status(e) == 412:
                    return False
                raise
            return True

        return self._request("write", key, put)

    def get(self, key: str) -> bytes:
        name = self._name(key)

        def get() -> bytes:
            response = self.client.get_object(Bucket=self.bucket, Key=name)
            # botocore checks the length against Content-Length (IncompleteReadError) and
            # never retries a body that breaks off: reading it inside the retried request does.
            data: bytes = response["Body"].read()
            return data

        return self._request("read", key, get)

    def stat(self, key: str) -> int | None:
        name = self._name(key)

        def head() -> int | None:
            try:
                size: int = self.client.head_object(Bucket=self.bucket, Key=name)["ContentLength"]
            except ClientError as e:
                if _code(e) in NOT_FOUND or _status(e) == 404:
                    return None
                raise
            return size

        return self._request("stat", key, head)

    def stat_many(self, keys: Iterable[str]) -> dict[str, int | None]:
        """`stat` of each key, `PARALLELISM` HEADs in flight: a batch costs its length over
        the parallelism in round trips, not its length. Keys that failed transiently are
        reported with what the others answered (`PartlyAnswered`), so that a retry asks only
        for them; a permanent failure is raised as it is."""
        todo = list(dict.fromkeys(keys))
        if len(todo) <= 1:
            return {k: self.stat(k) for k in todo}
        answered: dict[str, int | None] = {}
        transient: TransientStorageError | None = None
        pool = ThreadPoolExecutor(min(len(todo), PARALLELISM), thread_name_prefix="s3-stat")
        try:
            futures = [(k, pool.submit(self.stat, k)) for k in todo]
            for k, future in futures:
                try:
                    answered[k] = future.result()
                except TransientStorageError as e:
                    transient = transient or e
        finally:
            # A permanent failure leaves the HEADs not yet started unsent.
            pool.shutdown(wait=True, cancel_futures=True)
        if transient is not None:
            raise PartlyAnswered(f"{transient} ({len(todo) - len(answered)} of {len(todo)} "
                                 "keys unanswered)", transient.problem, answered)
        return answered

    def list(self, prefix: str, after: str | None = None) -> Iterator[tuple[str, int]]:
        full = self.prefix + prefix
        token: str | None = None
        while True:
            page = self._request("list", prefix, self._page_reader(
                full, token, None if after is None else self.prefix + after))
            for obj in page.get("Contents", ()):
                key = obj["Key"][len(self.prefix) :]
                if key.rsplit("/", 1)[-1].startswith(TMP_PREFIX) or not _valid_key(key):
                    continue  # not an object snapship wrote (a folder marker, a stray file)
                yield key, obj["Size"]
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def delete(self, key: str) -> None:
        name = self._name(key)
        self._request("delete", key, lambda: self.client.delete_object(Bucket=self.bucket,
                                                                      Key=name))

    def rename(self, src: str, dst: str) -> None:
        old, new = self._name(src), self._name(dst)
        if old == new:
            if self.stat(src) is None:
                raise ObjectNotFound(src)
            return

        def copy() -> None:
            self.client.copy_object(Bucket=self.bucket, Key=new,
                                    CopySource={"Bucket": self.bucket, "Key": old})

        self._request("copy", src, copy, to=dst)
        self.delete(src)

    def flush(self) -> None:
        """Nothing to do: S3 acknowledges a PUT only once the object is durably stored."""

    def describe(self) -> str:
        return self.location.url()

    # -- requests and their failures --------------------------------------------------------

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _page_reader(self, full_prefix: str, token: str | None, start_after: str | None
                     ) -> Callable[[], Any]:
        if token is not None:
            return lambda: self.client.list_objects_v2(Bucket=self.bucket, Prefix=full_prefix,
                                                       ContinuationToken=token)
        if start_after is not None:
            return lambda: self.client.list_objects_v2(Bucket=self.bucket, Prefix=full_prefix,
                                                       StartAfter=start_after)
        return lambda: self.client.list_objects_v2(Bucket=self.bucket, Prefix=full_prefix)

    def _request(self, verb: str, key: str, request: Callable[[], T], to: str | None = None
                 ) -> T:
        """`request()`, its failure classified (`RetryingStorage` retries the transient)."""
        what = f"{verb} {self.location.url(key)}" + (f" to {self.location.url(to)}" if to else "")
        try:
            return request()
        except (ClientError, BotoCoreError) as e:
            raise self._classify(e, verb, key, what) from None

    def _classify(self, e: ClientError | BotoCoreError, verb: str, key: str, what: str
                  ) -> StorageError | ObjectNotFound:
        """The snapship error for one failed attempt (retried only if transient)."""
        endpoint = self.client.meta.endpoint_url
        if isinstance(e, ClientError):
            code, status = _code(e), _status(e)
            message = _one_line(e.response.get("Error", {}).get("Message", ""))
            detail = f"HTTP {status} {code}" + (f": {message}" if message else "")
            if code in NOT_FOUND and verb in ("read", "copy"):
                return ObjectNotFound(key)
            if code == "NoSuchBucket":
                return StorageError(f"cannot {what}: bucket {self.bucket} does not exist at "
                                    f"{endpoint}")
            if code in TRANSIENT_CODES or status in TRANSIENT_STATUS:
                return TransientStorageError(f"cannot {what}: {detail}", detail)
            if code in ACCESS_CODES or status == 403:
                return StorageError(f"cannot {what}: {detail} (check the AWS credentials and "
                                    "the bucket's permissions, docs/s3.md)")
            return StorageError(f"cannot {what}: {detail}")
        if isinstance(e, NoCredentialsError | PartialCredentialsError):
            return StorageError(f"cannot {what}: no usable AWS credentials ({_one_line(e)}); "
                                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
        if isinstance(e, ConnectionError | HTTPClientError | IncompleteReadError):
            return TransientStorageError(f"cannot {what}: {_one_line(e)}", _one_line(e))
        return StorageError(f"cannot {what}: {type(e).__name__}: {_one_line(e)}")


def _crc32(data: bytes | bytearray) -> str:
    """The body's CRC32 as S3 wants it: four big-endian bytes, base64. S3 recomputes it and
    refuses a body that does not match (BadDigest); a fifth of the cost of an MD5."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def _as_body(data: bytes | bytearray) -> bytes:
    """The buffer itself, not a copy of it: botocore sends any buffer (the stubs say bytes)."""
    return cast(bytes, data)


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _valid_key(key: str) -> bool:
    try:
        check_key(key)
    except UsageError:
        return False
    return True
