"""The daemon's heap policy keeps freed request buffers from piling up.

Run in a fresh interpreter each: the policy is process-wide, and the point is
what a process's resident memory does after buffers like a daemon's (a copy's
8 MiB chunks and 1 MiB write buffers, allocated in worker threads among small
long-lived objects) are freed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")

CHURN = r"""
import os, sys, threading
from gmd.memory import bound_heap

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024

if sys.argv[1] == "bound":
    print(bound_heap(), file=sys.stderr)
before = rss_mib()
keep = []
turns = [threading.Event() for _ in range(9)]

def worker(i):
    # Eight worker threads alive at once, taking turns: each reads copy chunks
    # and holds write buffers, then frees them all and hands on.
    turns[i].wait()
    buffers = []
    for _ in range(4):
        buffers.append(os.urandom(8 << 20)[:-1] + b"x")  # a copy's chunk
        buffers.pop()
        for _ in range(8):
            buffers.append(os.urandom(1 << 20)[:-1] + b"x")  # a write's data
            keep.append(bytearray(100))  # something long-lived allocated after it
    buffers.clear()
    turns[i + 1].set()

threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
turns[0].set()
turns[8].wait()
print(rss_mib() - before)
for t in threads:
    t.join()
"""


def _growth_mib(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, env=env,
                         check=True, timeout=60)
    return int(out.stdout.strip())


def test_freed_request_buffers_are_reused_or_returned_not_kept_per_thread():
    # 512 MiB of buffers passed through eight threads, 32 MiB of write
    # buffers live at a time: what stays resident is about that, reused turn
    # after turn by whichever thread allocates next.
    assert _growth_mib("bound") < 48


def test_the_default_policy_keeps_them_which_is_why_the_daemon_sets_its_own():
    # The same churn without bound_heap keeps freed buffers resident in
    # several threads' arenas (91 MiB here): the test above measures the
    # policy, not a quiet allocator.
    assert _growth_mib("default") > 64


def test_an_operators_own_threshold_is_left_in_force(monkeypatch):
    from gmd.memory import bound_heap

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert "from the environment kept" in bound_heap()
