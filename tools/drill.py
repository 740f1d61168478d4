"""``gmd drill``: a disaster-recovery drill that proves what the mirror promises.

One drill is one fault, under a verifying workload:

1. **workload** — writer threads stamp 4 KiB blocks on the primary's volume
   file (:mod:`tools.workload`); every write that returned is journalled as
   acknowledged before its writer goes on;
2. **fault** — the primary, the secondary or the witness is SIGKILLed, cut
   off (WAN proxies in blackhole), or the secondary's link is slowed; on a
   three-site volume (a metro ``sync``/``mwc`` member and a far ``async``
   one) the far site's link can be cut;
3. **failover** where the fault takes the primary: the automatic takeover
   (``auto_promote``) where configured, else the operator's ``gmd primary``
   (retried until the witness lets it through); the RTO is the time from the
   fault to the first write completing on the new primary;
4. **verification** on the new primary, through its FUSE file: every
   acknowledged block with its latest stamp (RPO 0) for ``sync``/``mwc``; for
   ``async``, an exact prefix of the acknowledged writes, and how many writes
   and bytes were lost and how old they were;
   A far ``async`` member is verified too: at the moment of a primary's
   loss its image must be an exact prefix of the acknowledged writes (the
   far site's RPO: writes, bytes and age lost there);
5. **heal and failback** — the lost daemon restarted (or the link healed), the
   member brought back by mini-copy or merge, and a planned
   ``gmd switchover`` hands the role back; members byte-identical at the end;
6. a **report**: a terminal table, ``--json``, ``--report FILE.md``; the exit
   status is 0 only if every check passed.

The drill talks to the daemons only through their control sockets (and kills
them by the PID they report).
"""

from __future__ import annotations

import json
import mmap
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tools.drill_cluster import Cluster, ConfiguredCluster, DrillError, LocalCluster
from tools.procs import file_hash
from tools.stamps import BLOCK, verify
from tools.workload import Workload, probe

FAULTS = ("kill-primary", "partition-primary", "kill-secondary", "kill-witness", "partition-witness",
          "slow-secondary", "disk-full-secondary", "cut-far-link")
SMALL_DISK = 64 << 20  # bytes of the secondary's own file system in disk-full-secondary
PRIMARY_FAULTS = ("kill-primary", "partition-primary")
MODES = ("sync", "mwc", "async")
AREA = 32 << 20  # bytes of the volume the workload stamps (at most half the volume)
SLOW_DELAY = 0.03  # seconds one way on a slowed link
FAILOVER_TIMEOUT = 90.0
HEAL_TIMEOUT = 180.0
FAR_SITE = "labor3"  # the local cluster's far DR member with --sites 3
FAR_DELAY = 0.03  # seconds one way on the far site's links
FAR_BANDWIDTH = 20_000_000  # bytes/s on the far site's links
FAR_CUT = 10.0  # seconds a cut far link lasts at least
FAR_RPO_ALERT = 5  # rpo_alert_seconds of the three-site local cluster's volume


@dataclass
class Check:
    """One thing the drill proved, or failed to."""

    name: str
    passed: bool
    detail: str


