"""`snapship systemd install`: the units of the jobs file's schedules, written or printed.

The units themselves come from `jobs.systemd` (pure); this module reads the jobs file, picks
the executable for ExecStart=, writes each file atomically, and removes the drop-ins it once
wrote for jobs the file no longer has.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from snapship.cli import options
from snapship.cli.job_commands import add_config_option, load_config
from snapship.cli.reports import Report, emit
from snapship.errors import UsageError
from snapship.jobs import systemd

DEFAULT_UNIT_DIR = "/etc/systemd/system"


def default_executable() -> str:
    """The `snapship` beside the running Python (a venv's, or the system's), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "snapship")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("snapship") or "/usr/bin/snapship"


def write_atomically(path: str, text: str) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".snapship-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def stale_drop_ins(unit_dir: str, keep: set[str]) -> list[str]:
    """Drop-ins this command wrote (its file name, in a snapship-run@ instance directory)
    that are not in `keep`."""
    try:
        names = os.listdir(unit_dir)
    except FileNotFoundError:
        return []
    found = []
    for name in sorted(names):
        if name.startswith(systemd.PREFIX) and name.endswith((".service.d", ".timer.d")):
            rel = f"{name}/{systemd.DROP_IN}"
            if rel not in keep and os.path.isfile(os.path.join(unit_dir, rel)):
                found.append(rel)
    return found


def describe_install(r: Report) -> list[str]:
    if r["dry_run"]:
        return [f"# {os.path.join(r['unit_dir'], u['path'])}\n{u['text']}" for u in r["units"]]
    lines = [f"wrote {os.path.join(r['unit_dir'], p)}" for p in r["written"]]
    lines += [f"removed {os.path.join(r['unit_dir'], p)}" for p in r["removed"]]
    if r["timers"]:
        lines.append(f"now: systemctl daemon-reload && systemctl enable --now "
                     f"{' '.join(r['timers'])}")
    return lines


def cmd_systemd_install(args: argparse.Namespace) -> int:
    path, config = load_config(args)
    config_path = os.path.abspath(path)
    executable = args.executable or default_executable()
    if not os.path.isabs(executable):
        raise UsageError(f"--executable {executable!r} must be an absolute path")
    files = systemd.units(config, executable=executable, config_path=config_path)
    keep = {f.path for f in files}
    removed = stale_drop_ins(args.unit_dir, keep)
    if not args.dry_run:
        for f in files:
            write_atomically(os.path.join(args.unit_dir, f.path), f.text)
        for rel in removed:
            os.unlink(os.path.join(args.unit_dir, rel))
            with_dir = os.path.dirname(os.path.join(args.unit_dir, rel))
            if not os.listdir(with_dir):
                os.rmdir(with_dir)
    emit("systemd install", {
        "dry_run": args.dry_run, "unit_dir": args.unit_dir,
        "units": [{"path": f.path, "text": f.text} for f in files],
        "written": [] if args.dry_run else [f.path for f in files],
        "removed": removed, "timers": systemd.scheduled(config),
    }, describe_install, json=args.json)
    return 0


def register(sub: options.SubParsers) -> None:
    p = options.add_command(
        sub, "systemd", summary="systemd units for the jobs file's schedules",
        description="""
        Run the jobs of the jobs file (docs/config.md) on their schedules with systemd: a
        templated, hardened service snapship-run@.service that runs `snapship run JOB`, a
        templated timer snapship-run@.timer, and per job a drop-in with what differs (its
        OnCalendar=, the repositories it may write, whether it may use the network).""",
        examples=["snapship systemd install --dry-run",
                  "snapship systemd install && systemctl daemon-reload && "
                  "systemctl enable --now snapship-run@nightly.timer"])
    inner = p.add_subparsers(dest="systemd_command", required=True, metavar="COMMAND",
                             title="commands")
    i = options.add_command(
        inner, "install", summary="write (or print) the units of the jobs file's schedules",
        description="""
        Write snapship-run@.service and snapship-run@.timer and each job's drop-ins into the
        unit directory (atomically; drop-ins written for jobs the file no longer has are
        removed), then say which timers to enable. ExecStart= runs this snapship (or
        --executable) with the jobs file's absolute path. --dry-run prints them instead.""",
        examples=["snapship systemd install --dry-run --config ./snapship.toml",
                  "snapship systemd install --unit-dir /etc/systemd/system"],
        parents=options.parents())
    add_config_option(i)
    i.add_argument("--unit-dir", metavar="DIR", default=DEFAULT_UNIT_DIR,
                   help="where to write the units (default: %(default)s)")
    i.add_argument("--executable", metavar="PATH",
                   help="the snapship for ExecStart= (default: the one running, "
                   "else the one on PATH)")
    i.add_argument("--dry-run", action="store_true", help="print the units, write nothing")
    i.set_defaults(func=cmd_systemd_install, quiet_report=True)
