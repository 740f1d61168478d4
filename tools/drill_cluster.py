"""The drill's clusters: a local one it builds (two nodes and a witness on
loopback, every link through a WAN proxy it controls), or a configured one it
reaches through the nodes' control sockets.

Local cluster
-------------
Each node reads its own config file (``NODE.toml``): the same cluster, except
that every *other* node and the witness are at the ports of proxies
(``python -m transport.wanproxy``) that forward to their real ports, as
behind NAT. A node's outgoing connections therefore all pass a proxy of its
own, so one node can be cut from everyone (a partition), or slowed, by the
proxies' control sockets, while the daemons run untouched. The witness reads
``witness.toml``, with its real port. Everything lives in one temporary
directory; every process is started here and stopped by PID.

Configured cluster
------------------
``--config FILE``: the nodes' daemons are already running (started by the
operator) and answer on their control sockets, as configured; the drill kills
a daemon by the PID it reports (``ping``) and starts it again with the same
config and node name. Partitions and slow links need WAN proxies the
operator placed on the links, named with ``--proxy NODE=SOCKET`` (repeatable).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from gmd import admin, control
from gmd.control import ControlUnavailable
from gmd.config import Config, load_config
from gmd.errors import GmdError
from tools.cluster_config import NodeSpec, cluster_document, witness_table
from tools.procs import die_with_parent, free_ports, running, stop_process, unmount_fuse
from transport.wanproxy import control_request as proxy_request

VOLUME = "appslv"


class DrillError(RuntimeError):
    """A step of the drill could not be done (what and why in the message)."""


def _read_ready(proc: subprocess.Popen, what: str, log: Path | None, timeout: float = 30.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode(errors="replace").strip() if ready else ""
    if not line:
        proc.kill()
        proc.wait()
        raise DrillError(f"{what} did not start within {timeout:.0f} s" + (f"; see {log}" if log else ""))
    return line


@dataclass
class Proxy:
    """One WAN proxy process: ``src`` reaches ``dst`` through it."""

    src: str
    dst: str
    control: Path
    proc: subprocess.Popen | None = None

    def ask(self, **req: Any) -> dict[str, Any]:
        reply = proxy_request(self.control, req)
        if not reply.get("ok"):
            raise DrillError(f"proxy {self.src}->{self.dst}: {req} failed: {reply.get('error')}")
        return reply


@dataclass
class Node:
    """A node daemon of the drill's cluster."""

    name: str
    config: Path
    control: Path
    mount: Path
    log: Path
    proc: subprocess.Popen | None = None
    pid: int | None = None


