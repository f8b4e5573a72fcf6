"""Commands that leave a process running (`mount`, `restore --instant`): the state record that
names everything they attached, and the fork that puts them in the background.

A record is a JSON file in `<state dir>/<kind>/<name>.json` (the state directory of
known_repos.py: $SNAPSHIP_STATE_DIR in tests), written before each thing it names is attached
and replaced whole (temporary file, fsync, rename), so that whatever kills the process, the
command that undoes it (`umount`, `restore --instant --finish`) finds every device and process
to detach. docs/mount.md specifies the records (format version 1); readers refuse other
versions.

`run_in_background(work)` forks before anything else runs (no threads yet, no repository
open): the child does `work(ready)` and calls `ready(report)` once the thing is usable; the
parent waits for that report, prints it and exits 0, or reports the child's error as its own.
Only then does the child leave the terminal's session and send its output to a log file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from snapship.cli import known_repos
from snapship.cli.known_repos import replace_file
from snapship.cli.signals import Terminated
from snapship.errors import FormatError, SnapshipError

RECORD_VERSION = 1

Report = dict[str, Any]
Ready = Callable[[Report], None]


class Relayed(SnapshipError):
    """An error of the background process, reported by the command that started it."""

    def __init__(self, message: str, kind: str, exit_code: int) -> None:
        super().__init__(message)
        self.kind = kind
        self.exit_code = exit_code


def record_dir(kind: str) -> Path:
    return known_repos.state_dir() / kind


def record_name(key: str) -> str:
    """A file name for a record keyed by a path or a name of any length and characters."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def load_record(path: Path, fmt: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise FormatError(f"cannot read state record {path}: {e}") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise FormatError(f"state record {path} is not a {fmt!r} record")
    if obj.get("version") != RECORD_VERSION:
        raise FormatError(f"state record {path} has version {obj.get('version')!r}; this "
                          f"snapship reads version {RECORD_VERSION}")
    return obj


def save_record(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    replace_file(path, json.dumps({**obj, "version": RECORD_VERSION}, indent=1,
                                  sort_keys=True) + "\n")


def remove_record(path: Path) -> None:
    for p in (path, path.with_suffix(".log")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def run_in_background(work: Callable[[Ready], int], log_path: Path) -> Report:
    """Fork; the child runs `work(ready)`; returns the report it passed to `ready`."""
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's stack
        os.close(rfd)
        code = 1
        try:
            code = _child(work, wfd, log_path)
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        data = pipe.read()
    if not data:
        os.waitpid(pid, 0)
        raise SnapshipError("the background process ended before it was ready "
                            f"(its log: {log_path})")
    obj: dict[str, Any] = json.loads(data)
    if "error" in obj:
        os.waitpid(pid, 0)
        e = obj["error"]
        raise Relayed(e["message"], e["kind"], e["exit_code"])
    report: Report = obj["report"]
    return report


def _child(work: Callable[[Ready], int], wfd: int, log_path: Path) -> int:
    pipe: int | None = wfd

    def ready(report: Report) -> None:
        nonlocal pipe
        assert pipe is not None
        os.write(pipe, json.dumps({"report": report}).encode())
        os.close(pipe)
        pipe = None
        os.setsid()  # out of the terminal's session: its Ctrl-C and hang-up are not ours
        log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)

    try:
        return work(ready)
    except BaseException as e:
        if pipe is None:
            traceback.print_exc()
            return 1
        err: dict[str, Any]
        if isinstance(e, SnapshipError):
            err = {"message": str(e), "kind": e.kind, "exit_code": e.exit_code}
        elif isinstance(e, Terminated):
            err = {"message": "terminated", "kind": "terminated", "exit_code": 128 + e.signum}
        elif isinstance(e, KeyboardInterrupt):
            err = {"message": "interrupted", "kind": "interrupted", "exit_code": 130}
        else:
            err = {"message": f"internal error: {type(e).__name__}: {e}", "kind": "internal",
                   "exit_code": 70}
        os.write(pipe, json.dumps({"error": err}).encode())
        code: int = err["exit_code"]
        return code
    finally:
        if pipe is not None:
            os.close(pipe)
