"""Running declared jobs: for each job and each of its repositories, the backups of its
volumes, then each volume's retention (prune), then gc, each step's outcome recorded; then
the job's `on-success` or `on-failure` hook (a step too). A copy job (`copy-from`) copies
instead of backing up: one `copy` step per destination (engine/copy.py, as `snapship copy`
does: only the versions and chunks the destination lacks), then prune and gc there.

A step that fails is recorded and the run goes on: one missing source does not stop the other
volumes. Only a stop (Ctrl-C, SIGTERM: not exceptions of the `Exception` kind) ends the run.
The prune of a volume whose backup failed in this run is skipped (its versions stay as they
were); a repository that cannot be opened fails every step that needs it, opened once.

The runner builds no backend: the caller's `Opener` opens a repository as configured (the CLI
does, from `jobs.config.RepositoryConfig`), and the caller turns the steps into text or JSON.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

from snapship.changes.lvm import Lvm
from snapship.engine.copy import CopyReport, copy_versions, versions_to_copy
from snapship.engine.gc import GcReport, run_gc
from snapship.engine.progress import Progress
from snapship.engine.prune import PruneReport, run_prune
from snapship.engine.snapshot_backup import SnapshotOptions
from snapship.engine.source_backup import backup_source
from snapship.errors import NotFound, SnapshipError, UsageError
from snapship.formats.manifest import Manifest
from snapship.jobs.config import Config, JobConfig, RepositoryConfig, VolumeConfig
from snapship.repository.repo import Repository

Warn = Callable[[str], None]
Opener = Callable[[RepositoryConfig], Repository]
Hook = Callable[[str, str, str, "list[Step]"], None]
"""Runs a job's hook: (job, event `success` or `failure`, shell command, the failed steps);
raises SnapshipError if the command fails."""
OK, FAILED, SKIPPED = "ok", "failed", "skipped"


@dataclass
class Step:
    job: str
    step: str
    """`backup`, `copy`, `prune`, `gc` or `hook`."""
    repository: str | None
    """None for a hook, which is of the whole job."""
    volume: str | None
    """The volume's name in the file (None for copies, gc and hooks)."""
    outcome: str = OK
    error_kind: str | None = None
    message: str | None = None
    """Why it failed, or why it was skipped."""
    duration: float = 0.0
    manifest: Manifest | None = None
    pruned: PruneReport | None = None
    gc: GcReport | None = None
    copied: CopyReport | None = None
    hook: tuple[str, str] | None = None
    """The event and the command a hook step ran."""
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Repo:
    repo: Repository | None = None
    error: BaseException | None = None


def select_jobs(config: Config, names: Sequence[str]) -> list[JobConfig]:
    """The jobs named (each once, in the order given), or every job of the file."""
    for name in names:
        if name not in config.jobs:
            raise NotFound(f"the jobs file has no job {name!r} (it has: "
                           f"{', '.join(sorted(config.jobs))})")
    if not names:
        return list(config.jobs.values())
    return [config.jobs[n] for n in dict.fromkeys(names)]


def _kind(e: BaseException) -> str:
    return e.kind if isinstance(e, SnapshipError) else "internal"


def _text(e: BaseException) -> str:
    return str(e) if isinstance(e, SnapshipError) else f"internal error: {type(e).__name__}: {e}"


