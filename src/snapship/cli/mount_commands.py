"""`snapship mount` and `snapship umount`: a version's file system, mounted read-only.

The mount process serves the version on a private unix socket (nbd/inprocess.py), attaches it
with the kernel's NBD client (/dev/nbdN) where the nbd module exists, else with nbdfuse (a
FUSE file) plus a loop device, and mounts the file system (a partition of it with
--partition: a loop device at the partition's offset, from the table partx reads). It stays
in the background (or in the foreground with --foreground) until `snapship umount DIR`, or
SIGTERM, or Ctrl-C.

That nothing stays attached rests on the state record (cli/service.py, docs/mount.md): it is
written before each device or process is attached and names all of them, so `umount` tears
down what a killed mount process left (unmount, loop devices on the image, the NBD device or
nbdfuse, the runtime directory), step by step, each step doing nothing if already undone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from snapship import attach
from snapship.cli import options, service
from snapship.cli.context import open_repository
from snapship.cli.output import warn
from snapship.cli.reports import emit, ref
from snapship.cli.signals import Terminated
from snapship.cli.transfer_commands import parse_ref
from snapship.errors import NotFound, UsageError
from snapship.nbd.inprocess import ThreadedServer
from snapship.nbd.names import ExportNames
from snapship.nbd.server import ServerOptions

RECORD_FORMAT = "snapship mount"
RECORD_KIND = "mounts"
SOCKET = "nbd.sock"

# Read-only mounts of a file system that was in use when it was backed up: its journal must
# not be replayed (that would write), so these options leave it as the version holds it.
NO_REPLAY = {"xfs": ["norecovery"], "ext4": ["noload"], "ext3": ["noload"]}


def record_path(directory: str) -> Path:
    return service.record_dir(RECORD_KIND) / f"{service.record_name(directory)}.json"


def _directory(text: str) -> str:
    path = os.path.realpath(text)
    if not os.path.isdir(path):
        raise UsageError(f"mount point {text} is not a directory")
    return path


class Mounted:
    """One mount: the record and the steps that build and undo it."""

    def __init__(self, record: dict[str, Any], path: Path) -> None:
        self.record = record
        self.path = path

    def save(self, **changes: Any) -> None:
        self.record.update(changes)
        service.save_record(self.path, self.record)

    def teardown(self, server: ThreadedServer | None = None) -> None:
        """Undo every step the record names, newest first; each is a no-op once undone."""
        r = self.record
        if r.get("mounted"):
            attach.unmount(r["directory"])  # busy: an AttachError, nothing else undone
            self.save(mounted=False)
        image = r.get("image")
        if image:
            for loop in attach.loops_backed_by(image):
                attach.detach_loop(loop)
            # A loop that mount(8) made is freed when the unmount closes it, by the kernel's
            # workqueue: wait for that before the FUSE file under it can be unmounted.
            attach.wait_for(lambda: not attach.loops_backed_by(image),
                            f"the loop devices on {image} going away")
        if r.get("nbd_device"):
            attach.nbd_disconnect(r["nbd_device"])
        if r.get("fuse_dir"):
            attach.stop_nbdfuse(r["fuse_dir"], r.get("fuse_pid"), r.get("fuse_start"))
        if server is not None:
            server.close()
        if r.get("runtime_dir"):
            shutil.rmtree(r["runtime_dir"], ignore_errors=True)
        service.remove_record(self.path)


def cmd_mount(args: argparse.Namespace) -> int:
    directory = _directory(args.directory)
    path = record_path(directory)
    existing = service.load_record(path, RECORD_FORMAT)
    if existing is not None:
        state = "in use" if attach.alive(existing["pid"], existing.get("pid_start")) else \
            "left by a mount process that was stopped"
        raise UsageError(f"{directory} has a snapship mount record ({state}): run "
                         f"'snapship umount {directory}' first")
    if attach.mounted_at(directory) is not None:
        raise UsageError(f"something is already mounted on {directory}")
    if args.foreground:
        def show(report: service.Report) -> None:
            emit("mount", report, describe_mount, json=args.json, one_line=True)
            sys.stdout.flush()

        return _run_mount(args, directory, path, show)
    report = service.run_in_background(lambda ready: _run_mount(args, directory, path, ready),
                                       path.with_suffix(".log"))
    emit("mount", report, describe_mount, json=args.json, one_line=True)
    return 0


def _choose_client(wanted: str) -> str:
    if wanted == "kernel" or (wanted == "auto" and attach.kernel_nbd_available()):
        if wanted == "kernel" and not attach.kernel_nbd_available():
            raise UsageError("--client kernel: this kernel has no nbd module (/dev/nbd*)")
        return "kernel"
    return "fuse"


def _run_mount(args: argparse.Namespace, directory: str, path: Path,
               ready: service.Ready) -> int:  # fmt: skip
    repo = open_repository(args)
    volume, version = repo.resolve(parse_ref(args.version_ref))
    manifest = repo.load_manifest(volume, version)
    client = _choose_client(args.client)
    export = ref(volume, version)
    server = ThreadedServer(ExportNames(repo, read_only=not args.writable),
                            ServerOptions(writable=args.writable))
    runtime = tempfile.mkdtemp(prefix="snapship-mount.")
    pid = os.getpid()
    mounted = Mounted({"format": RECORD_FORMAT, "directory": directory, "pid": pid,
                       "pid_start": attach.process_start(pid), "export": export,
                       "client": client, "runtime_dir": runtime, "writable": args.writable},
                      path)
    mounted.save()
    try:
        socket_path = os.path.join(runtime, SOCKET)
        server.start(socket_path)
        image = _attach(mounted, client, socket_path, export, args.writable)
        offset, size = 0, manifest.size
        if args.partition is not None:
            offset, size = _partition(image, args.partition)
        fstype = attach.filesystem_type(image, offset)
        if fstype is None:
            where = f"partition {args.partition} of {export}" if args.partition else export
            hint = "" if args.partition else " (a disk image? give --partition N)"
            raise UsageError(f"no file system found on {where}{hint}")
        opts = ["rw"] if args.writable else ["ro", *NO_REPLAY.get(fstype, [])]
        if client == "fuse" or args.partition is not None:
            opts += ["loop", f"offset={offset}", f"sizelimit={size}"]
        mounted.save(image=image, mounted=True)
        attach.mount(image, directory, fstype, opts)
        ready({"volume": volume, "version_id": version, "ref": export,
               "directory": directory, "client": client, "partition": args.partition,
               "filesystem": fstype, "writable": args.writable, "pid": pid})
        _serve_until_stopped(mounted, server)
    except BaseException:
        with contextlib.suppress(Exception):
            mounted.teardown(server)
        raise
    return 0


def _attach(mounted: Mounted, client: str, socket_path: str, export: str,
            writable: bool) -> str:  # fmt: skip
    """The export as a block device (kernel) or a file (nbdfuse); returns its path."""
    if client == "kernel":
        tried = []
        for device in attach.free_nbd_devices(writable):
            mounted.save(nbd_device=device)  # recorded first: a kill meanwhile leaves it named
            try:
                attach.nbd_connect(socket_path, export, device, read_only=not writable)
                return device
            except attach.AttachError as e:  # taken by someone else meanwhile: the next one
                tried.append(str(e))
        raise attach.AttachError("no free /dev/nbd device" +
                                 (f" ({tried[-1]})" if tried else ""))
    fuse_dir = os.path.join(mounted.record["runtime_dir"], "fuse")
    os.mkdir(fuse_dir, 0o700)
    mounted.save(fuse_dir=fuse_dir)
    pid = attach.start_nbdfuse(fuse_dir, socket_path, export, read_only=not writable)
    mounted.save(fuse_pid=pid, fuse_start=attach.process_start(pid))
    return os.path.join(fuse_dir, attach.FUSE_FILE)


def _partition(image: str, number: int) -> tuple[int, int]:
    found = attach.partitions(image)
    for part in found:
        if part.number == number:
            return part.start, part.size
    have = ", ".join(str(p.number) for p in found) or "none"
    raise UsageError(f"the version has no partition {number} (partitions: {have})")


def _serve_until_stopped(mounted: Mounted, server: ThreadedServer) -> None:
    """Serve until SIGTERM (what `umount` sends) or Ctrl-C, then undo everything. A file
    system that is busy stays mounted and served: the stop is refused, with a warning."""
    forever = threading.Event()
    while True:
        try:
            forever.wait()
        except (KeyboardInterrupt, Terminated):
            try:
                mounted.teardown(server)
                return
            except attach.AttachError as e:
                warn(f"{e}; still mounted: stop what uses it, then stop again")


def cmd_umount(args: argparse.Namespace) -> int:
    directory = os.path.realpath(args.directory)
    path = record_path(directory)
    record = service.load_record(path, RECORD_FORMAT)
    if record is None:
        raise NotFound(f"{args.directory} is not a snapship mount (no record in {path.parent})")
    mounted = Mounted(record, path)
    # The file system first, while its device is still served: a busy one is refused here
    # and the mount goes on working.
    if record.get("mounted"):
        attach.unmount(directory)
        mounted.save(mounted=False)
    stopped = attach.stop_process(record["pid"], record.get("pid_start"))
    left = service.load_record(path, RECORD_FORMAT)
    if left is not None:  # a mount process that was killed, or failed to tidy up
        Mounted(left, path).teardown()
    emit("umount", {"directory": directory, "ref": record["export"],
                    "mount_process": "stopped" if stopped else "gone"},
         describe_umount, json=args.json)
    return 0


def describe_mount(r: dict[str, Any]) -> list[str]:
    part = f" partition {r['partition']}" if r["partition"] is not None else ""
    mode = "read-write (changes are discarded)" if r["writable"] else "read-only"
    via = "kernel NBD" if r["client"] == "kernel" else "nbdfuse and a loop device"
    return [f"mounted {r['ref']}{part} ({r['filesystem']}, {mode}) on {r['directory']} via "
            f"{via}; 'snapship umount {r['directory']}' to detach"]


def describe_umount(r: dict[str, Any]) -> list[str]:
    return [f"unmounted {r['ref']} from {r['directory']}; nothing is left attached"]


def register(sub: options.SubParsers) -> None:
    p = options.add_command(
        sub, "mount", summary="mount a version's file system (read-only)",
        description="""
        Serve a version in a background process and mount its file system on DIR, read-only
        and without replaying its journal (XFS norecovery, ext4 noload), so files can be
        copied out with cp. The kernel's NBD client is used where the nbd module exists,
        nbdfuse and a loop device elsewhere. A disk image with a partition table: give
        --partition N. 'snapship umount DIR' unmounts and detaches everything, also after the
        mount process was killed. See docs/mount.md.""",
        examples=["snapship mount root /mnt/old               # the newest version",
                  "cp /mnt/old/etc/fstab . && snapship umount /mnt/old",
                  "snapship mount vm-disk@20261126 /mnt/vm --partition 2",
                  "snapship mount root /mnt/old --foreground  # until Ctrl-C"],
        parents=options.parents(repo=True, key=True))
    options.completes(p.add_argument("version_ref", metavar="VOLUME[@VERSION]",
                                     help="version id, unique prefix, or 'latest' (the "
                                     "default)"), options.complete_version_refs)
    p.add_argument("directory", metavar="DIR", help="mount point (an existing directory)")
    p.add_argument("--partition", type=options.whole(1), metavar="N",
                   help="mount partition N of a disk image (MBR or GPT)")
    p.add_argument("--writable", action="store_true",
                   help="mount read-write; writes go to a throwaway overlay, the version "
                   "never changes (the journal is replayed into it)")
    p.add_argument("--foreground", action="store_true",
                   help="stay in the foreground until Ctrl-C or SIGTERM, then unmount")
    p.add_argument("--client", choices=["auto", "kernel", "fuse"], default="auto",
                   help="how the version becomes a device: the kernel's NBD client, nbdfuse "
                   "and a loop device, or the first where it works (default)")
    p.set_defaults(func=cmd_mount)

    p = options.add_command(
        sub, "umount", summary="unmount a version mounted by snapship mount",
        description="""
        Unmount DIR and detach everything `snapship mount` attached for it (NBD device or
        nbdfuse, loop devices), and stop its mount process. Works after that process was
        killed too: its state record names what to detach. A busy file system is refused
        and stays mounted.""",
        examples=["snapship umount /mnt/old"],
        parents=options.parents())
    p.add_argument("directory", metavar="DIR", help="where the version is mounted")
    p.set_defaults(func=cmd_umount)
