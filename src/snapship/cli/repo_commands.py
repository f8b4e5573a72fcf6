"""`snapship init`, `versions`, `show` and `verify`: creating and inspecting a repository."""

from __future__ import annotations

import argparse
import os
from typing import Any

from snapship.cli import known_repos, options, server_commands
from snapship.cli.context import open_repository, open_storage, passphrase_source
from snapship.cli.output import TerminalProgress, human_bytes, print_json, warn
from snapship.cli.reports import print_verify
from snapship.cli.transfer_commands import parse_ref
from snapship.engine.verify import run_verify
from snapship.errors import SnapshipError, UsageError
from snapship.formats.constants import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_ZSTD_LEVEL,
    ENCRYPTION_AES_GCM,
    ENCRYPTIONS,
    MAX_ZSTD_LEVEL,
)
from snapship.formats.manifest import Manifest
from snapship.repository.catalog import Catalog
from snapship.repository.repo import Repository
from snapship.storage.base import Storage
from snapship.storage.local import TMP_PREFIX, LocalStorage
from snapship.types import ZERO_ID


def check_init_target(storage: Storage) -> None:
    """Refuse to create a repository among other data: the location must hold nothing but
    what an unfinished init leaves (an existing repository is refused by `Repository.create`
    itself; a new file system's lost+found is no data of anyone's)."""
    catalog = Catalog(storage)
    if catalog.exists():
        return  # Repository.create says it exists
    if isinstance(storage, LocalStorage):  # empty directories count too: list the entries
        try:
            entries = sorted(os.listdir(storage.root))
        except FileNotFoundError:
            return
        except NotADirectoryError:
            raise UsageError(f"cannot create a repository at {storage.describe()}: it is not "
                             "a directory") from None
        except OSError as e:
            raise UsageError(f"cannot read {storage.describe()}: {e.strerror or e}") from None
        foreign = [e for e in entries if e != "lost+found" and not catalog.left_by_init(e)
                   and not e.startswith(TMP_PREFIX)]
    else:
        foreign = [k for k in catalog.foreign_keys() if not k.startswith("lost+found/")]
    if foreign:
        what = "directory" if isinstance(storage, LocalStorage) else "location"
        raise UsageError(f"{storage.describe()} is not empty and holds no snapship repository "
                         f"(it has {foreign[0]!r}{' and more' if len(foreign) > 1 else ''}): "
                         f"give an empty or new {what}")


def cmd_init(args: argparse.Namespace) -> int:
    storage = open_storage(args.repo, args)
    check_init_target(storage)
    repo = Repository.create(
        storage,
        encryption=args.encryption,
        chunk_size=args.chunk_size,
        compression_level=args.compression_level,
        passphrase=passphrase_source(args, confirm=True),
    )
    # This machine knows it from now on: a config edited later to say otherwise is refused.
    known_repos.remember(repo.config, repo.storage.describe())
    info = {
        "repository": repo.storage.describe(),
        "id": repo.config.repo_id,
        "chunk_size": repo.chunk_size,
        "encryption": repo.config.encryption,
        "compression_level": repo.config.compression_level,
    }
    if args.json:
        print_json(info)
    else:
        print(
            f"created repository {info['repository']} (chunk size "
            f"{human_bytes(repo.chunk_size)}, encryption {repo.config.encryption})"
        )
    return 0


def version_summary(m: Manifest) -> dict[str, Any]:
    """What `show` reports: sizes, what the version costs in the repository, and its ratios."""
    unique = m.unique_chunks()
    nonzero = sum(1 for i in range(m.count) if m.chunk(i) != ZERO_ID)
    data_bytes = sum(m.chunk_span(i)[1] for i in range(m.count) if m.chunk(i) != ZERO_ID)
    s = m.stats
    return {
        "volume": m.volume,
        "version": m.version,
        "created": m.created,
        "source": m.source,
        "parent": m.parent,
        "labels": m.labels,
        "size": m.size,
        "chunk_size": m.chunk_size,
        "chunks": m.count,
        "zero_chunks": m.count - nonzero,
        "unique_chunks": len(unique),
        "data_bytes": data_bytes,
        "stored_bytes": sum(unique.values()),
        "new_bytes_stored": s.get("bytes_new_stored", 0),
        "dedup_ratio": round(nonzero / len(unique), 3) if unique else 1.0,
        # Manifest decoding checked the types of these; older writers may have left some out.
        "compression_ratio": round(s.get("bytes_new", 0) / s["bytes_new_stored"], 3)
        if s.get("bytes_new_stored")
        else None,
        "duration": s.get("duration"),
        "stats": s,
    }


