"""The daemon's heap policy returns freed request buffers to the system.

Run in a fresh interpreter each: the policy is process-wide, and the point is
what a process's resident memory does after buffers like a daemon's (1 MiB
each, allocated in worker threads among small long-lived objects) are freed.
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

def requests():
    buffers = []
    for _ in range(200):
        buffers.append(os.urandom(1 << 20)[:-1] + b"x")  # a write's data
        keep.append(bytearray(100))  # something long-lived allocated after it
    buffers.clear()

threads = [threading.Thread(target=requests) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(rss_mib() - before)
"""


def _growth_mib(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, env=env,
                         check=True, timeout=60)
    return int(out.stdout.strip())


def test_freed_request_buffers_leave_the_process():
    # 400 MiB of 1 MiB buffers passed through; what stays resident is the
    # small objects (a few MiB), not the freed buffers.
    assert _growth_mib("bound") < 32


def test_the_default_policy_keeps_them_which_is_why_the_daemon_sets_its_own():
    # The same churn without bound_heap keeps most of the freed buffers
    # resident: the test above measures the policy, not a quiet allocator.
    assert _growth_mib("default") > 100


def test_an_operators_own_threshold_is_left_in_force(monkeypatch):
    from gmd.memory import bound_heap

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert "from the environment kept" in bound_heap()
