"""After the primary is lost, the survivors reconcile before anyone is called up to date.

Three real daemons and a witness: labor1 primary, labor2 an ``mwc`` member
next door, labor3 a far ``async`` member behind a slow WAN link (30 ms, 1 MB/s).
labor1 is SIGKILLed while labor3 is far behind; labor2 is promoted and writes
on. labor3 must be marked for what it may lack (the lost primary's writes it
never got) and copied, never shown up to date with a gap (issue 12, item 5).
"""

from __future__ import annotations

import os
import struct
import threading

import pytest
import trio

from transport.wanproxy import WanProxy

from .harness import (
    DaemonProcess,
    NodeSpec,
    WitnessProcess,
    backing,
    file_hash,
    free_ports,
    init_in_sync,
    wait_for,
    witness_table,
    write_config,
)

BLOCK = 4096
BLOCKS = 4096  # the stamped area: 16 MiB (4 extents), so what a member lacks lies beyond the extents it holds hot
STAMP = struct.Struct("<8sIII")  # magic, series, sequence, block


def stamp(series: int, seq: int) -> tuple[int, bytes]:
    """(offset, data) of write ``seq`` of ``series``: block seq % BLOCKS."""
    block = seq % BLOCKS
    head = STAMP.pack(b"GMDSTAMP", series, seq, block)
    return (series - 1) * BLOCKS * BLOCK + block * BLOCK, (head * (BLOCK // len(head) + 1))[:BLOCK]


def read_stamps(path, series: int) -> list[int | None]:
    """The sequence number found in each block of ``series`` (None: never written)."""
    out: list[int | None] = []
    with open(path, "rb") as f:
        f.seek((series - 1) * BLOCKS * BLOCK)
        area = f.read(BLOCKS * BLOCK)
    for b in range(BLOCKS):
        piece = area[b * BLOCK:(b + 1) * BLOCK]
        if piece == bytes(BLOCK):
            out.append(None)
            continue
        magic, s, seq, block = STAMP.unpack_from(piece)
        assert magic == b"GMDSTAMP" and s == series and block == b, f"block {b} holds garbage"
        assert piece == stamp(series, seq)[1], f"block {b} is torn"
        out.append(seq)
    return out


def assert_prefix(stamps: list[int | None]) -> int:
    """The blocks are exactly what writes 0..k left (a prefix of one writer's
    sequence, so an earlier instant of the primary's disk); returns k."""
    k = max((s for s in stamps if s is not None), default=-1)
    for b, s in enumerate(stamps):
        expect = None
        if b <= k:
            expect = b + (k - b) // BLOCKS * BLOCKS  # the last write to b at or before k
        assert s == expect, f"block {b} holds write {s}, but an instant after write {k} has {expect}"
    return k


def _writer(device: str, series: int, count: int, acked: list[int], stop: threading.Event, start: int = 0) -> None:
    """One sequential writer; a write counts as acknowledged once an fsync after it returned."""
    fd = os.open(device, os.O_RDWR)
    try:
        pending = []
        for seq in range(start, start + count):
            if stop.is_set():
                break
            offset, data = stamp(series, seq)
            os.pwrite(fd, data, offset)
            pending.append(seq)
            if len(pending) == 8:
                os.fsync(fd)
                acked.extend(pending)
                pending = []
        os.fsync(fd)
        acked.extend(pending)
    except OSError:
        pass  # the primary died under us: what was acknowledged is in ``acked``
    finally:
        os.close(fd)


def _try_promote(proc):
    try:
        return proc.request(op="primary", volume="appslv")
    except RuntimeError as e:
        if "no quorum" in str(e) or "is primary" in str(e):
            return None
        raise


@pytest.fixture(params=["mwc", "sync"])
def three_sites(tmp_path, request):
    """Configs for labor1..3 and witness W; labor1 reaches labor3 only through a
    WAN proxy (the far link), labor2 reaches it directly. labor2 is an ``mwc``
    or a ``sync`` member: a sync member logs no intent of its own, but it
    mirrors the primary's like any member."""
    # Every port picked at once: ports picked in separate calls may repeat
    # (a port released by one call is free again for the next).
    far_real, far_proxied, wport, port1, port2 = free_ports(5)
    w = witness_table("W", wport)
    specs = lambda far: [NodeSpec("labor1", address=[port1]),  # noqa: E731
                         NodeSpec("labor2", mode=request.param, address=[port2]),
                         NodeSpec("labor3", mode="async", address=[far], listen=[far_real])]
    base = specs(far_real)
    # Small extents (1 MiB: 256 stamped blocks), so that the far member's own
    # hot extents do not happen to cover the tail it lacks: only the mwc/sync
    # member's mirror of the primary's intents does.
    extents = 'extent_size = "1MiB"\n'
    cfg_other = write_config(tmp_path, base, name="others.toml", extra_tables=w, extra_volume=extents)
    nodes_far = specs(far_proxied)
    cfg1 = write_config(tmp_path, nodes_far, name="labor1.toml", extra_tables=w, extra_volume=extents)
    init_in_sync(cfg_other, "labor1", ["labor2", "labor3"])
    return tmp_path, cfg1, cfg_other, far_real, far_proxied


async def test_a_far_member_behind_a_lost_primary_is_marked_and_copied(three_sites):
    tmp_path, cfg1, cfg_other, far_real, far_proxied = three_sites
    proxy = WanProxy(("127.0.0.1", far_real), ("127.0.0.1", far_proxied))
    witness = WitnessProcess(cfg_other, "W", tmp_path)
    procs = {"labor1": DaemonProcess(cfg1, "labor1", tmp_path),
             "labor2": DaemonProcess(cfg_other, "labor2", tmp_path),
             "labor3": DaemonProcess(cfg_other, "labor3", tmp_path)}
    async with trio.open_nursery() as pn:
        await pn.start(proxy.serve)
        try:
            witness.start()
            for p in procs.values():
                p.start()
            for p in procs.values():
                p.request(op="up", volume="appslv")
            p1, p2, p3 = procs["labor1"], procs["labor2"], procs["labor3"]
            for peer in ("labor2", "labor3"):
                await wait_for(lambda peer=peer: p1.status()["members"][peer]["link"] == "connected",
                               what=f"{peer} connected")
            device = (await trio.to_thread.run_sync(lambda: p1.request(op="primary", volume="appslv")))["device"]
            proxy.update(delay=0.03, bandwidth=1_000_000)

            acked: list[int] = []
            stop = threading.Event()
            await trio.to_thread.run_sync(_writer, device, 1, 3000, acked, stop)
            assert len(acked) == 3000
            lag = p1.status()["members"]["labor3"]["lag_bytes"]
            assert lag > 1000 * BLOCK, f"the far member is only {lag} bytes behind; the test needs a real lag"
            p1.kill()  # SIGKILL, with the far member ~1,000+ writes behind
            p1.remove_dead_mount()

            # The far member, left alone, holds an earlier instant of labor1's disk.
            await wait_for(lambda: p3.status()["members"]["labor1"]["link"] != "connected", what="labor3 sees it")
            await wait_for(lambda: p2.status()["members"]["labor1"]["link"] != "connected", what="labor2 sees it")
            await trio.sleep(1.0)
            k = assert_prefix(read_stamps(backing(tmp_path, "labor3"), 1))
            assert k < 3000 - 512, f"labor3 got write {k}: not behind enough to prove anything"
            # The mwc member has every acknowledged write.
            assert assert_prefix(read_stamps(backing(tmp_path, "labor2"), 1)) >= acked[-1]

            reply = await wait_for(lambda: _try_promote(p2), timeout=30, what="labor2 promoted")
            new_device = reply["device"]
            # The new primary writes on: over the same blocks and a new area.
            await trio.to_thread.run_sync(_writer, new_device, 1, 200, [], threading.Event(), 3000)
            await trio.to_thread.run_sync(_writer, new_device, 2, 300, [], threading.Event())

            def settled():
                m = p2.status()["members"]["labor3"]
                return m["disk"] == "uptodate" and m["out_of_sync_bytes"] == 0 and m["copy"] is None
            await wait_for(settled, timeout=60, what="labor3 caught up by labor2")
            log2 = p2.log()
            assert "labor3" in log2 and "pass to labor3 done" in log2, "labor3 was declared current without a copy"
            fd = os.open(new_device, os.O_RDWR)
            os.fsync(fd)
            os.close(fd)
            await wait_for(lambda: file_hash(backing(tmp_path, "labor3")) == file_hash(backing(tmp_path, "labor2")),
                           timeout=30, what="labor3 identical to labor2")
            # And what it holds is an instant of the primaries' disk: labor2's now,
            # alpha's writes up to labor2's last one, then labor2's own.
            assert assert_prefix(read_stamps(backing(tmp_path, "labor3"), 1)) == 3199
        finally:
            for p in procs.values():
                p.stop()
                p.remove_dead_mount()
            witness.stop()
            pn.cancel_scope.cancel()
