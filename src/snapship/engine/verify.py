"""The verify engine: are all versions restorable? With the key or without it.

Fast mode reads what each version references and the chunk listing, and checks that every
referenced chunk exists with the size recorded. Deep mode also fetches every referenced chunk
once and checks it: with the key (a `Repository`), decrypts and re-hashes it; without (a bare
`Catalog`, as a storage server runs it), checks its envelope, and in an unencrypted repository
its checksum and content hash too, which is everything. With the key, the versions are read
from their manifests; without, from their reference lists. Problems are collected, not raised,
so one run names every damaged object and the versions it affects. `sample` deep-checks a
random share of the chunks (the rest get the fast check), for a regular cheap spot check.

Each affected version is marked damaged in the repository (`damaged/`, shown by `versions`,
and the next backup that meets a damaged chunk stores it again); a later run that checks such a
version completely, at least as thoroughly as the run that marked it, clears the mark.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from snapship.engine.pipeline import bounded_map, default_workers, window_for
from snapship.engine.progress import NoProgress, Progress
from snapship.errors import Corrupt, NotFound, ObjectNotFound, SnapshipError, UsageError
from snapship.formats.constants import ID_LEN
from snapship.repository.catalog import Catalog
from snapship.repository.repo import Repository


@dataclass
class VerifyReport:
    deep: bool = False
    content_checked: bool = False
    """Whether the deep check covered chunk contents (with the key, or unencrypted) or only
    their envelopes (keyless, encrypted)."""
    versions: int = 0
    chunks: int = 0
    bytes_checked: int = 0
    bad_versions: dict[str, str] = field(default_factory=dict)
    """Versions whose manifest (with the key) or reference list (without) is unreadable."""
    bad_chunks: dict[str, str] = field(default_factory=dict)
    affected: dict[str, list[str]] = field(default_factory=dict)
    deep_checked: int = 0
    marks_cleared: list[str] = field(default_factory=list)
    marks_error: str | None = None
    """Why the damage marks could not be stored (e.g. a read-only token)."""

    sample_percent: float | None = None

    @property
    def ok(self) -> bool:
        return not (self.bad_versions or self.bad_chunks)

    def to_json(self) -> dict[str, Any]:
        """The report as `verify --json` and the server's maintenance reply give it."""
        return {
            "ok": self.ok, "deep": self.deep, "content_checked": self.content_checked,
            "versions": self.versions, "chunks": self.chunks,
            "bytes_checked": self.bytes_checked, "chunks_deep_checked": self.deep_checked,
            "sample_percent": self.sample_percent, "bad_versions": self.bad_versions,
            "bad_chunks": self.bad_chunks, "affected_versions": self.affected,
            "marks_cleared": self.marks_cleared, "marks_error": self.marks_error,
        }


def describe(r: dict[str, Any], where: str = "verify") -> list[str]:
    """A verify report (`VerifyReport.to_json()`, wherever it ran) for people."""
    lines = [f"BAD version {name}: {problem}" for name, problem in r["bad_versions"].items()]
    lines += [f"BAD chunk {hexid}: {problem}" for hexid, problem in r["bad_chunks"].items()]
    lines += [f"AFFECTED {name}: {len(hexids)} bad chunk(s)"
              + ("" if r["marks_error"] else "; marked damaged")
              for name, hexids in r["affected_versions"].items()]
    lines += [f"healed {name}: no longer damaged" for name in r["marks_cleared"]]
    mode = "deep" if r["deep"] else "fast"
    if r["deep"] and not r["content_checked"]:
        mode += ", envelopes only: no key"
    if r["sample_percent"] is not None:
        mode += f", {r['chunks_deep_checked']} chunks sampled ({r['sample_percent']:g}%)"
    status = "ok" if r["ok"] else "FAILED"
    lines.append(f"{where} ({mode}): {r['versions']} versions, {r['chunks']} chunks: {status}")
    return lines


