"""`snapship copy`: copy versions from one repository to another (offsite replication).

Both repositories are opened with their own credentials (the source's from `--from-*`
options, the destination's from the usual ones); engine/copy.py does the work as a writer at
the destination, so a `backup`-role token there is enough, and that token cannot delete what
is already there.
"""

from __future__ import annotations

import argparse

from snapship.cli import options
from snapship.cli.context import open_repository, source_args
from snapship.cli.output import TerminalProgress, human_bytes, warn
from snapship.cli.reports import Report, emit
from snapship.cli.transfer_commands import parse_ref
from snapship.engine.copy import copy_versions, versions_to_copy
from snapship.errors import UsageError


def cmd_copy(args: argparse.Namespace) -> int:
    destination = args.to or args.repo
    if not destination:
        raise UsageError("no destination given: use --to REPO (or --repo, $SNAPSHIP_REPO)")
    src = open_repository(source_args(args, args.source))
    dst_args = argparse.Namespace(**vars(args))
    dst_args.repo = destination
    dst = open_repository(dst_args)
    if src.config.repo_id == dst.config.repo_id:
        raise UsageError("--from and --to are the same repository")
    refs = [(r.volume, r.version) for r in map(parse_ref, args.versions)]
    todo = list(versions_to_copy(src, refs))
    report = copy_versions(src, dst, todo, progress=TerminalProgress("copy"), warn=warn)
    emit("copy", report.to_json(), describe_copy, json=args.json)
    return 0


def describe_copy(r: Report) -> list[str]:
    lines = [f"copied {ref}" for ref in r["copied"]]
    lines.append(
        f"{len(r['copied'])} version(s) copied, {len(r['present'])} already there ({r['mode']}"
        f"): sent {r['chunks_sent']} chunks ({human_bytes(r['bytes_sent'])}), "
        f"{r['chunks_present']} were there, read {human_bytes(r['bytes_read'])} in "
        f"{r['duration']:.1f} s")
    return lines


def register(sub: options.SubParsers) -> None:
    p = options.add_command(
        sub, "copy", summary="copy versions to another repository",
        description="""
        Copy versions from the repository --from to the repository --to (a directory, S3
        or a snapship server, either way): every version of the volumes named (VOLUME), or
        one version (VOLUME@VERSION), or, with none named, every version. Only chunks the
        destination lacks are sent, and a version it has already is skipped, so a copy that
        was stopped continues where it was, and a second run sends nothing. The copy runs
        as a writer at the destination: its gc may run meanwhile, and a backup-role token
        there is enough (it cannot delete anything at the destination).

        A destination made with `init --copy-key-from SOURCE` shares the source's keys:
        chunks travel as they are stored, without being decrypted. Otherwise each chunk is
        decrypted and sealed again with the destination's key (at the same chunk size).
        The destination's credentials are the usual ones (--token-file, --passphrase-file,
        ...); the source's are --from-token-file and --from-passphrase-file/-command, by
        default the same.""",
        examples=["snapship copy --from /srv/backup/repo --to https://offsite:8420/db1 "
                  "--token-file offsite.token",
                  "snapship copy --from /srv/backup/repo --to s3://offsite/db1 root@latest",
                  "snapship copy --from s3://a/db1 --to /mnt/usb/repo --from-passphrase-file "
                  "a.pass --limit-download 20M"],
        parents=options.parents(repo=True, key=True))
    p.add_argument("--from", dest="source", metavar="REPO", required=True,
                   help="the repository to copy from")
    p.add_argument("--to", metavar="REPO", help="the repository to copy to (default: --repo)")
    options.add_source_options(p, "source")
    options.completes(p.add_argument("versions", nargs="*", metavar="VOLUME[@VERSION]",
                                     help="what to copy (default: every version)"),
                      options.complete_version_refs)
    p.set_defaults(func=cmd_copy, quiet_report=True)
