"""SIGTERM and SIGHUP as an exception, so that every command cleans up when it is stopped.

Python's default for these signals ends the process on the spot, skipping every `finally`: a
backup would leave its lock behind (and the next gc would take the chunks it had stored for
garbage), a restore its temporary file. Inside `terminate_raises()`, which `main` wraps around
every command, the signal raises `Terminated` in the main thread instead (as SIGINT raises
KeyboardInterrupt), the command unwinds, and `main` exits with 128 + the signal's number. A
second SIGTERM or SIGHUP while it unwinds is ignored, so the clean-up itself is not cut short.

Worker threads do not see the exception: the main thread waits for the requests they have
under way. So that this wait is short, a stop (these signals or SIGINT) also sets a deadline,
`retry_cutoff()`, after which storage requests are not tried again (storage/retry.py): a
remote that has stopped answering delays the exit by `STOP_GRACE` seconds, not by the whole
retry time. Commands that stop gracefully on their own (`server`, `nbd serve`) install their
own handlers inside this one, and it puts the previous ones back when the command returns.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
STOP_GRACE = 5.0
"""Seconds after a stop was asked for during which storage requests are still retried: the
lock's release and requests under way get this long to get through a brief failure."""

_stopping_since: float | None = None


class Terminated(BaseException):
    """The process was asked to stop (SIGTERM, SIGHUP)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _note_stop() -> None:
    global _stopping_since
    if _stopping_since is None:
        _stopping_since = time.monotonic()


def retry_cutoff() -> float | None:
    """The time (`time.monotonic`) after which storage requests stop retrying, once a stop
    was asked for; None until then."""
    since = _stopping_since
    return None if since is None else since + STOP_GRACE


def _raise(signum: int, _frame: FrameType | None) -> None:
    _note_stop()
    for s in _SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    _note_stop()
    raise KeyboardInterrupt


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (and receives the signals)
        return
    previous = {s: signal.signal(s, _raise) for s in _SIGNALS}
    # SIGINT keeps raising KeyboardInterrupt (a second Ctrl-C too), and also sets the cutoff;
    # a SIGINT that was ignored when we started (`nohup`, a background job) stays ignored.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
