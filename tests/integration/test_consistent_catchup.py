"""Consistent catch-up (issue 16, item 3): a far ``async`` member being caught
up keeps its last consistent image in its undo log, and ``gmd primary
--force`` returns it there when the primary is lost mid-catch-up.

Real daemons on loopback; the far member sits behind a WAN proxy (30 ms one
way, a bandwidth cap). The stamping workload (tools/workload.py) writes 4 KiB
stamped blocks through the primary's FUSE file, and tools/stamps.py judges a
member's image the way the drill does: is it a prefix of the acknowledged
write sequence?
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tomllib
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import tomli_w
import trio

from tools.drill import read_blocks
from tools.stamps import verify
from tools.workload import Workload
from transport.wanproxy import WanProxy

from .harness import (
    DaemonProcess,
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
from .test_replication import start_primary

REGION = 64 * 1024
UNDO = {"undo_log": "data/labor2/appslv.undo"}


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (FUSE mounts)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not shutil.which("fusermount3"):
        return "fusermount3 is not installed"
    return None


def far_configs(tmp_path: Path, *, undo: dict, queue: str = "1MiB") -> tuple[Path, Path, int, int]:
    """labor1 (2 votes: it writes on alone) and labor2, a far ``async``
    member with an undo log. labor1 reaches labor2 only through a proxy:
    its config names the proxy's port; labor2's own config (``others.toml``)
    its real one. Returns (labor1's config, labor2's, real port, proxied port)."""
    real, proxied, port1 = free_ports(3)
    specs = lambda far: [NodeSpec("labor1", votes=2, address=[port1]),  # noqa: E731
                         NodeSpec("labor2", mode="async", address=[far], listen=[real], member=dict(undo))]
    extra = f'async_queue = "{queue}"\n'
    cfg2 = write_config(tmp_path, specs(real), name="others.toml", extra_volume=extra)
    cfg1 = write_config(tmp_path, specs(proxied), name="labor1.toml", extra_volume=extra)
    init_in_sync(cfg2, "labor1", ["labor2"])
    return cfg1, cfg2, real, proxied


def set_undo_size(config: Path, size: str) -> None:
    doc = tomllib.loads(config.read_text())
    doc["volumes"]["appslv"]["members"]["labor2"]["undo_log_size"] = size
    config.write_text(tomli_w.dumps(doc))


def image_verdict(path: Path, workload: Workload):
    read, close = read_blocks(str(path))
    try:
        return verify(workload.acks(), read, workload.run, in_flight=workload.in_flight)
    finally:
        close()


def request(proc: DaemonProcess, **req):
    return proc.request(volume="appslv", **req)


@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
@pytest.mark.parametrize("restart_member", [False, True], ids=["member-up", "member-restarted"])
async def test_forcing_the_far_member_primary_mid_catch_up_rolls_back_to_a_prefix(tmp_path, restart_member):
    """Far link cut until the queue overflows, healed, primary SIGKILLed
    mid-catch-up (copy data reached the member, its undo log holds the old
    contents); with ``restart_member`` the far member's daemon is killed and
    restarted too (it reloads the active log). Mid-catch-up its disk is no
    prefix of the writes; ``gmd primary --force`` rolls back, and then it is:
    the pre-catch-up point, and status says consistent."""
    cfg1, cfg2, real, proxied = far_configs(tmp_path, undo=UNDO)
    proxy = WanProxy(("127.0.0.1", real), ("127.0.0.1", proxied))
    p1 = DaemonProcess(cfg1, "labor1", tmp_path)
    p2 = DaemonProcess(cfg2, "labor2", tmp_path)
    workload = None
    async with trio.open_nursery() as pn:
        await pn.start(proxy.serve)
        try:
            p1.start()
            p2.start()
            request(p1, op="up")
            request(p2, op="up")
            await wait_for(lambda: p1.status()["members"]["labor2"]["link"] == "connected", what="labor2 connected")
            device = (await trio.to_thread.run_sync(lambda: request(p1, op="primary")))["device"]
            proxy.update(delay=0.03, bandwidth=3 * MiB)
            workload = Workload(device, area=(0, 32 * MiB), writers=4, direct=True,
                                journal=tmp_path / "acks.journal", seed=16)
            workload.start()
            assert await trio.to_thread.run_sync(workload.wait_acked, 500, 30), workload.errors

            # Cut the far link until the queue overflows and many regions are marked.
            proxy.partition("blackhole")
            far = lambda: p1.status()["members"]["labor2"]  # noqa: E731
            await wait_for(lambda: far()["behind"] or far()["link"] != "connected", timeout=30,
                           what="labor2 behind (its queue overflowed)")
            await wait_for(lambda: far()["out_of_sync_bytes"] >= 12 * MiB, timeout=60, what="12 MiB marked")
            proxy.heal()

            # The catch-up runs: copy data reached labor2, and its undo log holds what it overwrote.
            def mid_catch_up():
                st, own = far(), p2.status()["members"]["labor2"]["consistency"]
                return (st["link"] == "connected" and st["copy"] and st["copy"]["sent_bytes"] >= 2 * MiB
                        and own["undo_log"]["active"] and own["undo_log"]["used"] > 2 * MiB)
            await wait_for(mid_catch_up, timeout=90, interval=0.02, what="labor2 mid-catch-up")
            st = p1.status()["members"]["labor2"]
            assert st["consistent"] is True and st["consistent_at"] is not None and st["catch_up_refused"] is None
            left = st["out_of_sync_bytes"]
            assert left > 2 * MiB, f"the catch-up is nearly done ({left} bytes left): too late to prove anything"
            p1.kill()  # SIGKILL, mid-catch-up
            p1.remove_dead_mount()
            await trio.to_thread.run_sync(lambda: workload.stop(timeout=30))
            await wait_for(lambda: p2.status()["members"]["labor1"]["link"] != "connected", what="labor1 gone")
            await trio.sleep(0.5)  # writes labor2 had in flight end (the session's applier is closed)

            own = p2.status()["members"]["labor2"]["consistency"]
            assert own["consistent"] is True and own["catching_up"] and own["undo_log"]["active"], own
            assert own["undo_log"]["regions"] > 0
            # As it stands, labor2's disk is no instant of labor1's: copied regions are newer than the rest.
            mixed = image_verdict(backing(tmp_path, "labor2"), workload)
            assert not mixed.is_prefix, "mid-catch-up the disk was a prefix already: the test proves nothing"

            if restart_member:
                p2.kill()
                p2.remove_dead_mount()
                p2.start()
                request(p2, op="up")
                own = p2.status()["members"]["labor2"]["consistency"]
                assert own["undo_log"]["active"] and own["undo_log"]["regions"] > 0, own
                assert "undo log" in p2.log() and "is active" in p2.log()

            # A plain promotion is refused: the disk is not uptodate (quorum overridden first).
            request(p2, op="quorum", expected_votes=1)
            with pytest.raises(RuntimeError, match="not uptodate"):
                request(p2, op="primary")
            assert p2.status()["members"]["labor2"]["consistency"]["undo_log"]["active"], "refused, yet rolled back"
            reply = await trio.to_thread.run_sync(lambda: request(p2, op="primary", force=True))
            assert reply["device"]
            log2 = p2.log()
            assert "rolled back the interrupted catch-up" in log2, log2[-3000:]

            image = image_verdict(backing(tmp_path, "labor2"), workload)
            assert image.corrupt == 0 and image.is_prefix, image.as_dict()
            assert image.lost_writes > 0, "labor2 was never behind"
            st = p2.status()
            own = st["members"]["labor2"]["consistency"]
            assert st["role"] == "primary" and own["consistent"] is True and not own["undo_log"]["active"], own
            assert own["consistent_at"] is not None
            # Every region rolled back is marked for labor1, which may hold the newer contents.
            assert st["members"]["labor1"]["out_of_sync_bytes"] > 0
        finally:
            if workload is not None:
                workload.stop(timeout=30)
            for p in (p1, p2):
                p.stop()
                p.remove_dead_mount()
            pn.cancel_scope.cancel()


@asynccontextmanager
async def far_member(tmp_path: Path, *, undo: dict, queue: str = "256KiB"):
    """labor1 in this process (primary, 2 votes), labor2 a far async daemon
    with an undo log behind a proxy. Yields (engine, proxy, labor2's process,
    labor2's config)."""
    cfg1, cfg2, real, proxied = far_configs(tmp_path, undo=undo, queue=queue)
    proxy = WanProxy(("127.0.0.1", real), ("127.0.0.1", proxied))
    async with trio.open_nursery() as pn:
        await pn.start(proxy.serve)
        with daemon_processes(cfg2, ["labor2"], tmp_path) as procs:
            async with in_process_daemon(cfg1, "labor1") as d:
                yield await start_primary(d, procs), proxy, procs["labor2"], cfg2
        pn.cancel_scope.cancel()


def _level(eng) -> bool:
    st = eng.status()["members"]["labor2"]
    return (st["disk"] == "uptodate" and st["out_of_sync_bytes"] == 0 and st["replication"] == "shipping"
            and st["copy"] is None)


async def test_a_catch_up_that_completes_empties_the_undo_log_and_leaves_the_member_identical(tmp_path):
    async with far_member(tmp_path, undo=UNDO) as (eng, proxy, p2, _cfg):
        m = eng.members["labor2"]
        rng = random.Random(3)
        proxy.update(delay=0.3)  # acks trail the writer: the queue overflows
        for i in range(128):
            await eng.write(i * REGION, rng.randbytes(REGION))
        assert m.behind
        assert eng.status()["members"]["labor2"]["consistent"] is True  # out of order, with an undo log
        proxy.update(delay=0.0)
        seen_active = False

        def level_and_watch():
            nonlocal seen_active
            own = p2.status()["members"]["labor2"]["consistency"]
            seen_active = seen_active or own["undo_log"]["active"]
            return _level(eng)
        await wait_for(level_and_watch, timeout=60, interval=0.02, what="labor2 caught up")
        await eng.flush()  # the flush after "uptodate" ends the catch-up on labor2
        await wait_for(lambda: m.queued_bytes == 0 and m.flushed_gseq >= eng.writepath.completed_gseq,
                       what="flushed")

        def emptied():
            return not p2.status()["members"]["labor2"]["consistency"]["undo_log"]["active"]
        await wait_for(emptied, what="labor2's undo log emptied")
        assert seen_active or "catch-up begins" in p2.log(), "the undo log was never used"
        own = (await status_of(p2))["members"]["labor2"]["consistency"]
        assert own["consistent"] is True and not own["catching_up"] and own["undo_log"]["used"] == 0
        assert "catch-up over" in p2.log()
        assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))
        st = eng.status()["members"]["labor2"]
        assert st["consistent"] is True and st["consistent_at"] is not None


