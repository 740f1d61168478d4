"""The torture suite: randomized schedules of faults under the verifying workload.

One local drill cluster (two nodes in ``mwc``, a witness, every link through a
WAN proxy, ``auto_promote`` on) runs for ``GMD_TORTURE_ROUNDS`` rounds (a
short form by default). Each round injects one fault drawn from the seeded
schedule — SIGKILL of the primary, the secondary or the witness; a clean
restart of the secondary; a partition of the primary, the secondary or the
witness; a slow secondary; the secondary's file system full (each member's
files live on a small ext4 of their own) — while the stamping writers run, then heals it
(restarts what was killed, heals the link; the primary's loss is taken over
automatically). After every round:

* every acknowledged write is on the primary with its latest stamp (RPO 0);
* the members are byte-identical after a barrier (xxh3-128 of the backing files);
* exactly one primary, and no link refused for split-brain (nothing was forced).

At the end no process and no mount of the cluster is left. The seed is printed
(``-s``) and named in every failure; ``GMD_TORTURE_SEED=N`` replays a schedule.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest

from tools.drill import read_blocks
from tools.drill_cluster import LocalCluster
from tools.procs import file_hash, processes_naming
from tools.stamps import verify
from tools.workload import Workload

ROUNDS = int(os.environ.get("GMD_TORTURE_ROUNDS", "5"))
SEED = int(os.environ.get("GMD_TORTURE_SEED", str(random.randrange(1 << 31))))
FAULTS = ("kill-primary", "partition-primary", "kill-secondary", "restart-secondary", "partition-secondary",
          "kill-witness", "partition-witness", "slow-secondary", "disk-full-secondary")
SMALL_DISK = 96 << 20  # each member's own file system (the volume is 64 MiB, sparse)
AREA = 16 << 20


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (FUSE mounts, loop-mounted file systems)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    for tool in ("fusermount3", "mkfs.ext4", "losetup", "mount"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    return None


pytestmark = [pytest.mark.torture, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


class Torture:
    def __init__(self, cluster: LocalCluster, rng: random.Random, seed: int):
        self.c, self.rng, self.seed = cluster, rng, seed
        self.primary, self.secondary = "labor1", "labor2"
        self.log: list[str] = []
        self.faults: dict[str, int] = {}
        self.workload: Workload | None = None

    def note(self, what: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {what}")
        print(f"torture[{self.seed}]: {what}", flush=True)

    def fail(self, what: str) -> None:
        pytest.fail(f"seed {self.seed}: {what}\n" + "\n".join(self.log[-30:]))

    def wait_primary(self, node: str) -> None:
        self.c.wait(f"{node} to be primary", lambda: (s := self.c.try_status(node)) and s["role"] == "primary",
                    timeout=90, interval=0.05)

    def settle_primary(self) -> None:
        """After a double fault (the witness restarting while the secondary is
        away, say) the primary may have fenced itself and the other member
        taken over: that is allowed; follow it."""
        c = self.c

        def one():
            roles = {n: (c.try_status(n) or {}).get("role") for n in c.nodes}
            primaries = [n for n, r in roles.items() if r == "primary"]
            return primaries[0] if len(primaries) == 1 and None not in roles.values() else None
        now = c.wait("exactly one primary", one, timeout=120, interval=0.1)
        if now != self.primary:
            self.note(f"the primary moved to {now} (fenced and taken over)")
            self.faults["takeover after a double fault"] = self.faults.get("takeover after a double fault", 0) + 1
            self.primary, self.secondary = self.secondary, self.primary
            self.workload.retarget(c.device(now))

    def wait_level(self) -> None:
        self.settle_primary()
        c, p, s = self.c, self.primary, self.secondary

        def level():
            st = c.try_status(p)
            if not st or st["role"] != "primary":
                return False
            m = st["members"][s]
            ok = (m["link"] == "connected" and m["disk"] == "uptodate" and not m["out_of_sync_bytes"]
                  and m["copy"] is None)
            # The witness knows the secondary holds every write again: it would
            # refuse it the next takeover otherwise.
            return ok and all(w["granted"] and w["registered_outdated"] == []
                              and (w["last_answer"] or {}).get("granted")
                              for w in st["quorum"]["witnesses"].values())
        c.wait(f"{s} level with {p}, the witness granting and told", level, timeout=180, interval=0.1)

    def round(self, n: int) -> None:
        c, w = self.c, self.workload
        fault = self.rng.choice(FAULTS)
        self.faults[fault] = self.faults.get(fault, 0) + 1
        outage = self.rng.uniform(0.3, 2.5)
        self.note(f"round {n}: {fault} ({self.primary} primary, outage {outage:.1f} s)")
        if fault in ("kill-primary", "partition-primary"):
            old, new = self.primary, self.secondary
            if fault == "kill-primary":
                c.kill(old)
            else:
                c.partition(old)
            self.wait_primary(new)
            w.retarget(c.device(new))
            time.sleep(outage)
            if fault == "kill-primary":
                c.start_node(old)
                c.ask(old, op="up", volume=c.volume)
            else:
                c.heal()
            self.primary, self.secondary = new, old
        elif fault in ("kill-secondary", "restart-secondary"):
            if fault == "kill-secondary":
                c.kill(self.secondary)
            else:
                node = c.nodes[self.secondary]
                node.proc.terminate()
                node.proc.wait(timeout=60)
            time.sleep(outage)
            c.start_node(self.secondary)
            c.ask(self.secondary, op="up", volume=c.volume)
        elif fault == "disk-full-secondary":
            c.fill_disk(self.secondary)
            time.sleep(outage)
            c.free_disk(self.secondary)
        elif fault == "partition-secondary":
            c.partition(self.secondary)
            time.sleep(outage)
            c.heal()
        elif fault == "kill-witness":
            c.kill_witness()
            time.sleep(outage)
            c.start_witness()
        elif fault == "partition-witness":
            c.partition_witness()
            time.sleep(outage)
            c.heal()
        else:
            c.slow(self.secondary, 0.03)
            time.sleep(outage)
            c.heal()
        self.wait_level()
        self.check(n)

    def check_no_leaks(self, n: int) -> None:
        """Exactly the cluster's own processes and mounts, whatever was killed
        and restarted: a daemon, witness and proxy each, a FUSE mount per node
        and each member's small file system."""
        c = self.c
        found = processes_naming(c.dir)
        expected = len(c.nodes) + len(c.witness_names) + len(c.proxies)
        if len(found) != expected:
            self.fail(f"round {n}: {len(found)} processes of the cluster, expected {expected}: {found}")
        with open("/proc/self/mounts") as f:
            mounts = sorted(line.split()[1] for line in f if str(c.dir) in line)
        want = sorted([str(node.mount) for node in c.nodes.values()] + [str(p) for p in c.small_disks])
        if mounts != want:
            self.fail(f"round {n}: mounts {mounts}, expected {want}")

    def check(self, n: int) -> None:
        c, w = self.c, self.workload
        blocked = w.pause(timeout=60)
        if blocked:
            self.fail(f"round {n}: {len(blocked)} writes still blocked after the heal")
        primaries = [node for node in c.nodes if (c.try_status(node) or {}).get("role") == "primary"]
        if primaries != [self.primary]:
            self.fail(f"round {n}: primaries {primaries}, expected exactly {self.primary}")
        for node in c.nodes:
            st = c.status(node)
            refused = [m for m, v in st["members"].items() if v["link"] == "standalone"]
            if refused or st["split_brain"]["saved_images"]:
                self.fail(f"round {n}: split-brain on {node}: {refused} {st['split_brain']}")
        read, close = read_blocks(c.device(self.primary))
        try:
            v = verify(w.acks(), read, w.run, in_flight=w.in_flight)
        finally:
            close()
        if not v.passed(rpo_zero=True) or v.acked_writes == 0:
            self.fail(f"round {n}: acknowledged writes lost on {self.primary}: {v.as_dict()}")
        fd = os.open(c.device(self.primary), os.O_RDWR)
        try:
            os.fsync(fd)  # a barrier on both members
        finally:
            os.close(fd)
        hashes = {node: file_hash(c.backing(node)) for node in c.nodes}
        if len(set(hashes.values())) != 1:
            self.fail(f"round {n}: members differ after the heal: {hashes}")
        self.check_no_leaks(n)
        self.note(f"round {n}: ok: {v.acked_writes} acknowledged writes verified, {v.ok} blocks current, "
                  f"members identical")
        w.resume()