class Cluster:
    """What the drill needs of any cluster: daemons to ask, kill and start,
    links to cut, slow and heal. Subclasses say where things are."""

    volume = VOLUME
    nodes: dict[str, Node]
    witness_names: list[str]
    proxies: list[Proxy]

    base_delay = 0.0  # seconds one way on every proxied link when nothing is broken

    def __init__(self) -> None:
        self.nodes = {}
        self.witness_names = []
        self.proxies = []

    # ----------------------------------------------------------- asking

    def ask(self, node: str, **req: Any) -> dict[str, Any]:
        """A control request to ``node``; raises :class:`DrillError` with its error."""
        try:
            reply = control.request(self.nodes[node].control, req)
        except (OSError, GmdError, ControlUnavailable) as e:  # nothing listens (a killed daemon), or no answer
            raise DrillError(f"{node}: control socket {self.nodes[node].control}: {e}") from None
        if not reply.get("ok"):
            raise DrillError(f"{node}: {req.get('op')} failed: {reply.get('error')}")
        return reply

    def try_ask(self, node: str, **req: Any) -> dict[str, Any] | None:
        try:
            return self.ask(node, **req)
        except DrillError:
            return None

    def status(self, node: str) -> dict[str, Any]:
        return self.ask(node, op="status", volume=self.volume)["status"]

    def try_status(self, node: str) -> dict[str, Any] | None:
        reply = self.try_ask(node, op="status", volume=self.volume)
        return reply["status"] if reply else None

    def primary(self) -> str | None:
        """The node that says it is primary (None: none answers so)."""
        for n in self.nodes:
            st = self.try_status(n)
            if st and st.get("role") == "primary":
                return n
        return None

    def device(self, node: str) -> str:
        return str(self.nodes[node].mount / self.volume)

    def wait(self, what: str, pred, timeout: float = 60.0, interval: float = 0.05):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            result = pred()
            if result:
                return result
            time.sleep(interval)
        raise DrillError(f"timed out after {timeout:.0f} s waiting for {what}")

    # ------------------------------------------------------------ faults

    def kill(self, node: str) -> int:
        """SIGKILL ``node``'s daemon, by the PID it reports; returns the PID."""
        n = self.nodes[node]
        pid = n.proc.pid if n.proc is not None and n.proc.poll() is None else None
        if pid is None:
            reply = self.ask(node, op="ping")
            pid = int(reply["pid"])
        os.kill(pid, signal.SIGKILL)
        if n.proc is not None and n.proc.pid == pid:
            n.proc.wait(timeout=30)
        else:
            self.wait(f"{node}'s daemon (pid {pid}) to die", lambda: not running(pid), timeout=30)
        unmount_fuse(n.mount)  # a killed FUSE daemon leaves its mount behind
        return pid

    def start_node(self, node: str) -> None:
        """Start ``node``'s daemon (its config and node name) and wait for it."""
        n = self.nodes[node]
        logf = open(n.log, "ab")
        try:
            n.proc = subprocess.Popen(
                [sys.executable, "-m", "gmd", "daemon", "--config", str(n.config), "--node", node, "--debug"],
                stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        finally:
            logf.close()
        line = _read_ready(n.proc, f"daemon {node}", n.log)
        if not line.startswith("ready"):
            raise DrillError(f"daemon {node} did not start: {line}; see {n.log}")
        n.pid = n.proc.pid

    def links_of(self, node: str) -> list[Proxy]:
        """The proxies on every link to and from ``node``."""
        return [p for p in self.proxies if node in (p.src, p.dst)]

    def partition(self, node: str) -> None:
        links = self.links_of(node)
        if not links:
            raise DrillError(f"no WAN proxy on {node}'s links: a partition needs them (see --proxy)")
        for p in links:
            p.ask(op="partition", mode="blackhole")

    def slow(self, node: str, delay: float) -> None:
        links = self.links_of(node)
        if not links:
            raise DrillError(f"no WAN proxy on {node}'s links: a slow link needs them (see --proxy)")
        for p in links:
            p.ask(op="set", delay=self.baseline(p)["delay"] + delay)

    def baseline(self, p: Proxy) -> dict[str, Any]:
        """The WAN settings of link ``p`` when nothing is broken."""
        return {"delay": self.base_delay, "bandwidth": 0}

    def heal_links(self, node: str, *, keep_cut: tuple[str, ...] = ()) -> None:
        """Heal the links of ``node`` only, but not those to ``keep_cut``."""
        for p in self.links_of(node):
            if p.src not in keep_cut and p.dst not in keep_cut:
                p.ask(op="heal")
                p.ask(op="set", **self.baseline(p))

    def heal(self) -> None:
        for p in self.proxies:
            p.ask(op="heal")
            p.ask(op="set", **self.baseline(p))

    def describe(self) -> str:
        return ", ".join(self.nodes)

    def votes_of(self, node: str) -> int:
        """The votes of ``node``'s member of the volume, as configured."""
        raise NotImplementedError(f"{type(self).__name__} does not know its configuration")

    def backing(self, node: str) -> Path | None:
        """The member's backing file, if this machine can read it (local clusters)."""
        return None

    def teardown(self) -> None:
        pass


def _run(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise DrillError(f"{' '.join(argv)} failed: {r.stderr.strip() or r.stdout.strip()}")


class LocalCluster(Cluster):
    """Two nodes and a witness on loopback, built in a temporary directory."""

    def __init__(self, *, mode: str = "mwc", size: str = "128MiB", auto_promote: bool = True,
                 names: Iterable[str] = ("labor1", "labor2"), witness: str | None = "W",
                 volume_settings: dict[str, Any] | None = None, member_settings: dict[str, dict] | None = None,
                 keep: bool = False, directory: Path | None = None, delay: float = 0.0,
                 far: dict[str, dict[str, Any]] | None = None, more_volumes: Iterable[str] = ()):
        super().__init__()
        # More volumes like the first (its settings, their own files), e.g.
        # the rest of a consistency group: [VOLUME, *more_volumes].
        self.volumes = [VOLUME, *more_volumes]
        self.base_delay = delay
        # Far sites: node -> {"delay": s, "bandwidth": bytes/s} on every link to
        # and from it, on top of ``delay`` (a DR site across a WAN).
        self.far = dict(far or {})
        self.mode, self.size, self.auto_promote, self.keep = mode, size, auto_promote, keep
        self.dir = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="gmd-drill-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.names = list(names)
        self.witness_names = [witness] if witness else []  # None: two sites alone, 1 vote each
        self.volume_settings = {"auto_promote": auto_promote, **(volume_settings or {})}
        self.member_settings = member_settings or {}
        self.witness_proc: subprocess.Popen | None = None
        self.small_disks: list[Path] = []  # mounts made by limit_disk
        self.witness_config = self.dir / "witness.toml"
        self.config_of: dict[str, Config] = {}
        self._write_configs()

    def _write_configs(self) -> None:
        everyone = [*self.names, *self.witness_names]
        real = dict(zip(everyone, free_ports(len(everyone))))
        pairs = [(s, d) for s in self.names for d in everyone if s != d]
        proxied = dict(zip(pairs, free_ports(len(pairs))))
        self.real, self.proxied = real, proxied
        w = self.witness_names[0] if self.witness_names else None

        def witness_tables(port_of: dict) -> dict[str, Any]:
            return witness_table(w, port_of[w], state=f"data/{w}/witness.json") if w else {}

        for me in self.names:
            specs = []
            for n in self.names:
                port = real[n] if n == me else proxied[(me, n)]
                specs.append(NodeSpec(n, address=[port], listen=[real[n]] if n == me else [],
                                      member=dict(self.member_settings.get(n, {}))))
            doc = cluster_document(specs, volume=VOLUME, size=self.size, mode=self.mode, secret="drill-secret",
                                   volume_settings=self.volume_settings,
                                   tables=witness_tables({w: proxied[(me, w)]} if w else {}))
            self._add_volumes(doc)
            path = self.dir / f"{me}.toml"
            path.write_text(tomli_w.dumps(doc))
            cfg = self.config_of[me] = load_config(path)
            node = cfg.node(me)
            self.nodes[me] = Node(me, path, node.control, node.mount, self.dir / f"{me}.log")
        if w:
            doc = cluster_document([NodeSpec(n, address=[real[n]]) for n in self.names], volume=VOLUME,
                                   size=self.size, mode=self.mode, secret="drill-secret",
                                   volume_settings=self.volume_settings, tables=witness_tables(real))
            self._add_volumes(doc)
            self.witness_config.write_text(tomli_w.dumps(doc))
            (self.dir / "data" / w).mkdir(parents=True, exist_ok=True)
        self.proxies = [Proxy(s, d, self.dir / f"proxy-{s}-{d}.sock") for s, d in pairs]

    def _add_volumes(self, doc: dict[str, Any]) -> None:
        """Copy the first volume's table for each further volume, with files of its own."""
        first = doc["volumes"][VOLUME]
        for name in self.volumes[1:]:
            table = {**first, "members": {}}
            for node, member in first["members"].items():
                table["members"][node] = {k: (v.replace(f"/{VOLUME}.", f"/{name}.") if isinstance(v, str) else v)
                                          for k, v in member.items()}
            doc["volumes"][name] = table

    def baseline(self, p: Proxy) -> dict[str, Any]:
        settings = {"delay": self.base_delay, "bandwidth": 0}
        for end in (p.src, p.dst):
            if end in self.far:
                settings["delay"] = self.base_delay + float(self.far[end].get("delay", 0.0))
                settings["bandwidth"] = int(self.far[end].get("bandwidth", 0))
        return settings

    def describe(self) -> str:
        delay = f" ({self.base_delay * 1000:.0f} ms one way)" if self.base_delay else ""
        witness = f" and witness {', '.join(self.witness_names)}" if self.witness_names else " (no witness)"
        far = "".join(f"; {n} far: {f.get('delay', 0) * 1000:.0f} ms one way"
                      + (f", {f['bandwidth'] / 1e6:.0f} MB/s" if f.get("bandwidth") else "")
                      for n, f in self.far.items())
        return f"local: {', '.join(self.names)}{witness} on loopback, every link through a WAN proxy{delay}{far}"

    def backing(self, node: str, volume: str = VOLUME) -> Path:
        return self.config_of[node].member(volume, node).device

    def votes_of(self, node: str) -> int:
        return self.config_of[node].member(VOLUME, node).votes

    def limit_disk(self, node: str, size: int) -> Path:
        """Put ``node``'s member files (backing file and state map) on a file
        system of ``size`` bytes of its own: ext4 without reserved blocks on a
        loop device, mounted at the member's directory (before
        :meth:`init_volume`). Returns the mount point; :meth:`fill_disk` fills it."""
        where = self.backing(node).parent
        where.mkdir(parents=True, exist_ok=True)
        image = self.dir / f"{node}-disk.img"
        with open(image, "wb") as f:
            f.truncate(size)
        _run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "nodiscard", str(image))
        _run("mount", "-o", "loop", str(image), str(where))
        self.small_disks.append(where)
        return where

    def fill_disk(self, node: str) -> int:
        """Fill ``node``'s small file system (:meth:`limit_disk`) to the last
        block with a filler file; returns the bytes it took."""
        filler = self.backing(node).parent / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            st = os.statvfs(filler)
            try:
                os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize)
            except OSError:
                pass  # metadata blocks may not fit: the rest is filled below
            end = os.fstat(fd).st_size
            block = bytes(4096)
            while True:
                try:
                    end += os.pwrite(fd, block, end)
                except OSError:
                    break
            os.fsync(fd)
            return end
        finally:
            os.close(fd)

    def free_disk(self, node: str) -> None:
        """Undo :meth:`fill_disk`."""
        (self.backing(node).parent / "filler").unlink(missing_ok=True)

    def init_volume(self, primary: str) -> None:
        """Fresh maps and sparse files everywhere; ``primary`` the source and the
        others taken as identical (all files are zeros), so no initial copy."""
        for n in self.names:
            for v in self.volumes:
                admin.init_volume(self.config_of[n], n, v)
        for v in self.volumes:
            admin.mark_dirty(self.config_of[primary], primary, v, skip_initial_copy=True)

    def start(self) -> None:
        """Proxies, the witness and every node's daemon; the volume up everywhere."""
        for p in self.proxies:
            target = self.real[p.dst]
            listen = self.proxied[(p.src, p.dst)]
            log = open(self.dir / f"proxy-{p.src}-{p.dst}.log", "ab")
            try:
                p.proc = subprocess.Popen(
                    [sys.executable, "-m", "transport.wanproxy", "--listen", f"127.0.0.1:{listen}",
                     "--target", f"127.0.0.1:{target}", "--control", str(p.control),
                     "--delay", str(self.baseline(p)["delay"]), "--bandwidth", str(self.baseline(p)["bandwidth"])],
                    stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
            finally:
                log.close()
            line = _read_ready(p.proc, f"proxy {p.src}->{p.dst}", None)
            if not line.startswith("listening"):
                raise DrillError(f"proxy {p.src}->{p.dst} did not start: {line}")
        if self.witness_names:
            self.start_witness()
        for n in self.names:
            self.start_node(n)
        for n in self.names:
            for v in self.volumes:
                self.ask(n, op="up", volume=v)

    def start_witness(self) -> None:
        w = self.witness_names[0]
        log_path = self.dir / f"witness-{w}.log"
        logf = open(log_path, "ab")
        try:
            self.witness_proc = subprocess.Popen(
                [sys.executable, "-m", "gmd", "witness", "--config", str(self.witness_config), "--name", w,
                 "--debug"], stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent)
        finally:
            logf.close()
        line = _read_ready(self.witness_proc, f"witness {w}", log_path)
        if not line.startswith("ready"):
            raise DrillError(f"witness {w} did not start: {line}")

    def kill_witness(self) -> int:
        proc = self.witness_proc
        if proc is None or proc.poll() is not None:
            raise DrillError("the witness is not running")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return proc.pid

    def partition_witness(self) -> None:
        for p in self.proxies:
            if p.dst in self.witness_names:
                p.ask(op="partition", mode="blackhole")

    def teardown(self) -> None:
        """Stop every process by PID, remove FUSE mounts and (unless kept) the directory."""
        for n in self.nodes.values():
            if n.proc is not None and n.proc.poll() is None:
                try:
                    for v in self.volumes:
                        control.request(n.control, {"op": "down", "volume": v, "force": True}, timeout=30)
                except Exception:
                    pass  # stopped below regardless
            if n.proc is not None:
                stop_process(n.proc, timeout=30)
            unmount_fuse(n.mount)
        if self.witness_proc is not None:
            stop_process(self.witness_proc, timeout=10)
        for p in self.proxies:
            if p.proc is not None:
                stop_process(p.proc, timeout=10)
        for where in self.small_disks:
            # The loop device goes with the last reference to the mount.
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


class ConfiguredCluster(Cluster):
    """A cluster the operator runs from ``config``: the drill reaches each node
    of the volume through its control socket."""

    def __init__(self, config_path: Path, volume: str, proxies: dict[str, list[Path]] | None = None,
                 log_dir: Path | None = None):
        super().__init__()
        self.config = load_config(Path(config_path).resolve())
        if volume not in self.config.volumes:
            raise DrillError(f"{config_path}: no volume {volume} (volumes: {', '.join(self.config.volumes)})")
        self.volume = volume
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="gmd-drill-"))
        vol = self.config.volumes[volume]
        for name in vol.members:
            node = self.config.node(name)
            self.nodes[name] = Node(name, self.config.path, node.control, node.mount,
                                    self.log_dir / f"{name}.log")
        self.witness_names = list(self.config.witnesses)
        for node, socks in (proxies or {}).items():
            if node not in self.nodes:
                raise DrillError(f"--proxy {node}=...: {node} is not a member of {volume}")
            self.proxies.extend(Proxy(node, "?", Path(s)) for s in socks)

    def start_node(self, node: str) -> None:
        """Start ``node``'s daemon again (the config and node name it ran with),
        in a session of its own and logging to a file, so that it outlives the
        drill as the operator's daemon did; ready once it answers a ping."""
        n = self.nodes[node]
        with open(n.log, "ab") as logf:
            subprocess.Popen(
                [sys.executable, "-m", "gmd", "daemon", "--config", str(n.config), "--node", node],
                stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True)
        reply = self.wait(f"{node}'s daemon to answer on {n.control}",
                          lambda: self.try_ask(node, op="ping"), timeout=60)
        n.pid = int(reply["pid"])

    def describe(self) -> str:
        return f"{self.config.path} ({', '.join(self.nodes)})"

    def votes_of(self, node: str) -> int:
        return self.config.member(self.volume, node).votes

    def links_of(self, node: str) -> list[Proxy]:
        return [p for p in self.proxies if p.src == node]
