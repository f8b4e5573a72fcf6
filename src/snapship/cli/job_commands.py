"""`snapship run` and `snapship config check`: the jobs file (docs/config.md) in use.

The file is read here and checked by `jobs.config`; the jobs are run by `jobs.runner`, with
the repositories opened here as the file says (this module is the runner's `Opener`). Each
step's outcome is one line as it finishes: on stdout, a failed one on stderr (so that `-q`
and `--json` still show failures, and a journal shows each line once).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import shutil
import subprocess
import sys
import time

from snapship.changes.lvm import Lvm
from snapship.cli import known_repos, options, output
from snapship.cli.context import open_storage, passphrase_source
from snapship.cli.output import TerminalProgress, human_bytes, warn
from snapship.cli.reports import Report, emit, ref, version_detail
from snapship.errors import AuthFailed, SnapshipError, UsageError
from snapship.jobs import config as jobs_config
from snapship.jobs.config import Config, RepositoryConfig
from snapship.jobs.runner import FAILED, SKIPPED, Runner, Step, select_jobs
from snapship.repository.repo import PassphraseSource, Repository

CONFIG_ENV = "SNAPSHIP_CONFIG"


def config_path(args: argparse.Namespace) -> str:
    return str(args.config or os.environ.get(CONFIG_ENV) or jobs_config.DEFAULT_PATH)


MAX_CONFIG_SIZE = 1 << 20


def read_config_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_SIZE + 1)
    except OSError as e:
        raise UsageError(f"cannot read the jobs file {path}: {e.strerror}") from None
    if len(data) > MAX_CONFIG_SIZE:
        raise UsageError(f"the jobs file {path} is larger than 1 MiB")
    return data


def load_config(args: argparse.Namespace) -> tuple[str, Config]:
    path = config_path(args)
    return path, jobs_config.parse(read_config_bytes(path), path)


# -- opening a repository as the file says ----------------------------------------------------


def passphrase_from_command(command: str, repository: str) -> PassphraseSource:
    """The first line a shell command prints (`pass show backup`, a vault client...)."""

    def get() -> bytes:
        p = subprocess.run(command, shell=True, capture_output=True, stdin=subprocess.DEVNULL,
                           check=False)
        if p.returncode != 0:
            raise AuthFailed(f"repository {repository}: passphrase-command failed with exit "
                             f"code {p.returncode}")
        value = p.stdout.split(b"\n", 1)[0].rstrip(b"\r")
        if not value:
            raise AuthFailed(f"repository {repository}: passphrase-command printed nothing")
        return value

    return get


def open_configured(rc: RepositoryConfig) -> Repository:
    """A repository of the jobs file, with its key: credentials from the file, else from the
    environment as for every command; checked against what this machine knows of it."""
    ns = argparse.Namespace(repo=rc.location, token_file=rc.token_file, ca=rc.ca_file,
                            passphrase_file=rc.passphrase_file)
    source = (passphrase_from_command(rc.passphrase_command, rc.name)
              if rc.passphrase_command else passphrase_source(ns))
    repo = Repository.open(open_storage(rc.location, ns), source)
    known_repos.vouch(repo.config, repo.storage.describe(), passphrase_configured=bool(
        rc.passphrase_file or rc.passphrase_command or os.environ.get("SNAPSHIP_PASSPHRASE")))
    return repo


# -- run ------------------------------------------------------------------------------------


def step_json(s: Step) -> Report:
    result: Report | None = None
    if s.manifest is not None:
        result = version_detail(s.manifest, None, None)
    elif s.pruned is not None:
        decisions = [(vol, d) for vol, ds in s.pruned.decisions.items() for d in ds]
        result = {"forgotten": [ref(vol, d.version) for vol, d in decisions if not d.keep],
                  "kept": [ref(vol, d.version) for vol, d in decisions if d.keep],
                  "chunks_freeable": s.pruned.chunks_freeable,
                  "bytes_freeable": s.pruned.bytes_freeable}
    elif s.gc is not None:
        result = dataclasses.asdict(s.gc)
    elif s.copied is not None:
        result = s.copied.to_json()
    elif s.hook is not None and s.outcome != FAILED:
        result = {"event": s.hook[0], "command": s.hook[1]}
    return {"job": s.job, "step": s.step, "repository": s.repository, "volume": s.volume,
            "outcome": s.outcome,
            "error": {"kind": s.error_kind, "message": s.message} if s.outcome == FAILED
            else None,
            "reason": s.message if s.outcome == SKIPPED else None,
            "duration": round(s.duration, 3), "warnings": s.warnings, "result": result}


def describe_step(r: Report) -> str:
    what = {"backup": f"backup {r['volume']} -> {r['repository']}",
            "prune": f"prune {r['volume']} in {r['repository']}",
            "gc": f"gc {r['repository']}", "hook": "hook",
            "copy": f"copy -> {r['repository']}"}[r["step"]]
    head = f"{r['job']}: {what}"
    if r["outcome"] == FAILED:
        return f"{head}: FAILED ({r['error']['kind']}): {r['error']['message']}"
    if r["outcome"] == SKIPPED:
        return f"{head}: skipped: {r['reason']}"
    res = r["result"]
    took = f"{r['duration']:.1f} s"
    if r["step"] == "backup":
        s = res["stats"]
        return (f"{head}: ok {res['ref']}: read {human_bytes(s.get('bytes_read', 0))}, "
                f"{s.get('chunks_new', 0)} new chunks ({human_bytes(res['new_bytes_stored'])} "
                f"stored), {took}")
    if r["step"] == "hook":
        return f"{head}: ok, on-{res['event']}: {res['command']}"
    if r["step"] == "copy":
        return (f"{head}: ok, copied {len(res['copied'])} version(s), "
                f"{len(res['present'])} already there ({res['mode']}): sent "
                f"{res['chunks_sent']} chunks ({human_bytes(res['bytes_sent'])}), {took}")
    if r["step"] == "prune":
        return (f"{head}: ok, forgot {len(res['forgotten'])}, kept {len(res['kept'])}; gc "
                f"will free {human_bytes(res['bytes_freeable'])}, {took}")
    waiting = f"; waits for {len(res['waiting_for'])} backup(s)" if res["waiting_for"] else ""
    return (f"{head}: ok, freed {res['chunks_freed']} chunks "
            f"({human_bytes(res['bytes_freed'])}){waiting}, {took}")


def describe_run(r: Report) -> list[str]:
    # The steps were said as they finished; the summary is what is left.
    failed = [s for s in r["steps"] if s["outcome"] == FAILED]
    return [f"run {', '.join(r['jobs'])}: {len(r['steps'])} steps, "
            + (f"{len(failed)} FAILED" if failed else "all succeeded")]


def _say_step(s: Step) -> None:
    line = describe_step(step_json(s))
    if s.outcome == FAILED:
        output.message(f"snapship: error: {line}")
    elif not output.settings.json:
        output.message(line, stream=sys.stdout)


def _local_tz() -> dt.tzinfo:
    return dt.datetime.now().astimezone().tzinfo or dt.UTC


def run_job_hook(job: str, event: str, command: str, failed: list[Step]) -> None:
    """A job's on-success or on-failure command, told what happened through its environment
    (docs/config.md); what it prints goes to stderr (stdout may be --json's)."""
    env = {**os.environ, "SNAPSHIP_JOB": job, "SNAPSHIP_EVENT": event,
           "SNAPSHIP_FAILED_STEPS": str(len(failed)),
           "SNAPSHIP_FAILURES": "\n".join(describe_step(step_json(s)) for s in failed)}
    p = subprocess.run(command, shell=True, env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, check=False)
    for line in (p.stdout + p.stderr).splitlines():
        output.message(line)
    if p.returncode != 0:
        raise SnapshipError(f"on-{event} hook failed with exit code {p.returncode}")


def write_metrics(path: str, steps: list[Report], jobs: list[str]) -> None:
    """Prometheus text (node_exporter's textfile collector), written atomically (a temporary
    file beside it, renamed over it: prometheus_client's `write_to_textfile`)."""
    # Only a run that writes metrics pays for the import.
    from prometheus_client import write_to_textfile

    from snapship.jobs import metrics

    try:
        with open(path, encoding="utf-8") as f:
            previous: str | None = f.read(1 << 22)
    except FileNotFoundError:
        previous = None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the metrics file {path}: {e}") from None
    try:
        write_to_textfile(path, metrics.registry(steps, jobs, time.time(), previous))
    except OSError as e:
        raise UsageError(f"cannot write the metrics file {path}: {e.strerror}") from None


def cmd_run(args: argparse.Namespace) -> int:
    path, config = load_config(args)
    jobs = select_jobs(config, args.jobs)
    metrics_file = args.metrics_file or config.metrics_file
    if metrics_file and not metrics_file.endswith(".prom"):
        raise UsageError(f"--metrics-file {metrics_file!r} must end in .prom (what "
                         "node_exporter's textfile collector reads)")
    runner = Runner(config, open_configured, lvm=Lvm(), progress=TerminalProgress,
                    on_step=_say_step, warn=warn, tz=_local_tz(), hook=run_job_hook)
    steps = [step_json(s) for s in runner.run(jobs)]
    names = [j.name for j in jobs]
    emit("run", {"file": path, "jobs": names, "ok": runner.ok, "steps": steps}, describe_run,
         json=args.json)
    if metrics_file:
        try:
            write_metrics(metrics_file, steps, names)
        except UsageError as e:  # the run's report stands; the exit code says it failed
            output.message(f"snapship: error: {e}")
            return 1
    return 0 if runner.ok else 1


# -- config check ---------------------------------------------------------------------------


def describe_check(r: Report) -> list[str]:
    if r["ok"]:
        return [f"{r['file']}: ok: {len(r['jobs'])} job(s): {', '.join(r['jobs'])}"]
    return [f"{r['file']}:{p['line']}: {p['message']}" for p in r["problems"]] + \
        [f"{r['file']}: {len(r['problems'])} problem(s)"]


def schedule_problems(config: Config, data: bytes) -> list[jobs_config.Problem]:
    """Schedules systemd would refuse, as `systemd-analyze calendar` says (when installed:
    the pure check cannot know systemd's calendar grammar)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return []
    lines = jobs_config.key_lines(data.decode("utf-8"))
    found = []
    for job in config.jobs.values():
        if job.schedule is None:
            continue
        p = subprocess.run([analyze, "calendar", job.schedule], capture_output=True,
                           text=True, stdin=subprocess.DEVNULL, check=False)
        if p.returncode != 0:
            path = ("jobs", job.name, "schedule")
            found.append(jobs_config.Problem(
                lines.get(path, 1), ".".join(path), f"jobs.{job.name}.schedule "
                f"{job.schedule!r} is not a calendar expression systemd reads (man "
                "systemd.time)"))
    return found


def cmd_config_check(args: argparse.Namespace) -> int:
    path = config_path(args)
    data = read_config_bytes(path)
    config, problems = jobs_config.check(data)
    if config is not None:
        problems = schedule_problems(config, data)
        if problems:
            config = None
    emit("config check", {
        "file": path, "ok": config is not None,
        "jobs": sorted(config.jobs) if config is not None else [],
        "problems": [{"line": p.line, "key": p.key, "message": p.message} for p in problems],
    }, describe_check, json=args.json)
    return 0 if config is not None else 1


CONFIG_HELP = (f"the jobs file (default: ${CONFIG_ENV}, else {jobs_config.DEFAULT_PATH}; "
               "docs/config.md)")


def add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)


def register(sub: options.SubParsers) -> None:
    p = options.add_command(
        sub, "run", summary="run the jobs of the jobs file (backup, prune, gc)",
        description="""
        Run jobs declared in the jobs file (docs/config.md): for each job and each of its
        repositories, back up its volumes (a copy job, with copy-from: copy the versions
        its source has and the repository lacks), then apply each volume's retention, then
        gc where the job says so. Each step's outcome is a line as it finishes (a failed one
        on stderr). A failing step does not stop the others; the exit code is 1 when any
        step failed, 0 when all succeeded.""",
        examples=["snapship run                        # every job of /etc/snapship/snapship.toml",
                  "snapship run nightly --config ./snapship.toml",
                  "snapship run nightly --json        # docs/json.md"],
        parents=options.parents())
    p.add_argument("jobs", nargs="*", metavar="JOB", help="jobs to run (default: all)")
    add_config_option(p)
    p.add_argument("--metrics-file", metavar="FILE.prom",
                   help="write Prometheus metrics there, for node_exporter's textfile "
                   "collector (default: the jobs file's metrics-file, else none)")
    p.set_defaults(func=cmd_run, quiet_report=True)

    p = options.add_command(
        sub, "config", summary="check the jobs file",
        description="""
        Work with the jobs file (docs/config.md), the TOML file that declares repositories,
        volumes with their retention, and jobs with their schedules: check it before
        `snapship run` or a timer uses it.""",
        examples=["snapship config check --config ./snapship.toml"])
    inner = p.add_subparsers(dest="config_command", required=True, metavar="COMMAND",
                             title="commands")
    c = options.add_command(
        inner, "check", summary="check the jobs file and name every mistake with its line",
        description="""
        Parse and check the jobs file without running anything: syntax, unknown keys, types,
        values, and names that refer to nothing. Every problem is one line, FILE:LINE:
        what is wrong. Exit code 1 when there is any.""",
        examples=["snapship config check", "snapship config check --config ./snapship.toml"],
        parents=options.parents())
    add_config_option(c)
    c.set_defaults(func=cmd_config_check)
