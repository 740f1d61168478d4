"""Replication between real daemons on loopback.

The primary runs in the test's trio loop (so the test drives its engine's
write/flush API, as the FUSE front will); every other member is a real
``gmd daemon`` subprocess talking TCP, started and killed by PID.
"""

from __future__ import annotations

import random
from contextlib import asynccontextmanager

import pytest
import trio

from statemap import StateMap
from transport.wanproxy import WanProxy, WanSettings

from .harness import (
    MiB,
    NodeSpec,
    backing,
    daemon_processes,
    file_hash,
    free_ports,
    in_process_daemon,
    init_in_sync,
    status_of,
    wait_for,
    write_config,
)

REGION = 64 * 1024


async def start_primary(daemon, procs):
    for p in procs.values():
        await trio.to_thread.run_sync(lambda p=p: p.request(op="up", volume="appslv"))
    eng = daemon.engines["appslv"]
    await eng.up()
    for name in procs:
        await wait_for(lambda name=name: eng.members[name].connected, what=f"{name} connected")
    await eng.promote()
    return eng


@asynccontextmanager
async def primary_alone_keeps_quorum(tmp_path):
    """labor1 (in this process) primary with 2 of 3 votes, so it keeps quorum
    and keeps writing alone; labor2 a daemon process, in sync. Yields the
    primary's engine and the member processes."""
    cfg = write_config(tmp_path, [NodeSpec("labor1", votes=2), NodeSpec("labor2")], mode="mwc")
    init_in_sync(cfg, "labor1", ["labor2"])
    with daemon_processes(cfg, ["labor2"], tmp_path) as procs:
        async with in_process_daemon(cfg, "labor1") as d:
            yield await start_primary(d, procs), procs


@asynccontextmanager
async def async_member_over_proxy(tmp_path):
    """labor1 (in this process) primary, labor2 an ``async`` member (a daemon
    process) with a 256 KiB queue, reached through a WAN proxy. Yields the
    primary's engine and the proxy."""
    listen = free_ports(1)
    labor2 = NodeSpec("labor2", mode="async", listen=listen)
    labor2.address = free_ports(1)
    cfg = write_config(tmp_path, [NodeSpec("labor1"), labor2], mode="mwc", extra_volume='async_queue = "256KiB"')
    init_in_sync(cfg, "labor1", ["labor2"])
    proxy = WanProxy(("127.0.0.1", listen[0]), ("127.0.0.1", labor2.address[0]))
    async with trio.open_nursery() as pn:
        await pn.start(proxy.serve)
        with daemon_processes(cfg, ["labor2"], tmp_path) as procs:
            async with in_process_daemon(cfg, "labor1") as d:
                yield await start_primary(d, procs), proxy
        pn.cancel_scope.cancel()


async def random_writes(eng, n, *, seed, size=64 * MiB, workers=8, log=None, stop=None):
    """``n`` writes of random sizes and offsets from ``workers`` concurrent tasks
    (payloads made lazily); ``log`` gets (start, end, offset, length) of each."""
    rng = random.Random(seed)
    remaining = [n]

    def next_write():
        length = rng.choice([512, 4096, 4096, 65536, 3 * 4096 + 512, 1 * MiB])
        offset = rng.randrange(0, size - length) // 512 * 512
        return offset, rng.randbytes(length)

    async def worker():
        while remaining[0] > 0 and not (stop is not None and stop.is_set()):
            remaining[0] -= 1
            offset, data = next_write()
            t0 = trio.current_time()
            gseq = await eng.write(offset, data)
            if log is not None:
                log.append((t0, trio.current_time(), offset, len(data), gseq))

    async with trio.open_nursery() as n_:
        for _ in range(workers):
            n_.start_soon(worker)


