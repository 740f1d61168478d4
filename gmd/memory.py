"""The daemon's heap policy: freed write buffers go back to the system.

A daemon allocates a buffer per request of up to 1 MiB (pyfuse3's write data,
a received frame) and 8 MiB per chunk a copy reads, many of them in trio's
worker threads. glibc's default policy raises its mmap threshold to the size
of the largest block freed (up to 32 MiB), so after the first few such buffers
they come from the heap, or from one of up to eight arenas per core, and a
freed one is returned to the system only when nothing live sits above it.
Measured (docs/BENCHMARKS.md, "Memory"): an async primary under a 1 MiB write
flood held 290-390 MiB, of which the live objects were ~110 MiB. With the
threshold fixed at 2 MiB and one arena the same run peaks at ~150 MiB. (A
threshold of 128 KiB gave ~130 MiB but mapped and unmapped every 1 MiB write
buffer, which cost 30-40% of the sequential write throughput.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # mallopt parameters (glibc's malloc.h)
M_ARENA_MAX = -8
# Above a request's buffer (up to 1 MiB of data plus its header), so those are
# reused from the heap without a system call; below a copy's 8 MiB chunks,
# which are mapped apart and unmapped when freed. Fixed: no dynamic raise.
MMAP_THRESHOLD = 2 * 1024 * 1024
ARENA_MAX = 1  # worker threads allocate from the one heap (they run under the GIL anyway)


def bound_heap() -> str:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` and its arenas at
    :data:`ARENA_MAX` for this process (before its worker threads start), so
    the largest buffers are unmapped as soon as they are freed and freed
    memory is reused rather than kept per thread. Returns a line for the log
    saying what was done (an operator's own ``MALLOC_MMAP_THRESHOLD_`` or
    ``MALLOC_ARENA_MAX`` leaves the policy alone; so does a C library other
    than glibc)."""
    own = [k for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX") if k in os.environ]
    if own:
        return "heap: " + ", ".join(f"{k}={os.environ[k]}" for k in own) + " from the environment kept"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return f"heap: C library {name!r} has no mallopt; its default allocation policy kept"
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(M_ARENA_MAX, ARENA_MAX) != 1:
        return "heap: mallopt refused; the default allocation policy kept"
    return (f"heap: buffers over {MMAP_THRESHOLD >> 20} MiB are mapped apart and returned to the system when "
            f"freed; {ARENA_MAX} arena")
