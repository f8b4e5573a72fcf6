"""Retrying transient storage failures: exponential backoff with full jitter, within a time
budget counted from the first failure of an operation.

Backends that talk to a network (storage/http.py) run each request through `Retry`; what is
transient is theirs to decide, the waiting is decided here.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_RETRY_TIME = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    budget: float = DEFAULT_RETRY_TIME
    """Seconds after an operation's first failure during which it is tried again."""
    first_delay: float = 0.1
    max_delay: float = 5.0

    def start(self) -> Retry:
        return Retry(self)


@dataclass
class Retry:
    """The retry state of one operation."""

    policy: RetryPolicy
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    rand: Callable[[], float] = random.random
    attempts: int = 0
    first_failure: float | None = field(default=None)

    def again(self) -> bool:
        """After a transient failure: wait, and say whether to try again (False once the
        budget is spent; the caller then gives up)."""
        self.attempts += 1
        now = self.clock()
        if self.first_failure is None:
            self.first_failure = now
        left = self.first_failure + self.policy.budget - now
        if left <= 0:
            return False
        ceiling = min(self.policy.max_delay, self.policy.first_delay * 2 ** (self.attempts - 1))
        self.sleep(min(left, self.rand() * ceiling))
        return True

    def elapsed(self) -> float:
        return 0.0 if self.first_failure is None else self.clock() - self.first_failure
