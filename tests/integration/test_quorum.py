"""Who may write: votes, the witness, partitions (issue 6), with real daemons.

labor1's daemon runs in the test's trio loop (its engine's write is the
application: a write that returned was acknowledged); labor2 and the witness are
subprocesses. Partitions are made with the WAN proxy placed on labor1's outgoing
connections: labor1 reads its own config file, in which labor2 and the witness
are at the proxies' ports (as behind NAT); labor2 and the witness read one with
the real ports.
"""

from __future__ import annotations

import errno
import os
import random
from contextlib import asynccontextmanager

import pytest
import trio

from gmd.config import load_config
from gmd.engine import NotPrimary
from transport.wanproxy import WanProxy

from .harness import (
    MiB,
    NodeSpec,
    WitnessProcess,
    backing,
    daemon_processes,
    file_hash,
    free_ports,
    in_process_daemon,
    init_in_sync,
    wait_for,
    witness_table,
    write_config,
)
from .test_replication import start_primary


class Cluster:
    """labor1 (in process) and labor2 (+ witness W) with proxies on labor1's side."""

    def __init__(self, tmp_path, *, witness: bool, mode: str = "sync", extra_volume: str = ""):
        real = free_ports(2)  # labor2's and the witness's real ports
        proxied = free_ports(2)  # where labor1 reaches them
        self.real, self.proxied = real, proxied
        labor1 = NodeSpec("labor1")
        w1 = witness_table("W", proxied[1]) if witness else ""
        w2 = witness_table("W", real[1]) if witness else ""
        self.cfg1 = write_config(tmp_path, [labor1, NodeSpec("labor2", address=[proxied[0]], listen=[real[0]])],
                                 mode=mode, name="labor1.toml", extra_tables=w1, extra_volume=extra_volume)
        self.cfg2 = write_config(tmp_path, [labor1, NodeSpec("labor2", address=[real[0]])], mode=mode,
                                 name="labor2.toml", extra_tables=w2, extra_volume=extra_volume)
        init_in_sync(self.cfg1, "labor1", ["labor2"])
        self.tmp = tmp_path
        self.to_labor2 = WanProxy(("127.0.0.1", real[0]), ("127.0.0.1", proxied[0]))
        self.to_witness = WanProxy(("127.0.0.1", real[1]), ("127.0.0.1", proxied[1])) if witness else None
        self.witness = WitnessProcess(self.cfg2, "W", tmp_path) if witness else None

    @asynccontextmanager
    async def running(self):
        """Proxies, the witness (if any) and labor2 started, labor1 in this trio
        loop and primary; yields (labor2's process, labor1's engine). Everything
        is stopped afterwards, by PID, also on failure."""
        async with trio.open_nursery() as pn:
            for proxy in (self.to_labor2, self.to_witness):
                if proxy is not None:
                    await pn.start(proxy.serve)
            try:
                if self.witness is not None:
                    self.witness.start()
                with daemon_processes(self.cfg2, ["labor2"], self.tmp) as procs:
                    async with in_process_daemon(self.cfg1, "labor1") as d:
                        yield procs, await start_primary(d, procs)
            finally:
                if self.witness is not None:
                    self.witness.stop()
                pn.cancel_scope.cancel()

    def partition(self, mode: str = "blackhole") -> None:
        for p in (self.to_labor2, self.to_witness):
            if p is not None:
                p.partition(mode)

    def heal(self) -> None:
        for p in (self.to_labor2, self.to_witness):
            if p is not None:
                p.heal()


async def run_in_thread(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)


