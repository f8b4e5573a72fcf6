"""pytest fixtures for the S3 tests: one SeaweedFS server per session, a fresh bucket per test.

Registered by the tests that use them with `pytest_plugins = ("tests.s3server",)` (not a
conftest, so the S3 set-up stays out of the other tests' way). `weed` is started once per
session (a few seconds) with its data in a temporary directory and killed, with its whole
process group, at the end; every test gets a new bucket, removed afterwards, and the AWS
variables of the test process point at the server (CLI subprocesses inherit them).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.s3faultproxy import FaultProxy
from tests.seaweed import Bucket, WeedServer, use_endpoint


@pytest.fixture(scope="session")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedServer]:
    server = WeedServer(tmp_path_factory.mktemp("weed") / "data")
    server.start()
    try:
        yield server
    finally:
        server.kill()  # its data is thrown away: no need to wait for a graceful stop


@pytest.fixture
def s3_bucket(weed: WeedServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bucket]:
    """A fresh bucket, with the AWS variables of this process pointing at its server."""
    name = weed.new_bucket()
    use_endpoint(monkeypatch, weed.endpoint)
    try:
        yield Bucket(weed, name)
    finally:
        weed.drop_bucket(name)


@pytest.fixture
def proxy(s3_bucket: Bucket) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the bucket's server (tests/s3faultproxy.py)."""
    p = FaultProxy(int(s3_bucket.endpoint.rsplit(":", 1)[1]))
    try:
        yield p
    finally:
        p.close()
