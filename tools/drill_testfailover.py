"""``gmd drill --test-failover [--on NODE]``: a test failover under load, the
drill users of SRM and Zerto run, proved (docs/DESIGN.md, "Test failover").

1. the stamping workload runs on the primary (:mod:`tools.workload`);
2. ``gmd test-failover start`` on NODE (default: the far site of a
   three-site volume, else the first secondary) freezes a writable image of
   its copy, ``<mount>/<volume>@test`` (and a loop device, where losetup is);
3. the image must be a prefix of the acknowledged writes
   (:func:`tools.stamps.verify`) and stay frozen (the same xxh3) while the
   workload goes on and the member keeps receiving: its disk changes, it
   stays connected, uptodate and shipping with nothing marked, and its lag
   on the primary stays within noise of what it was before the test;
4. writes into the image read back, and never reach the member's disk;
5. ``gmd test-failover end`` discards the image (file, loop device and the
   files beside the state map gone), and once the workload stops every
   member is byte-identical to the primary: the member is what it would be
   without the test.

It uses the control sockets and the member's files only, like the other
drills, and reports with the same :class:`tools.drill.Report`.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tools.drill import AREA, FAR_SITE, Report, primary_of, verify_file
from tools.drill_cluster import Cluster, DrillError
from tools.procs import file_hash
from tools.stamps import BLOCK
from tools.workload import Workload

SAMPLE_EVERY = 0.2  # seconds between samples of the member's lag on the primary
LAG_NOISE = 1.0  # seconds of lag the test may add at most, beyond what the member showed before it
IMAGE_WRITES = ((0, BLOCK), (5 * BLOCK + 100, 3000), (AREA + 64 * 1024, 256 * 1024))  # (offset, length)


class TestFailoverDrill:
    """One test failover on ``cluster`` (its volume up everywhere, with a
    primary) under the stamping workload; :meth:`run` returns the report."""

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(self, cluster: Cluster, *, on: str | None, mode: str, seed: int, writers: int = 4,
                 warmup: float = 3.0, outage: float = 3.0, work_dir: Path, loop: bool | None = None,
                 say: Callable[[str], None] = lambda s: None):
        self.c = cluster
        self.on, self.mode, self.seed = on, mode, seed
        self.writers, self.warmup = writers, warmup
        self.hold = max(3.0, outage)  # seconds the workload runs on while the image must stay frozen
        self.work_dir = work_dir
        self.loop = shutil.which("losetup") is not None if loop is None else loop
        self.say = say
        self.t0 = time.monotonic()
        self.report: Report | None = None
        self.workload: Workload | None = None

    def event(self, what: str) -> None:
        t = time.monotonic() - self.t0
        self.report.timeline.append((t, what))
        self.say(f"[{t:7.2f} s] {what}")

    def level(self, primary: str, member: str) -> str | None:
        """Why ``member`` is not current on ``primary`` (None: it is: connected,
        uptodate, shipping, nothing marked)."""
        m = self.c.status(primary)["members"][member]
        problems = [f"{k} {m[k]}" for k, want in (("link", "connected"), ("disk", "uptodate")) if m[k] != want]
        if m.get("replication") not in (None, "shipping"):
            problems.append(f"replication {m['replication']}")
        if m["out_of_sync_bytes"]:
            problems.append(f"{m['out_of_sync_bytes']} bytes marked")
        return "; ".join(problems) or None

    def lags(self, primary: str, member: str, seconds: float) -> tuple[list[float], list[str]]:
        """The member's lag_seconds on the primary, sampled for ``seconds``, and
        every moment it was not current."""
        samples, problems = [], []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            samples.append(float(self.c.status(primary)["members"][member]["lag_seconds"] or 0.0))
            problem = self.level(primary, member)
            if problem:
                problems.append(problem)
            time.sleep(SAMPLE_EVERY)
        return samples, problems

    def verify_image(self, path: str, label: str) -> Any:
        v = verify_file(path, self.workload.acks(), self.workload, fault_at=None)
        self.report.verifications[label] = v.as_dict()
        return v

    # ---------------------------------------------------------------- run

    def run(self) -> Report:
        c = self.c
        primary = primary_of(c)
        others = [n for n in c.nodes if n != primary]
        target = self.on or (FAR_SITE if FAR_SITE in others else (others[0] if others else None))
        if target is None:
            raise DrillError(f"{c.volume} has no member besides {primary}: nothing to run a test failover on")
        if target not in others:
            raise DrillError(f"--on {target}: not a secondary member of {c.volume} (members: {', '.join(c.nodes)}; "
                             f"{primary} is primary)")
        st = c.status(primary)
        self.report = r = Report("test-failover", self.mode, c.describe(), f"none: a test image on {target}",
                                 self.seed, time.time())
        for n in others:
            c.wait(f"{n} to be level with {primary}", lambda n=n: self.level(primary, n) is None, timeout=120)
        size = int(st["size"])
        area = min(AREA, (size // 2) // BLOCK * BLOCK)
        self.event(f"{primary} is primary; the test failover runs on {target} "
                   f"({st['members'][target]['mode']}); workload: {self.writers} writers over {area >> 20} MiB")
        self.workload = w = Workload(c.device(primary), area=(0, area), writers=self.writers, direct=True,
                                     journal=self.work_dir / "acknowledged.journal", seed=self.seed)
        w.start()
        started = False
        try:
            if not w.wait_acked(200, timeout=30):
                raise DrillError(f"the workload on {primary} acknowledged only {w.acked()} writes in 30 s "
                                 f"(errors: {dict(w.errors) or 'none'})")
            time.sleep(self.warmup)
            before, _ = self.lags(primary, target, 2.0)
            reply = c.ask(target, op="test_failover", volume=c.volume, action="start", loop=self.loop)
            started = True
            tf = reply["test_failover"]
            image, loop = tf["image"], tf.get("loop")
            self.event(f"test failover started on {target}: image {image} as of {tf['consistent_at']}"
                       + (f", loop device {loop}" if loop else "") + f" ({w.acked()} writes acknowledged)")
            self.check_image(primary, target, image, loop, before)
            self.write_image(target, image)
            self.end(primary, target, image, loop)
            started = False
        finally:
            if started:  # a failed step: the image is still discarded
                c.try_ask(target, op="test_failover", volume=c.volume, action="end")
            blocked = w.stop(timeout=30)
            if blocked:
                r.error = f"{len(blocked)} writes still blocked in the kernel at the end"
        self.identical(primary)
        r.figures["writes_acknowledged"] = w.acked()
        r.figures["bytes_acknowledged"] = w.acked() * BLOCK
        r.figures["write_errors"] = dict(w.errors)
        return r

    def check_image(self, primary: str, target: str, image: str, loop: str | None, before: list[float]) -> None:
        c, r, w = self.c, self.report, self.workload
        v1 = self.verify_image(image, "image at the start")
        r.check("the image is a prefix of the acknowledged writes", v1.passed(rpo_zero=False),
                f"prefix up to write {v1.prefix_index} of {v1.acked_writes}; {v1.corrupt} corrupt blocks")
        h1 = file_hash(image)
        backing = c.backing(target)
        member_at_start = file_hash(backing) if backing is not None else None
        seen = c.status(primary)["members"][target].get("test_failover") or {}
        r.check(f"{primary}'s status shows the test failover on {target}", seen.get("active") is True,
                f"members.{target}.test_failover = {seen}")
        during, problems = self.lags(primary, target, self.hold)
        r.check(f"{target} stays current while the test runs", not problems,
                f"{len(during)} samples over {self.hold:.0f} s" + (f"; not current: {problems[0]}" if problems else
                                                                  ": connected, uptodate, shipping, nothing marked"))
        worst_before, worst_during = max(before, default=0.0), max(during, default=0.0)
        r.check(f"{target}'s lag is not hurt beyond noise", worst_during <= worst_before + max(LAG_NOISE, worst_before),
                f"lag at most {worst_during:.3f} s during the test, {worst_before:.3f} s before "
                f"(median {statistics.median(during or [0]):.3f} s against {statistics.median(before or [0]):.3f} s)")
        if member_at_start is not None:
            moved = file_hash(backing) != member_at_start
            r.check(f"{target} keeps receiving the primary's writes", moved,
                    f"its backing file {'changed' if moved else 'did NOT change'} while the image stayed frozen")
        h2 = file_hash(image)
        v2 = self.verify_image(image, "image after the workload went on")
        r.check("the image stays frozen (xxh3-128 of the image)", h1 == h2, f"{h1[:16]} then {h2[:16]}")
        r.check("the image is still the same prefix", v2.passed(rpo_zero=False) and v2.prefix_index == v1.prefix_index,
                f"prefix up to write {v2.prefix_index} (was {v1.prefix_index}) of {v2.acked_writes} acknowledged now")
        if loop is not None:
            with open(image, "rb") as f, open(loop, "rb") as g:
                same = f.read(1 << 20) == g.read(1 << 20)
            r.check("the loop device reads the image", same, f"{loop}: the first MiB {'equal' if same else 'DIFFERS'}")
        tf = c.status(target)["test_failover"]
        r.figures["image_prefix_writes"] = v1.prefix_index
        r.figures["image_writes_after_freeze"] = v2.acked_writes - v2.prefix_index
        r.figures["lag_seconds_before_max"] = round(worst_before, 3)
        r.figures["lag_seconds_during_max"] = round(worst_during, 3)
        r.figures["kept_bytes"] = tf["kept_bytes"]
        r.figures["kept_regions"] = tf["kept_regions"]
        r.check(f"{target} kept what it overwrote for the image", tf["kept_bytes"] > 0,
                f"{tf['kept_bytes']} bytes in {tf['kept_regions']} regions of {tf['space']} bytes of space")
        self.event(f"image a prefix of {v1.prefix_index} writes and frozen while {w.acked()} writes were "
                   f"acknowledged; {tf['kept_bytes']} bytes kept")

    def write_image(self, target: str, image: str) -> None:
        """Writes into the image read back, and never reach the member's disk."""
        c, r = self.c, self.report
        data = {off: os.urandom(n) for off, n in IMAGE_WRITES}
        fd = os.open(image, os.O_RDWR)
        try:
            for off, buf in data.items():
                os.pwrite(fd, buf, off)
            back = {off: os.pread(fd, len(buf), off) for off, buf in data.items()}
        finally:
            os.close(fd)
        r.check("writes into the image read back", back == data,
                f"{len(data)} writes ({sum(map(len, data.values()))} bytes, partial blocks among them)")
        backing = c.backing(target)
        if backing is not None:
            with open(backing, "rb") as f:
                leaked = [off for off, buf in data.items() if (f.seek(off), f.read(len(buf)))[1] == buf]
            r.check(f"the image's writes never reach {target}'s disk", not leaked,
                    "none found in its backing file" if not leaked else f"found at {leaked}")
        r.figures["overlay_bytes"] = c.status(target)["test_failover"]["overlay_bytes"]

    def end(self, primary: str, target: str, image: str, loop: str | None) -> None:
        c, r = self.c, self.report
        tf = c.ask(target, op="test_failover", volume=c.volume, action="end")["test_failover"]
        self.event(f"test failover ended on {target}: {tf['ended_reason']}")
        files = [p for p in Path(c.backing(target)).parent.glob("*.test-*")] if c.backing(target) else []
        loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout if loop else ""
        gone = not tf["active"] and not os.path.exists(image) and not files and not (loop and loop + ":" in loops)
        r.check("ending the test discards the image", gone,
                f"{tf['ended_reason']}; image file {'gone' if not os.path.exists(image) else 'STILL THERE'}"
                + (f", loop device {loop} {'detached' if loop + ':' not in loops else 'STILL ATTACHED'}" if loop else "")
                + (f", left: {[str(p) for p in files]}" if files else ""))
        told = c.wait(f"{primary} to learn that the test ended", lambda: not (
            c.status(primary)["members"][target].get("test_failover") or {}).get("active"), timeout=10)
        r.check(f"{primary}'s status shows the test ended", told is True, "test_failover.active false")

    def identical(self, primary: str) -> None:
        """Every member byte-identical to the primary once the workload stopped."""
        c, r = self.c, self.report
        fd = os.open(c.device(primary), os.O_RDWR)
        try:
            os.fsync(fd)  # a barrier on every sync member
        finally:
            os.close(fd)

        def drained():
            st = c.try_status(primary)
            return st and all(m["link"] == "connected" and m["disk"] == "uptodate" and not m["out_of_sync_bytes"]
                              and not m.get("lag_bytes") for n, m in st["members"].items() if n != primary)
        c.wait("every member to be level and drained", drained, timeout=120)
        paths = {n: c.backing(n) for n in c.nodes}
        if any(p is None for p in paths.values()):
            raise DrillError("the members' backing files are not on this machine: run the test failover drill "
                             "on the local cluster")
        hashes = {n: file_hash(p) for n, p in paths.items()}
        r.check("members byte-identical after the test (xxh3-128 of the backing files)",
                len(set(hashes.values())) == 1, ", ".join(f"{n} {h[:16]}" for n, h in hashes.items()))