def cmd_versions(args: argparse.Namespace) -> int:
    """Lists every version; a damaged manifest is listed as such (exit 1), not fatal."""
    repo = open_repository(args)
    rows: list[dict[str, Any]] = []
    marks = repo.catalog.damaged()
    shielded = repo.catalog.protected()
    for volume, version in repo.list_versions(args.volume):
        try:
            row = version_summary(repo.load_manifest(volume, version))
        except SnapshipError as e:
            row = {"volume": volume, "version": version, "error": str(e)}
        mark = marks.get((volume, version))
        if mark is not None and "error" not in row:
            row["error"] = f"verify found {len(mark.chunks)} damaged chunk(s)"
        row["protected"] = (volume, version) in shielded
        rows.append(row)
    damaged = any("error" in r for r in rows)
    if args.json:
        print_json(rows)
        return 1 if damaged else 0
    if not rows:
        print("no versions")
    for r in rows:
        if "error" in r:
            print(f"{r['volume']}@{r['version']}  DAMAGED: {r['error']}")
            continue
        labels = ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items()))
        print(
            f"{r['volume']}@{r['version']}  {r['created']}  {human_bytes(r['size']):>10}  "
            f"+{human_bytes(r['new_bytes_stored']):>10} new  "
            + ("protected  " if r["protected"] else "") + labels
        )
    return 1 if damaged else 0


def cmd_show(args: argparse.Namespace) -> int:
    repo = open_repository(args)
    volume, version = repo.resolve(parse_ref(args.version_ref))
    info = version_summary(repo.load_manifest(volume, version))
    if args.json:
        print_json(info)
        return 0
    s = info["stats"]
    comp = info["compression_ratio"]
    lines = [
        f"version      {volume}@{version}",
        f"created      {info['created']}  ({s.get('mode')}, {info['duration']} s)",
        f"source       {info['source']}",
        f"parent       {info['parent'] or '-'}",
        f"size         {human_bytes(info['size'])} ({info['size']} bytes), "
        f"{info['chunks']} chunks of {human_bytes(info['chunk_size'])}",
        f"data         {human_bytes(info['data_bytes'])} non-zero, "
        f"{info['zero_chunks']} zero chunks (not stored)",
        f"stored       {human_bytes(info['stored_bytes'])} in {info['unique_chunks']} "
        "unique chunks",
        f"new          {human_bytes(info['new_bytes_stored'])} added by this version "
        f"({s.get('chunks_new', 0)} chunks)",
        f"dedup        {info['dedup_ratio']}x within the version; compression of new data "
        + (f"{comp}x" if comp else "-"),
        f"read         {human_bytes(s.get('bytes_read', 0))} in {s.get('chunks_read')} chunks",
    ]
    if info["labels"]:
        lines.append("labels       " + ", ".join(f"{k}={v}" for k, v in info["labels"].items()))
    print("\n".join(lines))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.on_server:
        return server_commands.cmd_verify_on_server(args)
    repo = open_repository(args)
    if args.sample is not None and not args.deep:
        raise UsageError("--sample goes with --deep (it picks the chunks to read)")
    report = run_verify(repo.catalog, repo, deep=args.deep, sample=args.sample,
                        volume=args.volume, progress=TerminalProgress("verify"))
    if report.marks_error:
        warn(f"damage marks not updated: {report.marks_error}")
    return print_verify(report.to_json(), json=args.json)