async def writer(eng, acked: dict, stop: trio.Event, seed: int, failures: list | None = None,
                 unacked: dict | None = None):
    """Writes of 64 KiB to random offsets in the first 32 MiB, each writer its
    own (offsets = seed mod 4); ``acked`` maps offset -> the bytes of the last
    write there that returned (was acknowledged); ``unacked`` gets a write
    that never returned (it may or may not have reached the disks)."""
    rng = random.Random(seed)
    while not stop.is_set():
        offset = (rng.randrange(0, 32 * MiB // 65536 // 4) * 4 + seed % 4) * 65536
        data = rng.randbytes(65536)
        try:
            await eng.write(offset, data)
        except (OSError, NotPrimary) as e:  # what the application sees as EIO
            if failures is None:
                raise
            failures.append(e)
            if unacked is not None:
                unacked[offset] = data
            return
        acked[offset] = data
        count[0] += 1


count = [0]  # acknowledged writes since the test's last reset (``acked`` holds distinct offsets)


def acked_count() -> int:
    return count[0]


def assert_acknowledged_present(path, acked: dict, unacked: dict | None = None) -> None:
    """Every acknowledged write is there, unless a later write to the same place
    that never returned replaced it (either is allowed then)."""
    unacked = unacked or {}
    with open(path, "rb") as f:
        for offset, data in acked.items():
            f.seek(offset)
            found = f.read(len(data))
            assert found == data or found == unacked.get(offset), f"acknowledged write at {offset} lost"


async def test_primary_keeps_writing_with_the_witness_when_the_secondary_dies(tmp_path):
    c = Cluster(tmp_path, witness=True)
    async with c.running() as (procs, eng):
        q = eng.status()["quorum"]
        assert (q["expected"], q["needed"]) == (3, 2)
        await wait_for(lambda: eng.status()["quorum"]["witnesses"]["W"]["granted"], what="lease")
        acked: dict = {}
        count[0] = 0
        stop = trio.Event()
        async with trio.open_nursery() as n:
            n.start_soon(writer, eng, acked, stop, 1)
            await wait_for(lambda: acked_count() > 50, what="writes")
            await run_in_thread(procs["labor2"].kill)
            n_before = acked_count()
            # 1 + the witness's vote of 3: the writes go on.
            await wait_for(lambda: acked_count() > n_before + 500, what="writes without labor2")
            stop.set()
        st = eng.status()
        assert st["quorum"]["ok"] and st["quorum"]["votes"] == 2
        assert st["members"]["labor2"]["disk"] == "outdated"
        assert "registered generation" in c.witness.log() and "outdated: labor2" in c.witness.log()
        # labor2 is refused by the witness as outdated, even with labor1 gone.
        procs["labor2"].start()
        await run_in_thread(lambda: procs["labor2"].request(op="up", volume="appslv"))
        await wait_for(lambda: eng.status()["members"]["labor2"]["disk"] == "uptodate", timeout=60,
                       what="mini-copy back")
        await eng.flush()
        assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))


async def test_two_nodes_without_witness_split_neither_side_may_write_or_promote(tmp_path):
    """(b) Equal votes, no witness: after a split the primary's writes wait
    (and complete once the link is back); the other side cannot be promoted
    without --force."""
    c = Cluster(tmp_path, witness=False)
    async with c.running() as (procs, eng):
        await eng.write(0, b"a" * 65536)
        c.partition("reset")
        await wait_for(lambda: not eng.members["labor2"].connected, what="link lost")
        done = trio.Event()
        data = os.urandom(65536)

        async def one_write():
            await eng.write(MiB, data)
            done.set()

        async with trio.open_nursery() as n:
            n.start_soon(one_write)
            await trio.sleep(3)
            assert not done.is_set(), "a write completed without quorum"
            st = eng.status()["quorum"]
            assert not st["ok"] and st["votes"] == 1 and st["needed"] == 2
            assert st["suspended_writes_since"] is not None
            # The other side: no quorum, no promotion.
            await wait_for(lambda: procs["labor2"].status()["members"]["labor1"]["link"] != "connected",
                           what="labor2 sees the split")
            with pytest.raises(RuntimeError, match="no quorum: 1 of 2 votes"):
                await run_in_thread(lambda: procs["labor2"].request(op="primary", volume="appslv"))
            assert procs["labor2"].status()["role"] == "secondary"
            c.heal()
            with trio.fail_after(30):
                await done.wait()  # quorum back: the suspended write completes
        await eng.flush()
        await wait_for(lambda: eng.status()["members"]["labor2"]["disk"] == "uptodate", timeout=60,
                       what="labor2 caught up")
        await eng.flush()
        with open(backing(tmp_path, "labor2"), "rb") as f:
            f.seek(MiB)
            assert f.read(65536) == data
        assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))


async def test_fail_policy_returns_eio_after_the_quorum_timeout(tmp_path):
    c = Cluster(tmp_path, witness=False, extra_volume='on_quorum_loss = "fail"\nquorum_timeout = 2')
    async with c.running() as (procs, eng):
        c.partition("reset")
        await wait_for(lambda: not eng.members["labor2"].connected, what="link lost")
        t0 = trio.current_time()
        with pytest.raises(OSError) as e:
            await eng.write(0, b"x" * 4096)
        assert e.value.errno == errno.EIO and "no quorum for 2 s" in str(e.value)
        assert trio.current_time() - t0 >= 2
        # The operator's override: this site alone is enough now.
        st = await eng.set_expected_votes(1)
        assert st["ok"] and st["expected"] == 1 and st["expected_override"] == 1
        await eng.write(0, b"y" * 4096)
        assert load_config(c.cfg1)  # config untouched; the override lives in the state map
        assert eng.statemap.sb.expected_votes == 1