def regions(offset, length):
    return set(range(offset // REGION, (offset + length - 1) // REGION + 1))


@pytest.mark.parametrize("mode", ["sync", "mwc"])
async def test_sync_members_are_byte_identical_after_random_writes(tmp_path, mode):
    cfg = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2"), NodeSpec("labor3")], mode=mode)
    init_in_sync(cfg, "labor1", ["labor2", "labor3"])
    with daemon_processes(cfg, ["labor2", "labor3"], tmp_path) as procs:
        async with in_process_daemon(cfg, "labor1") as d:
            eng = await start_primary(d, procs)
            await random_writes(eng, 300, seed=7)
            await eng.flush()
            h1 = file_hash(backing(tmp_path, "labor1"))
            assert h1 == file_hash(backing(tmp_path, "labor2")) == file_hash(backing(tmp_path, "labor3"))
            st = eng.status()
            for peer in ("labor2", "labor3"):
                assert st["members"][peer]["disk"] == "uptodate"
                assert st["members"][peer]["out_of_sync_bytes"] == 0
            st2 = await status_of(procs["labor2"])
            assert st2["members"]["labor2"]["disk"] == "uptodate"
            assert st2["state_map"]["generation"] == st["state_map"]["generation"]


async def test_killed_secondary_is_marked_exactly_and_caught_up_by_a_mini_copy(tmp_path):
    async with primary_alone_keeps_quorum(tmp_path) as (eng, procs):
        member = eng.members["labor2"]
        log: list = []
        stop = trio.Event()
        kill_t = lost_t = flushed_at_kill = None
        gens: list[str] = []
        gen_before = eng.statemap.sb.generations.current

        async def killer():
            nonlocal kill_t, lost_t, flushed_at_kill
            await wait_for(lambda: len(log) >= 100, what="writes flowing")
            kill_t = trio.current_time()
            await trio.to_thread.run_sync(procs["labor2"].kill)
            await wait_for(lambda: not member.connected, what="loss noticed")
            lost_t = trio.current_time()
            flushed_at_kill = member.flushed_gseq  # no ack arrives after the loss
            await wait_for(lambda: len([w for w in log if w[0] > lost_t]) >= 50, what="writes after loss")
            gens.append(eng.statemap.sb.generations.current)
            n_now = len(log)
            await wait_for(lambda: len(log) >= n_now + 50, what="more writes")
            gens.append(eng.statemap.sb.generations.current)
            stop.set()

        async with trio.open_nursery() as n:
            n.start_soon(killer)
            await random_writes(eng, 100_000, seed=3, workers=4, log=log, stop=stop)
        await eng.flush()
        bits = set(eng.statemap.out_of_sync_regions("labor2").search(1))
        # Written while it was away, or acked but not yet flushed by it (its
        # crash could have dropped those): must be marked.
        must = set().union(*(regions(o, n) for t0, _t1, o, n, _g in log if t0 > lost_t))
        unflushed = set().union(*(regions(o, n) for _t0, t1, o, n, g in log
                                  if t1 < kill_t and g > flushed_at_kill))
        # Anything it acked and flushed before the kill must not be.
        may = set().union(*(regions(o, n) for _t0, t1, o, n, g in log if t1 > kill_t or g > flushed_at_kill))
        assert must and must <= bits <= may
        assert unflushed <= bits
        # Losing the member started one new generation, not one per write.
        assert gens[0] == gens[1] != gen_before
        assert eng.statemap.sb.peers["labor2"].bitmap_gen == gen_before
        st = eng.status()["members"]["labor2"]
        assert st["disk"] == "outdated" and st["link"] != "connected"

        # The secondary restarts: its own crash recovery adds the extents it
        # had hot; the bitmaps are exchanged and it is told it is outdated.
        sm = StateMap.open(tmp_path / "data/labor2/appslv.sm", readonly=True)
        hot = set(sm.intent.search(1))
        sm.close()
        rpe = eng.config.extent_size // REGION
        expected = bits | {r for e in hot for r in range(e * rpe, (e + 1) * rpe)}
        await trio.to_thread.run_sync(procs["labor2"].start)
        await trio.to_thread.run_sync(lambda: procs["labor2"].request(op="up", volume="appslv"))
        await wait_for(lambda: member.connected, what="reconnect")
        # The mini-copy moves exactly the regions in the exchanged bitmaps
        # (fewer bytes where a region already matches), then it is uptodate.
        await wait_for(lambda: eng.status()["members"]["labor2"]["disk"] == "uptodate", what="caught up")
        passes = [p for name, p in eng.copier.history if name == "labor2"]
        assert passes[0].kind == "mini" and passes[0].total_bytes == len(expected) * REGION
        assert eng.copier.bytes_sent <= len(expected) * REGION
        assert eng.status()["members"]["labor2"]["out_of_sync_bytes"] == 0
        await eng.flush()
        assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))
        await wait_for(lambda: _disk_of(procs["labor2"], "uptodate"), what="labor2 knows")


def _disk_of(proc, disk):
    async def check():
        st = await status_of(proc)
        return st if st["members"][proc.node]["disk"] == disk else None
    return check()


