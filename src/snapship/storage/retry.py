"""Retrying a storage request: how many tries, how long between them, when to give up.

Backends classify their failures (`TransientStorageError` may succeed if repeated, anything
else will not); this module only repeats an idempotent request that failed transiently, with
exponential backoff and full jitter, so many workers failing at once do not hammer a recovering
server in step. It stops after `attempts` tries or once `deadline` seconds have passed,
whichever comes first, and then re-raises the last failure with the count and time added.
Every storage request snapship makes is idempotent (puts of immutable content, deletes, copies),
so repeating one whose answer was lost is harmless.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from snapship.errors import TransientStorageError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 10
    """Tries in all, the first included; 1 means no retry."""
    base: float = 0.25
    """Upper bound of the first pause, in seconds; it doubles with each retry..."""
    cap: float = 10.0
    """...up to this bound. The pause itself is uniform in [0, bound] ("full jitter")."""
    deadline: float = 120.0
    """No retry starts later than this many seconds after the first try."""

    def pause(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry` (1 for the first retry)."""
        return rng.uniform(0.0, min(self.cap, self.base * 2 ** (retry - 1)))


_rng = random.Random()


def retrying(
    request: Callable[[], T],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """`request()`, repeated while it raises `TransientStorageError` and the policy allows."""
    started = clock()
    tries = 0
    while True:
        tries += 1
        try:
            return request()
        except TransientStorageError as e:
            pause = policy.pause(tries, _rng)
            elapsed = clock() - started
            if tries >= policy.attempts or elapsed + pause > policy.deadline:
                if tries == 1:
                    raise
                raise TransientStorageError(
                    f"{e} (gave up after {tries} attempts in {elapsed:.1f} s)"
                ) from None
            sleep(pause)
