"""SIGTERM and SIGHUP as an exception, for commands that must clean up when stopped.

Python's default for these signals ends the process on the spot, skipping every `finally`: a
restore would leave its temporary file behind. Inside `terminate_raises()` the signal raises
`Terminated` in the main thread instead (as SIGINT raises KeyboardInterrupt), the command
unwinds, and `main` exits with 128 + the signal's number. A second signal while it unwinds is
ignored, so the clean-up itself is not cut short.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(BaseException):
    """The process was asked to stop (SIGTERM, SIGHUP)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum: int, _frame: FrameType | None) -> None:
    for s in _SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (and receives the signals)
        return
    previous = {s: signal.signal(s, _raise) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
