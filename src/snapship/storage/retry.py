"""Retrying transient storage failures: exponential backoff with full jitter, within a time
budget counted from the first failure of an operation.

Backends that talk to a network (storage/http.py, storage/s3.py) run each request through
`Retry`; what is transient is theirs to decide, the waiting is decided here.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_RETRY_TIME = 60.0
SLOW_AFTER = 3.0


@dataclass(frozen=True)
class RetryPolicy:
    budget: float = DEFAULT_RETRY_TIME
    """Seconds after an operation's first failure during which it is tried again."""
    first_delay: float = 0.1
    max_delay: float = 5.0
    attempts: int = 0
    """Tries in all, the first included, if the user asked for a limit (S3: AWS_MAX_ATTEMPTS);
    0: as many as the budget allows."""
    on_slow: Callable[[str, float], None] | None = None
    """Told once per operation, in the thread that runs it, when the operation has been
    failing for `slow_after` seconds and is to be tried again: (the last problem, seconds
    since its first failure). For the caller's display (the CLI says "retrying ..."); it
    must not raise. The storage modules print nothing themselves."""
    slow_after: float = SLOW_AFTER
    cutoff: Callable[[], float | None] | None = None
    """The caller's deadline (on `Retry.clock`), or None for none: nothing is tried again
    after it, whatever is left of the budget (the CLI sets it when it is asked to stop)."""

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
    told: bool = False

    def again(self, problem: str = "") -> bool:
        """After a transient failure (`problem`, for `on_slow`): wait, and say whether to try
        again (False once the budget is spent or the cutoff passed; the caller gives up)."""
        self.attempts += 1
        now = self.clock()
        if self.first_failure is None:
            self.first_failure = now
        if self.policy.attempts and self.attempts >= self.policy.attempts:
            return False
        left = self.first_failure + self.policy.budget - now
        cutoff = self.policy.cutoff() if self.policy.cutoff is not None else None
        if cutoff is not None:
            left = min(left, cutoff - now)
        if left <= 0:
            return False
        failing = now - self.first_failure
        if self.policy.on_slow is not None and not self.told and failing >= self.policy.slow_after:
            self.told = True
            self.policy.on_slow(problem, failing)
        ceiling = min(self.policy.max_delay, self.policy.first_delay * 2 ** (self.attempts - 1))
        self.sleep(min(left, self.rand() * ceiling))
        return True

    def elapsed(self) -> float:
        return 0.0 if self.first_failure is None else self.clock() - self.first_failure