async def test_wrong_secret_is_refused_and_logged_on_both_ends(tmp_path):
    nodes = [NodeSpec("labor1"), NodeSpec("labor2")]
    cfg = write_config(tmp_path, nodes)
    bad = write_config(tmp_path, nodes, secret="not-the-secret", name="bad.toml")
    init_in_sync(cfg, "labor1", ["labor2"])
    with daemon_processes(bad, ["labor2"], tmp_path) as procs:
        async with in_process_daemon(cfg, "labor1") as d:
            await trio.to_thread.run_sync(lambda: procs["labor2"].request(op="up", volume="appslv"))
            eng = d.engines["appslv"]
            await eng.up()
            m = eng.members["labor2"]
            await wait_for(lambda: m.state.value == "standalone", what="standalone")
            assert "authentication" in m.reason
            assert not m.connected
            await wait_for(lambda: "authentication failed" in procs["labor2"].log(), what="refusal in labor2's log")


async def test_volume_size_mismatch_is_refused(tmp_path):
    nodes = [NodeSpec("labor1"), NodeSpec("labor2")]
    cfg = write_config(tmp_path, nodes)
    (tmp_path / "other").mkdir()
    other = write_config(tmp_path / "other", nodes, size="128MiB")
    init_in_sync(cfg, "labor1", [])
    init_in_sync(other, "labor2", [])
    with daemon_processes(other, ["labor2"], tmp_path) as procs:
        async with in_process_daemon(cfg, "labor1") as d:
            await trio.to_thread.run_sync(lambda: procs["labor2"].request(op="up", volume="appslv"))
            eng = d.engines["appslv"]
            await eng.up()
            m = eng.members["labor2"]
            await wait_for(lambda: m.state.value == "standalone", what="standalone")
            assert "size mismatch" in m.reason and "67108864" in m.reason and "134217728" in m.reason
            await wait_for(lambda: "size mismatch" in procs["labor2"].log(), what="refusal logged on labor2")


async def test_losing_one_of_two_paths_loses_nothing(tmp_path):
    listen = free_ports(2)
    labor2 = NodeSpec("labor2", paths=2, listen=listen)
    labor2.address = free_ports(2)  # the proxies' ports: peers dial these
    cfg = write_config(tmp_path, [NodeSpec("labor1"), labor2], mode="sync")
    init_in_sync(cfg, "labor1", ["labor2"])
    proxies = [WanProxy(("127.0.0.1", listen[i]), ("127.0.0.1", labor2.address[i])) for i in range(2)]
    async with trio.open_nursery() as pn:
        for p in proxies:
            await pn.start(p.serve)
        with daemon_processes(cfg, ["labor2"], tmp_path) as procs:
            async with in_process_daemon(cfg, "labor1") as d:
                eng = await start_primary(d, procs)
                m = eng.members["labor2"]
                await wait_for(lambda: len([p for p in m.session.paths if not p.closed]) == 2, what="two paths")
                log: list = []
                stop = trio.Event()

                async def cutter():
                    await wait_for(lambda: len(log) >= 150, what="writes flowing")
                    proxies[0].partition("reset")
                    n_before = len(log)
                    await wait_for(lambda: len(log) >= n_before + 150, what="writes after the cut")
                    stop.set()

                async with trio.open_nursery() as n:
                    n.start_soon(cutter)
                    await random_writes(eng, 100_000, seed=11, workers=8, log=log, stop=stop)
                await eng.flush()
                assert m.connected, m.reason
                assert eng.statemap.out_of_sync_bytes("labor2") == 0
                assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))
                assert proxies[0].statistics().resets >= 1
                proxies[0].heal()
        pn.cancel_scope.cancel()


