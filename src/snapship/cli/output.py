"""How the CLI talks to people and programs: sizes, JSON, messages, the progress display.

Everything the CLI writes to stderr goes through `message` (warnings, errors, notices): it
first clears a progress line drawn there, so a message never lands in the middle of it, and
the line is drawn again below the message on its next update.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, TextIO

from snapship.units import human_bytes as human_bytes
from snapship.units import parse_size as parse_size


@dataclass
class Settings:
    """What the global options asked for (`main` sets them once, before the command)."""

    quiet: bool = False
    verbose: bool = False
    json: bool = False


settings = Settings()
_lock = threading.RLock()
_active: TerminalProgress | None = None


def configure(*, quiet: bool = False, verbose: bool = False, json: bool = False) -> None:
    settings.quiet, settings.verbose, settings.json = quiet, verbose, json


def message(text: str, stream: TextIO | None = None) -> None:
    """One line on stderr (or `stream`), below any progress line (which is cleared first)."""
    with _lock:
        if _active is not None:
            _active.clear()
        out = stream if stream is not None else sys.stderr
        out.write(text + "\n")
        out.flush()


def warn(text: str) -> None:
    message(f"snapship: warning: {text}")


JSON_VERSION = 1
"""The version of the --json contract (docs/json.md): every object printed carries it."""


def print_json(obj: Any, *, one_line: bool = False) -> None:
    json.dump(obj, sys.stdout, indent=None if one_line else 2, sort_keys=True)
    sys.stdout.write("\n")


def error_json(kind: str, message: str, exit_code: int, command: str | None) -> str:
    """The error object of docs/json.md, as one line."""
    return json.dumps({"version": JSON_VERSION, "command": command,
                       "error": {"kind": kind, "message": " ".join(message.splitlines()),
                                 "exit_code": exit_code}}, sort_keys=True)


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def terminal_columns(stream: TextIO) -> int:
    """The width to draw in: $COLUMNS if it is set (as shells and `shutil` honour it), else
    the terminal's own, else 80."""
    raw = os.environ.get("COLUMNS", "")
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


def format_eta(seconds: float | None) -> str:
    """h:mm:ss or m:ss; `--:--` while unknown; capped at a sane `>99h`."""
    if seconds is None:
        return "--:--"
    s = max(0, round(seconds))
    if s >= 100 * 3600:
        return ">99h"
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class TerminalProgress:
    """One line on stderr: label, bar, percentage, bytes, rate, ETA, fitted to the
    terminal's width (never wrapped: the least useful parts go first when it is narrow).

    Drawn only when stderr is a terminal, and never under --json or -q. The rate is that of
    the last `WINDOW` seconds, so the ETA follows a transfer that speeds up or slows down;
    neither is shown before `SETTLE` seconds of data."""

    INTERVAL = 0.2
    WINDOW = 10.0
    SETTLE = 1.0

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = (not settings.quiet and not settings.json
                        and is_terminal(self.stream))
        self.total = 0
        self.done = 0
        self.t0 = time.monotonic()
        self.last = 0.0
        self._drawn = False
        self._finished = False
        self._samples: deque[tuple[float, int]] = deque()

    # -- the Progress protocol of engine/progress.py -----------------------------------------

    def start(self, total_bytes: int) -> None:
        global _active
        self.total, self.done, self.t0 = total_bytes, 0, time.monotonic()
        self._samples = deque([(self.t0, 0)])
        if self.enabled:
            with _lock:
                _active = self

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and now - self.last >= self.INTERVAL:
            self.last = now
            self._samples.append((now, self.done))
            while len(self._samples) > 2 and now - self._samples[1][0] >= self.WINDOW:
                self._samples.popleft()
            with _lock:
                self._draw(now)

    def finish(self) -> None:
        global _active
        if not self.enabled:
            return
        with _lock:
            self._finished = True
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
            if _active is self:
                _active = None

    # -- drawing ----------------------------------------------------------------------------

    def clear(self) -> None:
        """Erase the line (a message is about to be written); the next update redraws it."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def rate(self, now: float) -> float | None:
        if self._finished:  # the last frame: the average of the whole run
            return self.done / (now - self.t0) if now > self.t0 else None
        if now - self.t0 < self.SETTLE:
            return None
        t_then, done_then = self._samples[0]
        if now - t_then <= 0:
            return None
        return (self.done - done_then) / (now - t_then)

    def render(self, width: int, now: float) -> str:
        """The line for a terminal `width` columns wide: at most width - 1 characters (a
        character in the last column makes some terminals wrap)."""
        room = max(1, width - 1)
        total = max(self.total, self.done)
        fraction = self.done / total if total else 1.0
        rate = self.rate(now)
        eta = 0.0 if self._finished else (total - self.done) / rate if rate else None
        pct = f"{100 * fraction:5.1f}%"
        amounts = f"{human_bytes(self.done)} / {human_bytes(total)}"
        speed = f"{human_bytes(rate)}/s" if rate is not None else "--/s"
        eta_text = f"ETA {format_eta(eta)}"
        tail = "  ".join([pct, amounts, speed, eta_text])
        cells = min(40, room - len(self.label) - len(tail) - 6)
        if cells >= 10:
            filled = int(cells * fraction)
            return f"{self.label}  [{'#' * filled}{'.' * (cells - filled)}]  {tail}"
        # Too narrow for a bar: the byte counts go first; then the label is shortened (to no
        # fewer than 10 characters) before the rate goes, and again before the ETA goes.
        options = ([pct, amounts, speed, eta_text], [pct, speed, eta_text], [pct, eta_text],
                   [pct])
        for n, parts in enumerate(options):
            for sep in ("  ", " "):
                tail = sep.join(parts)
                if len(self.label) + 2 + len(tail) <= room:
                    return f"{self.label}: {tail}"
            keep = room - len(tail) - 2
            if n > 0 and keep >= 10:
                return f"{self.label[:keep - 3]}...: {tail}"
        return pct.strip()[:room]

    def _draw(self, now: float) -> None:
        line = self.render(terminal_columns(self.stream), now)
        self.stream.write(f"\r{line}\x1b[K")
        self.stream.flush()
        self._drawn = True
