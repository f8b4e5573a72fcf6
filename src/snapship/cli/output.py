"""How the CLI talks to people and programs: sizes, JSON, the progress bar."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from snapship.units import human_bytes as human_bytes
from snapship.units import parse_size as parse_size


def warn(message: str) -> None:
    print(f"snapship: warning: {message}", file=sys.stderr)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


class TerminalProgress:
    """A one-line bar on stderr (bytes, rate, ETA), drawn only when stderr is a terminal."""

    def __init__(self, label: str, stream: TextIO = sys.stderr) -> None:
        self.label = label
        self.stream = stream
        self.enabled = stream.isatty()
        self.total = 0
        self.done = 0
        self.t0 = time.monotonic()
        self.last = 0.0

    def start(self, total_bytes: int) -> None:
        self.total, self.done, self.t0 = total_bytes, 0, time.monotonic()

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and now - self.last >= 0.2:
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.t0, 1e-6)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        self.stream.write(
            f"\r{self.label}: {human_bytes(self.done)} / {human_bytes(self.total)} "
            f"{pct:5.1f}%  {human_bytes(rate)}/s  ETA {eta:4.0f}s \x1b[K"
        )
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
