"""The engine's range locks: first come first served per overlap, so a copy's
long chunk is never starved by a stream of short application writes."""

from __future__ import annotations

import trio
from trio.testing import wait_all_tasks_blocked

from gmd.writepath import RangeLocks


async def _take(locks: RangeLocks, name: str, ranges, order: list[str]) -> None:
    token = await (locks.acquire(*ranges[0]) if len(ranges) == 1 else locks.acquire_many(ranges))
    order.append(name)
    locks.release(token)


async def test_a_waiting_request_is_not_overtaken_by_later_overlapping_ones():
    locks = RangeLocks()
    held = await locks.acquire(0, 10)
    order: list[str] = []
    async with trio.open_nursery() as n:
        n.start_soon(_take, locks, "long", [(0, 100)], order)
        await wait_all_tasks_blocked()
        # Overlaps only the waiting long request, not the held range: it waits too.
        n.start_soon(_take, locks, "short", [(50, 60)], order)
        n.start_soon(_take, locks, "elsewhere", [(200, 300)], order)
        await wait_all_tasks_blocked()
        assert order == ["elsewhere"]
        locks.release(held)
    assert order == ["elsewhere", "long", "short"]


async def test_several_ranges_are_taken_together_and_later_requests_wait_for_all():
    locks = RangeLocks()
    first = await locks.acquire(40, 50)
    order: list[str] = []
    async with trio.open_nursery() as n:
        n.start_soon(_take, locks, "copy", [(0, 10), (40, 50)], order)
        await wait_all_tasks_blocked()
        n.start_soon(_take, locks, "write", [(5, 45)], order)  # overlaps both of the copy's ranges
        await wait_all_tasks_blocked()
        assert order == []
        locks.release(first)
    assert order == ["copy", "write"]


async def test_a_request_cancelled_while_waiting_holds_nothing_up():
    locks = RangeLocks()
    held = await locks.acquire(0, 10)
    order: list[str] = []
    cancel = trio.CancelScope()

    async def cancelled():
        with cancel:
            await locks.acquire(0, 100)
        order.append("cancelled")

    async with trio.open_nursery() as n:
        n.start_soon(cancelled)
        await wait_all_tasks_blocked()
        n.start_soon(_take, locks, "later", [(50, 60)], order)  # waits for the cancelled one
        await wait_all_tasks_blocked()
        cancel.cancel()
        await wait_all_tasks_blocked()
        assert order == ["cancelled", "later"]
        locks.release(held)
    assert locks.busy == 0


async def test_wait_held_waits_for_requests_made_before_it_only():
    locks = RangeLocks()
    a = await locks.acquire(0, 10)
    done = trio.Event()

    async def waiter():
        await locks.wait_held()
        done.set()

    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        await wait_all_tasks_blocked()
        b = await locks.acquire(100, 110)  # made later: not waited for
        locks.release(a)
        await wait_all_tasks_blocked()
        assert done.is_set()
        locks.release(b)
