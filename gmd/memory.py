"""The daemon's heap policy: freed write buffers go back to the system.

A daemon allocates a buffer per request of up to 1 MiB (pyfuse3's write data,
a received frame) and 8 MiB per chunk a copy reads, many of them in trio's
worker threads. glibc's default policy raises its mmap threshold to the size
of the largest block freed (up to 32 MiB), so after the first few such buffers
they come from the heap, or from one of up to eight arenas per core, and a
freed one is returned to the system only when nothing live sits above it.
Measured (docs/BENCHMARKS.md, "Memory"): an async primary under a 1 MiB write
flood held 290-390 MiB, of which the live objects were ~110 MiB. With the
threshold fixed at 128 KiB every large buffer is its own mapping, unmapped when
freed, and the same run peaks at ~130 MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc's malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, kept fixed (no dynamic raise)


def bound_heap() -> str:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` for this process,
    so large buffers are unmapped as soon as they are freed. Returns a line for
    the log saying what was done (an operator's own ``MALLOC_MMAP_THRESHOLD_``
    is left in force; a C library other than glibc is left alone)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return f"heap: MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']} from the environment kept"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return f"heap: C library {name!r} has no mallopt; its default allocation policy kept"
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return "heap: mallopt(M_MMAP_THRESHOLD) refused; the default allocation policy kept"
    return f"heap: buffers over {MMAP_THRESHOLD // 1024} KiB are mapped apart and returned to the system when freed"
