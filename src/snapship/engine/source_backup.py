"""A backup as a user names it: a source (a file, a device or `lvm:VG/LV`) into a volume.

What `snapship backup` and a declared job (`snapship run`) share: choosing the LVM snapshot
workflow or a plain read, and keeping a volume one history (a source other than the one its
newest version came from is refused, or only warned about when the volume was named on
purpose).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

from snapship.changes.lvm import Lvm
from snapship.devices import Source, incomplete_restore
from snapship.engine.backup import BackupPlan, Prepared, run_backup
from snapship.engine.known_zero import survey
from snapship.engine.progress import Progress
from snapship.engine.snapshot_backup import SnapshotOptions, run_snapshot_backup
from snapship.errors import UsageError
from snapship.formats.manifest import Manifest
from snapship.repository.repo import Repository
from snapship.types import ByteRange

Warn = Callable[[str], None]


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


def check_volume_source(volume: str, source: str, base: Manifest | None, explicit: bool,
                        warn: Warn) -> None:
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


def backup_source(
    repo: Repository,
    source: str,
    volume: str,
    *,
    explicit_volume: bool,
    lvm: Lvm,
    labels: dict[str, str] | None = None,
    changed: Sequence[ByteRange] | None = None,
    snapshot: SnapshotOptions | None = None,
    skip_free: bool = True,
    progress: Progress | None = None,
    warn: Warn = lambda message: None,
) -> Manifest:
    """Back up `source` as a new version of `volume`: `lvm:VG/LV` through its tracking
    snapshot, anything else read as it is (with `changed`: only those ranges, on top of the
    newest version). Holes of a file are never read; with `skip_free`, neither is the free
    space of a clean file system on a plain source (the snapshot options say it for LVM)."""
    if source.startswith("lvm:"):
        vg, lv = parse_lvm_source(source)
        if changed is not None:
            raise UsageError("--changed-ranges is for plain sources; LVM tracks its own changes")
        # One manifest read more than the backup itself makes (it loads its base under its
        # writer lock); a damaged newest version is reported by the backup, not here.
        check_volume_source(volume, f"lvm:{vg}/{lv}",
                            repo.latest_manifest(volume, lambda _message: None),
                            explicit_volume, warn)
        return run_snapshot_backup(repo, lvm, vg, lv, volume,
                                   options=snapshot or SnapshotOptions(), labels=labels,
                                   progress=progress, warn=warn)
    source_desc = os.path.abspath(source)
    with Source(source) as reader:
        half = incomplete_restore(reader.read(0, min(512, reader.size)))
        if half is not None:
            warn(f"source {source} holds an incomplete restore of {half} (stopped before it "
                 "finished): its first chunk is a marker, not data, and the rest is partly "
                 "old; this backup keeps it as it is")

        @contextlib.contextmanager
        def prepare(base: Manifest | None) -> Iterator[Prepared]:
            check_volume_source(volume, source_desc, base, explicit_volume, warn)
            if changed is not None and base is None:
                raise UsageError(f"--changed-ranges needs an earlier version of {volume} to "
                                 "apply to")
            yield reader, BackupPlan(changed, "ranges file" if changed is not None
                                     else "full read",
                                     known_zero=survey(reader, skip_free=skip_free, warn=warn))

        return run_backup(repo, prepare, volume, labels=labels, source_desc=source_desc,
                          progress=progress, warn=warn)