async def test_a_catch_up_the_undo_log_cannot_hold_is_refused_until_the_log_is_enlarged(tmp_path, caplog):
    """An undo log of 1 MiB, 4 MiB marked: the primary asks, the member
    refuses, nothing is copied, the marks stay and the status and log say
    why (member, size, capacity). Given a larger log (``gmd reload``), the
    member is caught up."""
    async with far_member(tmp_path, undo={**UNDO, "undo_log_size": "1MiB"}) as (eng, proxy, p2, cfg2):
        m = eng.members["labor2"]
        before = file_hash(backing(tmp_path, "labor2"))
        proxy.partition("reset")
        await wait_for(lambda: not m.connected, what="labor2 cut off")
        rng = random.Random(4)
        for i in range(64):  # 4 MiB the member misses
            await eng.write(i * REGION, rng.randbytes(REGION))
        marked = eng.statemap.out_of_sync_bytes("labor2")
        assert marked == 64 * REGION
        proxy.heal()
        await wait_for(lambda: eng.status()["members"]["labor2"]["catch_up_refused"], timeout=30,
                       what="the catch-up refused")
        st = eng.status()["members"]["labor2"]
        assert "undo log" in st["catch_up_refused"] and "appslv.undo" in st["catch_up_refused"]
        assert "needs 4.0 MiB" in st["catch_up_refused"], st["catch_up_refused"]
        await trio.sleep(2.0)  # retries meanwhile, backing off: still nothing copied
        assert eng.copier.bytes_sent == 0
        assert eng.statemap.out_of_sync_bytes("labor2") == marked
        assert file_hash(backing(tmp_path, "labor2")) == before
        refusals = [r for r in caplog.records if "refuses the mini pass of 4194304 bytes" in r.getMessage()]
        assert refusals and refusals[0].levelname == "ERROR"
        assert len(refusals) == 1, "the same refusal is logged once, not at every retry"
        assert "refusing labor1's catch-up" in p2.log()
        # The operator enlarges the log and reloads the member's config: the next try runs.
        set_undo_size(cfg2, "64MiB")
        await trio.to_thread.run_sync(lambda: p2.request(op="reload"))
        await wait_for(lambda: _level(eng), timeout=60, what="labor2 caught up")
        assert "undo log" in p2.log() and "bound 1.0 MiB -> 64.0 MiB" in p2.log()
        assert eng.status()["members"]["labor2"]["catch_up_refused"] is None
        await eng.flush()
        await wait_for(lambda: m.flushed_gseq >= eng.writepath.completed_gseq, what="flushed")
        assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))


async def test_a_member_without_an_undo_log_says_it_is_not_consistent_while_catching_up(tmp_path):
    async with far_member(tmp_path, undo={}) as (eng, proxy, p2, _cfg):
        proxy.update(delay=0.3, bandwidth=1 * MiB)
        rng = random.Random(5)
        for i in range(128):
            await eng.write(i * REGION, rng.randbytes(REGION))
        assert eng.members["labor2"].behind

        def copying():
            st = eng.status()["members"]["labor2"]
            return st["copy"] and st["copy"]["sent_bytes"] > 0 and st
        st = await wait_for(copying, timeout=30, what="the catch-up copying")
        assert st["consistent"] is False and st["consistent_at"] is None
        await wait_for(lambda: p2.status()["members"]["labor2"]["consistency"]["catching_up"], what="labor2 told")
        own = p2.status()["members"]["labor2"]["consistency"]
        assert own["consistent"] is False and own["undo_log"] is None
        proxy.update(delay=0.0, bandwidth=0)
        await wait_for(lambda: _level(eng), timeout=60, what="labor2 caught up")
