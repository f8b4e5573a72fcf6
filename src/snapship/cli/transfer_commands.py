"""`snapship backup` and `snapship restore`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import stat
import sys
from typing import TYPE_CHECKING

from snapship.cli import instant_commands, options
from snapship.cli.context import open_repository
from snapship.cli.output import TerminalProgress, warn
from snapship.cli.reports import describe_backup, describe_restore, emit, ref, version_detail
from snapship.devices import STDOUT
from snapship.errors import UsageError
from snapship.formats.manifest import Manifest, check_name
from snapship.types import ByteRange, VersionRef

# The engines (and the file-system, COW and thin parsers under them, ~70 modules) load only
# once a backup or a plain restore runs: the commands that take parse_ref from here, and an
# instant restore, whose start must be quick (under emulation each module costs ~0.1 s),
# do not need them.
if TYPE_CHECKING:
    from snapship.engine.restore import RestoreStats
    from snapship.repository.repo import Repository



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
    from snapship.changes.range_file import MAX_FILE_SIZE, parse_ranges

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


def parse_lvm_source(text: str) -> tuple[str, str]:
    from snapship.engine.source_backup import parse_lvm_source as parse

    return parse(text)


def cmd_backup(args: argparse.Namespace) -> int:
    from snapship.changes.lvm import Lvm
    from snapship.engine.snapshot_backup import SnapshotOptions
    from snapship.engine.source_backup import backup_source

    lvm_source = parse_lvm_source(args.source) if args.source.startswith("lvm:") else None
    if args.volume is not None:
        volume = args.volume
    elif lvm_source:
        volume = ".".join(lvm_source)
    else:
        volume = default_volume_name(args.source)
    check_name("volume", volume)
    labels = parse_labels(args.label)
    if lvm_source and args.changed_ranges:
        raise UsageError("--changed-ranges is for plain sources; LVM tracks its own changes")
    if args.snapshot_pv and not lvm_source:
        raise UsageError("--snapshot-pv is for lvm:VG/LV sources")
    changed = read_changed_ranges(args.changed_ranges) if args.changed_ranges else None
    repo = open_repository(args)
    m = backup_source(
        repo, args.source, volume, explicit_volume=args.volume is not None, lvm=Lvm(),
        labels=labels, changed=changed,
        snapshot=SnapshotOptions(args.snapshot_size, args.pre_snapshot, args.post_snapshot,
                                 skip_free=not args.no_skip_free,
                                 pvs=tuple(args.snapshot_pv)),
        skip_free=not args.no_skip_free,
        progress=TerminalProgress(f"backup {volume}"), warn=warn)
    report_backup(args, m)
    return 0


def report_backup(args: argparse.Namespace, m: Manifest) -> None:
    """The new version as `show` describes it (it has no marks yet), and a line for people."""
    emit("backup", version_detail(m, None, None), describe_backup, json=args.json)


def check_restore_options(args: argparse.Namespace) -> None:
    """The usage errors of `restore`, found before the repository is opened."""
    lvm_target = args.target.startswith("lvm:")
    if args.target == STDOUT:
        if args.json:
            raise UsageError("--json cannot go with -: standard output carries the image")
        if args.differential:
            raise UsageError("--differential needs a target to read: a file or a device, "
                             "not -")
    if not lvm_target and (args.rollback or args.thin_pool is not None or args.pv):
        raise UsageError(f"{'--rollback' if args.rollback else '--thin-pool and --pv'} "
                         "need the target to be lvm:VG/LV")
    if args.rollback and (args.differential or args.thin_pool is not None or args.pv):
        raise UsageError("--rollback does not go with --differential, --thin-pool or --pv")
    if lvm_target:
        parse_lvm_source(args.target)


def restore_into_lvm(args: argparse.Namespace, repo: Repository, m: Manifest,
                     progress: TerminalProgress) -> tuple[RestoreStats, dict[str, object]]:
    """`restore ... lvm:VG/LV` (with --rollback or not): the stats and the report's extras."""
    from snapship.changes.lvm import Lvm
    from snapship.engine.lvm_restore import LvPlacement, restore_to_lv, rollback_lv

    vg, lv = parse_lvm_source(args.target)
    if args.rollback:
        done = rollback_lv(repo, m, Lvm(), vg, lv, progress=progress, warn=warn)
    else:
        done = restore_to_lv(repo, m, Lvm(), vg, lv, force=args.force,
                             placement=LvPlacement(args.thin_pool, tuple(args.pv)),
                             differential=args.differential, progress=progress, warn=warn)
    extra: dict[str, object] = {"lv": {"device": done.device, "created": done.created}}
    if done.rollback is not None:
        extra["rollback"] = dataclasses.asdict(done.rollback)
    return done.stats, extra


def cmd_restore(args: argparse.Namespace) -> int:
    if instant_commands.requested(args):
        return instant_commands.run_instant(args)
    check_restore_options(args)
    from snapship.devices import remove_unfinished
    from snapship.engine.restore import run_restore

    repo = open_repository(args)
    volume, version = repo.resolve(parse_ref(args.version_ref))
    m = repo.load_manifest(volume, version)
    progress = TerminalProgress(f"restore {volume}")
    extra: dict[str, object] = {}
    if args.target.startswith("lvm:"):
        stats, extra = restore_into_lvm(args, repo, m, progress)
    else:
        # A stopped restore (SIGINT, or SIGTERM as main makes it raise) removes its
        # temporary file.
        try:
            stats = run_restore(repo, m, args.target, progress=progress, force=args.force,
                                differential=args.differential, warn=warn)
        finally:
            remove_unfinished()  # also one an exception struck before it could abort
    report_restore(args, m, stats, extra)
    return 0