async def test_partitioned_primary_stops_and_the_witness_side_takes_over(tmp_path):
    """(a) 2 nodes + witness; labor1 (primary) is cut from labor2 and the
    witness: its writes stop completing; labor2 gets quorum with the witness
    and is promoted; after the heal labor1 steps down and is brought back by a
    bitmap copy; no acknowledged write is lost and the members are identical."""
    c = Cluster(tmp_path, witness=True)
    async with c.running() as (procs, eng):
        acked: dict = {}
        count[0] = 0
        unacked: dict = {}
        failures: list = []
        stop = trio.Event()
        async with trio.open_nursery() as n:
            for seed in range(4):
                n.start_soon(writer, eng, acked, stop, seed, failures, unacked)
            await wait_for(lambda: acked_count() > 100, what="writes")
            c.partition("blackhole")
            cut = acked_count()
            # Writes stop completing (labor2's acks and the witness are out of reach).
            await trio.sleep(8)
            stalled = acked_count()
            await trio.sleep(2)
            assert acked_count() == stalled, "writes completed without quorum"
            assert eng.status()["quorum"]["ok"] is False
            # labor2 + the witness: quorum; promote (the operator's step).
            await wait_for(lambda: procs["labor2"].status()["members"]["labor1"]["link"] != "connected",
                           what="labor2 sees the split")
            reply = await wait_for(lambda: _try_promote(procs["labor2"]), timeout=20,
                                   what="labor2 promoted")
            device = reply["device"]
            # The new primary writes too.
            new_data = os.urandom(MiB)
            await run_in_thread(_pwrite_sync, device, new_data, 32 * MiB)
            st2 = procs["labor2"].status()
            assert st2["role"] == "primary" and st2["quorum"]["ok"]
            c.heal()
            # labor1 learns from the witness that labor2 holds the lease: it steps down.
            await wait_for(lambda: eng.role.value == "secondary", timeout=20, what="labor1 demoted")
            stop.set()
        assert all(e.errno == errno.EIO for e in failures), failures
        assert len(failures) == 4  # every writer's stalled write failed when labor1 stepped down
        await wait_for(lambda: procs["labor2"].status()["members"]["labor1"]["disk"] == "uptodate",
                       timeout=60, what="labor1 brought back")
        log2 = procs["labor2"].log()
        assert "mini pass to labor1 done" in log2 and "full pass to labor1" not in log2
        await run_in_thread(_fsync_sync, device)
        # Every write labor1 acknowledged (all before the cut completed on
        # labor2 too) survives, and so does the new primary's.
        assert stalled >= cut
        assert_acknowledged_present(backing(tmp_path, "labor2"), acked, unacked)
        with open(backing(tmp_path, "labor1"), "rb") as f:
            f.seek(32 * MiB)
            assert f.read(MiB) == new_data
        assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))


def _try_promote(proc):
    try:
        return proc.request(op="primary", volume="appslv")
    except RuntimeError as e:
        if "no quorum" in str(e):
            return None
        raise