class Runner:
    def __init__(self, config: Config, opener: Opener, *, lvm: Lvm,
                 progress: Callable[[str], Progress | None] = lambda label: None,
                 on_step: Callable[[Step], None] = lambda step: None,
                 warn: Warn = lambda message: None, tz: dt.tzinfo = dt.UTC,
                 hook: Hook | None = None) -> None:
        self.config = config
        self.opener = opener
        self.lvm = lvm
        self.progress = progress
        self.on_step = on_step
        self.warn = warn
        self.tz = tz
        self.hook = hook
        self.steps: list[Step] = []
        self._repos: dict[str, _Repo] = {}

    def run(self, jobs: Sequence[JobConfig]) -> list[Step]:
        for job in jobs:
            first = len(self.steps)
            for name in job.repositories:
                self._run_in(job, self.config.repositories[name])
            failed = [s for s in self.steps[first:] if s.outcome == FAILED]
            event, command = ("failure", job.on_failure) if failed else \
                ("success", job.on_success)
            if command and self.hook is not None:
                self._step(Step(job.name, "hook", None, None),
                           partial(self._hook, event=event, command=command, failed=failed))
        return self.steps

    @property
    def ok(self) -> bool:
        return all(s.outcome != FAILED for s in self.steps)

    def _open(self, rc: RepositoryConfig) -> Repository:
        held = self._repos.setdefault(rc.name, _Repo())
        if held.repo is None and held.error is None:
            try:
                held.repo = self.opener(rc)
            except Exception as e:
                held.error = e
        if held.error is not None:
            raise held.error
        assert held.repo is not None
        return held.repo

    def _step(self, step: Step, work: Callable[[Step, Warn], None]) -> Step:
        started = time.monotonic()

        def note(message: str) -> None:
            step.warnings.append(message)
            self.warn(f"{step.job}: {step.step} {step.volume or step.repository or ''}: "
                      f"{message}")

        try:
            work(step, note)
        except Exception as e:  # recorded; the other volumes go on
            step.outcome, step.error_kind, step.message = FAILED, _kind(e), _text(e)
        step.duration = time.monotonic() - started
        self.steps.append(step)
        self.on_step(step)
        return step

    def _run_in(self, job: JobConfig, rc: RepositoryConfig) -> None:
        backed_up: dict[str, bool] = {}
        if job.copy_from is not None:
            source = self.config.repositories[job.copy_from]
            s = self._step(Step(job.name, "copy", rc.name, None),
                           partial(self._copy, src=source, dst=rc, job=job))
            backed_up = dict.fromkeys(job.volumes, s.outcome == OK)
        for vname in () if job.copy_from else job.volumes:
            v = self.config.volumes[vname]
            s = self._step(Step(job.name, "backup", rc.name, vname),
                           partial(self._backup, rc=rc, v=v))
            backed_up[vname] = s.outcome == OK
        if job.prune:
            for vname in job.volumes:
                v = self.config.volumes[vname]
                if v.retention is None:
                    continue
                step = Step(job.name, "prune", rc.name, vname)
                if not backed_up[vname]:
                    step.outcome, step.message = SKIPPED, (
                        "the copy failed" if job.copy_from else "its backup failed")
                    self.steps.append(step)
                    self.on_step(step)
                    continue
                self._step(step, partial(self._prune, rc=rc, v=v))
        if job.gc:
            self._step(Step(job.name, "gc", rc.name, None),
                       partial(self._gc, rc=rc))

    def _backup(self, step: Step, warn: Warn, *, rc: RepositoryConfig, v: VolumeConfig) -> None:
        repo = self._open(rc)
        step.manifest = backup_source(
            repo, v.source, v.volume, explicit_volume=True, lvm=self.lvm, labels=v.labels,
            snapshot=SnapshotOptions(v.snapshot_size, v.pre_snapshot, v.post_snapshot,
                                     pvs=v.snapshot_pvs),
            progress=self.progress(f"backup {v.name} -> {rc.name}"), warn=warn)

    def _copy(self, step: Step, warn: Warn, *, src: RepositoryConfig, dst: RepositoryConfig,
              job: JobConfig) -> None:
        source, destination = self._open(src), self._open(dst)
        if source.config.repo_id == destination.config.repo_id:
            raise UsageError(f"repositories {src.name} and {dst.name} are the same "
                             "repository")
        refs = [(self.config.volumes[v].volume, None) for v in job.volumes]
        todo = list(versions_to_copy(source, refs))
        step.copied = copy_versions(source, destination, todo,
                                    progress=self.progress(f"copy {src.name} -> {dst.name}"),
                                    warn=warn)

    def _prune(self, step: Step, warn: Warn, *, rc: RepositoryConfig, v: VolumeConfig) -> None:
        assert v.retention is not None
        step.pruned = run_prune(self._open(rc).catalog, v.retention, volume=v.volume,
                                tz=self.tz, warn=warn)

    def _hook(self, step: Step, warn: Warn, *, event: str, command: str,
              failed: list[Step]) -> None:
        assert self.hook is not None
        step.hook = (event, command)
        self.hook(step.job, event, command, failed)

    def _gc(self, step: Step, warn: Warn, *, rc: RepositoryConfig) -> None:
        repo = self._open(rc)
        step.gc = run_gc(repo.catalog, repo=repo, warn=warn)