def _references(catalog: Catalog, repo: Repository | None, vol: str, ver: str
                ) -> dict[bytes, int]:
    """The distinct chunks of a version with their recorded sizes."""
    if repo is not None:
        return repo.load_manifest(vol, ver).unique_chunks()
    try:
        refs = catalog.load_refs(vol, ver)
    except ObjectNotFound:
        raise Corrupt("no reference list (made by snapship 0.1?): check it with a verify "
                      "that has the key") from None
    return {refs.ids[i * ID_LEN : (i + 1) * ID_LEN]: refs.sizes[i] for i in range(refs.count)}


def run_verify(
    catalog: Catalog,
    repo: Repository | None = None,
    *,
    deep: bool = False,
    sample: float | None = None,
    volume: str | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
) -> VerifyReport:
    """Verify with `repo` (the key) if given, else keyless from `catalog` alone."""
    if sample is not None and not 0 < sample <= 100:
        raise UsageError(f"--sample {sample} is not a percentage in (0, 100]")
    config = repo.config if repo is not None else catalog.config()
    report = VerifyReport(deep=deep,
                          content_checked=deep and (repo is not None or not config.encrypted),
                          sample_percent=sample)
    users: dict[bytes, list[str]] = {}
    versions: list[tuple[str, str]] = []
    expected_size: dict[bytes, int] = {}
    for vol, ver in catalog.versions(volume):
        name = f"{vol}@{ver}"
        try:
            chunks = _references(catalog, repo, vol, ver)
        except NotFound:
            continue  # forgotten meanwhile
        except SnapshipError as e:
            report.bad_versions[name] = str(e)
            continue
        report.versions += 1
        versions.append((vol, ver))
        for cid, size in chunks.items():
            users.setdefault(cid, []).append(name)
            expected_size[cid] = size
    report.chunks = len(users)
    stored = catalog.stored_chunks()
    for cid, size in expected_size.items():
        have = stored.get(cid)
        if have is None:
            report.bad_chunks[cid.hex()] = "missing"
        elif have != size:
            report.bad_chunks[cid.hex()] = f"stored size {have}, recorded size {size}"
    if deep:
        todo = [c for c in users if c.hex() not in report.bad_chunks]
        if sample is not None and todo:
            todo = random.Random().sample(todo, max(1, round(len(todo) * sample / 100)))
        progress = progress or NoProgress()
        progress.start(sum(stored.get(c, 0) for c in todo))
        report.deep_checked = len(todo)

        def check(cid: bytes) -> tuple[bytes, int, str | None]:
            try:
                blob = catalog.chunk_blob(cid)
            except ObjectNotFound:
                return cid, 0, "missing"
            if repo is None:
                return cid, len(blob), catalog.inspect_chunk(cid, blob, config)
            try:
                repo.open_chunk(cid, blob)
            except Corrupt as e:
                return cid, len(blob), str(e)
            return cid, len(blob), None

        nworkers = workers or default_workers(catalog.storage)
        for cid, nbytes, problem in bounded_map(
            check, todo, nworkers, window_for(nworkers, config.chunk_size)
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
        _update_marks(catalog, report, versions, report.content_checked and sample is None)
    except SnapshipError as e:
        report.marks_error = str(e)
    return report


def _update_marks(catalog: Catalog, report: VerifyReport, versions: list[tuple[str, str]],
                  thorough: bool) -> None:
    """Mark what this run found damaged; clear a mark only after a check of the version at
    least as thorough as the one that set it (`thorough`: every chunk's content checked)."""
    marked = catalog.damaged()
    for vol, ver in versions:
        name = f"{vol}@{ver}"
        if name in report.affected:
            catalog.mark_damaged(vol, ver, report.affected[name], thorough)
        elif (vol, ver) in marked and (thorough or not marked[(vol, ver)].deep):
            catalog.mark_damaged(vol, ver, None)
            report.marks_cleared.append(name)
