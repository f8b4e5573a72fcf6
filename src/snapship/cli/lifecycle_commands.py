"""`snapship prune`, `forget`, `protect`, `unprotect`, `gc` and `locks`: the version lifecycle.

None of them needs the passphrase: they work from version names and the unencrypted reference
lists. gc uses the key only when one is at hand, to rebuild a missing reference list.
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Iterable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from snapship.cli import known_repos, options, reports, server_commands
from snapship.cli.context import open_storage, passphrase_configured, passphrase_source, vouch_for
from snapship.cli.output import warn
from snapship.cli.reports import emit, ref
from snapship.engine.prune import Policy, forget_versions, parse_duration, run_prune
from snapship.errors import AuthFailed, UsageError
from snapship.repository import locks
from snapship.repository.catalog import Catalog

if TYPE_CHECKING:
    from snapship.repository.repo import Repository

# gc's engine, the key's code (repo.py) and backup's module (parse_ref) are imported by the
# commands that use them: `locks` and `prune` start without them.


def open_keyless(args: argparse.Namespace) -> Catalog:
    """The repository without its key, after checking it holds a repository this snapship
    reads and that this machine knows it as it is."""
    catalog = Catalog(open_storage(args.repo, args))
    known_repos.check(catalog.config(), catalog.describe())
    return catalog


def _local_tz() -> dt.tzinfo | None:
    """Calendar periods (days, weeks) as the machine's clock shows them (TZ applies)."""
    return dt.datetime.now().astimezone().tzinfo


def cmd_prune(args: argparse.Namespace) -> int:
    policy = Policy(args.keep_last, args.keep_hourly, args.keep_daily, args.keep_weekly,
                    args.keep_monthly, args.keep_yearly,
                    parse_duration(args.keep_within) if args.keep_within else None)
    if policy.is_empty():
        raise UsageError("no retention rule given: use at least one --keep-* option")
    catalog = open_keyless(args)
    report = run_prune(catalog, policy, volume=args.volume, dry_run=args.dry_run,
                       tz=_local_tz() or dt.UTC, warn=warn)
    emit("prune", {
        "dry_run": args.dry_run,
        "volumes": {vol: [{"version_id": d.version, "ref": ref(vol, d.version), "keep": d.keep,
                           "reasons": d.reasons} for d in ds]
                    for vol, ds in report.decisions.items()},
        "forgotten": [ref(vol, d.version) for vol, ds in report.decisions.items() for d in ds
                      if not d.keep],
        "chunks_freeable": report.chunks_freeable,
        "bytes_freeable": report.bytes_freeable,
    }, reports.describe_prune, json=args.json)
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from snapship.cli.transfer_commands import parse_ref

    for name in args.version_refs:
        if "@" not in name:
            raise UsageError(f"{name}: name the version to forget (VOLUME@VERSION)")
    catalog = open_keyless(args)
    targets = _unique(catalog.resolve(parse_ref(r)) for r in args.version_refs)
    chunks, nbytes = forget_versions(catalog, targets, allow_newest=args.allow_newest,
                                     warn=warn)
    emit("forget", {"forgotten": [ref(v, n) for v, n in targets], "chunks_freeable": chunks,
                    "bytes_freeable": nbytes}, reports.describe_forget, json=args.json)
    return 0


