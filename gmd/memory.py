"""The daemon's heap policy: buffers freed by any thread are reused, not kept per thread.

A daemon allocates a buffer per request of up to 1 MiB (pyfuse3's write data,
a received frame) and 8 MiB per chunk a copy reads, many of them in trio's
worker threads. glibc's default policy raises its mmap threshold to the size
of the largest block freed (up to 32 MiB), so after the first few such buffers
they come from the heap, or from one of up to eight arenas per core, and a
freed one is returned to the system only when nothing live sits above it.
Measured (docs/BENCHMARKS.md, "Memory"): an async primary under a 1 MiB write
flood held 290-390 MiB, of which the live objects were ~110 MiB, most of the
rest in worker threads' arenas. With one arena the same run peaks at ~150
MiB. Fixing the mmap threshold instead (128 KiB: ~130 MiB; 2 MiB with one
arena: ~150 MiB) mapped and zeroed large buffers afresh each time, and cost
up to 45% of replicated sequential writes and a third of the copy's speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_ARENA_MAX = -8  # mallopt parameter (glibc's malloc.h)
ARENA_MAX = 1  # worker threads allocate from the one heap (they run under the GIL anyway)


def bound_heap() -> str:
    """Limit glibc to :data:`ARENA_MAX` arena for this process (before its
    worker threads start), so memory a thread freed is reused by the next
    buffer whichever thread allocates it, instead of staying in that thread's
    arena. Returns a line for the log saying what was done (an operator's own
    ``MALLOC_ARENA_MAX`` or ``MALLOC_MMAP_THRESHOLD_`` leaves the policy
    alone; so does a C library other than glibc)."""
    own = [k for k in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_") if k in os.environ]
    if own:
        return "heap: " + ", ".join(f"{k}={os.environ[k]}" for k in own) + " from the environment kept"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return f"heap: C library {name!r} has no mallopt; its default allocation policy kept"
    if mallopt(M_ARENA_MAX, ARENA_MAX) != 1:
        return "heap: mallopt(M_ARENA_MAX) refused; the default allocation policy kept"
    return f"heap: {ARENA_MAX} malloc arena for every thread (freed buffers are reused, not kept per thread)"
