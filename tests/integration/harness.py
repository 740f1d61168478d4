"""Real clusters for tests: node daemons as subprocesses on loopback, or in process.

Every process is started by this module and stopped by PID (SIGTERM, then
SIGKILL) in a ``finally``, whatever the test did; readiness is the daemon's own
``ready`` line on stdout, never a sleep.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import xxhash

from gmd import admin, control
from gmd.config import load_config
from gmd.daemon import NodeDaemon

GMD = str(Path(sys.executable).parent / "gmd")
MiB = 1 << 20


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago on 127.0.0.1."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class NodeSpec:
    name: str
    paths: int = 1  # addresses (paths) of this node
    mode: str | None = None  # member mode override
    votes: int | None = None  # the node's votes (config default 1)
    listen: list[int] = field(default_factory=list)
    address: list[int] = field(default_factory=list)


def write_config(directory: Path, nodes: list[NodeSpec], *, size: str = "64MiB", mode: str = "mwc",
                 secret: str = "test-secret", extra_volume: str = "", name: str = "gmd.toml",
                 extra_tables: str = "") -> Path:
    """A cluster config with volume ``appslv`` on every node; ports come from
    each spec's ``address``/``listen`` (filled with free ports when empty)."""
    parts = [f'secret = "{secret}"\n']
    for spec in nodes:
        if not spec.address:
            spec.address = free_ports(spec.paths)
        addr = ", ".join(f'"127.0.0.1:{p}"' for p in spec.address)
        listen = ""
        if spec.listen:
            listen = "listen = [" + ", ".join(f'"127.0.0.1:{p}"' for p in spec.listen) + "]\n"
        votes = f"votes = {spec.votes}\n" if spec.votes is not None else ""
        parts.append(f"\n[nodes.{spec.name}]\naddress = [{addr}]\n{listen}{votes}"
                     f'control = "run/{spec.name}.sock"\nmount = "run/{spec.name}"\n')
    parts.append(extra_tables)
    parts.append(f'\n[volumes.appslv]\nsize = "{size}"\nmode = "{mode}"\n{extra_volume}\n')
    for spec in nodes:
        parts.append(f'\n[volumes.appslv.members.{spec.name}]\ndevice = "data/{spec.name}/appslv.img"\n'
                     f'statemap = "data/{spec.name}/appslv.sm"\n')
        if spec.mode:
            parts.append(f'mode = "{spec.mode}"\n')
    path = directory / name
    path.write_text("".join(parts))
    return path


def init_in_sync(config_path: Path, primary: str, others: list[str]) -> None:
    """Fresh maps everywhere, ``primary`` the source, the others taken as
    identical (all backing files are new sparse zero files)."""
    cfg = load_config(config_path)
    for node in [primary, *others]:
        admin.init_volume(cfg, node, "appslv")
    admin.mark_dirty(cfg, primary, "appslv", skip_initial_copy=True)


class DaemonProcess:
    """A ``gmd daemon`` subprocess."""

    def __init__(self, config: Path, node: str, log_dir: Path):
        self.config = config
        self.node = node
        self.log_path = log_dir / f"{node}.log"
        self.proc: subprocess.Popen | None = None
        self.control = load_config(config).node(node).control

    def argv(self) -> list[str]:
        return [GMD, "daemon", "--config", str(self.config), "--node", self.node, "--debug"]

    def start(self, timeout: float = 20.0) -> None:
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv(),
            stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
        )
        logf.close()
        line = _readline_with_deadline(self.proc, timeout)
        if not line.startswith(b"ready"):
            self.kill()
            raise RuntimeError(f"daemon {self.node} did not start: {line!r}\n{self.log()}")

    def request(self, **req: Any) -> dict[str, Any]:
        reply = control.request(self.control, req)
        if not reply.get("ok"):
            raise RuntimeError(f"{self.node}: {req} failed: {reply}")
        return reply

    def status(self) -> dict[str, Any]:
        return self.request(op="status", volume="appslv")["status"]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def remove_dead_mount(self) -> None:
        """A daemon killed with SIGKILL leaves its FUSE mount; tests clean up."""
        mount = os.path.realpath(load_config(self.config).node(self.node).mount)
        with open("/proc/self/mounts") as f:
            if any(line.split()[1] == mount for line in f if len(line.split()) > 1):
                subprocess.run(["fusermount3", "-u", "-z", mount], capture_output=True)

    def stop(self) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""


class WitnessProcess(DaemonProcess):
    """A ``gmd witness`` subprocess (no control socket: it is driven by the nodes)."""

    def __init__(self, config: Path, name: str, log_dir: Path):
        self.config = config
        self.node = name
        self.log_path = log_dir / f"witness-{name}.log"
        self.proc = None
        self.control = None

    def argv(self) -> list[str]:
        return [GMD, "witness", "--config", str(self.config), "--name", self.node, "--debug"]

    def remove_dead_mount(self) -> None:
        pass


def witness_table(name: str, port: int, votes: int = 1) -> str:
    """A ``[witnesses.NAME]`` table for :func:`write_config`'s ``extra_tables``."""
    return (f'\n[witnesses.{name}]\naddress = "127.0.0.1:{port}"\nvotes = {votes}\n'
            f'state = "data/{name}/witness.json"\n')


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if the test process dies first (even by
    SIGKILL), so no daemon outlives a killed test run."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _readline_with_deadline(proc: subprocess.Popen, timeout: float) -> bytes:
    import select

    fd = proc.stdout.fileno()
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return b"<no ready line within %.0f s>" % timeout
    return proc.stdout.readline()


@contextmanager
def daemon_processes(config: Path, nodes: list[str], log_dir: Path):
    """Start a daemon subprocess per node; stop them all afterwards, by PID."""
    procs: dict[str, DaemonProcess] = {}
    try:
        for node in nodes:
            p = DaemonProcess(config, node, log_dir)
            procs[node] = p
            p.start()
        yield procs
    finally:
        for p in procs.values():
            p.stop()
            p.remove_dead_mount()


@asynccontextmanager
async def in_process_daemon(config_path: Path, node: str, *, mount: bool = False):
    """A node daemon inside the test's trio loop (the engine's API is reachable).
    No FUSE mount unless asked: pyfuse3 allows one per process."""
    cfg = load_config(config_path)
    daemon = NodeDaemon(cfg, node, mount=mount)
    async with trio.open_nursery() as n:
        await n.start(daemon.serve)
        try:
            yield daemon
        finally:
            daemon.stop()


async def wait_for(predicate, *, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` (sync or returning an awaitable) until true, within ``timeout``."""
    with trio.move_on_after(timeout):
        while True:
            result = predicate()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return result
            await trio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def file_hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def backing(directory: Path, node: str) -> Path:
    return directory / "data" / node / "appslv.img"


async def status_of(proc: DaemonProcess) -> dict[str, Any]:
    return await trio.to_thread.run_sync(proc.status)
