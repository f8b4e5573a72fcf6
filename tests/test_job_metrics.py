"""Being told (issue 15, item 6): `run --metrics-file` and the jobs' on-success/on-failure.

The metrics file is read back with prometheus_client's own parser and must say exactly what
`run --json` said; the hooks are real shell commands that record what they were told.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from snapship.jobs.config import check
from tests.clihelp import CHUNK, describe, image_bytes, init_repo_fast_kdf, run_cli, write_image
from tests.test_json_contract import assert_valid

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def read_metrics(path: Path) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(path.read_text())
            for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(f"snapship_{name}", tuple(sorted(labels.items())))]


def setup(tmp: Path) -> Path:
    init_repo_fast_kdf(tmp / "repo")
    write_image(tmp / "a.img", image_bytes(5 * CHUNK, seed=1, zero_chunks=(2,)))
    write_image(tmp / "b.img", image_bytes(2 * CHUNK + 7, seed=2))
    config = tmp / "snapship.toml"
    config.write_text(f"""\
version = 1
metrics-file = "{tmp / "ignored.prom"}"

[repositories.r]
location = "{tmp / "repo"}"

[volumes.a]
source = "{tmp / "a.img"}"
retention = {{ keep-last = 1 }}

[volumes.b]
source = "{tmp / "b.img"}"

[volumes.gone]
source = "{tmp / "gone.img"}"

[jobs.nightly]
volumes = ["a", "b", "gone"]
repositories = ["r"]
gc = true
on-failure = "env | grep ^SNAPSHIP_ | sort > '{tmp / "failure.env"}'; echo told"
on-success = "touch '{tmp / "nightly-success"}'"

[jobs.small]
volumes = ["b"]
repositories = ["r"]
on-success = "echo $SNAPSHIP_JOB $SNAPSHIP_EVENT > '{tmp / "small-success"}'"
on-failure = "exit 3"
""")
    return config


def run(config: Path, metrics: Path, *jobs: str) -> tuple[int, dict[str, Any]]:
    r = run_cli("run", *jobs, "--config", config, "--metrics-file", metrics, "--json")
    assert r.returncode in (0, 1), describe(r)
    obj = json.loads(r.stdout)
    assert_valid("run", obj)  # hooks and failures included: docs/json.md, `run`
    return r.returncode, obj


def test_the_metrics_file_says_what_the_json_says(tmp_path: Path) -> None:
    config = setup(tmp_path)
    metrics = tmp_path / "snapship.prom"
    code, obj = run(config, metrics)
    assert code == 1 and not (tmp_path / "ignored.prom").exists()  # the option wins
    samples = read_metrics(metrics)
    backups = [s for s in obj["steps"] if s["step"] == "backup"]
    assert [s["outcome"] for s in backups] == ["ok", "ok", "failed", "ok"], obj
    for s in backups:
        labels = {"job": s["job"], "repository": "r", "volume": s["volume"]}
        assert value(samples, "backup_success", **labels) == (s["outcome"] == "ok")
        if s["outcome"] != "ok":
            assert ("snapship_backup_read_bytes", tuple(sorted(labels.items()))) not in samples
            continue
        stats = s["result"]["stats"]
        for metric, field in (("read_bytes", "bytes_read"), ("new_bytes", "bytes_new"),
                              ("stored_bytes", "bytes_new_stored"),
                              ("read_chunks", "chunks_read"), ("new_chunks", "chunks_new")):
            assert value(samples, f"backup_{metric}", **labels) == stats[field], (metric, s)
        assert value(samples, "backup_duration_seconds", **labels) == s["duration"]
        created = dt.datetime.fromisoformat(s["result"]["created"].replace("Z", "+00:00"))
        assert value(samples, "backup_last_success_timestamp_seconds", **labels) == \
            created.timestamp()
    a = next(s for s in backups if s["volume"] == "a")["result"]["stats"]
    assert a["bytes_read"] == 5 * CHUNK and a["chunks_new"] == 4, a  # one chunk is zeroes
    gc = next(s for s in obj["steps"] if s["step"] == "gc")["result"]
    assert value(samples, "gc_freed_bytes", job="nightly", repository="r") == gc["bytes_freed"]
    prune = next(s for s in obj["steps"] if s["step"] == "prune")["result"]
    assert value(samples, "prune_forgotten_versions", job="nightly", repository="r",
                 volume="a") == len(prune["forgotten"]) == 0
    for job, errors in (("nightly", 1), ("small", 0)):
        assert value(samples, "job_errors", job=job) == errors
        assert value(samples, "job_success", job=job) == (errors == 0)
        assert value(samples, "job_duration_seconds", job=job) == \
            sum(s["duration"] for s in obj["steps"] if s["job"] == job)
    assert ("snapship_job_last_success_timestamp_seconds", (("job", "nightly"),)) not in samples
    last_b = value(samples, "backup_last_success_timestamp_seconds", job="nightly",
                   repository="r", volume="b")

    # Another run, with b's source gone: b failed, but when it last worked stays known; the
    # job not run keeps its series as they were.
    (tmp_path / "b.img").unlink()
    code, obj = run(config, metrics, "nightly")
    assert code == 1
    again = read_metrics(metrics)
    labels = {"job": "nightly", "repository": "r", "volume": "b"}
    assert value(again, "backup_success", **labels) == 0
    assert value(again, "backup_last_success_timestamp_seconds", **labels) == last_b
    assert ("snapship_backup_read_bytes", tuple(sorted(labels.items()))) not in again
    small = {k: v for k, v in samples.items() if ("job", "small") in k[1]}
    assert small and all(again[k] == v for k, v in small.items()), (small, again)
    assert value(again, "job_errors", job="nightly") == 2


def test_on_failure_and_on_success_hooks(tmp_path: Path) -> None:
    config = setup(tmp_path)
    code, obj = run(config, tmp_path / "m.prom")
    assert code == 1  # gone's backup failed
    hooks = [s for s in obj["steps"] if s["step"] == "hook"]
    assert [(s["job"], s["outcome"], s["result"]["event"]) for s in hooks] == \
        [("nightly", "ok", "failure"), ("small", "ok", "success")], hooks
    told = dict(line.split("=", 1) for line in
                (tmp_path / "failure.env").read_text().splitlines() if "=" in line)
    assert told["SNAPSHIP_JOB"] == "nightly" and told["SNAPSHIP_EVENT"] == "failure"
    assert told["SNAPSHIP_FAILED_STEPS"] == "1"
    assert told["SNAPSHIP_FAILURES"].startswith("nightly: backup gone -> r: FAILED (source)")
    assert not (tmp_path / "nightly-success").exists()
    assert (tmp_path / "small-success").read_text() == "small success\n"
    # A hook that fails is a failed step: the exit code says so.
    (tmp_path / "b.img").unlink()
    r = run_cli("run", "small", "--config", config)
    assert r.returncode == 1, describe(r)
    assert "snapship: error: small: hook: FAILED (error): on-failure hook failed with exit " \
        "code 3" in r.stderr, describe(r)


def test_metrics_file_names_must_end_in_prom() -> None:
    text = 'version = 1\nmetrics-file = "/var/lib/m.txt"\n[jobs.j]\nvolumes = []\n'
    _config, problems = check(text.encode())
    assert problems[0].line == 2 and ".prom" in problems[0].message, problems
