"""`snapship backup` and `snapship restore`."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import stat
import sys
from collections.abc import Iterator

from snapship.changes.lvm import Lvm
from snapship.changes.range_file import MAX_FILE_SIZE, parse_ranges
from snapship.cli import options
from snapship.cli.context import open_repository
from snapship.cli.output import TerminalProgress, warn
from snapship.cli.reports import describe_backup, describe_restore, emit, ref, version_detail
from snapship.devices import Source, remove_unfinished
from snapship.engine.backup import BackupPlan, Prepared, run_backup
from snapship.engine.known_zero import survey
from snapship.engine.restore import run_restore
from snapship.engine.snapshot_backup import SnapshotOptions, run_snapshot_backup
from snapship.errors import UsageError
from snapship.formats.manifest import Manifest, check_name
from snapship.types import ByteRange, VersionRef


def parse_labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"label {item!r} is not of the form key=value")
        labels[key] = value
    return labels


def default_volume_name(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", os.path.basename(source.rstrip("/"))) or "volume"


def read_changed_ranges(path: str) -> list[ByteRange]:
    """The list in file `path` (`-`: standard input): a regular file or a pipe, at most
    MAX_FILE_SIZE bytes. A device or a directory is refused before anything is read."""
    what = "standard input" if path == "-" else f"changed-ranges file {path}"
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_FILE_SIZE + 1)
        else:
            kind = _file_kind(os.stat(path).st_mode)
            if kind is not None:
                raise UsageError(f"{what} is {kind}, not a regular file or a pipe")
            # Blocking: a named pipe is read once its writer has opened it.
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_SIZE + 1)
        if len(data) > MAX_FILE_SIZE:
            raise UsageError(f"{what} is larger than {MAX_FILE_SIZE >> 20} MiB, the most a "
                             "changed-ranges list may hold")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {what}: {e}") from None
    return parse_ranges(text, what)


def _file_kind(mode: int) -> str | None:
    """None for what a changed-ranges list may be read from, else what it is instead."""
    if stat.S_ISREG(mode) or stat.S_ISFIFO(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "a socket" if stat.S_ISSOCK(mode) else "a special file"


def parse_ref(text: str) -> VersionRef:
    volume, _, version = text.partition("@")
    check_name("volume", volume)
    return VersionRef(volume, version or None)


def parse_lvm_source(source: str) -> tuple[str, str]:
    vg, sep, lv = source.removeprefix("lvm:").partition("/")
    if not sep or not vg or not lv or "/" in lv:
        raise UsageError(f"LVM source {source!r} is not of the form lvm:VG/LV")
    return vg, lv


def same_source(recorded: str, source: str) -> bool:
    """Whether a version recorded as taken from `recorded` came from `source`: the same
    text, or two paths to the same file (a symlink, /dev/vg/lv and /dev/mapper/vg-lv)."""
    if recorded == source:
        return True
    if recorded.startswith("lvm:") or source.startswith("lvm:"):
        return False
    if os.path.realpath(recorded) == os.path.realpath(source):
        return True
    try:
        return os.path.samefile(recorded, source)
    except OSError:
        return False


def check_volume_source(volume: str, source: str, base: Manifest | None, explicit: bool
                        ) -> None:
    """A volume is one history: a name derived from the file name that another source already
    uses is refused (two disk.img files must not silently become one volume); a name given
    with --volume is taken as meant, with a warning."""
    if base is None or same_source(base.source, source):
        return
    if explicit:
        warn(f"volume {volume} was last backed up from {base.source}; this version is of "
             f"{source}")
        return
    raise UsageError(f"volume {volume} already holds backups of {base.source}, not of {source}: "
                     f"give --volume NAME for a history of its own (or --volume {volume} to "
                     "continue that one)")


def cmd_backup(args: argparse.Namespace) -> int:
    lvm_source = parse_lvm_source(args.source) if args.source.startswith("lvm:") else None
    if args.volume is not None:
        volume = args.volume
    elif lvm_source:
        volume = ".".join(lvm_source)
    else:
        volume = default_volume_name(args.source)
    check_name("volume", volume)
    labels = parse_labels(args.label)
    if lvm_source:
        if args.changed_ranges:
            raise UsageError("--changed-ranges is for plain sources; LVM tracks its own changes")
        repo = open_repository(args)
        # One manifest read more than the backup itself makes (it loads its base under its
        # writer lock); a damaged newest version is reported by the backup, not here.
        check_volume_source(volume, f"lvm:{'/'.join(lvm_source)}",
                            repo.latest_manifest(volume, lambda _message: None),
                            args.volume is not None)
        m = run_snapshot_backup(
            repo,
            Lvm(),
            *lvm_source,
            volume,
            options=SnapshotOptions(args.snapshot_size, args.pre_snapshot, args.post_snapshot,
                                    skip_free=not args.no_skip_free),
            labels=labels,
            progress=TerminalProgress(f"backup {volume}"),
            warn=warn,
        )
        report_backup(args, m)
        return 0
    changed = read_changed_ranges(args.changed_ranges) if args.changed_ranges else None
    repo = open_repository(args)
    source_desc = os.path.abspath(args.source)
    explicit = args.volume is not None
    with Source(args.source) as source:

        @contextlib.contextmanager
        def prepare(base: Manifest | None) -> Iterator[Prepared]:
            check_volume_source(volume, source_desc, base, explicit)
            if changed is not None and base is None:
                raise UsageError(f"--changed-ranges needs an earlier version of {volume} to "
                                 "apply to")
            yield source, BackupPlan(changed, "ranges file" if changed is not None
                                     else "full read",
                                     known_zero=survey(source, skip_free=not args.no_skip_free,
                                                       warn=warn))

        m = run_backup(repo, prepare, volume, labels=labels, source_desc=source_desc,
                       progress=TerminalProgress(f"backup {volume}"), warn=warn)
    report_backup(args, m)
    return 0


def report_backup(args: argparse.Namespace, m: Manifest) -> None:
    """The new version as `show` describes it (it has no marks yet), and a line for people."""
    emit("backup", version_detail(m, None, None), describe_backup, json=args.json)


def cmd_restore(args: argparse.Namespace) -> int:
    repo = open_repository(args)
    volume, version = repo.resolve(parse_ref(args.version_ref))
    m = repo.load_manifest(volume, version)
    # A stopped restore (SIGINT, or SIGTERM as main makes it raise) removes its temporary file.
    try:
        stats = run_restore(repo, m, args.target, progress=TerminalProgress(f"restore {volume}"))
    finally:
        remove_unfinished()  # also one an exception struck before it could abort
    emit("restore", {
        "volume": volume,
        "version_id": version,
        "ref": ref(volume, version),
        "target": args.target,
        "size": stats.size,
        "chunks_written": stats.chunks_written,
        "chunks_zero": stats.chunks_zero,
        "duration": round(stats.duration, 3),
    }, describe_restore, json=args.json)
    return 0


def register(sub: options.SubParsers) -> None:
    p = options.add_command(
        sub, "backup", summary="back up a file or block device",
        description="""
        Back up a file, a block device or an LVM logical volume as a new version of a volume.
        Chunks the repository already holds are not stored again; with --changed-ranges, or
        for lvm:VG/LV (through a tracking snapshot), only what changed since the newest
        version is read. The volume name defaults to the source's file name (VG.LV for LVM);
        such a name whose newest version came from another source is refused (give --volume:
        a new name, or the same one to continue that history, with a warning).""",
        examples=["snapship backup /dev/vg0/root --volume root --label host=db1",
                  "snapship backup disk.img                       # volume disk.img",
                  "snapship backup lvm:vg0/root --snapshot-size 20%",
                  "snapship backup lvm:vg0/db --pre-snapshot 'mysql -e \"FLUSH TABLES\"'",
                  "snapship backup disk.img --changed-ranges list # docs/changed-ranges.md"],
        parents=options.parents(repo=True, key=True))
    p.add_argument("source", help="file or block device, or lvm:VG/LV (through a tracking "
                   "snapshot: only changed chunks are read)")
    options.completes(p.add_argument("--volume",
                                     help="volume name (default: the source's file name)"),
                      options.complete_volumes)
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="attach a label to the new version (repeatable)")
    p.add_argument("--changed-ranges", metavar="FILE",
                   help="read only these byte ranges, on top of the newest version "
                   "(docs/changed-ranges.md; - for stdin)")
    p.add_argument("--no-skip-free", action="store_true",
                   help="read the free space of a clean ext4/XFS filesystem too (by default "
                   "it is recorded as zeroes without being read: docs/free-space.md)")
    p.add_argument("--snapshot-size", default="10%", metavar="SIZE",
                   type=options.snapshot_size,
                   help="lvm: classic snapshot size, N%% of the origin or e.g. 2G "
                   "(default: %(default)s)")
    p.add_argument("--pre-snapshot", metavar="CMD",
                   help="lvm: shell command run just before the snapshot (flush an application)")
    p.add_argument("--post-snapshot", metavar="CMD",
                   help="lvm: shell command run just after it, also if it failed")
    p.set_defaults(func=cmd_backup, quiet_report=True)

    p = options.add_command(
        sub, "restore", summary="restore a version to a file or device",
        description="""
        Write a version to a file or a block device. A device is opened exclusively (refused
        while mounted or otherwise in use) and written in place, zero chunks as zeroes. A file
        is written sparse to a temporary file beside it and renamed over it only when
        complete: a restore that fails or is stopped leaves an existing file as it was.""",
        examples=["snapship restore root restored.img               # the newest version",
                  "snapship restore root@20261126-0930 /dev/vg0/restore",
                  "snapship restore root@2026112 disk.img          # a unique id prefix"],
        parents=options.parents(repo=True, key=True))
    options.completes(p.add_argument("version_ref", metavar="VOLUME[@VERSION]",
                                     help="version id, unique prefix, or 'latest' (the "
                                     "default)"), options.complete_version_refs)
    p.add_argument("target", help="file (written sparse beside it, then renamed over it) or "
                   "block device (refused while mounted or in use)")
    p.set_defaults(func=cmd_restore, quiet_report=True)
