"""The allocator settings keep freed chunk buffers for reuse instead of faulting them in
again (cli/allocator.py), measured as the minor page faults of a loop shaped like the
backup's: workers allocate a chunk and its sealed copy, the caller's thread drops them."""

from __future__ import annotations

import subprocess
import sys

LOOP = """
import resource, sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from snapship.cli.allocator import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
def work(n):
    data = bytes(n)
    return bytearray(n // 2 + 1)
pending = deque()
with ThreadPoolExecutor(4) as pool:
    for i in range(1000):
        pending.append(pool.submit(work, (1 << 20) - (i % 4) * 250_000))
        if len(pending) > 16:
            pending.popleft().result()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", LOOP, mode], check=True, capture_output=True,
                         text=True).stdout
    return int(out)


def test_freed_chunk_buffers_are_reused_without_page_faults() -> None:
    default, tuned = faults("default"), faults("tuned")
    # By default most of the 1,000 chunks' pages are faulted in again (about 240 each).
    assert default > 50_000 and tuned * 5 < default, (default, tuned)
