"""Retrying transient storage failures: exponential backoff with full jitter, within a time
budget counted from the first failure of an operation.

Backends that talk to a network (storage/http.py, storage/s3.py) decide what is transient
(`TransientStorageError`) and never wait themselves; `RetryingStorage` wraps such a backend
and does the waiting, for every operation of the contract alike. A batch that is many
requests (S3's `stat_many`, one HEAD per key) may fail part-way with `PartlyAnswered`: the
retry then asks again only for the keys still unanswered.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from snapship.errors import ObjectNotFound, TransientStorageError
from snapship.storage.base import CreateFn, Storage, StorageDefaults, creator

T = TypeVar("T")

DEFAULT_RETRY_TIME = 60.0
SLOW_AFTER = 3.0


class PartlyAnswered(TransientStorageError):
    """A `stat_many` of which some keys failed transiently: what the others answered, so a
    retry does not ask for them again."""

    def __init__(self, message: str, problem: str | None, answered: dict[str, int | None]
                 ) -> None:
        super().__init__(message, problem)
        self.answered = answered


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
        doublings = min(self.attempts - 1, 60)  # beyond that the cap rules anyway
        ceiling = min(self.policy.max_delay, self.policy.first_delay * 2 ** doublings)
        self.sleep(min(left, self.rand() * ceiling))
        return True

    def elapsed(self) -> float:
        return 0.0 if self.first_failure is None else self.clock() - self.first_failure


def run(policy: RetryPolicy, fn: Callable[[], T]) -> T:
    """`fn()`, tried again while it raises `TransientStorageError` and the policy allows;
    the last error, with how long was tried, once it does not."""
    retry = policy.start()
    while True:
        try:
            return fn()
        except TransientStorageError as e:
            if retry.again(e.problem):
                continue
            if retry.attempts > 1:
                raise TransientStorageError(f"{e} (gave up after {retry.attempts} attempts in "
                                            f"{retry.elapsed():.0f} s)") from None
            raise


class RetryingStorage(StorageDefaults):
    """Any backend, its transient failures retried under `policy` (restic's RetryBackend).

    Every operation of the contract is safe to repeat: a put repeated after it was done
    stores the same bytes again, a delete of a missing key succeeds, GET/stat/list/flush change
    nothing. Two need care: a rename whose earlier attempt may have moved the object finds
    `src` gone and `dst` there, which is success; and a listing that fails part-way resumes
    after the last key it gave, if the backend lists in key order (`ordered_listing`), or
    starts again and skips the keys it gave already."""

    def __init__(self, inner: Storage, policy: RetryPolicy | None = None) -> None:
        self.inner = inner
        self.policy = policy or RetryPolicy()
        self.capabilities = inner.capabilities

    def put(self, key: str, data: bytes | bytearray) -> None:
        run(self.policy, lambda: self.inner.put(key, data))

    def creator(self) -> CreateFn | None:
        """The inner create, retried: an attempt that stored the object but lost the answer
        makes the retry find it there (False), which its caller must take as "maybe mine"."""
        inner = creator(self.inner)
        if inner is None:
            return None
        return lambda key, data: run(self.policy, lambda: inner(key, data))

    def get(self, key: str) -> bytes:
        return run(self.policy, lambda: self.inner.get(key))

    def stat(self, key: str) -> int | None:
        return run(self.policy, lambda: self.inner.stat(key))

    def stat_many(self, keys: Iterable[str]) -> dict[str, int | None]:
        todo = list(keys)
        answered: dict[str, int | None] = {}

        def stat_rest() -> dict[str, int | None]:
            nonlocal todo
            try:
                answered.update(self.inner.stat_many(todo))
            except PartlyAnswered as e:
                answered.update(e.answered)
                todo = [k for k in todo if k not in answered]
                raise
            return answered

        return run(self.policy, stat_rest)

    def list(self, prefix: str, after: str | None = None) -> Iterator[tuple[str, int]]:
        retry = self.policy.start()
        last = after
        seen: set[str] = set()
        ordered = self.inner.capabilities.ordered_listing
        while True:
            try:
                for key, size in self.inner.list(prefix, last if ordered else after):
                    if not ordered:
                        if key in seen:
                            continue
                        seen.add(key)
                    last = key
                    yield key, size
                return
            except TransientStorageError as e:
                if not retry.again(e.problem):
                    raise TransientStorageError(f"{e} (gave up after {retry.attempts} "
                                                f"attempts in {retry.elapsed():.0f} s)"
                                                ) from None

    def delete(self, key: str) -> None:
        run(self.policy, lambda: self.inner.delete(key))

    def rename(self, src: str, dst: str) -> None:
        tried = False

        def rename() -> None:
            nonlocal tried
            try:
                self.inner.rename(src, dst)
            except ObjectNotFound:
                # An attempt that failed on the way back may have moved it already.
                if not tried or self.inner.stat(dst) is None:
                    raise
            except TransientStorageError:
                tried = True
                raise

        run(self.policy, rename)

    def flush(self) -> None:
        run(self.policy, self.inner.flush)

    def remove_temporaries(self, older_than: float) -> int:
        return self.inner.remove_temporaries(older_than)

    def describe(self) -> str:
        return self.inner.describe()
