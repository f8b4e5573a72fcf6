"""Maintenance the server runs on its own repositories, with no key: gc and a keyless verify.

gc is `engine/gc.py` on the repository's local directory (it needs no key by design,
docs/gc.md): nothing crosses the network. The keyless verify checks what can be checked
without the key, from the plaintext reference lists: every chunk a version uses exists with
the recorded size; `deep` also reads every such chunk and checks its envelope (and, in an
unencrypted repository, its checksum and content hash: everything a client-side deep verify
checks). Versions found damaged are marked as `snapship verify` marks them (docs/gc.md).

Both run on demand (admin requests, `snapship gc --on-server`, `snapship verify --on-server`)
or on a schedule (`snapship server --gc-every/--verify-every`).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from snapship.engine.gc import run_gc
from snapship.engine.pipeline import bounded_map
from snapship.errors import Busy, Corrupt, NotFound, ObjectNotFound, SnapshipError, UsageError
from snapship.formats import envelope
from snapship.formats import http_api as api
from snapship.formats.config import decode_config
from snapship.formats.constants import CHUNK_PREFIX, CONFIG_KEY, FOSSIL_PREFIX, KIND_CHUNK
from snapship.repository import catalog
from snapship.repository.repo import Repository, chunk_key, parse_chunk_key
from snapship.server.objects import Repositories, RepoStore
from snapship.storage.base import Storage

log = logging.getLogger("snapship.server")
IO_WORKERS = 4


@dataclass
class KeylessVerifyReport:
    ok: bool = True
    deep: bool = False
    content_checked: bool = False
    """Whether `deep` could check chunk contents (unencrypted repositories) or only their
    envelopes (encrypted ones: the tag needs the key)."""
    versions: int = 0
    chunks: int = 0
    bytes_checked: int = 0
    bad_chunks: dict[str, str] = field(default_factory=dict)
    bad_refs: dict[str, str] = field(default_factory=dict)
    affected: dict[str, list[str]] = field(default_factory=dict)


def keyless_verify(storage: Storage, deep: bool = False) -> KeylessVerifyReport:
    try:
        cfg, _mac = decode_config(storage.get(CONFIG_KEY))
    except ObjectNotFound:
        raise NotFound(f"no snapship repository at {storage.describe()}") from None
    plain = Repository(storage, cfg, None) if not cfg.encrypted else None
    report = KeylessVerifyReport(deep=deep, content_checked=deep and plain is not None)
    versions = catalog.list_versions(storage)
    users: dict[bytes, list[str]] = {}
    expected: dict[bytes, int] = {}
    for vol, ver in versions:
        name = f"{vol}@{ver}"
        try:
            refs = catalog.load_refs(storage, vol, ver)
        except ObjectNotFound:
            report.bad_refs[name] = "no reference list (made by snapship 0.1?): check it " \
                "with a client-side verify"
            continue
        except Corrupt as e:
            report.bad_refs[name] = str(e)
            continue
        report.versions += 1
        for i in range(refs.count):
            cid = refs.ids[i * 32 : i * 32 + 32]
            users.setdefault(cid, []).append(name)
            expected[cid] = refs.sizes[i]
    report.chunks = len(expected)
    stored: dict[bytes, tuple[str, int]] = {}
    for prefix in (FOSSIL_PREFIX, CHUNK_PREFIX):
        for key, size in storage.list(prefix):
            found = parse_chunk_key(key)
            if found is not None:
                stored[found] = (key, size)
    for cid, size in expected.items():
        have = stored.get(cid)
        if have is None:
            report.bad_chunks[cid.hex()] = "missing"
        elif have[1] != size:
            report.bad_chunks[cid.hex()] = f"stored size {have[1]}, reference list says {size}"
    if deep:
        todo = [c for c in expected if c.hex() not in report.bad_chunks]

        def check(cid: bytes) -> tuple[bytes, int, str | None]:
            key = stored[cid][0]
            try:
                blob = storage.get(key)
            except ObjectNotFound:
                try:
                    blob = storage.get(chunk_key(cid))  # gc moved it back meanwhile
                except ObjectNotFound:
                    return cid, 0, "missing"
            problem = envelope.inspect(blob, KIND_CHUNK, cfg.encrypted)
            if problem is None and plain is not None:
                try:
                    plain.open_chunk(cid, blob)
                except Corrupt as e:
                    problem = str(e)
            return cid, len(blob), problem

        for cid, nbytes, problem in bounded_map(check, todo, IO_WORKERS, 4 * IO_WORKERS):
            report.bytes_checked += nbytes
            if problem:
                report.bad_chunks[cid.hex()] = problem
    for hexid in report.bad_chunks:
        for name in users[bytes.fromhex(hexid)]:
            report.affected.setdefault(name, []).append(hexid)
    report.ok = not (report.bad_chunks or report.bad_refs)
    _mark(storage, report, versions)
    return report


def _mark(storage: Storage, report: KeylessVerifyReport, versions: list[tuple[str, str]]
          ) -> None:
    """Damage marks as `snapship verify` keeps them; a mark is cleared only by a check at least
    as thorough as the one that set it."""
    thorough = report.content_checked
    marked = catalog.damaged(storage)
    for vol, ver in versions:
        name = f"{vol}@{ver}"
        if name in report.affected:
            catalog.mark_damaged(storage, vol, ver, report.affected[name], thorough)
        elif (vol, ver) in marked and name not in report.bad_refs and (
                thorough or not marked[(vol, ver)].deep):
            catalog.mark_damaged(storage, vol, ver, None)


class ServerMaintenance:
    """The `maintenance/*` endpoints and the schedule: one task at a time per repository."""

    def __init__(self) -> None:
        self._running: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    def _slot(self, task: str, repo: str) -> threading.Lock:
        with self._lock:
            return self._running.setdefault((task, repo), threading.Lock())

    def run(self, task: str, repo: str, store: RepoStore, options: bytes) -> dict[str, Any]:
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
            if task == "gc":
                warnings: list[str] = []

                def warn(message: str) -> None:
                    warnings.append(message)
                    log.warning("gc of %s: %s", repo, message)

                if store.local.stat(CONFIG_KEY) is None:
                    raise NotFound(f"no snapship repository named {repo} on this server")
                return {**asdict(run_gc(store.local, warn=warn)), "warnings": warnings}
            return asdict(keyless_verify(store.local, deep))
        finally:
            slot.release()


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
            for name in sorted(os.listdir(self.repos.root)):
                if self._stop.is_set():
                    return
                if not os.path.isfile(os.path.join(self.repos.root, name, CONFIG_KEY)):
                    continue
                try:
                    report = self.maintenance.run(task, name, self.repos.get(name), b"")
                except SnapshipError as e:
                    log.error("scheduled %s of %s failed: %s", task, name, e)
                    continue
                log.info("scheduled %s of %s: %s", task, name, summary(task, report))


def summary(task: str, report: dict[str, Any]) -> str:
    if task == "gc":
        return (f"{report['versions']} versions, freed {report['chunks_freed']} chunks "
                f"({report['bytes_freed']} bytes)"
                + (f", waiting for {len(report['waiting_for'])} backups"
                   if report["waiting_for"] else ""))
    state = "ok" if report["ok"] else (f"FAILED: {len(report['bad_chunks'])} bad chunks, "
                                       f"{len(report['bad_refs'])} bad reference lists")
    return f"{report['versions']} versions, {report['chunks']} chunks: {state}"