async def test_async_member_lags_over_a_slow_link_then_drains(tmp_path):
    listen = free_ports(1)
    labor2 = NodeSpec("labor2", mode="async", listen=listen)
    labor2.address = free_ports(1)
    cfg = write_config(tmp_path, [NodeSpec("labor1"), labor2], mode="mwc")
    init_in_sync(cfg, "labor1", ["labor2"])
    proxy = WanProxy(("127.0.0.1", listen[0]), ("127.0.0.1", labor2.address[0]), WanSettings(delay=0.02))
    async with trio.open_nursery() as pn:
        await pn.start(proxy.serve)
        with daemon_processes(cfg, ["labor2"], tmp_path) as procs:
            async with in_process_daemon(cfg, "labor1") as d:
                eng = await start_primary(d, procs)
                proxy.update(delay=0.25)  # slow enough that acks clearly trail the writes
                rng = random.Random(5)
                for i in range(40):
                    await eng.write(i * REGION, rng.randbytes(REGION))
                # 40 writes returned although no ack can have come back yet.
                st = eng.status()["members"]["labor2"]
                assert st["lag_bytes"] > 0 and st["mode"] == "async"
                await wait_for(lambda: eng.status()["members"]["labor2"]["lag_bytes"] == 0, what="lag drained")
                await eng.flush()
                await wait_for(lambda: eng.members["labor2"].flushed_gseq >= eng.writepath.completed_gseq, what="flush acked")
                assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))
                assert eng.status()["members"]["labor2"]["disk"] == "uptodate"
        pn.cancel_scope.cancel()


async def test_async_queue_overflow_falls_back_to_bitmap_with_bounded_memory(tmp_path):
    async with async_member_over_proxy(tmp_path) as (eng, proxy):
        m = eng.members["labor2"]
        proxy.update(delay=0.3)
        peak = 0
        written = set()
        for i in range(64):  # 4 MiB into a 256 KiB queue
            await eng.write(i * REGION, bytes([i]) * REGION)
            written.add(i)
            peak = max(peak, m.queued_bytes)
        assert m.behind
        assert peak <= 256 * 1024
        st = eng.status()["members"]["labor2"]
        assert st["behind"] and st["disk"] == "outdated"
        bits = set(eng.statemap.out_of_sync_regions("labor2").search(1))
        assert bits and bits <= written
        # Everything the queue accepted still arrives; the rest is in the bitmap.
        await wait_for(lambda: m.queued_bytes == 0, what="queue drained")
        with open(backing(tmp_path, "labor2"), "rb") as f:
            for i in sorted(written - bits):
                f.seek(i * REGION)
                assert f.read(REGION) == bytes([i]) * REGION


async def test_primary_with_a_failed_disk_reads_from_an_uptodate_member(tmp_path):
    import errno

    from statemap import DiskState

    cfg = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")], mode="mwc")
    init_in_sync(cfg, "labor1", ["labor2"])
    with daemon_processes(cfg, ["labor2"], tmp_path) as procs:
        async with in_process_daemon(cfg, "labor1") as d:
            eng = await start_primary(d, procs)
            data = random.Random(9).randbytes(6 * MiB)  # more than one remote read frame
            await eng.write(3 * MiB, data)
            await eng.flush()
            eng.statemap.set_disk(DiskState.FAILED)  # as a failed local write leaves it
            with open(backing(tmp_path, "labor1"), "r+b") as f:  # a local read would see this
                f.seek(3 * MiB)
                f.write(bytes(len(data)))
            assert await eng.read(3 * MiB, len(data)) == data
            await trio.to_thread.run_sync(procs["labor2"].kill)
            await wait_for(lambda: not eng.members["labor2"].connected, what="member gone")
            with pytest.raises(OSError) as e:
                await eng.read(3 * MiB, 4096)
            assert e.value.errno == errno.EIO


async def test_a_returning_member_is_dialled_as_soon_as_it_comes_up(tmp_path, monkeypatch):
    """The member (the higher name, which never dials) pokes the primary when
    its volume comes up; the primary dials at once instead of at its next
    retry, here made an hour away."""
    import gmd.sessions

    monkeypatch.setattr(gmd.sessions, "REDIAL_MIN", 3600)
    monkeypatch.setattr(gmd.sessions, "REDIAL_MAX", 3600)
    async with primary_alone_keeps_quorum(tmp_path) as (eng, procs):
        member = eng.members["labor2"]
        await eng.write(0, b"a" * REGION)
        await trio.to_thread.run_sync(lambda: procs["labor2"].request(op="down", volume="appslv"))
        await wait_for(lambda: not member.connected, what="labor2 gone")
        # While it is away the primary keeps retrying on its (hour-long) schedule.
        await eng.write(REGION, b"b" * REGION)
        await wait_for(lambda: member.state.value != "connecting", what="first redial refused")
        await trio.to_thread.run_sync(lambda: procs["labor2"].request(op="up", volume="appslv"))
        await wait_for(lambda: eng.status()["members"]["labor2"]["disk"] == "uptodate", timeout=30,
                       what="labor2 dialled and caught up")
        await eng.flush()
        assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))