def report_restore(args: argparse.Namespace, m: Manifest, stats: RestoreStats,
                   extra: dict[str, object]) -> None:
    report: dict[str, object] = {
        "volume": m.volume,
        "version_id": m.version,
        "ref": ref(m.volume, m.version),
        "target": args.target,
        "mode": stats.mode,
        "size": stats.size,
        "chunks": stats.chunks,
        "chunks_compared": stats.chunks_compared,
        "chunks_fetched": stats.chunks_written,
        "bytes_fetched": stats.bytes_fetched,
        "chunks_written": stats.chunks_written,
        "chunks_zero": stats.chunks_zero,
        "duration": round(stats.duration, 3),
        **extra,
    }
    # The image went to standard output: the report for people goes to stderr instead.
    to_stderr = args.target == STDOUT
    with contextlib.redirect_stdout(sys.stderr) if to_stderr else contextlib.nullcontext():
        emit("restore", report, describe_restore, json=args.json)


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
                  "snapship backup lvm:vg0/root --snapshot-size auto  # docs/snapspace.md",
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
                   help="lvm: classic snapshot size, N%% of the origin, e.g. 2G, or auto "
                   "(from the space earlier snapshots used, with headroom: docs/snapspace.md)"
                   " (default: %(default)s)")
    p.add_argument("--snapshot-pv", action="append", default=[], metavar="PV",
                   help="lvm: put the classic snapshot on this PV (repeatable; default: the "
                   "VG's snapshot space if it has any, else anywhere in the VG)")
    p.add_argument("--pre-snapshot", metavar="CMD",
                   help="lvm: shell command run just before the snapshot (flush an application)")
    p.add_argument("--post-snapshot", metavar="CMD",
                   help="lvm: shell command run just after it, also if it failed")
    p.set_defaults(func=cmd_backup, quiet_report=True)

    p = options.add_command(
        sub, "restore", summary="restore a version to a file, device or pipe",
        description="""
        Write a version to a file, a block device, or standard output (-). A device is opened
        exclusively (refused while mounted or otherwise in use, even with --force), refused
        if it carries a file system, partition table or other signature (as blkid finds it)
        unless --force is given, and written in place, zero chunks as zeroes, its first chunk
        last: until the restore is complete that chunk is blank, so a stopped restore leaves
        a device that does not mount (and says it is incomplete). A target larger than the
        version is warned about: its tail keeps its old data. A file is written sparse to a
        temporary file beside it and renamed over it only when complete: a restore that
        fails or is stopped leaves an existing file as it was. With --differential, an
        existing copy (file or device) is read and hashed chunk by chunk, and only the chunks
        that differ are fetched and written, in place. A target lvm:VG/LV that does not
        exist is created at the version's size (--thin-pool POOL: thin; else linear, on --pv
        PV... if given) and removed again if the restore fails. --rollback restores a version
        onto the LV it was backed up from in O(changed), through the tracking snapshot of the
        newest version: only the chunks written since that backup and those where the version
        differs from the newest are fetched and written (a later backup stays incremental).""",
        examples=["snapship restore root restored.img               # the newest version",
                  "snapship restore root@20261126-0930 /dev/vg0/restore",
                  "snapship restore root@2026112 disk.img          # a unique id prefix",
                  "snapship restore root@latest~2 disk.img         # two before the newest",
                  "snapship restore root@2026-12-01T08:00 disk.img # newest at or before then",
                  "snapship restore root - | ssh host 'cat > root.img'   # zeroes included",
                  "snapship restore --force root /dev/sdb          # over an old file system",
                  "snapship restore --differential root@latest~1 copy.img  # only what differs",
                  "snapship restore root lvm:vg0/root-restored     # a new linear LV",
                  "snapship restore root lvm:vg0/new --thin-pool pool0   # a new thin LV",
                  "snapship restore --rollback root@latest~1 lvm:vg0/root  # O(changed)"],
        parents=options.parents(repo=True, key=True))
    options.completes(p.add_argument("version_ref", metavar="VOLUME[@VERSION]",
                                     help=options.VERSION_HELP),
                      options.complete_version_refs)
    p.add_argument("target", help="file (written sparse beside it, then renamed over it), "
                   "block device (refused while mounted or in use), lvm:VG/LV (created if "
                   "missing), or - for standard output")
    p.add_argument("--force", action="store_true",
                   help="overwrite a device that carries a file system or other signature "
                   "(never one that is mounted or in use)")
    p.add_argument("--differential", action="store_true",
                   help="TARGET holds an earlier copy: read and hash it, fetch and write only "
                   "the chunks that differ (in place)")
    p.add_argument("--rollback", action="store_true",
                   help="lvm:VG/LV is the volume's own origin, its tracking snapshot still "
                   "there: write only what changed since the last backup and where the "
                   "version differs from the newest (no --force needed; never while mounted)")
    p.add_argument("--thin-pool", metavar="POOL",
                   help="lvm:VG/LV that does not exist: create it as a thin LV in POOL "
                   "(default: a linear LV)")
    p.add_argument("--pv", nargs="+", action="extend", default=[], metavar="PV",
                   help="lvm:VG/LV that does not exist: place the new linear LV on these "
                   "physical volumes (give it last, or once per PV)")
    instant_commands.add_instant_options(p)
    p.set_defaults(func=cmd_restore, quiet_report=True)
