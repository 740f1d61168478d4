"""The copy pass's bookkeeping: what a flush may record as durable."""

from hypothesis import given, strategies as st

from gmd.copy import _Progress

CHUNK = 1 << 20


def work(n: int) -> list[tuple[int, int]]:
    return [(i * CHUNK, CHUNK) for i in range(n)]


def test_full_copy_fence_stops_at_the_first_unacknowledged_chunk():
    p = _Progress(work(6))
    for _ in range(6):
        p.take()
    for i in (0, 1, 3, 4):
        p.ack(i)
    done = p.snapshot(full=True)
    assert max(o + n for o, n in done) == 2 * CHUNK  # chunk 2 is not acknowledged
    p.ack(2)
    done = p.snapshot(full=True)
    assert max(o + n for o, n in done) == 5 * CHUNK
    assert p.snapshot(full=True) == []  # nothing new


def test_mini_copy_records_every_acknowledged_chunk_once():
    p = _Progress(work(5))
    for _ in range(5):
        p.take()
    p.ack(4)
    p.ack(1)
    assert p.snapshot(full=False) == [(CHUNK, CHUNK), (4 * CHUNK, CHUNK)]
    assert p.pending_bytes() == 0
    p.ack(0)
    assert p.snapshot(full=False) == [(0, CHUNK)]


def test_cursor_hands_out_each_chunk_once_in_order():
    p = _Progress(work(3))
    assert [p.take(), p.take(), p.take(), p.take()] == [0, 1, 2, None]


@given(st.permutations(range(12)), st.lists(st.integers(0, 12), max_size=6))
def test_a_fence_never_passes_an_unacknowledged_chunk(order, snapshot_points):
    p = _Progress(work(12))
    for _ in range(12):
        p.take()
    acked: set[int] = set()
    fence = 0
    for step, index in enumerate(order):
        p.ack(index)
        acked.add(index)
        if step in snapshot_points:
            done = p.snapshot(full=True)
            if done:
                fence = max(o + n for o, n in done)
            assert all(i in acked for i in range(fence // CHUNK))
    done = p.snapshot(full=True)
    if done:
        fence = max(o + n for o, n in done)
    assert fence == 12 * CHUNK


class _Shipped:
    def __init__(self, n: int):
        self.data = bytes(n)


async def test_an_idle_volume_lets_the_copy_fill_its_windows(autojump_clock):
    import trio

    from gmd.copy import CopyBudget

    budget = CopyBudget(lambda: -1e9)  # no application write ever
    for _ in range(8):
        with trio.fail_after(0.001):  # no waiting at all
            await budget.wait_room(CHUNK)
        budget.shipped(CHUNK)
    assert budget.in_flight == 8 * CHUNK


async def test_the_copy_keeps_one_chunk_in_flight_while_the_application_writes(autojump_clock):
    import trio

    from gmd.copy import YIELD_FOR, CopyBudget

    last_write = [0.0]
    budget = CopyBudget(lambda: last_write[0])
    last_write[0] = trio.current_time()
    await budget.wait_room(CHUNK)  # the first chunk always goes
    budget.shipped(CHUNK)
    first = _Shipped(CHUNK)
    moved_on = []

    async def second():
        await budget.wait_room(CHUNK)
        moved_on.append(trio.current_time())

    async with trio.open_nursery() as n:
        n.start_soon(second)
        for _ in range(5):  # the application keeps writing: the copy waits
            await trio.sleep(YIELD_FOR / 2)
            last_write[0] = trio.current_time()
        assert not moved_on
        settled_at = trio.current_time()
        budget.settled(first)  # the chunk's ack: the next may go
    assert moved_on == [settled_at]
    assert budget.in_flight == 0


async def test_the_copy_speeds_up_again_when_the_application_stops(autojump_clock):
    import trio

    from gmd.copy import YIELD_FOR, CopyBudget

    budget = CopyBudget(lambda: 0.0)
    budget.shipped(CHUNK)  # unacknowledged, and never acknowledged here
    await budget.wait_room(CHUNK)
    assert trio.current_time() >= YIELD_FOR  # waited until the writes were YIELD_FOR old


def test_look_ahead_covers_the_items_within_its_bytes_and_always_the_current_one():
    from gmd.copy import _ahead_end, _ends

    ends = _ends([(0, 10), (10, 10), (20, 10), (30, 50), (80, 10)])
    assert _ahead_end(ends, 0, 0, 30) == 3  # items 0-2 fit in 30 bytes
    assert _ahead_end(ends, 0, 3, 30) == 3  # already asked up to 3: nothing more
    assert _ahead_end(ends, 3, 3, 10) == 4  # item 3 alone exceeds the limit, but it is the current one
    assert _ahead_end(ends, 1, 2, 1000) == 5  # to the end of the pass
    assert _ahead_end(ends, 5, 5, 1000) == 5  # past the end: nothing
