"""Bandwidth limits (issue 15, item 5): the token bucket's arithmetic, a 64 MiB upload at 8M
through a real snapship server, and the CLI's --limit-upload / --limit-download."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from snapship.storage.memory import MemoryStorage
from snapship.storage.ratelimit import RateLimitedStorage, TokenBucket, limited
from tests.clihelp import CHUNK, describe, image_bytes, sha256, write_image
from tests.serverproc import create_repo_fast_kdf, http_storage, run_cli_env, running_server

MiB = 1 << 20


class FakeTime:
    """A clock that moves only when someone sleeps (thread-safe)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def clock(self) -> float:
        with self.lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


def test_the_bucket_paces_from_the_first_byte_and_allows_only_a_small_burst() -> None:
    t = FakeTime()
    bucket = TokenBucket(1000, burst=100, clock=t.clock, sleep=t.sleep)
    assert bucket.take(500) == 0.5  # starts empty: paced at once
    assert bucket.take(0) == 0.0
    t.now += 10  # idle: refills only up to the burst
    assert bucket.take(100) == 0.0
    assert abs(bucket.take(1000) - 1.0) < 1e-9


def test_threads_sharing_a_bucket_wait_behind_each_other() -> None:
    """Eight threads reserving at the same instant: their waits are 1, 2, ... 8 units, so
    together they take exactly what the rate allows."""
    waits: list[float] = []
    lock = threading.Lock()
    bucket = TokenBucket(1000, burst=0, clock=lambda: 0.0, sleep=lambda s: None)

    def take() -> None:
        w = bucket.take(1000)
        with lock:
            waits.append(w)

    with ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            pool.submit(take)
    assert sorted(waits) == [float(i) for i in range(1, 9)]


def test_no_limit_is_no_wrapper() -> None:
    s = MemoryStorage()
    assert limited(s, None, None) is s and limited(s, 0, None) is s
    assert isinstance(limited(s, 10, None), RateLimitedStorage)


def test_a_64_mib_upload_at_8m_takes_8_seconds(tmp_path: Path) -> None:
    """The issue's figure, against a real snapship server: 64 one-MiB objects from four
    threads (as a backup's workers put chunks), limited to 8 MiB/s: 8 s within 10%."""
    with running_server(tmp_path / "srv") as (server, tokens):
        inner = http_storage(server, "bw", tokens["ops"])
        storage = limited(inner, 8 * MiB, None)
        blobs = [bytes([i]) * MiB for i in range(64)]
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: storage.put(f"data/{i:02d}", blobs[i]), range(64)))
        elapsed = time.monotonic() - started
        inner.close()
        print(f"64 MiB at --limit-upload 8M: {elapsed:.2f} s")
        assert 7.2 <= elapsed <= 8.8, f"64 MiB at 8 MiB/s took {elapsed:.2f} s"
        assert sorted(p.name for p in (server.root / "bw" / "data").iterdir()) == \
            [f"{i:02d}" for i in range(64)]


def test_the_cli_limits_backups_and_restores_to_a_server(tmp_path: Path) -> None:
    """2 MiB of random chunks at 1M each way: neither can take less than about 2 s (the
    bucket starts empty), where unlimited they take a fraction of that."""
    with running_server(tmp_path / "srv") as (server, tokens):
        url = server.url("db")
        create_repo_fast_kdf(http_storage(server, "db", tokens["ops"]))
        img = tmp_path / "disk.img"
        data = image_bytes(32 * CHUNK, seed=5)  # 2 MiB, incompressible
        write_image(img, data)
        env = {"SNAPSHIP_TOKEN": tokens["ops"]}
        started = time.monotonic()
        r = run_cli_env("backup", "--repo", url, img, "--volume", "disk", "--limit-upload",
                        "1M", env=env)
        up = time.monotonic() - started
        assert r.returncode == 0, describe(r)
        assert up >= 1.9, f"a 2 MiB backup at 1M took {up:.2f} s"
        out = tmp_path / "out.img"
        started = time.monotonic()
        r = run_cli_env("restore", "--repo", url, "disk", out, "--limit-download", "1M",
                        env=env)
        down = time.monotonic() - started
        assert r.returncode == 0, describe(r)
        assert down >= 1.9, f"a 2 MiB restore at 1M took {down:.2f} s"
        assert sha256(out.read_bytes()) == sha256(bytes(data))
        # A bad rate is a usage error naming the option.
        r = run_cli_env("backup", "--repo", url, img, "--volume", "disk", "--limit-upload",
                        "0", env=env)
        assert r.returncode == 2 and "--limit-upload" in r.stderr, describe(r)