def _unique(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The versions named, each once, in the order first named (`disk` and `disk@latest`
    are one)."""
    return list(dict.fromkeys(pairs))


def cmd_protect(args: argparse.Namespace) -> int:
    from snapship.cli.transfer_commands import parse_ref

    catalog = open_keyless(args)
    on = args.command == "protect"
    with catalog.exclusive(locks.PRUNE, args.command, warn):
        targets = _unique(catalog.resolve(parse_ref(r)) for r in args.version_refs)
        for vol, ver in targets:
            catalog.set_protected(vol, ver, on, args.note if on else "")
    names = [ref(vol, ver) for vol, ver in targets]
    body: dict[str, Any] = {"protected": names, "note": args.note} if on else \
        {"unprotected": names}
    emit(args.command, body, reports.describe_protect, json=args.json)
    return 0


def _key_if_at_hand(args: argparse.Namespace, catalog: Catalog) -> Repository | None:
    """The repository with its key, if that needs no prompt: gc can then rebuild a missing
    reference list instead of stopping."""
    from snapship.repository.repo import Repository

    if passphrase_configured(args):
        return vouch_for(Repository.open(catalog.storage, passphrase_source(args)), args)
    try:  # the storage already open, not a second backend (and connection pool) of its own
        return vouch_for(Repository.open(catalog.storage, None), args)
    except AuthFailed:  # encrypted, and no passphrase without a prompt
        return None


def cmd_gc(args: argparse.Namespace) -> int:
    if args.on_server:
        return server_commands.cmd_gc_on_server(args)
    from snapship.engine.gc import run_gc

    catalog = open_keyless(args)
    warnings: list[str] = []

    def note(message: str) -> None:
        warnings.append(message)
        warn(message)

    r = run_gc(catalog, repo=_key_if_at_hand(args, catalog), warn=note)
    reports.print_gc({**asdict(r), "warnings": warnings}, json=args.json)
    return 0


def cmd_locks(args: argparse.Namespace) -> int:
    catalog = open_keyless(args)
    found = catalog.list_locks(warn=None if args.clear_stale else warn)
    cleared: list[locks.LockInfo] = []
    if args.clear_stale:
        live = catalog.clear_stale(found, warn)
        cleared = [i for i in found if i not in live]
        found = live

    def rows(infos: list[locks.LockInfo]) -> list[dict[str, Any]]:
        return [reports.lock_row(i.kind, i.session, i.command, i.pid, i.machine, i.started,
                                 i.is_alive(), i.problem) for i in infos]

    emit("locks", {"locks": rows(found), "cleared": rows(cleared)}, reports.describe_locks,
         json=args.json)
    return 0


def _duration(text: str) -> str:
    """--keep-within: a duration above zero (checked here, parsed again by cmd_prune)."""
    try:
        d = parse_duration(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not (d.years or d.months or d.days or d.hours):
        raise argparse.ArgumentTypeError(f"{text!r} keeps nothing: give a duration above zero")
    return text


def register(sub: options.SubParsers) -> None:
    p = options.add_command(
        sub, "prune", summary="forget versions no retention rule keeps",
        description="""
        Apply retention rules to each volume and forget the versions no rule keeps, saying
        why each kept one is kept. Calendar periods are counted in local time, restic-style:
        --keep-daily 7 keeps the newest version of each of the last 7 days that have one. The
        newest version of a volume and protected versions are always kept. Prune only forgets:
        `snapship gc` then gives back the space. It needs no passphrase, and runs safely
        beside backups.""",
        examples=["snapship prune --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --dry-run",
                  "snapship prune --keep-last 2 --keep-within 30d",
                  "snapship prune --volume root --keep-hourly 24 && snapship gc"],
        parents=options.parents(repo=True))
    options.completes(p.add_argument("--volume", help="only this volume (default: every volume)"),
                      options.complete_volumes)
    for rule, what in (("last", "the N newest versions"),
                       ("hourly", "the newest version of each of the last N hours"),
                       ("daily", "... of each of the last N days"),
                       ("weekly", "... of each of the last N ISO weeks"),
                       ("monthly", "... of each of the last N months"),
                       ("yearly", "... of each of the last N years")):
        p.add_argument(f"--keep-{rule}", type=options.whole(1), default=0, metavar="N",
                       help=f"keep {what}")
    p.add_argument("--keep-within", metavar="DURATION", type=_duration,
                   help="keep every version less than DURATION (e.g. 7d, 2w, 6m, 1y) older "
                   "than the newest")
    p.add_argument("--dry-run", action="store_true", help="only say what would be forgotten")
    p.set_defaults(func=cmd_prune, quiet_report=True)

    p = options.add_command(
        sub, "forget", summary="forget named versions",
        description="""
        Forget the named versions, whatever the retention rules say. A protected version is
        refused (unprotect it first), and so is the newest version of a volume unless
        --allow-newest: it is what the next backup builds on. `snapship gc` then gives back
        the space.""",
        examples=["snapship forget root@20261126-0930",
                  "snapship forget old@2025 old@2024 --allow-newest"],
        parents=options.parents(repo=True))
    options.completes(p.add_argument("version_refs", nargs="+", metavar="VOLUME@VERSION"),
                      options.complete_version_refs)
    p.add_argument("--allow-newest", action="store_true",
                   help="allow forgetting the newest version of a volume")
    p.set_defaults(func=cmd_forget, quiet_report=True)

    for name, summary, description, example in (
        ("protect", "keep versions whatever prune's rules say",
         """Mark versions protected: prune keeps them whatever its rules say, and forget
         refuses them. VOLUME alone is its newest version.""",
         "snapship protect root@20261126-0930 --note 'audit 2026'"),
        ("unprotect", "let prune forget versions again",
         """Remove the protection of versions: prune's retention rules apply to them again,
         and forget may forget them. VOLUME alone is its newest version.""",
         "snapship unprotect root@20261126-0930"),
    ):
        p = options.add_command(sub, name, summary=summary, description=description,
                                examples=[example], parents=options.parents(repo=True))
        options.completes(p.add_argument("version_refs", nargs="+", metavar="VOLUME[@VERSION]"),
                          options.complete_version_refs)
        if name == "protect":
            p.add_argument("--note", default="", help="why (stored with the mark)")
        p.set_defaults(func=cmd_protect, quiet_report=True)

    p = options.add_command(
        sub, "gc", summary="delete chunks no version uses (safe beside running backups)",
        description="""
        Give back the space of chunks no version uses. Safe beside running backups: unused
        chunks are first set aside, and deleted only once every backup that was running has
        finished (chunks a backup used meanwhile are put back); on a quiet repository one run
        frees everything, else the next run does. A killed gc is harmless: run it again. With
        a passphrase at hand it can also rebuild a missing reference list. Exit code 75 when
        another gc or prune is running.""",
        examples=["snapship gc",
                  "snapship gc --on-server --repo https://backup.example:8420/db1"],
        parents=options.parents(repo=True, key=True))
    server_commands.add_on_server_option(p)
    p.set_defaults(func=cmd_gc, quiet_report=True)

    p = options.add_command(
        sub, "locks", summary="list running operations' locks",
        description="""
        List the locks of the backups, gc and prune runs working on the repository: what,
        since when, by which process on which machine, and whether it is still alive. A lock
        whose process is gone (killed, or its machine crashed) is stale; --clear-stale removes
        those.""",
        examples=["snapship locks", "snapship locks --clear-stale"],
        parents=options.parents(repo=True))
    p.add_argument("--clear-stale", action="store_true",
                   help="remove locks whose process is gone")
    p.set_defaults(func=cmd_locks)