def _pwrite_sync(device: str, data: bytes, offset: int) -> None:
    fd = os.open(device, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_sync(device: str) -> None:
    fd = os.open(device, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


ROUNDS = int(os.environ.get("GMD_WITNESS_ROUNDS", "4"))


async def test_a_restarted_witness_never_gives_both_sides_quorum(tmp_path):
    """(e) labor1 (primary) and labor2 are cut apart; both still reach the
    witness, which is killed and restarted at random moments while labor1
    writes (or idles) and labor2 keeps trying to become primary. Never may
    labor1 hold quorum as primary while labor2 is primary too; and no write
    labor1 acknowledged is lost."""
    rng = random.Random(int(os.environ.get("GMD_SEED", "0")) or None)
    c = Cluster(tmp_path, witness=True)
    async with c.running() as (procs, eng):
        await wait_for(lambda: eng.status()["quorum"]["witnesses"]["W"]["granted"], timeout=20,
                       what="witness lease")
        acked: dict = {}
        unacked: dict = {}
        failures: list = []
        count[0] = 0
        violations: list = []
        promoted: list = []
        done = trio.Event()

        async def monitor():
            while not done.is_set():
                a = eng.status()  # labor1 first, then labor2: see the docstring of Cluster
                b = await run_in_thread(procs["labor2"].status)
                if a["role"] == "primary" and a["quorum"]["ok"] and b["role"] == "primary":
                    violations.append((trio.current_time(), a["quorum"], b["quorum"]))
                await trio.sleep(0.05)

        async def promoter():
            while not done.is_set() and not promoted:
                reply = await run_in_thread(_try_promote_any, procs["labor2"])
                if reply is not None:
                    promoted.append(trio.current_time())
                await trio.sleep(0.1)

        async with trio.open_nursery() as n:
            n.start_soon(monitor)
            c.to_labor2.partition("reset")
            await wait_for(lambda: not eng.members["labor2"].connected, what="split")
            n.start_soon(promoter)
            for i in range(ROUNDS):
                stop = trio.Event()
                # Idle first: no write registers labor2 as outdated, so only the
                # leases keep labor2 out; then writes, maybe.
                writing = i >= ROUNDS // 2 and rng.random() < 0.7
                async with trio.open_nursery() as wn:
                    if writing:
                        wn.start_soon(writer, eng, acked, stop, rng.randrange(4), failures, unacked)
                    await trio.sleep(rng.uniform(0, 2))
                    await run_in_thread(c.witness.kill)
                    # Mostly back within labor1's lease: the dangerous case.
                    await trio.sleep(rng.uniform(0, 1.5) if rng.random() < 0.8 else rng.uniform(1.5, 5))
                    await run_in_thread(c.witness.start)
                    await trio.sleep(rng.uniform(4, 8))  # through the quiet time, or not
                    stop.set()
            done.set()
        assert not violations, violations[:3]
        if count[0]:
            # labor1 wrote without labor2 and registered it outdated: never promoted.
            assert not promoted
        c.heal()
        if promoted:
            await wait_for(lambda: eng.role.value == "secondary", timeout=30, what="labor1 stepped down")
            await wait_for(lambda: procs["labor2"].status()["members"]["labor1"]["disk"] == "uptodate",
                           timeout=60, what="labor1 caught up")
        else:
            await wait_for(lambda: eng.status()["members"]["labor2"]["disk"] == "uptodate", timeout=60,
                           what="labor2 caught up")
            await eng.flush()
        assert all(isinstance(e, NotPrimary) or e.errno == errno.EIO for e in failures), failures
        assert_acknowledged_present(backing(tmp_path, "labor2"), acked, unacked)
        assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))


def _try_promote_any(proc):
    try:
        return proc.request(op="primary", volume="appslv")
    except RuntimeError:
        return None


async def test_split_brain_is_detected_and_resolved_with_the_discarded_data_saved(tmp_path):
    """(c) Two forced primaries write during a split; reconnected, the link
    stays down and both data stay intact; gmd resolve --dry-run names the rule
    and the byte counts; --discard-local on labor2 brings it back identical to
    labor1, and the saved image holds exactly labor2's diverging regions."""
    import json
    import subprocess

    from .harness import GMD

    c = Cluster(tmp_path, witness=False, mode="mwc")
    rs = 65536
    async with c.running() as (procs, eng):
        ours, theirs, labor2_before = await make_split_brain(c, eng, procs, tmp_path, (3, 4, 40), (4, 5, 90))
        # Heal: both primary, then labor2 demoted; the histories diverge: split-brain.
        await heal_into_split_brain(c, eng, procs)
        assert not eng.members["labor2"].connected
        for r, data in theirs.items():  # nothing overwritten
            assert _read_region(backing(tmp_path, "labor2"), r, rs) == data
        for r, data in ours.items():
            assert _read_region(backing(tmp_path, "labor1"), r, rs) == data
        # The dry run explains.
        env = dict(os.environ, GMD_CONFIG=str(c.cfg2), GMD_NODE="labor2")
        p = await run_in_thread(lambda: subprocess.run(
            [GMD, "resolve", "appslv", "--discard-local", "--dry-run", "--json"], env=env,
            capture_output=True, text=True, timeout=60))
        assert p.returncode == 0, p.stderr
        plan = json.loads(p.stdout)["plan"]
        assert plan["rule"] == "operator: gmd resolve --discard-local on labor2"
        assert plan["direction"] == "labor1 -> labor2" and plan["copy"] == "bitmap"
        assert plan["local_changed_bytes"] == 3 * rs and plan["peer_changed_bytes"] == 3 * rs
        assert plan["move_bytes"] == plan["discard_bytes"] == 5 * rs  # regions 3, 4, 5, 40, 90
        assert _read_region(backing(tmp_path, "labor2"), 5, rs) == theirs[5]  # dry run: nothing changed
        # Resolve.
        p = await run_in_thread(lambda: subprocess.run(
            [GMD, "resolve", "appslv", "--discard-local"], env=env, capture_output=True, text=True,
            timeout=60))
        assert p.returncode == 0, p.stderr
        await wait_for(lambda: eng.status()["members"]["labor2"]["disk"] == "uptodate", timeout=60,
                       what="labor2 brought back")
        await eng.flush()
        assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))
        st2 = await run_in_thread(procs["labor2"].status)
        (image,) = st2["split_brain"]["saved_images"]
        manifest = json.loads(open(image + ".json").read())
        assert manifest["regions"] == [[3 * rs, 3 * rs], [40 * rs, rs], [90 * rs, rs]]
        assert not os.access(image, os.W_OK) or os.geteuid() == 0
        assert os.stat(image).st_mode & 0o777 == 0o444
        for r, data in labor2_before.items():
            assert _read_region(image, r, rs) == data  # labor2's own data, as it was
        assert _read_region(image, 10, rs) == bytes(rs)  # only the diverging regions


