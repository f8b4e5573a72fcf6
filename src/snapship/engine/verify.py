"""The verify engine: are all versions restorable?

Fast mode reads every manifest (which checks it) and the chunk listing, and checks that every
referenced chunk exists with the size the manifest recorded. Deep mode also fetches, decrypts
and re-hashes every referenced chunk once. Problems are collected, not raised, so one run names
every damaged object and the versions it affects. `sample` deep-checks a random share of the
chunks (the rest get the fast check), for a regular cheap spot check.

Each affected version is marked damaged in the repository (`damaged/`, shown by `versions`,
and the next backup that meets a damaged chunk stores it again); a later run that checks such a
version completely, at least as deeply as the run that marked it, clears the mark if it is fine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from snapship.engine.pipeline import bounded_map, default_workers, window_for
from snapship.engine.progress import NoProgress, Progress
from snapship.errors import Corrupt, ObjectNotFound, SnapshipError, UsageError
from snapship.repository import catalog
from snapship.repository.repo import Repository


@dataclass
class VerifyReport:
    versions: int = 0
    chunks: int = 0
    bytes_checked: int = 0
    bad_manifests: dict[str, str] = field(default_factory=dict)
    bad_chunks: dict[str, str] = field(default_factory=dict)
    affected: dict[str, list[str]] = field(default_factory=dict)
    deep_checked: int = 0
    marks_cleared: list[str] = field(default_factory=list)
    marks_error: str | None = None
    """Why the damage marks could not be stored (e.g. a read-only token)."""

    @property
    def ok(self) -> bool:
        return not (self.bad_manifests or self.bad_chunks)


def run_verify(
    repo: Repository,
    *,
    deep: bool = False,
    sample: float | None = None,
    volume: str | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
) -> VerifyReport:
    if sample is not None and not 0 < sample <= 100:
        raise UsageError(f"--sample {sample} is not a percentage in (0, 100]")
    report = VerifyReport()
    users: dict[bytes, list[str]] = {}
    versions: list[tuple[str, str]] = []
    expected_size: dict[bytes, int] = {}
    for vol, ver in repo.list_versions(volume):
        name = f"{vol}@{ver}"
        try:
            m = repo.load_manifest(vol, ver)
        except SnapshipError as e:
            report.bad_manifests[name] = str(e)
            continue
        report.versions += 1
        versions.append((vol, ver))
        for cid, size in m.unique_chunks().items():
            users.setdefault(cid, []).append(name)
            expected_size[cid] = size
    report.chunks = len(users)
    stored = repo.list_chunks()
    for cid, size in expected_size.items():
        have = stored.get(cid)
        if have is None:
            report.bad_chunks[cid.hex()] = "missing"
        elif have != size:
            report.bad_chunks[cid.hex()] = f"stored size {have}, manifest says {size}"
    if deep:
        todo = [c for c in users if c.hex() not in report.bad_chunks]
        if sample is not None and todo:
            todo = random.Random().sample(todo, max(1, round(len(todo) * sample / 100)))
        progress = progress or NoProgress()
        progress.start(sum(stored.get(c, 0) for c in todo))
        report.deep_checked = len(todo)

        def check(cid: bytes) -> tuple[bytes, int, str | None]:
            try:
                blob = repo.get_chunk_blob(cid)
            except ObjectNotFound:
                return cid, 0, "missing"
            try:
                repo.open_chunk(cid, blob)
            except Corrupt as e:
                return cid, len(blob), str(e)
            return cid, len(blob), None

        nworkers = workers or default_workers()
        for cid, nbytes, problem in bounded_map(
            check, todo, nworkers, window_for(nworkers, repo.chunk_size)
        ):
            report.bytes_checked += nbytes
            progress.advance(nbytes)
            if problem:
                report.bad_chunks[cid.hex()] = problem
        progress.finish()
    for hexid in report.bad_chunks:
        for name in users[bytes.fromhex(hexid)]:
            report.affected.setdefault(name, []).append(hexid)
    try:
        _update_marks(repo, report, versions, deep and sample is None)
    except SnapshipError as e:
        report.marks_error = str(e)
    return report


def _update_marks(repo: Repository, report: VerifyReport, versions: list[tuple[str, str]],
                  complete_deep: bool) -> None:
    marked = catalog.damaged(repo.storage)
    for vol, ver in versions:
        name = f"{vol}@{ver}"
        if name in report.affected:
            catalog.mark_damaged(repo.storage, vol, ver, report.affected[name], complete_deep)
        elif (vol, ver) in marked and (complete_deep or not marked[(vol, ver)].deep):
            catalog.mark_damaged(repo.storage, vol, ver, None)
            report.marks_cleared.append(name)
