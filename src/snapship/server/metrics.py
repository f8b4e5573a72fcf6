"""What `snapship server` counts, for its `/v1/metrics` endpoint (Prometheus text format).

Counters since the process started: requests by repository, operation and HTTP status; body
bytes received and reply bytes sent by repository; refusals (403) by the role of the token
and the operation; requests without a valid token (401). Gauges of the last maintenance run
per repository and task (gc, verify; on demand or scheduled): when it ended, how long it
took, whether it failed, and its results (chunks and bytes gc freed, backups it waits for;
versions and chunks verify found bad). One registry per server (not prometheus_client's
global one), rendered by `render()`; docs/http-api.md ("Metrics") lists the series.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

MAX_REPOSITORIES = 1000
"""Distinct `repository` labels of the request series; requests for more count as
`OTHER`. (Any name may be asked for, and every label set is held until the server stops.)"""
OTHER = "(other)"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""What `generate_latest` writes (newer prometheus_clients call another format "latest")."""
PREFIX = "snapship_server_"


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}requests", "requests answered",
                                ["repository", "op", "status"], registry=r)
        self.received = Counter(f"{PREFIX}received_bytes", "request body bytes read",
                                ["repository"], registry=r)
        self.sent = Counter(f"{PREFIX}sent_bytes", "reply body bytes (objects, listings, "
                            "reports)", ["repository"], registry=r)
        self.refusals = Counter(f"{PREFIX}refusals", "requests refused (403) by the role of "
                                "their token", ["role", "op"], registry=r)
        self.unauthorized = Counter(f"{PREFIX}unauthorized_requests", "requests without a "
                                    "valid token (401)", registry=r)
        self.runs = Counter(f"{PREFIX}maintenance_runs", "maintenance runs by outcome (ok, "
                            "failed: a verify that found damage, or an error)",
                            ["task", "repository", "outcome"], registry=r)
        labels = ["task", "repository"]
        self.last_end = Gauge(f"{PREFIX}maintenance_last_end_timestamp_seconds",
                              "when the last run ended", labels, registry=r)
        self.last_duration = Gauge(f"{PREFIX}maintenance_last_duration_seconds",
                                   "how long the last run took", labels, registry=r)
        self.last_failed = Gauge(f"{PREFIX}maintenance_last_failed", "1 if the last run "
                                 "failed or verify found damage, else 0", labels, registry=r)
        self.gc_chunks = Gauge(f"{PREFIX}gc_chunks_freed", "chunks the last gc freed",
                               ["repository"], registry=r)
        self.gc_bytes = Gauge(f"{PREFIX}gc_bytes_freed", "bytes the last gc freed",
                              ["repository"], registry=r)
        self.gc_waiting = Gauge(f"{PREFIX}gc_waiting_writers", "running backups the last "
                                "gc's collection waits for", ["repository"], registry=r)
        self.verify_versions = Gauge(f"{PREFIX}verify_versions", "versions the last verify "
                                     "checked", ["repository"], registry=r)
        self.verify_bad_versions = Gauge(f"{PREFIX}verify_bad_versions", "versions the last "
                                         "verify found damaged or affected", ["repository"],
                                         registry=r)
        self.verify_bad_chunks = Gauge(f"{PREFIX}verify_bad_chunks", "chunks the last verify "
                                       "found missing or damaged", ["repository"], registry=r)
        self._lock = threading.Lock()
        self._repositories: set[str] = set()

    def request(self, repository: str, op: str, status: int, received: int, sent: int) -> None:
        if repository not in self._repositories:
            with self._lock:
                if len(self._repositories) < MAX_REPOSITORIES:
                    self._repositories.add(repository)
                else:
                    repository = OTHER
        self.requests.labels(repository, op, str(status)).inc()
        if received:
            self.received.labels(repository).inc(received)
        if sent:
            self.sent.labels(repository).inc(sent)

    def refused(self, role: str, op: str) -> None:
        self.refusals.labels(role, op).inc()

    def maintenance(self, task: str, repository: str, started: float,
                    report: dict[str, Any] | None) -> None:
        """A run that ended: `report` is its result, None if it raised."""
        failed = report is None or (task == "verify" and not report.get("ok", False))
        with self._lock:  # one run's gauges change together
            self.runs.labels(task, repository, "failed" if failed else "ok").inc()
            self.last_end.labels(task, repository).set(time.time())
            self.last_duration.labels(task, repository).set(time.monotonic() - started)
            self.last_failed.labels(task, repository).set(int(failed))
            if report is None:
                return
            if task == "gc":
                self.gc_chunks.labels(repository).set(report["chunks_freed"])
                self.gc_bytes.labels(repository).set(report["bytes_freed"])
                self.gc_waiting.labels(repository).set(len(report["waiting_for"]))
            elif task == "verify":
                bad = set(report["bad_versions"]) | set(report["affected_versions"])
                self.verify_versions.labels(repository).set(report["versions"])
                self.verify_bad_versions.labels(repository).set(len(bad))
                self.verify_bad_chunks.labels(repository).set(len(report["bad_chunks"]))

    def render(self) -> bytes:
        with self._lock:
            return generate_latest(self.registry)
