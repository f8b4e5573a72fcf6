"""A run's outcome as Prometheus metrics, for node_exporter's textfile collector.

Built from the same step objects `run --json` prints (docs/json.md, `run`), so the two cannot
disagree. The file holds the state of every job, not only of those this run ran: the series of
other jobs are carried over from the previous file, and so is the last success time of a
backup that failed this time (the point of the metric is how long ago it last worked). Writing
the file is the caller's (prometheus_client writes it atomically); this module only builds the
registry, from the previous file's text if there is one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "snapship_"
VOLUME_LABELS = ("job", "repository", "volume")
BACKUP_STATS = {
    # metric: (help, the field of the backup's `stats`)
    "backup_read_bytes": ("bytes the last backup read from its source", "bytes_read"),
    "backup_new_bytes": ("bytes of new chunks the last backup stored, before compression",
                         "bytes_new"),
    "backup_stored_bytes": ("bytes the last backup added to the repository", "bytes_new_stored"),
    "backup_read_chunks": ("chunks the last backup read", "chunks_read"),
    "backup_new_chunks": ("chunks the last backup stored", "chunks_new"),
}
KEPT_ON_FAILURE = ("backup_last_success_timestamp_seconds", "job_last_success_timestamp_seconds")


def _timestamp(iso: str) -> float:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.gauges: dict[str, Gauge] = {}
        self.labels: dict[str, set[str]] = {}

        def gauge(name: str, text: str, labels: Sequence[str]) -> None:
            self.gauges[name] = Gauge(PREFIX + name, text, list(labels),
                                      registry=self.registry)
            self.labels[name] = set(labels)

        gauge("backup_success", "1 if the last backup of the volume succeeded, else 0",
              VOLUME_LABELS)
        gauge("backup_last_success_timestamp_seconds", "when the newest version the job made "
              "of the volume was created", VOLUME_LABELS)
        gauge("backup_duration_seconds", "how long the last backup took", VOLUME_LABELS)
        for name, (text, _field) in BACKUP_STATS.items():
            gauge(name, text, VOLUME_LABELS)
        gauge("prune_forgotten_versions", "versions the last prune forgot", VOLUME_LABELS)
        gauge("gc_freed_bytes", "bytes the last gc freed", ("job", "repository"))
        gauge("gc_freed_chunks", "chunks the last gc freed", ("job", "repository"))
        gauge("copy_success", "1 if the last copy into the repository succeeded, else 0",
              ("job", "repository"))
        gauge("copy_copied_versions", "versions the last copy wrote", ("job", "repository"))
        gauge("copy_sent_bytes", "stored bytes of the chunks the last copy sent",
              ("job", "repository"))
        gauge("copy_sent_chunks", "chunks the last copy sent", ("job", "repository"))
        gauge("job_errors", "steps that failed in the job's last run", ("job",))
        gauge("job_success", "1 if every step of the job's last run succeeded, else 0",
              ("job",))
        gauge("job_duration_seconds", "how long the job's last run took (its steps)", ("job",))
        gauge("job_last_run_timestamp_seconds", "when the job last ran", ("job",))
        gauge("job_last_success_timestamp_seconds", "when the job last ran with no failed "
              "step", ("job",))

    def set(self, name: str, labels: dict[str, str], value: float) -> None:
        self.gauges[name].labels(**labels).set(value)


def _previous(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(metric without the prefix, labels, value) of each of our samples in an earlier file;
    a file that does not parse is ignored (it is rewritten whole)."""
    try:
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    except ValueError:
        return []
    return [(s.name.removeprefix(PREFIX), dict(s.labels), s.value) for s in samples
            if s.name.startswith(PREFIX)]


def registry(steps: Sequence[dict[str, Any]], jobs: Sequence[str], finished: float,
             previous: str | None = None) -> CollectorRegistry:
    """The metrics of a run: `steps` as `run --json` has them, `jobs` the jobs it ran,
    `finished` when (seconds since the epoch); `previous`: the text of the earlier file."""
    m = _Metrics()
    done: set[tuple[str, tuple[tuple[str, str], ...]]] = set()

    def put(name: str, labels: dict[str, str], value: float) -> None:
        m.set(name, labels, value)
        done.add((name, tuple(sorted(labels.items()))))

    for job in jobs:
        mine = [s for s in steps if s["job"] == job]
        failed = sum(1 for s in mine if s["outcome"] == "failed")
        put("job_errors", {"job": job}, failed)
        put("job_success", {"job": job}, 0 if failed else 1)
        put("job_duration_seconds", {"job": job}, sum(s["duration"] for s in mine))
        put("job_last_run_timestamp_seconds", {"job": job}, finished)
        if not failed:
            put("job_last_success_timestamp_seconds", {"job": job}, finished)
    for s in steps:
        if s["step"] == "backup":
            labels = {"job": s["job"], "repository": s["repository"], "volume": s["volume"]}
            put("backup_success", labels, 1 if s["outcome"] == "ok" else 0)
            r = s["result"]
            if r is None:
                continue
            put("backup_last_success_timestamp_seconds", labels, _timestamp(r["created"]))
            put("backup_duration_seconds", labels, s["duration"])
            for name, (_text, field) in BACKUP_STATS.items():
                put(name, labels, r["stats"].get(field, 0))
        elif s["step"] == "prune" and s["result"] is not None:
            labels = {"job": s["job"], "repository": s["repository"], "volume": s["volume"]}
            put("prune_forgotten_versions", labels, len(s["result"]["forgotten"]))
        elif s["step"] == "copy":
            labels = {"job": s["job"], "repository": s["repository"]}
            put("copy_success", labels, 1 if s["outcome"] == "ok" else 0)
            if s["result"] is not None:
                put("copy_copied_versions", labels, len(s["result"]["copied"]))
                put("copy_sent_bytes", labels, s["result"]["bytes_sent"])
                put("copy_sent_chunks", labels, s["result"]["chunks_sent"])
        elif s["step"] == "gc" and s["result"] is not None:
            labels = {"job": s["job"], "repository": s["repository"]}
            put("gc_freed_bytes", labels, s["result"]["bytes_freed"])
            put("gc_freed_chunks", labels, s["result"]["chunks_freed"])
    for name, labels, value in _previous(previous or ""):
        key = (name, tuple(sorted(labels.items())))
        if name not in m.gauges or key in done or set(labels) != m.labels[name]:
            continue
        if labels.get("job") not in jobs or name in KEPT_ON_FAILURE:
            put(name, labels, value)
    return m.registry