def test_randomized_faults_under_load_lose_no_acknowledged_write(tmp_path):
    seed = SEED
    rng = random.Random(seed)
    print(f"torture: seed {seed}, {ROUNDS} rounds (GMD_TORTURE_SEED={seed} replays the schedule)", flush=True)
    cluster = LocalCluster(size="64MiB", directory=tmp_path / "cluster", keep=True)
    t = None
    passed = False
    try:
        for node in cluster.names:
            cluster.limit_disk(node, SMALL_DISK)
        cluster.init_volume("labor1")
        cluster.start()
        cluster.wait("the members to connect",
                     lambda: cluster.status("labor1")["members"]["labor2"]["link"] == "connected", timeout=60)
        cluster.ask("labor1", op="primary", volume="appslv")
        t = Torture(cluster, rng, seed)
        t.wait_level()
        t.workload = Workload(cluster.device("labor1"), area=(0, AREA), writers=4, direct=True,
                              journal=tmp_path / "acknowledged.journal", seed=seed)
        t.workload.start()
        assert t.workload.wait_acked(200, timeout=30), f"seed {seed}: the workload does not start"
        started = time.monotonic()
        for n in range(1, ROUNDS + 1):
            t.round(n)
        total = t.workload.acked()
        print(f"torture: seed {seed}: {ROUNDS} rounds in {time.monotonic() - started:.0f} s, faults "
              f"{t.faults}, {total} acknowledged writes, none lost", flush=True)
        passed = True
    finally:
        if t is not None and t.workload is not None:
            t.workload.stop(timeout=30)
        cluster.teardown()
        if passed:  # a failure keeps the daemons' logs (in pytest's tmp directory)
            shutil.rmtree(cluster.dir, ignore_errors=True)
        else:
            print(f"torture: seed {seed}: logs kept in {cluster.dir}", flush=True)
    left = processes_naming(tmp_path)
    with open("/proc/self/mounts") as f:
        left += [line.split()[1] for line in f if str(tmp_path) in line]
    import subprocess
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    left += [line for line in loops.splitlines() if str(tmp_path) in line]
    assert not left, f"seed {seed}: leaked {left}"
