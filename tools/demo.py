"""``gmd demo``: a whole local cluster, end to end, on embedded defaults.

Two node daemons on loopback, a 256 MiB ``mwc`` volume, HAGEO-style
dirty/clean, the primary's volume as a loop device with ext4 on it, files
written and synced, and then the proof: the member's backing file is byte for
byte the primary's, with the member uptodate after the initial full copy.
Everything is torn down at the end, also on Ctrl-C or a failure. Talks to the daemons only through their control sockets.
"""

from __future__ import annotations

import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from gmd import admin, control
from gmd.config import load_config
from tools.cluster_config import NodeSpec, write_cluster_config
from tools.procs import die_with_parent, file_hash, stop_process, unmount_fuse
from tools.status_text import format_status

NODES = ("labor1", "labor2")
SIZE = "256MiB"


def say(msg: str) -> None:
    print(f"demo: {msg}", flush=True)


def _run(*cmd) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def _preflight() -> str | None:
    if os.geteuid() != 0:
        return "the demo mounts FUSE and ext4 and attaches a loop device: run it as root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (load the fuse module)"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount", "fusermount3"):
        if not shutil.which(tool):
            return f"{tool} is not installed (./quickstart installs it)"
    return None


class Demo:
    def __init__(self, keep: bool):
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix="gmd-demo-"))
        self.config_path = self.dir / "gmd.toml"
        self.procs: dict[str, subprocess.Popen] = {}
        self.fs_mount: Path | None = None
        self.config = None

    def write_config(self) -> None:
        self.config_path = write_cluster_config(self.dir, [NodeSpec(n) for n in NODES], size=SIZE,
                                                secret="demo-secret")
        self.config = load_config(self.config_path)

    def start_daemon(self, node: str) -> None:
        log = open(self.dir / f"{node}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "gmd", "daemon", "--config", str(self.config_path), "--node", node],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
        )
        log.close()
        self.procs[node] = proc
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else b""
        if not line.startswith(b"ready"):
            raise RuntimeError(f"daemon {node} did not start; see {self.dir / (node + '.log')}")
        say(f"daemon {node} running (pid {proc.pid}): {line.decode().strip()}")

    def ask(self, node: str, **req):
        reply = control.request(self.config.node(node).control, req)
        if not reply.get("ok"):
            raise RuntimeError(f"{node}: {req['op']} failed: {reply.get('error')}")
        return reply

    def status(self, node: str) -> dict:
        return self.ask(node, op="status", volume="appslv")["status"]

    def wait(self, what: str, pred, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return
            time.sleep(0.05)
        raise RuntimeError(f"timed out waiting for {what}")

    def run(self) -> int:
        say(f"working directory {self.dir}")
        self.write_config()
        say(f"cluster config {self.config_path}: nodes {', '.join(NODES)} on 127.0.0.1, volume appslv "
            f"({SIZE}, mode mwc)")
        say("quorum: two nodes of 1 vote each and no witness: both must be present to write "
            "(a third site's 'gmd witness' would let one node go on alone)")
        for n in NODES:
            admin.init_volume(self.config, n, "appslv")
        say("gmd init appslv on both nodes: state maps and sparse backing files created")
        admin.mark_dirty(self.config, "labor1", "appslv")
        admin.mark_clean(self.config, "labor2", "appslv")
        say("gmddirty -l appslv on labor1 (copy source), gmdclean -l appslv on labor2 (copy target)")
        for n in NODES:
            self.start_daemon(n)
        self.ask("labor2", op="up", volume="appslv")
        self.ask("labor1", op="up", volume="appslv", loop=True)
        self.wait("the members to connect",
                  lambda: self.status("labor1")["members"]["labor2"]["link"] == "connected")
        reply = self.ask("labor1", op="primary", volume="appslv")
        dev, loop = reply["device"], reply["loop"]
        say(f"labor1 is primary: volume file {dev}, loop device {loop}")
        self.wait("the initial full copy to labor2",
                  lambda: self.status("labor1")["members"]["labor2"]["disk"] == "uptodate", timeout=300)
        say("initial full copy to labor2 done: regions compared by hash, only differing ones sent "
            "(both backing files started as zeros, so nothing had to move); labor2 is uptodate")

        _run("mkfs.ext4", "-q", "-F", "-L", "appslv", loop)
        self.fs_mount = self.dir / "mnt"
        self.fs_mount.mkdir()
        _run("mount", loop, self.fs_mount)
        say(f"ext4 made on {loop} and mounted at {self.fs_mount}")
        rng = random.Random(2026)
        crcs = {}
        total = 0
        for d in range(4):
            (self.fs_mount / f"dept{d}").mkdir()
            for f in range(25):
                data = rng.randbytes(rng.choice([512, 8192, 100_000, 700_000]))
                path = self.fs_mount / f"dept{d}" / f"record{f:03d}.dat"
                path.write_bytes(data)
                crcs[path] = zlib.crc32(data)
                total += len(data)
        _run("sync")
        say(f"wrote {len(crcs)} files ({total / 2**20:.1f} MiB) and synced")
        _run("umount", self.fs_mount)
        _run("mount", "-o", "ro", loop, self.fs_mount)
        bad = [p for p, c in crcs.items() if zlib.crc32(p.read_bytes()) != c]
        _run("umount", self.fs_mount)
        self.fs_mount = None
        if bad:
            say(f"FAILED: {len(bad)} files read back wrong")
            return 1
        say("remounted read-only: every file reads back intact")
        fd = os.open(dev, os.O_RDWR)
        try:
            os.fsync(fd)  # a barrier on every member
        finally:
            os.close(fd)
        h1 = file_hash(self.config.member("appslv", "labor1").device)
        h2 = file_hash(self.config.member("appslv", "labor2").device)
        self.wait("labor2 to be uptodate", lambda: self.status("labor1")["members"]["labor2"]["disk"] == "uptodate")
        say(f"xxh3-128 of labor1's backing file: {h1}")
        say(f"xxh3-128 of labor2's backing file: {h2}")
        print(format_status(self.status("labor1")), flush=True)
        if h1 != h2:
            say("FAILED: the member's copy differs from the primary's")
            return 1
        say("the member's copy is byte-identical to the primary's")
        return 0

    def teardown(self) -> None:
        if self.fs_mount is not None:
            subprocess.run(["umount", str(self.fs_mount)], capture_output=True)
        for n in NODES:
            try:
                if n in self.procs and self.procs[n].poll() is None:
                    self.ask(n, op="down", volume="appslv")  # detaches the loop device
            except Exception as e:
                say(f"{n}: clean down failed ({e}); stopping the daemon anyway")
        for n, proc in self.procs.items():
            stop_process(proc, timeout=30)
            if self.config is not None:
                unmount_fuse(self.config.node(n).mount)
        if self.keep:
            say(f"kept {self.dir} (logs, config, backing files)")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
            say("cleaned up: daemons stopped, mounts and loop device removed, files deleted")


def run_demo(*, keep: bool = False) -> int:
    problem = _preflight()
    if problem:
        say(problem)
        return 1
    demo = Demo(keep)
    try:
        return demo.run()
    except KeyboardInterrupt:
        say("interrupted; tearing down")
        return 130
    except Exception as e:
        say(f"FAILED: {e}")
        return 1
    finally:
        demo.teardown()
