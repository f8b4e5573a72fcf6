"""The verify engine: are all versions restorable?

Fast mode reads every manifest (which checks it) and the chunk listing, and checks that every
referenced chunk exists with the size the manifest recorded. Deep mode also fetches, decrypts
and re-hashes every referenced chunk once. Problems are collected, not raised, so one run names
every damaged object and the versions it affects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from snapship.engine.pipeline import bounded_map, default_workers, window_for
from snapship.engine.progress import NoProgress, Progress
from snapship.errors import Corrupt, ObjectNotFound, SnapshipError
from snapship.repository.repo import Repository


@dataclass
class VerifyReport:
    versions: int = 0
    chunks: int = 0
    bytes_checked: int = 0
    bad_manifests: dict[str, str] = field(default_factory=dict)
    bad_chunks: dict[str, str] = field(default_factory=dict)
    affected: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.bad_manifests or self.bad_chunks)


def run_verify(
    repo: Repository,
    *,
    deep: bool = False,
    volume: str | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
) -> VerifyReport:
    report = VerifyReport()
    users: dict[bytes, list[str]] = {}
    expected_size: dict[bytes, int] = {}
    for vol, ver in repo.list_versions(volume):
        name = f"{vol}@{ver}"
        try:
            m = repo.load_manifest(vol, ver)
        except SnapshipError as e:
            report.bad_manifests[name] = str(e)
            continue
        report.versions += 1
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
        progress = progress or NoProgress()
        progress.start(sum(stored.get(c, 0) for c in users))
        todo = [c for c in users if c.hex() not in report.bad_chunks]

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
    return report
