"""`snapship restore --instant VOL@VER lvm:VG/LV` and its `--status`, `--finish`, `--abort`.

The command creates the LV and returns within seconds, leaving a background process that
serves the version (writable, into a throwaway overlay) on a private unix socket to a kernel
NBD device; the LV's device-mapper table becomes a dm-raid1 mirror copying from that device
into the LV's extents (instant.py says how, docs/mount.md why dm-mirror). `--status` shows
the copy's progress; `--finish` waits until every region is in sync, loads the LV's plain
table back, detaches the NBD device and stops the process: a plain LV holding the version
plus what was written meanwhile. Until then the LV is tagged incomplete and skipped by
activation, and `--finish` refuses a mirror whose source failed: a restore whose source died
never looks complete. `--abort` takes the plumbing down and leaves the LV deactivated and
tagged incomplete.

The state record (cli/service.py; docs/mount.md) names the LV, the NBD device, the data
device and the LV's original table, written before each is made, so `--finish`/`--abort`
work from it whatever happened to the process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapship import attach, instant
from snapship.changes.lvm import LvmError
from snapship.cli import service
from snapship.cli.context import open_repository
from snapship.cli.output import TerminalProgress
from snapship.cli.reports import emit, ref
from snapship.cli.signals import Terminated
from snapship.errors import NotFound, SnapshipError, UsageError
from snapship.formats.manifest import check_name
from snapship.types import VersionRef

if TYPE_CHECKING:  # the NBD stack is loaded only by an instant restore, not by every restore
    from snapship.nbd.inprocess import ThreadedServer

RECORD_FORMAT = "snapship instant restore"
RECORD_KIND = "instant"
POLL = 0.5


class Incomplete(SnapshipError):
    """An instant restore that cannot be finished (its source failed, or it is not done)."""


def add_instant_options(parser: argparse.ArgumentParser) -> None:
    """The restore parser's instant options. --status/--finish/--abort name only the LV, so
    the restore's two positionals become optional here; `requested` insists on both for
    every other restore."""
    g = parser.add_argument_group("instant restore into a new LV (docs/mount.md)")
    g.add_argument("--instant", action="store_true",
                   help="lvm:VG/LV only: create the LV and make it usable at once, while the "
                   "version is copied in the background (dm-mirror from an NBD device)")
    g.add_argument("--status", action="store_true",
                   help="with --instant: how far the copy into lvm:VG/LV is")
    g.add_argument("--finish", action="store_true",
                   help="with --instant: wait until the copy is complete, then leave a plain "
                   "LV and stop the background process")
    g.add_argument("--abort", action="store_true",
                   help="with --instant: stop it unfinished; the LV is left deactivated and "
                   "tagged incomplete")
    for action in parser._actions:
        if action.dest in ("version_ref", "target"):
            action.nargs = "?"


def requested(args: argparse.Namespace) -> bool:
    """Whether this restore is an instant one; a plain one must name version and target."""
    actions = [args.status, args.finish, args.abort]
    if args.instant or any(actions):
        return True
    if args.version_ref is None or args.target is None:
        raise UsageError("restore needs a VOLUME[@VERSION] and a TARGET")
    return False


def _parse_lv(text: str | None) -> tuple[str, str]:
    if text is None or not text.startswith("lvm:"):
        raise UsageError(f"instant restore restores into a new LV, lvm:VG/LV (not {text!r})")
    vg, sep, lv = text.removeprefix("lvm:").partition("/")
    if not sep or not vg or not lv or "/" in lv:
        raise UsageError(f"{text!r} is not of the form lvm:VG/LV")
    return vg, lv


def record_path(vg: str, lv: str) -> Path:
    return service.record_dir(RECORD_KIND) / f"{service.record_name(f'{vg}/{lv}')}.json"


def run_instant(args: argparse.Namespace) -> int:
    chosen = [name for name in ("status", "finish", "abort") if getattr(args, name)]
    if len(chosen) > 1:
        raise UsageError(f"--{chosen[0]} and --{chosen[1]} exclude each other")
    if not chosen:
        if args.target is None:
            raise UsageError("restore --instant needs VOLUME[@VERSION] and lvm:VG/LV")
        return _start(args)
    # One positional: the LV (argparse filled the first slot with it).
    given = [a for a in (args.version_ref, args.target) if a is not None]
    if len(given) != 1:
        raise UsageError(f"restore --instant --{chosen[0]} takes the LV alone: lvm:VG/LV")
    vg, lv = _parse_lv(given[0])
    path = record_path(vg, lv)
    record = service.load_record(path, RECORD_FORMAT)
    if record is None:
        raise NotFound(f"no instant restore into lvm:{vg}/{lv} is under way on this machine")
    if chosen == ["status"]:
        _report(args, "status", record, _state(record))
        return 0
    if chosen == ["finish"]:
        return _finish(args, path, record)
    return _abort(args, path, record)


# -- start: in the background process -------------------------------------------------------


def _start(args: argparse.Namespace) -> int:
    vg, lv = _parse_lv(args.target)
    volume, _, version = args.version_ref.partition("@")
    check_name("volume", volume)
    path = record_path(vg, lv)
    if service.load_record(path, RECORD_FORMAT) is not None:
        raise UsageError(f"an instant restore into lvm:{vg}/{lv} is under way: --status, "
                         "--finish or --abort it")
    report = service.run_in_background(
        lambda ready: _hydrate(args, VersionRef(volume, version or None), vg, lv, path, ready),
        path.with_suffix(".log"))
    emit("restore", report, describe_instant, json=args.json)
    return 0


def _hydrate(args: argparse.Namespace, wanted: VersionRef, vg: str, lv: str, path: Path,
             ready: service.Ready) -> int:  # fmt: skip
    started = time.monotonic()
    repo = open_repository(args)
    volume, version = repo.resolve(wanted)
    manifest = repo.load_manifest(volume, version)
    if manifest.size % 512 or manifest.size == 0:
        raise UsageError(f"{ref(volume, version)} is {manifest.size} bytes, not a whole "
                         "number of 512-byte sectors: it cannot be an LV")
    if not attach.kernel_nbd_available():
        raise UsageError("instant restore needs the kernel's nbd module (/dev/nbd*)")
    pid = os.getpid()
    record: dict[str, Any] = {
        "format": RECORD_FORMAT, "vg": vg, "lv": lv, "export": ref(volume, version),
        "volume": volume, "version_id": version, "size": manifest.size, "pid": pid,
        "pid_start": attach.process_start(pid), "runtime_dir": tempfile.mkdtemp(
            prefix="snapship-instant."), "lv_created": False, "mirrored": False}

    def save(**changes: Any) -> None:
        record.update(changes)
        service.save_record(path, record)

    save()
    # The mirror copies one region at a time, each a sequential read of the server; every
    # read of the file system on the LV queues behind the copy's chunks being decoded. So
    # regions of one chunk and a read-ahead of one chunk (not the server's 8 MiB): a read
    # waits for two chunks of the copy at most.
    region = max(8, manifest.chunk_size // 512)
    from snapship.nbd.inprocess import ThreadedServer
    from snapship.nbd.names import ExportNames
    from snapship.nbd.server import ServerOptions

    server = ThreadedServer(ExportNames(repo, read_only=False),
                            ServerOptions(writable=True, readahead_bytes=manifest.chunk_size))
    try:
        socket_path = os.path.join(record["runtime_dir"], "nbd.sock")
        server.start(socket_path)
        # lvcreate refuses an LV that exists (one lvm call: each costs a second or more);
        # recorded only once made, so a failure never removes someone else's LV.
        instant.create_lv(vg, lv, manifest.size)
        save(lv_created=True)
        device = _attach(record, save, socket_path)
        lv_dm = instant.device(vg, lv).removeprefix("/dev/mapper/")
        linear = instant.table(lv_dm)
        data = f"{instant.DATA_PREFIX}{service.record_name(f'{vg}/{lv}')}"
        save(dm_name=lv_dm, linear_table=linear, data_device=data)
        data_dev = instant.create_device(data, linear)
        lv_sectors = sum(int(line.split()[1]) for line in linear.splitlines())
        mirror = instant.mirror_table(manifest.size // 512, device, data_dev, lv_sectors,
                                      region)
        save(mirrored=True)
        instant.swap_table(lv_dm, mirror)
        report = _body("start", record, _state(record))
        report["duration"] = round(time.monotonic() - started, 3)
        ready(report)
    except BaseException:
        _undo_start(record, path, server)
        raise
    _serve(record, server)
    return 0


def _attach(record: dict[str, Any], save: Callable[..., None], socket_path: str) -> str:
    for device in attach.free_nbd_devices(writable=True):
        save(nbd_device=device)
        try:
            attach.nbd_connect(socket_path, record["export"], device, read_only=False)
            return device
        except attach.AttachError:
            continue
    raise attach.AttachError("no free writable /dev/nbd device")


def _undo_start(record: dict[str, Any], path: Path, server: ThreadedServer) -> None:
    """A start that failed: take down what it made, the LV too (nothing was written to it
    that anyone could have used)."""
    if record.get("mirrored") and record.get("linear_table"):
        with contextlib.suppress(LvmError):
            instant.swap_table(record["dm_name"], record["linear_table"])
    if record.get("data_device"):
        _quietly(instant.remove_device, record["data_device"])
    if record.get("nbd_device"):
        _quietly(attach.nbd_disconnect, record["nbd_device"])
    server.close()
    if record.get("lv_created"):
        _quietly(_remove_lv, record["vg"], record["lv"])
    shutil.rmtree(record["runtime_dir"], ignore_errors=True)
    service.remove_record(path)


def _remove_lv(vg: str, lv: str) -> None:
    if instant.lv_exists(vg, lv):
        instant.deactivate(vg, lv)
        instant.remove_lv(vg, lv)


def _quietly(fn: Callable[..., object], *a: Any) -> None:
    """A step of undoing a failed start: the error that stopped the start is the one to
    report, not one of these."""
    with contextlib.suppress(SnapshipError, OSError):
        fn(*a)


def _serve(record: dict[str, Any], server: ThreadedServer) -> None:
    """Serve until SIGTERM (what --finish and --abort send). If the mirror still uses the
    device, it stays attached, failing: the LV must go on saying it is incomplete."""
    forever = threading.Event()
    try:
        forever.wait()
    except (KeyboardInterrupt, Terminated):
        pass
    finally:
        path = record_path(record["vg"], record["lv"])
        current = service.load_record(path, RECORD_FORMAT) or record
        if not current.get("mirrored") and current.get("nbd_device"):
            _quietly(attach.nbd_disconnect, current["nbd_device"])
        server.close()
        shutil.rmtree(record["runtime_dir"], ignore_errors=True)


# -- status, finish, abort: in the caller's process ----------------------------------------


def _state(record: dict[str, Any]) -> dict[str, Any]:
    server_alive = attach.alive(record["pid"], record.get("pid_start"))
    status = None
    if record.get("mirrored") and record.get("dm_name"):
        status = instant.mirror_status(record["dm_name"])
    size = record["size"]
    if status is None:
        return {"state": "finished" if not record.get("mirrored") else "failed",
                "copied": size if not record.get("mirrored") else 0, "server": server_alive,
                "health": ""}
    copied = min(size, size * status.in_sync // max(1, status.regions))
    if status.failed or not server_alive:
        state = "failed"
    else:
        state = "complete" if status.complete else "copying"
    return {"state": state, "copied": copied, "server": server_alive, "health": status.health}


def _finish(args: argparse.Namespace, path: Path, record: dict[str, Any]) -> int:
    progress = TerminalProgress(f"restore --instant lvm:{record['vg']}/{record['lv']}")
    progress.start(record["size"])
    try:
        while True:
            state = _state(record)
            progress.advance(state["copied"] - progress.done)
            if state["state"] == "failed":
                raise Incomplete(
                    f"the copy into lvm:{record['vg']}/{record['lv']} failed at "
                    f"{state['copied'] * 100 // record['size']}% (its source "
                    f"{'failed' if state['server'] else 'process is gone'}); the LV is "
                    "incomplete: --abort it")
            if state["state"] in ("complete", "finished"):
                break
            time.sleep(POLL)  # polling the kernel's copy progress, which has no event
    finally:
        progress.finish()
    if record.get("mirrored"):
        instant.swap_table(record["dm_name"], record["linear_table"])
        record["mirrored"] = False
        service.save_record(path, record)
    instant.remove_device(record["data_device"])
    attach.stop_process(record["pid"], record.get("pid_start"))
    if record.get("nbd_device"):
        attach.nbd_disconnect(record["nbd_device"])
    instant.mark_complete(record["vg"], record["lv"])
    shutil.rmtree(record["runtime_dir"], ignore_errors=True)
    service.remove_record(path)
    _report(args, "finish", record, {"state": "finished", "copied": record["size"],
                                     "server": False, "health": ""})
    return 0


def _abort(args: argparse.Namespace, path: Path, record: dict[str, Any]) -> int:
    dm_name = record.get("dm_name")
    if dm_name and instant.device_exists(dm_name) and instant.open_count(dm_name):
        raise UsageError(f"lvm:{record['vg']}/{record['lv']} is in use (mounted?): unmount it "
                         "before --abort")
    state = _state(record)
    attach.stop_process(record["pid"], record.get("pid_start"))
    nbd = record.get("nbd_device")
    if nbd:
        # First: a mirror copying from a source that is gone has I/O waiting on it, and a
        # suspend waits for that; disconnected, the device fails it at once.
        attach.nbd_disconnect(nbd, wait=False)
    if record.get("mirrored"):
        instant.swap_table(dm_name or "", record["linear_table"])
        record["mirrored"] = False
        service.save_record(path, record)
    if record.get("data_device"):
        instant.remove_device(record["data_device"])
    if nbd:
        attach.wait_nbd_released(nbd)
    if record.get("lv_created") and instant.lv_exists(record["vg"], record["lv"]):
        instant.deactivate(record["vg"], record["lv"])
    shutil.rmtree(record["runtime_dir"], ignore_errors=True)
    service.remove_record(path)
    _report(args, "abort", record, {**state, "state": "aborted", "server": False})
    return 0


def _body(action: str, record: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    return {"mode": "instant", "action": action, "volume": record["volume"],
            "version_id": record["version_id"], "ref": record["export"],
            "target": f"lvm:{record['vg']}/{record['lv']}",
            "device": instant.device(record["vg"], record["lv"]), "size": record["size"],
            "copied": state["copied"], "state": state["state"],
            "source_running": state["server"], "health": state["health"],
            "pid": record["pid"] if state["server"] else None}


def _report(args: argparse.Namespace, action: str, record: dict[str, Any],
            state: dict[str, Any]) -> None:  # fmt: skip
    emit("restore", _body(action, record, state), describe_instant, json=args.json)


def describe_instant(r: dict[str, Any]) -> list[str]:
    pct = r["copied"] * 100 // max(1, r["size"])
    target = r["target"]
    if r["action"] == "start":
        return [f"{target} ({r['device']}) is usable now and holds {r['ref']}; copying in the "
                f"background: 'snapship restore --instant --status {target}', then --finish"]
    if r["action"] == "finish":
        return [f"{target} holds {r['ref']} and every write made meanwhile: a plain LV again"]
    if r["action"] == "abort":
        return [f"stopped the instant restore into {target} at {pct}%: the LV is "
                f"deactivated and tagged {instant.INCOMPLETE_TAG} (lvremove it to discard it)"]
    return [f"{target}: {r['state']}, {pct}% copied of {r['ref']}"
            + ("" if r["source_running"] else " (its serving process is gone)")]
