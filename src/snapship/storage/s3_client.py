"""Where an S3 repository is (`s3://BUCKET[/PREFIX]`) and the boto3 client that reaches it.

Everything but the bucket and prefix comes from the standard AWS configuration, read by
botocore exactly as the AWS CLI reads it: credentials (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`, `~/.aws/credentials`, instance
roles), `AWS_DEFAULT_REGION`, the endpoint of an S3-compatible server (`AWS_ENDPOINT_URL_S3`
or `AWS_ENDPOINT_URL`, or `endpoint_url` in `~/.aws/config`), and `AWS_MAX_ATTEMPTS`. Two
choices are snapship's own:

- botocore makes exactly one attempt per request; `storage/s3.py` does all retrying, with
  the policy of `storage/retry.py` (also of failures botocore never sees, such as a body cut
  off while it is read); `AWS_MAX_ATTEMPTS`, if set, caps its tries. Retrying in both layers
  would multiply them.
- Requests carry what the storage contract needs and no more (docs/s3.md, "Integrity and
  cost"): a PUT's body goes out as it is, in one piece, without the `Expect: 100-continue`
  round trip botocore adds to every upload, and with the one checksum `storage/s3.py` sends
  itself (CRC32, which the store verifies) instead of an MD5 or SHA-256 of it as well.
- A custom endpoint gets path-style addressing (`http://HOST/BUCKET/KEY`), which every
  S3-compatible server supports, unless `~/.aws/config` says otherwise; AWS itself keeps
  botocore's default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import boto3
import botocore.handlers
import botocore.session
from botocore.config import Config

from snapship import __version__
from snapship.errors import UsageError
from snapship.storage.base import check_key

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

SCHEME = "s3://"
DEFAULT_REGION = "us-east-1"
"""Signing needs a region; S3-compatible servers accept any, AWS redirects to the right one."""
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_AWS_HOSTS = (".amazonaws.com", ".amazonaws.com.cn")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str
    """Empty, or ends with `/`: every object key of the repository starts with it."""

    def url(self, key: str = "") -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}{key}".rstrip("/")


def parse_s3_url(url: str) -> S3Location:
    if not url.startswith(SCHEME):
        raise UsageError(f"{url!r} is not an s3:// location")
    bucket, _, prefix = url[len(SCHEME) :].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise UsageError(
            f"invalid S3 bucket name {bucket!r} in {url}: 3 to 63 lowercase letters, digits, "
            "dots and hyphens"
        )
    prefix = prefix.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except UsageError:
            raise UsageError(
                f"invalid S3 prefix {prefix!r} in {url}: use /-separated names of "
                "letters, digits and ._+-"
            ) from None
        prefix += "/"
    return S3Location(bucket, prefix)


@dataclass(frozen=True)
class ClientOptions:
    max_connections: int = 32
    """Size of the connection pool: at least the number of threads using the client."""
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    """Seconds a socket may stay silent; a stalled request fails (and is retried) after it."""


def make_client(options: ClientOptions = ClientOptions()) -> tuple[S3Client, int | None]:
    """An S3 client from the standard AWS configuration, and the number of tries per request
    that configuration asks for (`AWS_MAX_ATTEMPTS`), if any."""
    session = botocore.session.get_session()
    # Timestamps (Last-Modified of every HEAD and GET, of every key of a listing) stay the
    # text the server sent: snapship reads none of them, and dateutil took 40-55 us to parse
    # each (40 ms of CPU per page of 1000 keys).
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    factory = boto3.session.Session(botocore_session=session)
    s3_settings: dict[str, Any] = dict(session.get_scoped_config().get("s3") or {})
    region = session.get_config_variable("region") or DEFAULT_REGION
    attempts: int | None = session.get_config_variable("max_attempts") or None

    def build(path_style: bool) -> S3Client:
        config = Config(
            region_name=region,
            max_pool_connections=options.max_connections,
            connect_timeout=options.connect_timeout,
            read_timeout=options.read_timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},
            # storage/s3.py sends a CRC32 itself; no second checksum of every body.
            request_checksum_calculation="when_required",
            # What snapship reads, the repository format checks (docs/s3.md): a CRC32 of every
            # download on top cost 0.5 ms of CPU per MiB here.
            response_checksum_validation="when_required",
            tcp_keepalive=True,
            user_agent_extra=f"snapship/{__version__}",
            # The CRC32 protects the body; an SHA-256 of it in the signature adds nothing.
            s3={"payload_signing_enabled": False, "addressing_style": "path"}
            if path_style
            else {"payload_signing_enabled": False},
        )
        client = factory.client("s3", config=config)
        events = client.meta.events
        # Both make botocore stream a body it holds whole: an `Expect: 100-continue` round
        # trip before every upload (worth it only for a body too large to send twice), and
        # a file wrapper the connection reads 16 KiB at a time. Our bodies are in memory and
        # at most a chunk: one sendall of the buffer. They are botocore's internals: should a
        # release rename them, uploads only get slower (tests/test_s3_storage.py notices).
        for event, name in (("before-call.s3", "add_expect_header"),
                            ("before-parameter-build.s3.PutObject",
                             "convert_body_to_file_like_object")):
            handler = getattr(botocore.handlers, name, None)
            if handler is not None:
                events.unregister(event, handler)
        return client

    client = build(path_style=False)
    host = urlsplit(client.meta.endpoint_url).hostname or ""
    if "addressing_style" not in s3_settings and not host.endswith(_AWS_HOSTS):
        client = build(path_style=True)
    return client, attempts
