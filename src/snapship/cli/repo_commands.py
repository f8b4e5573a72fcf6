"""`snapship init`, `versions`, `show` and `verify`: creating and inspecting a repository."""

from __future__ import annotations

import argparse
import os
from typing import Any

from snapship.cli import against_commands, known_repos, options, reports, server_commands
from snapship.cli.context import open_repository, open_storage, passphrase_source, source_args
from snapship.cli.output import TerminalProgress, warn
from snapship.cli.reports import emit
from snapship.cli.transfer_commands import parse_ref
from snapship.engine.verify import run_verify
from snapship.errors import NotFound, SnapshipError, UsageError
from snapship.formats.constants import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_ZSTD_LEVEL,
    ENCRYPTION_AES_GCM,
    ENCRYPTIONS,
    MAX_ZSTD_LEVEL,
)
from snapship.repository.catalog import Catalog
from snapship.repository.repo import Repository
from snapship.storage.base import Storage
from snapship.storage.local import TMP_PREFIX, LocalStorage


class _Given(argparse.Action):
    """Stores the value and notes that it was given (`chunk_size_given`)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.chunk_size_given = True


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
    master, chunk_size = None, args.chunk_size
    if args.copy_key_from:
        # Share the source's keys (and so its chunk ids and sealed chunks, docs/format.md):
        # `copy` between the two then moves chunks without decrypting them.
        src = open_repository(source_args(args, args.copy_key_from))
        if src.keys is None:
            raise UsageError(f"{src.storage.describe()} is not encrypted: it has no key to "
                             "share (chunks of two unencrypted repositories with the same "
                             "chunk size are copied as they are anyway)")
        if args.encryption != src.config.encryption:
            raise UsageError(f"--copy-key-from needs --encryption {src.config.encryption}")
        if args.chunk_size_given and args.chunk_size != src.chunk_size:
            raise UsageError(f"--chunk-size {args.chunk_size} is not the chunk size of "
                             f"{src.storage.describe()} ({src.chunk_size}), which a shared key "
                             "needs")
        master, chunk_size = src.keys.master, src.chunk_size
    repo = Repository.create(
        storage,
        encryption=args.encryption,
        chunk_size=chunk_size,
        compression_level=args.compression_level,
        passphrase=passphrase_source(args, confirm=True),
        master=master,
    )
    # This machine knows it from now on: a config edited later to say otherwise is refused.
    known_repos.remember(repo.config, repo.storage.describe())
    emit("init", {
        "repository": repo.storage.describe(),
        "repository_id": repo.config.repo_id,
        "chunk_size": repo.chunk_size,
        "encryption": repo.config.encryption,
        "compression_level": repo.config.compression_level,
    }, reports.describe_init, json=args.json)
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    """Lists every version with its marks, from the versions' summaries (a few hundred bytes
    each); a version without one is read from its manifest, and the listing says how many
    were. A manifest that cannot be read, or whose stored size is not the one its summary
    recorded, is listed as such (with the date its id gives), not fatal. Damage is reported,
    not an error: exit 0."""
    repo = open_repository(args)
    rows: list[dict[str, Any]] = []
    damage = repo.catalog.damaged()
    shielded = repo.catalog.protected()
    from_manifests = 0
    for (volume, version), stored in repo.catalog.manifest_sizes(args.volume).items():
        s, problem = None, None
        try:
            s, read_manifest = repo.summary(volume, version, stored, warn)
            from_manifests += read_manifest
        except NotFound:
            continue  # forgotten meanwhile
        except SnapshipError as e:
            problem = str(e)
        note = (repo.catalog.protection_note(volume, version)
                if (volume, version) in shielded else None)
        rows.append(reports.version_row(volume, version, s, problem,
                                        damage.get((volume, version)), note))
    if from_manifests:
        warn(f"{from_manifests} version(s) have no readable summary (written before summaries "
             "existed, or interrupted just before it): listed from their manifests, which is "
             "slow for large volumes")
    emit("versions", {"versions": rows}, reports.describe_versions, json=args.json)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    repo = open_repository(args)
    volume, version = repo.resolve(parse_ref(args.version_ref))
    s, _ = repo.summary(volume, version, warn=warn)
    info = reports.version_detail(s, repo.catalog.damage_mark(volume, version),
                                  repo.catalog.protection_note(volume, version))
    emit("show", info, reports.describe_version, json=args.json)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    against_commands.check_usage(args)
    if args.against is not None:
        return against_commands.cmd_verify_against(args)
    if args.on_server:
        return server_commands.cmd_verify_on_server(args)
    repo = open_repository(args)
    if args.sample is not None and not args.deep:
        raise UsageError("--sample goes with --deep (it picks the chunks to read)")
    report = run_verify(repo.catalog, repo, deep=args.deep, sample=args.sample,
                        volume=args.volume, progress=TerminalProgress("verify"))
    if report.marks_error:
        warn(f"damage marks not updated: {report.marks_error}")
    return reports.print_verify(report.to_json(), json=args.json)


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
                   metavar="SIZE", action=_Given,
                   help="power of two from 64K to 16M (default: %(default)s bytes; with "
                   "--copy-key-from, the source's)")
    p.add_argument("--copy-key-from", metavar="REPO",
                   help="share the master key (and chunk size) of the encrypted repository "
                   "REPO, opened with --from-passphrase-file/-command (default: the same "
                   "passphrase), so that `snapship copy` between the two sends chunks "
                   "without decrypting them; whoever can open one can read both")
    options.add_source_options(p, "repository of --copy-key-from")
    p.add_argument("--compression-level", type=options.whole(0, MAX_ZSTD_LEVEL),
                   default=DEFAULT_ZSTD_LEVEL, metavar="N",
                   help=f"zstd level for new chunks, 0 (off) to {MAX_ZSTD_LEVEL} "
                   "(default: %(default)s)")
    p.set_defaults(func=cmd_init, quiet_report=True, chunk_size_given=False)

    p = options.add_command(
        sub, "versions", summary="list versions",
        description="""
        List every version of every volume (or of one), oldest first: when it was made, its
        size, what it added to the repository, whether it is protected (and why), and its
        labels. A version in which verify found damaged chunks is listed as DAMAGED, one
        whose manifest cannot be read as UNREADABLE (with the date its id says); neither is
        an error (exit 0: `snapship verify` exits 1 for damage).""",
        examples=["snapship versions", "snapship versions --volume root --json",
                  "snapship --repo /srv/backup/repo versions"],
        parents=options.parents(repo=True, key=True))
    options.completes(p.add_argument("--volume", help="only this volume"), options.complete_volumes)
    p.set_defaults(func=cmd_versions)

    p = options.add_command(
        sub, "show", summary="details of one version",
        description="""
        Details of one version: when and from what it was made, its parent, its size, how
        much of it is zero, shared or new, what it costs in the repository, whether it is
        protected (with the note given to `protect`) or marked damaged, and its labels.
        VOLUME alone means its newest version; VOLUME@VERSION names one (a unique prefix of
        the id, latest~N, or a local date or time such as 2026-12-01T08:00).""",
        examples=["snapship show root", "snapship show root@20261126-0930 --json",
                  "snapship show root@latest~1          # the version before the newest",
                  "snapship show root@2026-12-01        # the newest made on or before Dec 1"],
        parents=options.parents(repo=True, key=True))
    options.completes(p.add_argument("version_ref", metavar="VOLUME[@VERSION]",
                                     help=options.VERSION_HELP),
                      options.complete_version_refs)
    p.set_defaults(func=cmd_show)

    p = options.add_command(
        sub, "verify", summary="check that every version is restorable",
        description="""
        Check that every version can be restored. The fast check makes sure that every chunk
        a version references exists with the right size; --deep also reads, decrypts and
        hashes each chunk (with --sample, a random share of them). Versions that use a bad
        chunk are marked damaged; the next backup that meets such a chunk stores it again, and
        a later deep verify clears the mark. Exit code 1 when something is wrong.
        VOLUME[@VERSION] --against PATH|lvm:VG/LV instead compares that version with a live
        device, snapshot or image chunk by chunk (hashes only, nothing fetched) and lists the
        chunks that differ (exit code 1 if any do).""",
        examples=["snapship verify", "snapship verify --deep",
                  "snapship verify root@latest --against lvm:vg0/root-snap   # after a backup",
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
    options.completes(p.add_argument("version_ref", nargs="?", metavar="VOLUME[@VERSION]",
                                     help="with --against: the version to compare; "
                                     + options.VERSION_HELP),
                      options.complete_version_refs)
    p.add_argument("--against", metavar="PATH|lvm:VG/LV",
                   help="compare the version with this file, device or logical volume")
    p.set_defaults(func=cmd_verify)
