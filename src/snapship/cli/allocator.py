"""The C allocator's settings for a command that moves chunks (a process-wide choice).

glibc's malloc returns freed memory to the kernel as soon as the top of a heap holds more
than twice its (dynamically raised) mmap threshold: a 1 MiB chunk buffer freed by one worker
and allocated again by the next is then faulted in page by page every time. A 4 GiB backup
took 207,000-253,000 page faults that way (a restore 153,000), 45,000 with these settings
(44,000), and 0.2-0.4 s less system time (docs/perf.md); peak RSS did not change (165 MB),
since the pipeline's window bounds what is ever allocated at once.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 256 << 20
"""Freed memory kept before the top of a heap is given back."""
MMAP_THRESHOLD = 32 << 20
"""Allocations below this come from the heaps (glibc's maximum); setting it also stops the
dynamic adjustment."""


def keep_freed_memory() -> bool:
    """Apply the settings; False where the C library is not glibc (nothing changes)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
