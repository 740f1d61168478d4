"""Small process, port, mount and file helpers shared by the demo, the drill,
the benchmarks and the tests (the one definition of each), and the
benchmarks' description of the machine they ran on."""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import socket
import subprocess
from pathlib import Path

import xxhash

PR_SET_PDEATHSIG = 1


_HANDED_OUT: set[int] = set()  # every port free_ports gave this process (never given twice)
_HANDED_OUT_LIMIT = 10_000  # forgotten past this many: the ephemeral range holds about 28,000


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that were free a moment ago, none
    of them handed out before by this process: a port released by one call is
    free again for the next, and a cluster whose ports come from several calls
    would otherwise see one twice."""
    if len(_HANDED_OUT) > _HANDED_OUT_LIMIT:
        _HANDED_OUT.clear()
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            socks.append(s)  # held open until all are picked, so none repeats within the call
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    _HANDED_OUT.update(ports)
    return ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def die_with_parent() -> None:
    """preexec_fn: SIGKILL the child when this process dies, however it dies
    (even by SIGKILL), so no daemon outlives a killed run."""
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


def running(pid: int) -> bool:
    """``pid`` runs: it exists and is not a zombie (a killed process stays one
    until whoever started it reaps it, which may never be the one asking)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_naming(directory: str | os.PathLike[str]) -> list[str]:
    """Running processes (``pid: command line``) whose command line names ``directory``."""
    needle, found = os.fsencode(directory), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and int(pid) != os.getpid() and running(int(pid)):
            found.append(f"{pid}: {cmdline.replace(bytes(1), b' ').decode(errors='replace')}")
    return found


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """True if something is mounted at ``path`` (symlinks resolved)."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f if len(line.split()) > 1)


def unmount_fuse(path: str | os.PathLike[str]) -> None:
    """Remove a FUSE mount left by a killed process (lazily)."""
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", os.path.realpath(Path(path))], capture_output=True)


def file_hash(path: str | os.PathLike[str]) -> str:
    """xxh3-128 of a whole file (a member's backing file), read 4 MiB at a time."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def machine() -> str:
    """This machine as a benchmark reports it: host, cores, CPU model, kernel, Python."""
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python {platform.python_version()}"
