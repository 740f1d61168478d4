"""Small process, port and mount helpers shared by the demo and the benchmarks."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
from pathlib import Path

PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def die_with_parent() -> None:
    """preexec_fn: SIGKILL the child when this process dies, however it dies."""
    ctypes.CDLL("libc.so.6").prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def stop_process(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM by PID and wait; SIGKILL if it does not stop in time."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def is_mounted(path: str | os.PathLike[str]) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f if len(line.split()) > 1)


def unmount_fuse(path: str | os.PathLike[str]) -> None:
    """Remove a FUSE mount left by a killed process (lazily)."""
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", os.path.realpath(Path(path))], capture_output=True)
