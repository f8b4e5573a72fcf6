"""Maintenance the server runs on its own repositories, with no key: gc and a keyless verify.

Both are the engines' own (`engine/gc.py`, `engine/verify.py` without a key) on the
repository's local directory: nothing crosses the network. The keyless verify checks what
can be checked without the key, from the plaintext reference lists: every chunk a version
uses exists with the recorded size; `deep` also reads every such chunk and checks its
envelope (and, in an unencrypted repository, its checksum and content hash: everything a
client-side deep verify checks). Versions found damaged are marked as `snapship verify`
marks them (docs/gc.md).

Both run on demand (admin requests, `snapship gc --on-server`, `snapship verify --on-server`)
or on a schedule (`snapship server --gc-every/--verify-every`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from typing import Any

from snapship.engine import gc, verify
from snapship.engine.gc import run_gc
from snapship.engine.verify import run_verify
from snapship.errors import Busy, NotFound, SnapshipError, UsageError
from snapship.formats import http_api as api
from snapship.repository.catalog import Catalog
from snapship.server.metrics import ServerMetrics
from snapship.server.objects import Repositories, RepoStore

log = logging.getLogger("snapship.server")
IO_WORKERS = 4


class ServerMaintenance:
    """The `maintenance/*` endpoints and the schedule: one task at a time per repository."""
    def __init__(self, metrics: ServerMetrics | None = None) -> None:
        self._running: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()
        self.metrics = metrics

    def _slot(self, task: str, repo: str) -> threading.Lock:
        with self._lock:
            return self._running.setdefault((task, repo), threading.Lock())

    def run(self, task: str, repo: str, store: RepoStore, options: bytes) -> dict[str, Any]:
        deep = False
        if task == "gc":
            api.decode_options(options, {}, "gc options")
        elif task == "verify":
            deep = api.decode_options(options, {"deep": bool}, "verify options").get("deep",
                                                                                    False)
        else:
            raise UsageError(f"unknown maintenance task {task!r}")
        slot = self._slot(task, repo)
        if not slot.acquire(blocking=False):
            raise Busy(f"{task} of {repo} is already running on the server")
        try:
            catalog = Catalog(store.storage)
            if not catalog.exists():
                raise NotFound(f"no snapship repository named {repo} on this server")
            started = time.monotonic()
            try:
                report = self._run(task, repo, catalog, deep)
            except Busy:
                raise  # another server's gc holds the repository: no run of ours
            except BaseException:
                if self.metrics is not None:
                    self.metrics.maintenance(task, repo, started, None)
                raise
            if self.metrics is not None:
                self.metrics.maintenance(task, repo, started, report)
            return report
        finally:
            slot.release()

    @staticmethod
    def _run(task: str, repo: str, catalog: Catalog, deep: bool) -> dict[str, Any]:
        if task == "gc":
            warnings: list[str] = []

            def warn(message: str) -> None:
                warnings.append(message)
                log.warning("gc of %s: %s", repo, message)

            return {**asdict(run_gc(catalog, warn=warn)), "warnings": warnings}
        return run_verify(catalog, deep=deep, workers=IO_WORKERS).to_json()


class Scheduler:
    """Runs gc and/or a fast keyless verify of every repository under the root, every so often
    (the first run one period after start). Problems are logged, never fatal."""

    def __init__(self, repos: Repositories, maintenance: ServerMaintenance,
                 every: dict[str, float]) -> None:
        self.repos = repos
        self.maintenance = maintenance
        self.every = every
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(task, period),
                                          name=f"maintenance-{task}", daemon=True)
                         for task, period in every.items()]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self, task: str, period: float) -> None:
        while not self._stop.wait(period):
            for name in self.repos.names():
                if self._stop.is_set():
                    return
                if not Catalog(self.repos.get(name).storage).exists():
                    continue
                try:
                    report = self.maintenance.run(task, name, self.repos.get(name), b"")
                except SnapshipError as e:
                    log.error("scheduled %s of %s failed: %s", task, name, e)
                    continue
                log.info("%s: %s", name, summary(task, report))


def summary(task: str, report: dict[str, Any]) -> str:
    """The last line of the report as a client prints it (engine `describe`)."""
    describe = gc.describe if task == "gc" else verify.describe
    return describe(report, f"scheduled {task}")[-1]
