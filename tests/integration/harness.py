"""Real clusters for tests: node daemons as subprocesses on loopback, or in process.

Every process is started by this module and stopped by PID (SIGTERM, then
SIGKILL) in a ``finally``, whatever the test did; readiness is the daemon's own
``ready`` line on stdout, never a sleep.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tomllib
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import tomli_w
import trio

from gmd import admin, control
from gmd.config import load_config
from gmd.daemon import NodeDaemon
from tools import cluster_config
from tools.cluster_config import NodeSpec, write_cluster_config
from tools.procs import die_with_parent, file_hash, free_ports, unmount_fuse

__all__ = [
    "GMD", "MiB", "DaemonProcess", "NodeSpec", "WitnessProcess", "backing", "daemon_processes", "die_with_parent",
    "file_hash", "free_ports", "in_process_daemon", "init_in_sync", "status_of", "wait_for", "witness_table",
    "write_config",
]

GMD = str(Path(sys.executable).parent / "gmd")
MiB = 1 << 20


def write_config(directory: Path, nodes: list[NodeSpec], *, size: str = "64MiB", mode: str = "mwc",
                 secret: str = "test-secret", extra_volume: str = "", name: str = "gmd.toml",
                 extra_tables: str = "") -> Path:
    """A cluster config with volume ``appslv`` on every node (through the one
    writer, :func:`tools.cluster_config.write_cluster_config`); ports come from
    each spec's ``address``/``listen`` (filled with free ports when empty).
    ``extra_volume`` (keys of the volume's table) and ``extra_tables`` (whole
    tables) are TOML text, merged in."""
    return write_cluster_config(directory, nodes, name=name, size=size, mode=mode, secret=secret,
                                volume_settings=tomllib.loads(extra_volume), tables=tomllib.loads(extra_tables))


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
        unmount_fuse(load_config(self.config).node(self.node).mount)

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
    """A ``[witnesses.NAME]`` table (TOML text) for :func:`write_config`'s ``extra_tables``."""
    return tomli_w.dumps(cluster_config.witness_table(name, port, votes))


def _readline_with_deadline(proc: subprocess.Popen, timeout: float) -> bytes:
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


def backing(directory: Path, node: str) -> Path:
    return directory / "data" / node / "appslv.img"


async def status_of(proc: DaemonProcess) -> dict[str, Any]:
    return await trio.to_thread.run_sync(proc.status)
