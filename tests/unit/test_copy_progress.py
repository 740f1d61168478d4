"""The copy pass's bookkeeping: what a flush may record as durable."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gmd.copystate import PassTracker

CHUNK = 1 << 20
KiB64 = 64 * 1024


def work(n: int) -> list[tuple[int, int]]:
    return [(i * CHUNK, CHUNK) for i in range(n)]


def test_full_copy_fence_stops_at_the_first_unacknowledged_chunk():
    p = PassTracker(work(6))
    for _ in range(6):
        p.take(CHUNK)
    for i in (0, 1, 3, 4):
        p.ack(i)
    done = p.snapshot(full=True)
    assert max(o + n for o, n in done) == 2 * CHUNK  # chunk 2 is not acknowledged
    p.ack(2)
    done = p.snapshot(full=True)
    assert max(o + n for o, n in done) == 5 * CHUNK
    assert p.snapshot(full=True) == []  # nothing new


def test_mini_copy_records_every_acknowledged_chunk_once():
    p = PassTracker(work(5))
    for _ in range(5):
        p.take(CHUNK)
    p.ack(4)
    p.ack(1)
    assert p.snapshot(full=False) == [(CHUNK, CHUNK), (4 * CHUNK, CHUNK)]
    assert p.pending_bytes() == 0
    p.ack(0)
    assert p.snapshot(full=False) == [(0, CHUNK)]


def test_cursor_hands_out_each_chunk_once_in_order():
    p = PassTracker(work(3))
    assert [p.take(CHUNK), p.take(CHUNK), p.take(CHUNK), p.take(CHUNK)] == [[0], [1], [2], []]


def test_small_chunks_are_handed_out_together_up_to_the_batch():
    small = [(i * 4 * KiB64, KiB64) for i in range(10)]  # scattered 64 KiB regions
    p = PassTracker(small)
    assert p.take(4 * KiB64) == [0, 1, 2, 3]
    assert p.take(4 * KiB64 + 1) == [4, 5, 6, 7]
    assert p.take(4 * KiB64) == [8, 9]
    assert p.take(4 * KiB64) == []


def test_a_chunk_larger_than_the_batch_is_still_handed_out_alone():
    p = PassTracker([(0, KiB64), (KiB64, 8 * CHUNK), (9 * CHUNK, KiB64)])
    assert p.take(CHUNK) == [0]
    assert p.take(CHUNK) == [1]
    assert p.take(CHUNK) == [2]


@given(st.lists(st.integers(1, 4 * CHUNK), max_size=40), st.integers(1, 8 * CHUNK))
def test_batches_cover_every_chunk_once_in_order(lengths, batch):
    items, offset = [], 0
    for n in lengths:
        items.append((offset, n))
        offset += n
    p = PassTracker(items)
    handed: list[int] = []
    while taken := p.take(batch):
        assert len(taken) == 1 or sum(items[i][1] for i in taken) <= batch
        handed += taken
    assert handed == list(range(len(items)))


@given(st.permutations(range(12)), st.lists(st.integers(0, 12), max_size=6))
def test_a_fence_never_passes_an_unacknowledged_chunk(order, snapshot_points):
    p = PassTracker(work(12))
    for _ in range(12):
        p.take(CHUNK)
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

    from gmd.copystate import CopyBudget

    budget = CopyBudget(lambda: -1e9)  # no application write ever
    for _ in range(8):
        with trio.fail_after(0.001):  # no waiting at all
            await budget.wait_room(CHUNK)
        budget.shipped(CHUNK)
    assert budget.in_flight == 8 * CHUNK


async def test_the_copy_keeps_one_chunk_in_flight_while_the_application_writes(autojump_clock):
    import trio

    from gmd.copystate import YIELD_FOR, CopyBudget

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

    from gmd.copystate import YIELD_FOR, CopyBudget

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


def test_unsent_regions_cover_whole_regions_and_only_for_that_member():
    from gmd.copystate import UnsentRegions

    rs = KiB64
    unsent = UnsentRegions(64 * rs, rs)
    assert not unsent.all_unsent("b", 0, rs)  # nothing noted yet
    unsent.note("b", rs + 10, 100)  # a small write inside region 1
    assert unsent.all_unsent("b", rs, rs)
    assert not unsent.all_unsent("b", 0, 2 * rs)  # region 0 was sent everything
    assert not unsent.all_unsent("c", rs, rs)
    unsent.note("b", 2 * rs - 1, 2)  # straddles regions 1 and 2
    assert unsent.all_unsent("b", rs, 2 * rs)
    unsent.forget("b", rs, rs)  # region 1 copied
    assert not unsent.all_unsent("b", rs, rs) and unsent.all_unsent("b", 2 * rs, rs)


def test_unsent_regions_never_claim_regions_past_the_end():
    from gmd.copystate import UnsentRegions

    unsent = UnsentRegions(4 * KiB64, KiB64)
    unsent.note("b", 0, 4 * KiB64)
    assert unsent.all_unsent("b", 0, 4 * KiB64)
    assert not unsent.all_unsent("b", 4 * KiB64, KiB64)  # beyond the volume (say, after a resize)


def test_a_rate_limited_pass_goes_in_steps_of_a_tenth_of_a_second_in_whole_regions():
    from gmd.copystate import CHUNK as COPY_CHUNK
    from gmd.copystate import chunk_for_rate

    assert chunk_for_rate(0, KiB64) == COPY_CHUNK  # no limit
    assert chunk_for_rate(1 << 20, KiB64) == KiB64  # 1 MiB/s: 64 KiB steps, not 8 MiB every 8 s
    assert chunk_for_rate(10 << 20, KiB64) == 16 * KiB64
    assert chunk_for_rate(1024, KiB64) == KiB64  # never less than a region
    assert chunk_for_rate(1 << 30, KiB64) == COPY_CHUNK  # never more than a chunk


async def test_the_pacer_never_lets_the_copy_run_ahead_of_the_rate(autojump_clock):
    import trio

    from gmd.copystate import RatePacer

    pacer = RatePacer(lambda: 1 << 20)
    start = trio.current_time()
    sent = 0
    for _ in range(20):
        await pacer.pace(KiB64)
        sent += KiB64
        assert sent / (trio.current_time() - start) <= (1 << 20) * 1.0001
    assert trio.current_time() - start == pytest.approx(sent / (1 << 20))  # and no slower either


async def test_a_rate_lowered_mid_copy_applies_from_then_on(autojump_clock):
    import trio

    from gmd.copystate import RatePacer

    rate = [0]
    pacer = RatePacer(lambda: rate[0])
    for _ in range(100):  # 800 MiB unlimited
        await pacer.pace(8 << 20)
    rate[0] = 1 << 20  # the operator: gmd resync --rate 1MiB
    t0 = trio.current_time()
    await pacer.pace(KiB64)
    # One step's worth of waiting, not the 800 s the bytes so far would take at 1 MiB/s.
    assert trio.current_time() - t0 == pytest.approx(KiB64 / (1 << 20))


async def test_time_lost_to_a_slow_copy_is_not_made_up_in_a_burst(autojump_clock):
    import trio

    from gmd.copystate import RatePacer

    pacer = RatePacer(lambda: 1 << 20)
    await pacer.pace(KiB64)
    await trio.sleep(10)  # the member was slow for a while
    t0 = trio.current_time()
    for _ in range(4):
        await pacer.pace(KiB64)
    assert trio.current_time() - t0 == pytest.approx(4 * KiB64 / (1 << 20))