def register(sub: options.SubParsers) -> None:
    p = options.add_command(
        sub, "init", summary="create a repository",
        description="""
        Create an empty repository at --repo: a directory (made if missing, else it must be
        empty), an S3 bucket and prefix, or a repository on a snapship server. The chunk size
        is fixed for the repository's life. With encryption (the default) a random master key
        is wrapped by the passphrase (--passphrase-file, $SNAPSHIP_PASSPHRASE, or a prompt
        asked twice): nothing can be restored without it, so keep it safe.""",
        examples=["snapship init --repo /srv/backup/repo",
                  "snapship init --repo s3://backups/db1 --chunk-size 4M",
                  "snapship init --repo https://backup.example:8420/db1 --token-file db1.token",
                  "snapship init --repo /mnt/trusted/repo --encryption none"],
        parents=options.parents(repo=True, key=True))
    p.add_argument("--encryption", choices=ENCRYPTIONS, default=ENCRYPTION_AES_GCM,
                   help="how chunks and manifests are sealed (default: %(default)s)")
    p.add_argument("--chunk-size", type=options.chunk_size, default=str(DEFAULT_CHUNK_SIZE),
                   metavar="SIZE",
                   help="power of two from 64K to 16M (default: %(default)s bytes)")
    p.add_argument("--compression-level", type=options.whole(0, MAX_ZSTD_LEVEL),
                   default=DEFAULT_ZSTD_LEVEL, metavar="N",
                   help=f"zstd level for new chunks, 0 (off) to {MAX_ZSTD_LEVEL} "
                   "(default: %(default)s)")
    p.set_defaults(func=cmd_init, quiet_report=True)

    p = options.add_command(
        sub, "versions", summary="list versions",
        description="""
        List every version of every volume (or of one), oldest first: when it was made, its
        size, what it added to the repository, whether it is protected, and its labels. A
        version whose manifest cannot be read, or in which verify found damaged chunks, is
        listed as DAMAGED.""",
        examples=["snapship versions", "snapship versions --volume root --json",
                  "snapship --repo /srv/backup/repo versions"],
        parents=options.parents(repo=True, key=True))
    options.completes(p.add_argument("--volume", help="only this volume"), options.complete_volumes)
    p.set_defaults(func=cmd_versions)

    p = options.add_command(
        sub, "show", summary="details of one version",
        description="""
        Details of one version: when and from what it was made, its parent, its size, how
        much of it is zero, shared or new, what it costs in the repository, and its labels.
        VOLUME alone means its newest version; VOLUME@VERSION names one (a unique prefix of
        the id is enough).""",
        examples=["snapship show root", "snapship show root@20261126-0930 --json"],
        parents=options.parents(repo=True, key=True))
    options.completes(p.add_argument("version_ref", metavar="VOLUME[@VERSION]"),
                      options.complete_version_refs)
    p.set_defaults(func=cmd_show)

    p = options.add_command(
        sub, "verify", summary="check that every version is restorable",
        description="""
        Check that every version can be restored. The fast check makes sure that every chunk
        a version references exists with the right size; --deep also reads, decrypts and
        hashes each chunk (with --sample, a random share of them). Versions that use a bad
        chunk are marked damaged; the next backup that meets such a chunk stores it again, and
        a later deep verify clears the mark. Exit code 1 when something is wrong.""",
        examples=["snapship verify", "snapship verify --deep",
                  "snapship verify --deep --sample 5 --volume root   # a cheap spot check",
                  "snapship verify --on-server --deep --repo https://backup.example:8420/db1"],
        parents=options.parents(repo=True, key=True))
    p.add_argument("--deep", action="store_true", help="read, decrypt and hash every chunk")
    p.add_argument("--sample", type=options.percent, metavar="PERCENT",
                   help="with --deep: read only a random PERCENT (above 0, at most 100) of "
                   "the chunks")
    options.completes(p.add_argument("--volume", help="only versions of this volume"),
                      options.complete_volumes)
    server_commands.add_on_server_option(p)
    p.set_defaults(func=cmd_verify)