@dataclass
class Report:
    """What the drill did and found; ``passed`` only if every check did."""

    fault: str
    mode: str
    cluster: str
    takeover: str
    seed: int
    started_at: float
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    timeline: list[tuple[float, str]] = field(default_factory=list)
    verifications: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.passed for c in self.checks)

    def check(self, name: str, passed: bool, detail: str) -> bool:
        self.checks.append(Check(name, bool(passed), detail))
        return bool(passed)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["timeline"] = [{"t": round(t, 3), "event": e} for t, e in self.timeline]
        return d

    def table(self) -> str:
        """The terminal report."""
        lines = [f"gmd drill: fault {self.fault}, mode {self.mode}, takeover {self.takeover}, "
                 f"cluster {self.cluster}, seed {self.seed}", ""]
        width = max([len(c.name) for c in self.checks] + [5])
        for c in self.checks:
            lines.append(f"  {'PASS' if c.passed else 'FAIL'}  {c.name:<{width}}  {c.detail}")
        if self.error:
            lines.append(f"  FAIL  {'drill':<{width}}  {self.error}")
        lines.append("")
        for k, v in self.figures.items():
            lines.append(f"  {k:<28} {_show(v)}")
        lines.append("")
        lines.append(f"result: {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)

    def markdown(self) -> str:
        """The report as a Markdown document (``--report FILE.md``)."""
        out = [f"# gmd drill: {self.fault} ({self.mode})", "",
               f"- result: **{'passed' if self.passed else 'FAILED'}**",
               f"- started: {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(self.started_at))}",
               f"- cluster: {self.cluster}; takeover: {self.takeover}; seed {self.seed}", ""]
        if self.error:
            out += [f"**The drill stopped:** {self.error}", ""]
        out += ["| check | result | detail |", "|---|---|---|"]
        out += [f"| {c.name} | {'pass' if c.passed else '**FAIL**'} | {c.detail} |" for c in self.checks]
        out += ["", "| figure | value |", "|---|---|"]
        out += [f"| {k} | {_show(v)} |" for k, v in self.figures.items()]
        out += ["", "## Timeline", "", "| s | event |", "|---:|---|"]
        out += [f"| {t:.3f} | {e} |" for t, e in self.timeline]
        return "\n".join(out) + "\n"


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def read_blocks(path: str) -> tuple[Callable[[int], bytes], Callable[[], None]]:
    """A reader of 4 KiB blocks of ``path`` with O_DIRECT (what the device
    holds, not a page cache's memory of it), and its closer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, BLOCK)
    except OSError:
        fd, buf = os.open(path, os.O_RDONLY), None

    def read(offset: int) -> bytes:
        if buf is None:
            return os.pread(fd, BLOCK, offset)
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])

    def close() -> None:
        os.close(fd)
        if buf is not None:
            buf.close()

    return read, close


def primary_of(c: Cluster) -> str:
    """The node that is primary for the drill's volume; DrillError if none."""
    primary = c.primary()
    if primary is None:
        raise DrillError(f"no node is primary for {c.volume}: make one primary first (gmd primary)")
    return primary


def verify_file(path: str, acks, workload: Workload, *, fault_at: float | None) -> Any:
    """:func:`tools.stamps.verify` of the blocks ``path`` holds (read with
    O_DIRECT) against ``acks`` of ``workload``."""
    read, close = read_blocks(path)
    try:
        return verify(acks, read, workload.run, in_flight=workload.in_flight, fault_at=fault_at)
    finally:
        close()


class Drill:
    """One drill of ``fault`` on ``cluster`` (whose volume is up everywhere
    and has a primary); :meth:`run` returns the :class:`Report`."""

    def __init__(self, cluster: Cluster, *, fault: str, mode: str, seed: int, writers: int = 4,
                 warmup: float = 3.0, outage: float = 3.0, work_dir: Path,
                 say: Callable[[str], None] = lambda s: None):
        if fault not in FAULTS:
            raise DrillError(f"unknown fault {fault!r} (expected one of: {', '.join(FAULTS)})")
        self.c = cluster
        self.fault, self.mode, self.seed = fault, mode, seed
        self.writers, self.warmup, self.outage = writers, warmup, outage
        self.work_dir = work_dir
        self.say = say
        self.t0 = time.monotonic()
        self.workload: Workload | None = None
        self.report: Report | None = None
        self.oos_during_fault = 0  # bytes marked for the secondary while a fault of it lasted
        self.far: list[str] = []  # far async members (a three-site volume), verified at a primary's loss

    # ------------------------------------------------------------ helpers

    def event(self, what: str) -> None:
        t = time.monotonic() - self.t0
        self.report.timeline.append((t, what))
        self.say(f"[{t:7.2f} s] {what}")

    def member_view(self, primary: str, member: str) -> dict[str, Any]:
        return self.c.status(primary)["members"][member]

    def wait_in_sync(self, primary: str, member: str, timeout: float = HEAL_TIMEOUT, *,
                     drained: bool = False) -> None:
        """Wait until ``member`` is connected, uptodate and nothing is marked
        for it; with ``drained`` (no writes coming) also until an async
        member has acknowledged everything queued to it."""
        def level():
            st = self.c.try_status(primary)
            if not st:
                return False
            m = st["members"][member]
            return (m["link"] == "connected" and m["disk"] == "uptodate" and not m["out_of_sync_bytes"]
                    and m["copy"] is None and not m.get("behind") and not (drained and m.get("lag_bytes")))
        self.c.wait(f"{member} to be connected, uptodate and level with {primary}"
                    + (" (its queue drained)" if drained else ""), level, timeout=timeout)

    def healed(self, primary: str, member: str, since_mono: float, since_wall: float) -> tuple[float, int, list[str]]:
        """Wait until ``member`` is level with ``primary``; record and return how
        long the heal took since ``since_mono``, the bytes the passes started
        since ``since_wall`` moved, and their kinds."""
        self.wait_in_sync(primary, member)
        heal_s = time.monotonic() - since_mono
        copies = self.copies_to(primary, member, since_wall)
        moved = sum(p["sent_bytes"] for p in copies)
        kinds = sorted({p["kind"] for p in copies})
        f = self.report.figures
        f["heal_seconds"], f["heal_bytes_moved"], f["heal_passes"] = round(heal_s, 3), moved, ", ".join(kinds) or "none"
        return heal_s, moved, kinds

    def needs_force(self, node: str) -> bool:
        """``node``, once alone, cannot reach quorum: no witness to lend it votes,
        and its own votes no majority (two sites of one vote each)."""
        q = self.c.status(node)["quorum"]
        return not q["witnesses"] and self.c.votes_of(node) < q["needed"]

    def copies_to(self, primary: str, member: str, since: float) -> list[dict[str, Any]]:
        st = self.c.status(primary)
        return [p for p in st.get("copies", []) if p["member"] == member and p["started_at"] >= since - 0.5]

    def verify_device(self, node: str, acks, *, fault_at: float | None, label: str) -> Any:
        return self.verify_path(self.c.device(node), acks, fault_at=fault_at, label=label)

    def verify_path(self, path: str, acks, *, fault_at: float | None, label: str) -> Any:
        """Verify the image at ``path`` (a volume file, or a member's backing
        file) against ``acks``; recorded in the report as ``label``."""
        v = verify_file(path, acks, self.workload, fault_at=fault_at)
        self.report.verifications[label] = v.as_dict()
        return v

    # ---------------------------------------------------------------- run

    def run(self) -> Report:
        c = self.c
        primary = primary_of(c)
        members = list(c.nodes)
        others = [n for n in members if n != primary]
        if not others:
            raise DrillError(f"{c.volume} has no member besides {primary}: nothing to fail over to")
        st = c.status(primary)
        # The member that takes over: a metro (sync/mwc) one before a far async one.
        ready = [n for n in others if st["members"][n]["link"] == "connected"
                 and st["members"][n]["disk"] == "uptodate"]
        secondary = next((n for n in ready if st["members"][n]["mode"] != "async"), ready[0] if ready else None)
        if secondary is None:
            raise DrillError(f"no member of {c.volume} is connected and uptodate on {primary}: "
                             + "; ".join(f"{n}: {st['members'][n]['link']}/{st['members'][n]['disk']}"
                                         for n in others))
        auto = bool(st.get("takeover", {}).get("auto_promote"))
        self.far = [n for n in others if n != secondary and st["members"][n]["mode"] == "async"]
        if self.fault == "cut-far-link" and not self.far:
            raise DrillError(f"cut-far-link: {c.volume} has no far async member besides {secondary} "
                             f"(drill a three-site volume: --sites 3)")
        for n in self.far:
            self.wait_in_sync(primary, n)
        if self.fault == "partition-primary" and self.needs_force(secondary):
            raise DrillError(f"partition-primary without a witness: neither side holds quorum alone, so nobody "
                             f"may take over, and forcing {secondary} while {primary} lives would split the brain; "
                             f"drill kill-primary, or add a witness")
        if st["quorum"]["witnesses"]:
            # The steady state a fault interrupts: the primary holds every
            # witness's lease (a witness grants nothing in its first seconds).
            c.wait(f"{primary} to hold the witnesses' lease", lambda: all(
                w["granted"] and w["registered_outdated"] == [] and (w["last_answer"] or {}).get("granted")
                for w in c.status(primary)["quorum"]["witnesses"].values()), timeout=30)
        self.report = r = Report(self.fault, self.mode, c.describe(), "automatic (auto_promote)" if auto else
                                 "operator (gmd primary)", self.seed, time.time())
        size = int(st["size"])
        area = min(AREA, (size // 2) // BLOCK * BLOCK)
        probe_at = size - BLOCK
        self.event(f"{primary} is primary, {secondary} secondary ({st['members'][secondary]['mode']}); "
                   f"workload: {self.writers} writers, O_DIRECT 4 KiB stamped blocks over {area >> 20} MiB")
        self.workload = w = Workload(c.device(primary), area=(0, area), writers=self.writers, direct=True,
                                     journal=self.work_dir / "acknowledged.journal", seed=self.seed)
        w.start()
        try:
            if not w.wait_acked(200, timeout=30):
                raise DrillError(f"the workload on {primary} acknowledged only {w.acked()} writes in 30 s "
                                 f"(errors: {dict(w.errors) or 'none'})")
            time.sleep(self.warmup)
            before = w.acked()
            self.event(f"workload running: {before} writes acknowledged")
            if self.fault in PRIMARY_FAULTS:
                self.primary_fault(primary, secondary, auto, probe_at)
            else:
                self.secondary_fault(primary, self.far[0] if self.fault == "cut-far-link" else secondary)
        finally:
            blocked = w.stop(timeout=30)
            if blocked:
                r.error = f"{len(blocked)} writes still blocked in the kernel at the end"
        r.figures["writes_acknowledged"] = w.acked()
        r.figures["bytes_acknowledged"] = w.acked() * BLOCK
        r.figures["write_errors"] = dict(w.errors)
        return r

    def primary_fault(self, primary: str, secondary: str, auto: bool, probe_at: float) -> None:
        c, w, r = self.c, self.workload, self.report
        fault_wall, fault_mono = time.time(), time.monotonic()
        acked_before = w.acked()
        if self.fault == "kill-primary":
            pid = c.kill(primary)
            self.event(f"FAULT: {primary}'s daemon SIGKILLed (pid {pid})")
        else:
            c.partition(primary)
            self.event(f"FAULT: {primary} cut from every member and the witness (blackhole)")
        if self.far:
            # A partitioned primary stays cut off from the far site too.
            self.verify_far_at_loss(fault_wall, cut=(primary,) if self.fault == "partition-primary" else ())
        # --- failover
        alone_without_quorum = self.needs_force(secondary)
        if auto and not alone_without_quorum:
            c.wait(f"{secondary} to take over automatically", lambda: (s := c.try_status(secondary))
                   and s["role"] == "primary", timeout=FAILOVER_TIMEOUT, interval=0.02)
            self.event(f"{secondary} took over automatically")
        elif alone_without_quorum:
            # Two sites alone: the survivor's own votes are no quorum, so no
            # promotion is granted; the operator, knowing the primary is down,
            # forces it (and gmd says what that risks).
            self.say(f"{secondary} alone holds no quorum (no witness): the operator's step is 'gmd primary "
                     f"{c.volume} --force', taken only when {primary} is known to be down")
            c.ask(secondary, op="primary", volume=c.volume, force=True)
            forced = c.status(secondary)["quorum"]["forced"]
            r.takeover = "operator (gmd primary --force: no witness)"
            self.event(f"operator: 'gmd primary {c.volume} --force' on {secondary}")
            self.say(f"WARNING: {secondary} is primary WITHOUT quorum (forced_primary {forced}, in its status "
                     f"until it is demoted): had {primary} been alive and writing, the two copies would now "
                     f"diverge (a split-brain, detected when they meet)")
            r.check(f"{secondary} shows the forced promotion", forced is True, f"quorum.forced = {forced}")
        else:
            attempts = [0]

            def promote():
                attempts[0] += 1
                return c.try_ask(secondary, op="primary", volume=c.volume)
            c.wait(f"'gmd primary' on {secondary} to be granted", promote, timeout=FAILOVER_TIMEOUT,
                   interval=0.5)
            self.event(f"operator: 'gmd primary {c.volume}' on {secondary} granted "
                       f"(after {attempts[0]} attempt(s))")
        device = c.device(secondary)
        first = c.wait("the first write to complete on the new primary",
                       lambda: _try_probe(device, probe_at), timeout=30, interval=0.02)
        rto = first - fault_wall
        r.figures["rto_seconds"] = round(rto, 3)
        self.event(f"first write completed on {secondary}: RTO {rto:.2f} s")
        blocked = w.pause(timeout=30 if self.fault == "partition-primary" else 10)
        if blocked:
            r.check("old primary's writes ended", False,
                    f"{len(blocked)} writes still blocked on {primary} 30 s after the new primary took over")
            raise DrillError("writes to the old primary never returned")
        # Paused: every ack so far was made by the old primary.
        v = self.verify_device(secondary, w.acks(), fault_at=fault_wall, label="after failover")
        rpo_zero = self.mode != "async"
        if rpo_zero:
            r.check("RPO 0: every acknowledged write on the new primary", v.passed(rpo_zero=True),
                    f"{v.ok} blocks current, {v.newer} newer unacknowledged, {v.stale} LOST, {v.corrupt} corrupt "
                    f"of {v.blocks_checked} blocks ({v.acked_writes} acknowledged writes)")
        else:
            r.check("async copy is an exact prefix of the acknowledged writes", v.passed(rpo_zero=False),
                    f"prefix up to write {v.prefix_index} of {v.acked_writes}; {v.corrupt} corrupt blocks")
        r.figures["rpo_writes"] = v.lost_writes
        r.figures["rpo_bytes"] = v.lost_bytes
        r.figures["rpo_seconds"] = round(v.lost_age, 3)
        r.figures["writes_before_fault"] = acked_before
        self.event(f"verified {secondary}: {v.blocks_checked} blocks, RPO {v.lost_writes} writes "
                   f"({v.lost_bytes} bytes, {v.lost_age:.3f} s)")
        lost_cut = v.prefix_index if not rpo_zero else None
        # --- the new primary writes on
        w.retarget(device)
        w.resume()
        since = w.acked()
        ok = w.wait_acked(100, timeout=30, since=since)
        r.check("the new primary takes writes", ok, f"{w.acked() - since} writes acknowledged on {secondary}")
        time.sleep(self.outage)
        # --- heal
        heal_from = time.time()
        heal_mono = time.monotonic()
        if self.fault == "kill-primary":
            c.start_node(primary)
            c.ask(primary, op="up", volume=c.volume)
            self.event(f"{primary}'s daemon restarted (pid {c.nodes[primary].pid}, log {c.nodes[primary].log}) "
                       f"and the volume up: it comes back as secondary")
        else:
            c.heal()
            self.event("partition healed")
        old = c.wait(f"{primary} to be secondary", lambda: (s := c.try_status(primary))
                     and s["role"] == "secondary" and s, timeout=60)
        if self.fault == "partition-primary":
            fence = old.get("takeover", {}).get("last") or {}
            if auto:
                left = fence.get("lease_left")
                r.check("the cut-off primary fenced itself before its lease ended",
                        fence.get("event") == "self-fence" and (left or 0) > 0,
                        f"{primary} stepped down with {left} s of its lease left" if left is not None
                        else f"{primary}: no self-fence recorded")
                r.figures["fence_lease_left_seconds"] = left
        heal_s, moved, kinds = self.healed(secondary, primary, heal_mono, heal_from)
        for n in self.far:
            self.wait_in_sync(secondary, n)
            far_copies = self.copies_to(secondary, n, fault_wall)
            r.check(f"far member {n} caught up from {secondary} without a full copy",
                    all(p["kind"] != "full" for p in far_copies),
                    f"passes to {n}: {', '.join(sorted({p['kind'] for p in far_copies})) or 'none'}; "
                    f"{sum(p['sent_bytes'] for p in far_copies)} bytes moved")
        r.check("old primary brought back without a full copy", "full" not in kinds,
                f"passes to {primary}: {', '.join(kinds) or 'none (nothing differed)'}; {moved} bytes moved "
                f"in {heal_s:.1f} s")
        self.event(f"{primary} level with {secondary} after {heal_s:.1f} s ({moved} bytes moved)")
        # --- failback: a planned switchover (the workload's files are closed first:
        # a switchover refuses while the device is in use)
        blocked = w.stop(timeout=30)
        if blocked:
            raise DrillError(f"{len(blocked)} writes still blocked on {secondary} before the switchover")
        acks = w.acks()
        # Ack indices start at 1: the first ``since`` were the old primary's. An
        # async takeover lost those after the prefix cut; they are not expected.
        check_acks = acks if rpo_zero else [a for a in acks if a.index > since or a.index <= lost_cut]
        v2 = self.verify_device(secondary, check_acks, fault_at=None, label="before failback")
        r.check(f"every write acknowledged since is on {secondary}", v2.passed(rpo_zero=True),
                f"{v2.ok} blocks current, {v2.stale} LOST, {v2.corrupt} corrupt")
        c.ask(secondary, op="switchover", volume=c.volume, to=primary)
        c.wait(f"{primary} to be primary again", lambda: (s := c.try_status(primary)) and s["role"] == "primary",
               timeout=60)
        self.event(f"switchover: {primary} primary again, {secondary} secondary")
        self.wait_in_sync(primary, secondary, timeout=60)
        for n in self.far:
            self.wait_in_sync(primary, n)
        v3 = self.verify_device(primary, check_acks, fault_at=None, label="after failback")
        r.check(f"every acknowledged write on {primary} after the failback", v3.passed(rpo_zero=True),
                f"{v3.ok} blocks current, {v3.stale} LOST, {v3.corrupt} corrupt")
        self.identical(primary)

    def secondary_fault(self, primary: str, secondary: str) -> None:
        c, w, r = self.c, self.workload, self.report
        rate_before = self.rate(2.0)
        fault_wall = time.time()
        heal: Callable[[], None]
        if self.fault == "kill-secondary":
            pid = c.kill(secondary)
            self.event(f"FAULT: {secondary}'s daemon SIGKILLed (pid {pid})")

            def heal():
                c.start_node(secondary)
                c.ask(secondary, op="up", volume=c.volume)
                self.event(f"{secondary}'s daemon restarted (pid {c.nodes[secondary].pid}, log "
                           f"{c.nodes[secondary].log}) and the volume up")
        elif self.fault in ("kill-witness", "partition-witness") and not c.witness_names:
            raise DrillError(f"{self.fault}: this cluster has no witness")
        elif self.fault == "kill-witness":
            if not isinstance(c, LocalCluster):
                raise DrillError("kill-witness needs the drill's own cluster (it starts the witness again)")
            pid = c.kill_witness()
            self.event(f"FAULT: the witness SIGKILLed (pid {pid})")

            def heal():
                c.start_witness()
                self.event("witness restarted")
        elif self.fault == "partition-witness":
            if not isinstance(c, LocalCluster):
                raise DrillError("partition-witness needs the drill's own cluster (its proxies)")
            c.partition_witness()
            self.event("FAULT: the witness cut from every node (blackhole)")

            def heal():
                c.heal()
                self.event("witness partition healed")
        elif self.fault == "disk-full-secondary":
            if not isinstance(c, LocalCluster) or not c.small_disks:
                raise DrillError("disk-full-secondary needs the drill's own cluster (the secondary's member on a "
                                 "small file system of its own)")
            took = c.fill_disk(secondary)
            self.event(f"FAULT: {secondary}'s file system filled to the last block ({took >> 20} MiB of filler): "
                       "its writes to blocks not yet allocated fail with ENOSPC")

            def heal():
                c.free_disk(secondary)
                self.event(f"{secondary}'s filler removed: space again")
        elif self.fault == "cut-far-link":
            c.partition(secondary)
            self.event(f"FAULT: the far site {secondary} cut from every other site (blackhole)")

            def heal():
                self.far_during_cut(primary, secondary)
                c.heal()
                self.event(f"the far site {secondary}'s links healed")
        else:  # slow-secondary
            c.slow(secondary, SLOW_DELAY)
            self.event(f"FAULT: {secondary}'s links slowed by {SLOW_DELAY * 1000:.0f} ms each way")

            def heal():
                c.heal()
                self.event(f"{secondary}'s links back to full speed")
        since = w.acked()
        ok = w.wait_acked(100, timeout=30, since=since)
        first = w.first_ack_after(fault_wall)
        stall = (first - fault_wall) if first is not None else None
        # A cut far link lasts past the 6 s path timeout: the session ends, and
        # the far member comes back through the bitmap, not the queue alone.
        rate_during = self.rate(max(self.outage, FAR_CUT) if self.fault == "cut-far-link" else self.outage)
        self.oos_during_fault = c.status(primary)["members"][secondary]["out_of_sync_bytes"]
        times = [fault_wall] + [a.acked_at for a in w.acks() if a.acked_at > fault_wall]
        r.figures["write_rate_before"] = round(rate_before, 1)
        r.figures["write_rate_during_fault"] = round(rate_during, 1)
        r.figures["first_write_after_fault_seconds"] = round(stall, 3) if stall is not None else None
        r.figures["longest_write_gap_during_fault_seconds"] = round(max(b - a for a, b in zip(times, times[1:])), 3)
        r.check(f"{primary} writes on through the fault", ok and primary == c.primary(),
                f"{w.acked() - since} writes acknowledged during the fault (first after {stall or 0:.2f} s), "
                f"{rate_during:.0f} writes/s against {rate_before:.0f} before")
        r.figures["rto_seconds"] = 0.0  # the primary never stopped
        heal_mono, heal_from = time.monotonic(), time.time()
        heal()
        heal_s, moved, kinds = self.healed(primary, secondary, heal_mono, heal_from)
        if self.fault == "disk-full-secondary":
            r.figures["secondary_out_of_sync_during_fault"] = self.oos_during_fault
            r.check(f"{primary} marked what {secondary} could not store", self.oos_during_fault > 0,
                    f"{self.oos_during_fault} bytes out of sync for {secondary} while its disk was full")
        if self.fault == "cut-far-link":
            r.check(f"far member {secondary} caught up without a full copy", "full" not in kinds,
                    f"passes: {', '.join(kinds) or 'none'}; {moved} bytes moved in {heal_s:.1f} s")
            if c.status(primary)["rpo_alert"].get("seconds") is not None:
                over = c.wait(f"the RPO alert for {secondary} to end", lambda: secondary not in (
                    c.status(primary)["rpo_alert"]["members_over"]) or None, timeout=10) is True
                r.check(f"the RPO alert for {secondary} ends once it caught up", over,
                        "no member over the threshold")
        elif self.fault in ("kill-secondary", "disk-full-secondary"):
            r.check(f"{secondary} mini-copied back", kinds == ["mini"],
                    f"passes: {', '.join(kinds) or 'none'}; {moved} bytes moved in {heal_s:.1f} s")
        else:
            r.check(f"{secondary} level again without a full copy", "full" not in kinds,
                    f"passes: {', '.join(kinds) or 'none'}; {moved} bytes moved in {heal_s:.1f} s")
        if self.fault in ("kill-witness", "partition-witness"):
            wname = c.witness_names[0]
            c.wait(f"witness {wname} to grant {primary}'s lease again",
                   lambda: (s := c.try_status(primary)) and s["quorum"]["witnesses"][wname]["granted"], timeout=30)
            r.check("the witness grants the lease again", True, f"{wname} granted {primary}'s lease after the heal")
        self.event(f"{secondary} level with {primary} after {heal_s:.1f} s ({moved} bytes moved)")
        blocked = w.stop(timeout=30)
        if blocked:
            raise DrillError(f"{len(blocked)} writes still blocked on {primary} at the end")
        for n in self.far:
            self.wait_in_sync(primary, n)
        v = self.verify_device(primary, w.acks(), fault_at=None, label="end")
        r.check("RPO 0: every acknowledged write on the primary", v.passed(rpo_zero=True),
                f"{v.ok} blocks current, {v.stale} LOST, {v.corrupt} corrupt of {v.blocks_checked}")
        r.figures["rpo_writes"] = v.stale
        r.figures["rpo_bytes"] = v.stale * BLOCK
        self.identical(primary)

    def far_image(self, node: str, label: str, acks, fault_at: float | None) -> Any:
        """Verify the far member's backing file as it stands (its links cut,
        so nothing more arrives): an exact prefix of ``acks``?"""
        path = self.c.backing(node)
        if path is None:
            raise DrillError(f"the far member {node}'s backing file is not on this machine: its image cannot be "
                             "read while it is secondary")
        time.sleep(1.0)  # the last frames that reached it are applied (writes arrive in order)
        return self.verify_path(str(path), acks, fault_at=fault_at, label=label)

    def verify_far_at_loss(self, fault_at: float, cut: tuple[str, ...]) -> None:
        """The primary is lost: were the far site called on now, what would it
        hold? Its links are cut at once (the new primary would otherwise
        start catching it up), its image checked, and the links given back."""
        c, r = self.c, self.report
        acks = self.workload.acks()
        for n in self.far:
            c.partition(n)
        try:
            for n in self.far:
                v = self.far_image(n, f"far site {n} at the primary's loss", acks, fault_at=fault_at)
                r.check(f"far site {n} is an exact prefix of the acknowledged writes", v.passed(rpo_zero=False),
                        f"prefix up to write {v.prefix_index} of {v.acked_writes}; {v.corrupt} corrupt blocks")
                r.figures[f"far_rpo_writes_{n}"] = v.lost_writes
                r.figures[f"far_rpo_bytes_{n}"] = v.lost_bytes
                r.figures[f"far_rpo_seconds_{n}"] = round(v.lost_age, 3)
                self.event(f"far site {n}: RPO {v.lost_writes} writes ({v.lost_bytes} bytes, {v.lost_age:.3f} s)")
        finally:
            for n in self.far:
                c.heal_links(n, keep_cut=cut)

    def far_during_cut(self, primary: str, far: str) -> None:
        """While the far site is cut off: the primary's view of its RPO, and
        its own image, frozen, a prefix of the acknowledged writes."""
        r = self.report
        m = self.member_view(primary, far)
        rpo = m.get("rpo") or {}
        r.figures["far_rpo_bytes_at_heal"] = rpo.get("bytes")
        r.figures["far_rpo_seconds_at_heal"] = rpo.get("seconds")
        r.check(f"{primary} shows what {far} lacks", (rpo.get("bytes") or 0) > 0,
                f"RPO {rpo.get('bytes')} bytes, {rpo.get('seconds')} s; replication {m.get('replication')}, "
                f"{m['out_of_sync_bytes']} bytes marked, {m.get('lag_bytes')} queued")
        threshold = self.c.status(primary)["rpo_alert"]
        if threshold.get("seconds") is not None:  # the cut lasts FAR_CUT, past the local cluster's threshold
            r.check(f"the RPO alert is raised for {far}", bool(rpo.get("alert")),
                    f"RPO {rpo.get('seconds')} s against the alert threshold of {threshold['seconds']} s; "
                    f"members over it: {', '.join(threshold.get('members_over') or {}) or 'none'}")
        v = self.far_image(far, "far site during the cut", self.workload.acks(), fault_at=None)
        r.check(f"far site {far} cut off is an exact prefix of the acknowledged writes", v.passed(rpo_zero=False),
                f"prefix up to write {v.prefix_index} of {v.acked_writes}; {v.corrupt} corrupt blocks")
        self.event(f"far site {far} during the cut: prefix of {v.prefix_index} writes, {v.lost_writes} behind")

    def rate(self, seconds: float) -> float:
        n0, t0 = self.workload.acked(), time.monotonic()
        time.sleep(seconds)
        return (self.workload.acked() - n0) / max(1e-6, time.monotonic() - t0)

    def identical(self, primary: str) -> None:
        """Members byte-identical: xxh3 of the backing files where this machine
        holds them, else the daemons' own ``gmd verify``."""
        c, r = self.c, self.report
        fd = os.open(c.device(primary), os.O_RDWR)
        try:
            os.fsync(fd)  # a barrier on every member
        finally:
            os.close(fd)
        for n in self.far:
            self.wait_in_sync(primary, n, drained=True)  # the barrier does not wait for an async member
        paths = {n: c.backing(n) for n in c.nodes}
        if all(p is not None for p in paths.values()):
            hashes = {n: file_hash(p) for n, p in paths.items()}
            r.check("members byte-identical (xxh3-128 of the backing files)", len(set(hashes.values())) == 1,
                    ", ".join(f"{n} {h[:16]}" for n, h in hashes.items()))
        else:
            started = time.time()
            reply = c.ask(primary, op="verify", volume=c.volume)
            names = [m for m, a in reply["members"].items() if a == "started"]

            def reports():
                st = c.status(primary)
                got = {m: st["members"][m].get("last_verify") for m in names}
                return got if all(g and g.get("finished", 0) >= started for g in got.values()) else None
            got = c.wait("gmd verify to finish", reports, timeout=HEAL_TIMEOUT, interval=0.5)
            bad = {m: g for m, g in got.items() if g.get("differing_regions") or "skipped" in g}
            r.check("members identical (gmd verify)", bool(names) and not bad,
                    "; ".join(f"{m}: {g.get('differing_regions', g.get('skipped'))} differing regions"
                              for m, g in got.items()) or f"nothing verified: {reply['members']}")


def _try_probe(device: str, offset: int) -> float | None:
    try:
        return probe(device, offset)
    except OSError:
        return None


def run_drill(*, fault: str, mode: str = "mwc", auto_promote: bool = True, config: Path | None = None,
              volume: str | None = None, overwrite: bool = False, proxies: list[str] = (),
              as_json: bool = False, report: Path | None = None, keep: bool = False, seed: int | None = None,
              writers: int = 4, warmup: float = 3.0, outage: float = 3.0, delay: float = 0.0,
              witness: bool = True, sites: int = 2, test_failover: bool = False, on: str | None = None) -> int:
    """``gmd drill``: build (or reach) the cluster, run one drill, print the report; 0 if it passed.
    ``test_failover``: instead of a fault, a test failover on ``on`` (tools.drill_testfailover)."""
    if test_failover:
        fault = "test-failover"
    seed = random.randrange(1 << 31) if seed is None else seed
    out = sys.stderr if as_json else sys.stdout

    def say(msg: str) -> None:
        print(f"drill: {msg}", file=out, flush=True)

    if os.geteuid() != 0:
        say("the drill mounts FUSE and runs daemons: run it as root")
        return 1
    cluster: Cluster | None = None
    rep: Report | None = None
    work_dir: Path | None = None
    try:
        if config is None:
            if sites not in (2, 3):
                raise DrillError(f"--sites {sites}: the local cluster has 2 sites, or 3 (a far async one)")
            three = sites == 3
            if three and mode == "async":
                raise DrillError("--sites 3 --mode async: the metro member is sync or mwc; the far one is async")
            if fault == "cut-far-link" and not three:
                raise DrillError("cut-far-link needs a far site: --sites 3")
            cluster = LocalCluster(
                mode=mode, auto_promote=auto_promote, keep=keep, delay=delay, witness="W" if witness else None,
                names=("labor1", "labor2", FAR_SITE) if three else ("labor1", "labor2"),
                member_settings={FAR_SITE: {"mode": "async", "votes": 0}} if three else None,
                volume_settings={"rpo_alert_seconds": FAR_RPO_ALERT} if three else None,
                far={FAR_SITE: {"delay": FAR_DELAY, "bandwidth": FAR_BANDWIDTH}} if three else None)
            work_dir = cluster.dir
            if fault == "disk-full-secondary":
                where = cluster.limit_disk("labor2", SMALL_DISK)
                say(f"labor2's member files on a {SMALL_DISK >> 20} MiB file system of their own ({where})")
            far_note = (f", far site {FAR_SITE} (async, 0 votes, {FAR_DELAY * 1000:.0f} ms, "
                        f"{FAR_BANDWIDTH / 1e6:.0f} MB/s)" if three else "")
            say(f"building a local cluster in {cluster.dir}: labor1, labor2 ({mode}){far_note}"
                f"{' and witness W' if witness else ', no witness'}, every link through a WAN proxy; "
                f"auto_promote {'on' if auto_promote else 'off'}")
            cluster.init_volume("labor1")
            cluster.start()
            cluster.wait(f"labor1 and {', '.join(cluster.names[1:])} to connect", lambda: all(
                m["link"] == "connected" for n, m in cluster.status("labor1")["members"].items() if n != "labor1"),
                timeout=60)
            cluster.ask("labor1", op="primary", volume=cluster.volume)
        else:
            if not volume:
                raise DrillError("--config needs --volume VOLUME (the volume to drill)")
            if not overwrite:
                raise DrillError(f"the drill writes stamped blocks over the first {AREA >> 20} MiB and the last "
                                 f"4 KiB of {volume}: give --overwrite to confirm that its data may go")
            by_node: dict[str, list[Path]] = {}
            for spec in proxies:
                node, sep, sock = spec.partition("=")
                if not sep or not node or not sock:
                    raise DrillError(f"--proxy {spec!r}: expected NODE=SOCKET (a WAN proxy's control socket)")
                by_node.setdefault(node, []).append(Path(sock))
            work_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"gmd-drill-{time.strftime('%Y%m%d-%H%M%S')}"
            work_dir.mkdir(parents=True, exist_ok=True)
            cluster = ConfiguredCluster(config, volume, by_node, log_dir=work_dir)
            mode = cluster.config.volumes[volume].mode
            say(f"drilling {volume} of {config} (nodes {', '.join(cluster.nodes)}); journal and logs in {work_dir}")
        say(f"seed {seed}")
        if test_failover:
            from tools.drill_testfailover import TestFailoverDrill  # here: it builds on this module

            drill = TestFailoverDrill(cluster, on=on, mode=mode, seed=seed, writers=writers, warmup=warmup,
                                      outage=outage, work_dir=work_dir, say=say)
        else:
            drill = Drill(cluster, fault=fault, mode=mode, seed=seed, writers=writers, warmup=warmup,
                          outage=outage, work_dir=work_dir, say=say)
        try:
            rep = drill.run()
        except Exception as e:  # a step that went wrong fails the drill, with what and why in the report
            rep = drill.report
            if rep is None:
                raise DrillError(str(e)) from None
            rep.error = str(e) if isinstance(e, DrillError) else f"{type(e).__name__}: {e}"
    except DrillError as e:
        say(f"FAILED: {e}")
        # The same report as a drill that ran, so scripts reading --json or
        # --report learn why: no check passed, and the error says what failed.
        rep = Report(fault, mode, cluster.describe() if cluster is not None else "none", "none", seed,
                     time.time(), error=str(e))
    except KeyboardInterrupt:
        say("interrupted; tearing down")
        return 130
    finally:
        if cluster is not None:
            try:
                if rep is not None and not rep.passed and isinstance(cluster, LocalCluster) and not keep:
                    keep_dir = Path(f"{cluster.dir}-failed")
                    # Logs, configs, journal and maps; not the images, mounts or sockets.
                    shutil.copytree(cluster.dir, keep_dir, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("*.img", "run", "*.sock", "data"))
                    say(f"the drill failed: logs and journal kept in {keep_dir}")
            except OSError as e:
                say(f"could not keep the failed drill's logs: {e}")
            finally:
                cluster.teardown()
    if as_json:
        print(json.dumps(rep.as_dict(), indent=2))
    else:
        print(rep.table(), flush=True)
    if report is not None:
        Path(report).write_text(rep.markdown())
        say(f"report written to {report}")
    return 0 if rep.passed else 1