async def heal_into_split_brain(c, eng, procs) -> None:
    """Heal the partition of two primaries and demote labor2: their histories
    diverged, so labor1 sees a split-brain and labor2 stays standalone."""
    c.heal()
    await run_in_thread(lambda: procs["labor2"].request(op="secondary", volume="appslv"))
    await wait_for(lambda: "split-brain" in (eng.members["labor2"].reason or ""), timeout=20,
                   what="split-brain detected")
    st2 = await run_in_thread(procs["labor2"].status)
    assert st2["members"]["labor1"]["link"] == "standalone"
    assert "split-brain" in st2["members"]["labor1"]["reason"]


async def make_split_brain(c, eng, procs, tmp_path, ours_at, theirs_at, rs=65536):
    """Split, then labor1 writes ``ours_at`` (by an expected-votes override) and
    labor2, forced primary, writes ``theirs_at``; returns both and labor2's data
    of every touched region before any resolution."""
    await eng.write(0, os.urandom(8 * MiB))
    await eng.flush()
    c.partition("reset")
    await wait_for(lambda: not eng.members["labor2"].connected, what="split")
    await eng.set_expected_votes(1)
    ours = {r: os.urandom(rs) for r in ours_at}
    for r, data in ours.items():
        await eng.write(r * rs, data)
    await eng.flush()
    reply = await run_in_thread(lambda: procs["labor2"].request(op="primary", volume="appslv", force=True))
    theirs = {r: os.urandom(rs) for r in theirs_at}
    await run_in_thread(_pwrite_regions, reply["device"], theirs, rs)
    touched = sorted({*ours_at, *theirs_at})
    return ours, theirs, {r: _read_region(backing(tmp_path, "labor2"), r, rs) for r in touched}


def _pwrite_regions(device: str, regions: dict, rs: int) -> None:
    fd = os.open(device, os.O_RDWR)
    try:
        for r, data in regions.items():
            os.pwrite(fd, data, r * rs)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_region(path, r: int, rs: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(r * rs)
        return f.read(rs)


async def test_split_brain_policy_discard_least_changes_resolves_by_itself(tmp_path):
    """With split_brain = "discard-least-changes", the side that wrote fewer
    regions since the split (here labor2, once it is secondary) is brought
    back from the other without the operator, its data saved first."""
    import json

    c = Cluster(tmp_path, witness=False, mode="mwc", extra_volume='split_brain = "discard-least-changes"')
    rs = 65536
    async with c.running() as (procs, eng):
        ours, theirs, labor2_before = await make_split_brain(c, eng, procs, tmp_path, (3, 4, 40), (7,))
        c.heal()
        # Both primary: refused; the side to discard must step down first.
        await wait_for(lambda: "are primary" in (eng.members["labor2"].reason or ""), timeout=20,
                       what="both primary refused")
        assert not eng.members["labor2"].connected
        await run_in_thread(lambda: procs["labor2"].request(op="secondary", volume="appslv"))
        await wait_for(lambda: eng.status()["members"]["labor2"]["disk"] == "uptodate", timeout=60,
                       what="labor2 brought back by the policy")
        await eng.flush()
        assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))
        (image,) = (await run_in_thread(procs["labor2"].status))["split_brain"]["saved_images"]
        manifest = json.loads(open(image + ".json").read())
        assert manifest["regions"] == [[3 * rs, 2 * rs], [7 * rs, rs], [40 * rs, rs]]
        assert _read_region(image, 7, rs) == theirs[7] == labor2_before[7]
        assert "discard-least-changes" in procs["labor2"].log()
