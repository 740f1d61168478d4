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
