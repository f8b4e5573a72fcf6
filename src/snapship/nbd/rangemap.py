"""A map from disjoint byte ranges to small integer states (pure; the overlay's bookkeeping).

Setting a range overwrites whatever it covers, splitting ranges at its edges; touching ranges
with the same state are merged, so a sequential writer leaves one range, not one per write.
Operations cost O(log n) to find the place plus O(k) for the k ranges they replace (and a list
insert): fine for the tens of thousands of ranges a busy overlay may hold.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator


class RangeMap:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._states: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def set(self, start: int, end: int, state: int) -> None:
        """Give [start, end) the state `state`."""
        if end <= start:
            return
        starts, ends, states = self._starts, self._ends, self._states
        # Ranges that overlap or touch [start, end): i .. j-1.
        i = bisect_left(ends, start)
        j = bisect_right(starts, end)
        new_s: list[int] = []
        new_e: list[int] = []
        new_v: list[int] = []
        lo, hi = start, end
        for k in range(i, j):
            s, e, v = starts[k], ends[k], states[k]
            if v == state:
                lo, hi = min(lo, s), max(hi, e)  # same state: absorb (touching or overlapping)
                continue
            if s < start:
                new_s.append(s)
                new_e.append(start)
                new_v.append(v)
            if e > end:
                tail = (end, e, v)
                break
        else:
            tail = None
        new_s.append(lo)
        new_e.append(hi)
        new_v.append(state)
        if tail is not None:
            new_s.append(tail[0])
            new_e.append(tail[1])
            new_v.append(tail[2])
        starts[i:j] = new_s
        ends[i:j] = new_e
        states[i:j] = new_v

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, int | None]]:
        """(start, end, state) pieces covering [start, end) exactly; None where nothing is set."""
        pos = start
        k = bisect_right(self._ends, start)
        while pos < end:
            if k >= len(self._starts) or self._starts[k] >= end:
                yield pos, end, None
                return
            s, e, v = self._starts[k], self._ends[k], self._states[k]
            if s > pos:
                yield pos, s, None
                pos = s
            stop = min(e, end)
            yield pos, stop, v
            pos = stop
            k += 1

    def items(self) -> Iterator[tuple[int, int, int]]:
        """Every (start, end, state), in order."""
        return zip(self._starts, self._ends, self._states, strict=True)

    def covered(self) -> int:
        """Bytes with any state."""
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))
