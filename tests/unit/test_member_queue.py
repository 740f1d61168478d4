"""Waiting for an async member's queue to drain (MemberLink.wait_queue_at_most):
woken by the acks that bring it low enough, or by any change of the link, never
by a timer."""

from __future__ import annotations

import trio
import trio.testing

from gmd.replication import LinkState, MemberLink, Session, Shipment
from transport.codec import WriteAck


def _queued(m: MemberLink, sizes: list[int]) -> None:
    m.session = Session("s1", m.name)
    for seq, size in enumerate(sizes, start=1):
        m.session.unsettled[seq] = Shipment(seq, seq, "write", seq * 4096, b"x" * size)
        m.queued_bytes += size


async def test_the_wait_ends_when_acks_bring_the_queue_to_the_limit():
    m = MemberLink("labor2", "async", queue_limit=1 << 20)
    _queued(m, [4096, 4096, 4096])
    woke = []

    async def waiter():
        await m.wait_queue_at_most(4096)
        woke.append(m.queued_bytes)

    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        m.on_ack(WriteAck(1))
        await trio.testing.wait_all_tasks_blocked()
        assert woke == []  # 8 KiB still queued: above the limit
        m.on_ack(WriteAck(2))
    assert woke == [4096]


async def test_a_change_of_the_link_wakes_the_wait_too():
    m = MemberLink("labor2", "async", queue_limit=1 << 20)
    _queued(m, [4096])
    async with trio.open_nursery() as n:
        n.start_soon(m.wait_queue_at_most, 0)
        await trio.testing.wait_all_tasks_blocked()
        m.set_state(LinkState.DISCONNECTED, "gone")  # the caller re-checks connected
    assert m.queued_bytes == 4096


async def test_no_wait_when_the_queue_is_already_low_enough():
    m = MemberLink("labor2", "async", queue_limit=1 << 20)
    with trio.fail_after(1):
        await m.wait_queue_at_most(0)


class _Path:
    closed = False

    def __init__(self):
        self.sent = []

    def send_nowait(self, event):
        self.sent.append(event)


async def test_a_barrier_waits_behind_the_writes_waiting_in_the_backlog_and_a_replay_keeps_order():
    from gmd.backlog import Backlog
    from transport.codec import Flush, FlushAck, Write
    m = MemberLink("labor3", "async", queue_limit=8192)
    m.backlog = Backlog("labor3", memory_limit=1 << 20)
    m.session = Session("s1", m.name)
    path = _Path()
    m.session.paths.append(path)
    m.set_state(LinkState.CONNECTED)
    settled = []
    for g in (1, 2, 3, 4):  # two fit in the queue; two wait
        m.ship_write(g, g * 4096, b"x" * 4096, settled.append)
    assert m.ship_flush(4, in_sync=0) is None  # behind the waiting writes, not ahead of them
    assert [type(e).__name__ for e in path.sent] == ["Write", "Write"]
    m.on_ack(WriteAck(1))
    m.on_ack(WriteAck(2))
    with trio.fail_after(5):
        await m.pump_backlog(lambda: True)
    kinds = [(type(e).__name__, getattr(e, "gseq", None)) for e in path.sent]
    assert kinds == [("Write", 1), ("Write", 2), ("Write", 3), ("Write", 4), ("Flush", None)]
    # The link dies with 3, 4 and the barrier unacknowledged; the member says
    # it applied 3: the next session replays 4 and the barrier, in order.
    m.on_ack(WriteAck(3))
    m.end_session("gone")
    assert m.backlog.resume(3)
    m.session = Session("s2", m.name)
    path2 = _Path()
    m.session.paths.append(path2)
    m.set_state(LinkState.CONNECTED)
    with trio.fail_after(5):
        await m.pump_backlog(lambda: True)
    assert [(type(e).__name__, getattr(e, "gseq", None)) for e in path2.sent] == [("Write", 4), ("Flush", None)]
    m.on_ack(WriteAck(1))
    m.on_ack(FlushAck(2))
    assert m.backlog.caught_up() and not m.backlog.entries and m.flushed_gseq == 4
    assert isinstance(path2.sent[1], Flush) and isinstance(path2.sent[0], Write)


async def test_each_acked_write_is_counted_once_in_the_ack_latency_and_copy_data_never():
    m = MemberLink("labor2", "mwc", queue_limit=1 << 20)
    m.session = Session("s1", m.name)
    m.session.paths.append(_Path())
    m.set_state(LinkState.CONNECTED)
    m.ship_write(1, 0, b"x" * 4096, lambda sh: None)
    m.ship_write(2, 4096, b"y" * 4096, lambda sh: None, copy=True)
    m.ship_write(3, 8192, b"z" * 4096, lambda sh: None)
    for seq in (1, 2, 3, 3):  # the last one a duplicate ack of a resent write
        m.on_ack(WriteAck(seq))
    assert m.ack_latency.count == 2
