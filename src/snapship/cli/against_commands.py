"""`snapship verify VOL@VER --against PATH|lvm:VG/LV`: a version compared with its source.

Reads the live device (or a snapshot, or an image file) and lists the chunks whose id differs
from the version's, fetching nothing: the check that finds a change tracker that
under-reported. Exit code 1 when any chunk differs.
"""

from __future__ import annotations

import argparse

from snapship.changes.lvm import Lvm
from snapship.cli.context import open_repository
from snapship.cli.output import TerminalProgress, human_bytes
from snapship.cli.reports import Report, emit, ref
from snapship.cli.transfer_commands import parse_ref
from snapship.devices import Source, incomplete_restore
from snapship.engine.compare import compare, runs
from snapship.engine.pipeline import default_workers
from snapship.engine.source_backup import parse_lvm_source
from snapship.errors import UsageError

MAX_LISTED_RUNS = 20
"""Runs of differing chunks the text report shows; --json has them all."""


def check_usage(args: argparse.Namespace) -> None:
    if args.against is None:
        if args.version_ref is not None:
            raise UsageError("VOLUME[@VERSION] goes with --against PATH|lvm:VG/LV (a plain "
                             "verify checks every version)")
        return
    if args.version_ref is None:
        raise UsageError("--against needs the version to compare: verify VOLUME[@VERSION] "
                         "--against PATH|lvm:VG/LV")
    for given, name in ((args.deep, "--deep"), (args.sample is not None, "--sample"),
                        (args.volume is not None, "--volume"),
                        (args.on_server, "--on-server")):
        if given:
            raise UsageError(f"{name} does not go with --against")


def cmd_verify_against(args: argparse.Namespace) -> int:
    repo = open_repository(args)
    volume, version = repo.resolve(parse_ref(args.version_ref))
    m = repo.load_manifest(volume, version)
    path = args.against
    if path.startswith("lvm:"):
        path = Lvm().lv(*parse_lvm_source(path)).device
    with Source(path) as source:
        found = compare(repo, m, source.read, source.size, TerminalProgress(f"verify {volume}"),
                        default_workers(repo.storage))
        available = source.size
        # What a restore that was stopped leaves in place of the first chunk.
        incomplete = incomplete_restore(source.read(0, min(512, source.size)))
    report = {
        "volume": volume,
        "version_id": version,
        "ref": ref(volume, version),
        "against": args.against,
        "path": path,
        "ok": not found.differing,
        "size": m.size,
        "against_size": available,
        "chunk_size": m.chunk_size,
        "chunks": m.count,
        "chunks_compared": found.compared,
        "chunks_differing": len(found.differing),
        "incomplete_restore": incomplete,
        "differing": [{"first": first, "count": count, "offset": first * m.chunk_size,
                       "length": min(count * m.chunk_size, m.size - first * m.chunk_size)}
                      for first, count in runs(found.differing)],
    }
    emit("verify", report, describe_against, json=args.json)
    return 0 if report["ok"] else 1


def describe_against(r: Report) -> list[str]:
    where = f"{r['ref']} against {r['against']}"
    lines = []
    if r["incomplete_restore"] is not None:
        lines.append(f"note: {r['against']} holds an incomplete restore of "
                     f"{r['incomplete_restore']}: that restore stopped before it finished "
                     "(restore it again; --differential writes only what is missing)")
    if r["against_size"] != r["size"]:
        lines.append(f"note: {r['against']} is {r['against_size']} bytes, the version "
                     f"{r['size']}" + (": its tail was not compared"
                                       if r["against_size"] > r["size"] else
                                       ": the chunks past its end differ"))
    if r["ok"]:
        return [*lines, f"{where}: all {r['chunks']} chunks match"]
    lines.append(f"{where}: {r['chunks_differing']} of {r['chunks']} chunks differ")
    for d in r["differing"][:MAX_LISTED_RUNS]:
        span = f"chunk {d['first']}" if d["count"] == 1 else \
            f"chunks {d['first']}-{d['first'] + d['count'] - 1}"
        lines.append(f"  {span}: offset {d['offset']}, {human_bytes(d['length'])}")
    if len(r["differing"]) > MAX_LISTED_RUNS:
        lines.append(f"  ... and {len(r['differing']) - MAX_LISTED_RUNS} more runs (--json "
                     "lists them all)")
    return lines
