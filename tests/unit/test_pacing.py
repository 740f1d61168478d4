"""transport.pacing: the token bucket's arithmetic, the schedule's windows
(midnight, weekdays, first match wins), and the pacer over virtual time."""

from __future__ import annotations

import datetime

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.pacing import (
    MIN_BURST,
    BandwidthRule,
    BandwidthSchedule,
    Pacer,
    TokenBucket,
    burst_of,
)

ALL_DAYS = frozenset(range(7))
WEEKDAYS = frozenset(range(5))


def at(day: str, clock: str) -> datetime.datetime:
    """A local time in the week of Monday 2024-06-03: ``at("wed", "08:30")``."""
    days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    h, m = map(int, clock.split(":"))
    return datetime.datetime(2024, 6, 3 + days.index(day), h, m)


def minutes(clock: str) -> int:
    h, m = map(int, clock.split(":"))
    return h * 60 + m


def rule(start: str, end: str, bandwidth: int, days=ALL_DAYS) -> BandwidthRule:
    return BandwidthRule(minutes(start), minutes(end), frozenset(days), bandwidth)


# ------------------------------------------------------------------ the bucket


def test_the_burst_is_20_ms_but_never_below_64_kib():
    assert burst_of(1_000_000) == MIN_BURST == 64 * 1024
    assert burst_of(100_000_000) == 2_000_000


def test_a_full_bucket_grants_one_burst_then_refills_at_the_rate():
    b = TokenBucket(1_000_000, now=0.0)
    assert b.take(10 * MIN_BURST, 0.0) == MIN_BURST  # at most one burst at once
    assert b.take(1, 0.0) == 0
    assert b.delay(1000, 0.0) == pytest.approx(0.001)
    assert b.take(1000, 0.0005) == 0  # 500 bytes saved up, not the 1000 asked for
    assert b.take(1000, 0.001) == 1000
    assert b.take(10 * MIN_BURST, 10.0) == MIN_BURST  # saved up to one burst, no more
    assert b.take(1, 10.0) == 0


def test_a_large_want_waits_for_half_a_burst_and_gets_all_that_came_in():
    b = TokenBucket(1_000_000, now=0.0)
    b.take(MIN_BURST, 0.0)
    assert b.piece == MIN_BURST // 2
    assert b.delay(1 << 20, 0.0) == pytest.approx(b.piece / 1_000_000)
    assert b.take(1 << 20, 0.02) == 0  # 20 KB in: short of the piece
    assert b.take(1 << 20, 0.04) == 40_000  # woken late: nothing that came in meanwhile is lost


def test_what_was_not_sent_goes_back_into_the_bucket():
    b = TokenBucket(1_000_000, now=0.0)
    n = b.take(MIN_BURST, 0.0)
    b.give_back(n - 100)
    assert b.take(MIN_BURST, 0.0) == MIN_BURST - 100


def test_a_new_rate_applies_from_then_on():
    b = TokenBucket(1_000_000, now=0.0)
    b.take(MIN_BURST, 0.0)
    b.set_rate(100_000_000, now=0.01)  # 10 ms at the old rate saved 10 KB
    assert b.burst == 2_000_000
    assert b.take(10**9, 0.01) == 0  # 10 KB saved: short of one 1 MB piece
    assert b.take(10**9, 0.03) == 2_000_000


def test_a_bucket_needs_a_positive_rate():
    with pytest.raises(ValueError, match="positive rate"):
        TokenBucket(0, now=0.0)


@settings(max_examples=200, deadline=None)
@given(st.integers(MIN_BURST, 50_000_000),
       st.lists(st.tuples(st.floats(0, 0.5), st.integers(1, 4 << 20)), min_size=1, max_size=60))
def test_no_sequence_of_takes_gets_more_than_one_burst_plus_the_rate_times_the_time(rate, steps):
    b = TokenBucket(rate, now=0.0)
    now = 0.0
    granted = 0
    for gap, want in steps:
        now += gap
        got = b.take(want, now)
        assert 0 <= got <= min(want, b.burst)
        assert got == 0 or got >= min(want, b.piece)
        granted += got
        assert granted <= b.burst + rate * now + 1e-6
        # And it never refuses what it holds: after its delay a take succeeds.
        wait = b.delay(want, now)
        if got == 0:
            assert wait > 0
            now += wait + 1e-9
            got = b.take(want, now)
            assert got >= min(want, b.piece)
            granted += got
            assert granted <= b.burst + rate * now + 1e-6


@settings(max_examples=100, deadline=None)
@given(st.integers(MIN_BURST, 20_000_000), st.integers(16 << 10, 8 << 20))
def test_a_steady_sender_gets_the_rate(rate, piece):
    # A sender that always waits for its delay sends at the rate, within one
    # burst, over a long run: the limit is neither too tight nor too loose.
    b = TokenBucket(rate, now=0.0)
    now = 0.0
    sent = 0
    while now < 2.0:
        got = b.take(piece, now)
        sent += got
        if not got:
            now += b.delay(piece, now)
    # What it started with plus what flowed in, less at most the piece it last waited for.
    assert b.burst + rate * now - min(piece, b.piece) - 1 <= sent <= b.burst + rate * now + 1


# ---------------------------------------------------------------- the schedule


def test_a_business_hours_rule_applies_on_weekdays_in_its_window_only():
    s = BandwidthSchedule(10_000_000, (rule("08:00", "18:00", 2_000_000, WEEKDAYS),))
    assert s.at(at("mon", "08:00")) == (2_000_000, 0)
    assert s.at(at("fri", "17:59")) == (2_000_000, 0)
    assert s.at(at("fri", "18:00")) == (10_000_000, None)  # the end is not in the window
    assert s.at(at("wed", "07:59")) == (10_000_000, None)
    assert s.at(at("sat", "12:00")) == (10_000_000, None)


def test_a_window_through_midnight_belongs_to_the_day_it_starts():
    s = BandwidthSchedule(0, (rule("22:00", "06:00", 50_000_000, {4}),))  # Friday night
    assert s.at(at("fri", "22:00"))[1] == 0
    assert s.at(at("fri", "23:59"))[1] == 0
    assert s.at(at("sat", "00:00"))[1] == 0
    assert s.at(at("sat", "05:59"))[1] == 0
    assert s.at(at("sat", "06:00"))[1] is None
    assert s.at(at("fri", "05:00"))[1] is None  # Thursday night is not in it
    assert s.at(at("sat", "22:30"))[1] is None


def test_a_window_through_midnight_on_sunday_wraps_to_monday():
    s = BandwidthSchedule(0, (rule("23:00", "01:00", 1, {6}),))
    assert s.at(at("mon", "00:30"))[1] == 0
    assert s.at(at("sun", "00:30"))[1] is None


def test_the_first_matching_rule_wins():
    s = BandwidthSchedule(5, (rule("12:00", "13:00", 1), rule("08:00", "18:00", 2)))
    assert s.at(at("tue", "12:30")) == (1, 0)
    assert s.at(at("tue", "13:00")) == (2, 1)


def test_a_whole_day_window_ends_at_24_00():
    r = rule("00:00", "00:00", 7)  # end at or before start: through midnight, i.e. 24 hours
    assert all(r.covers(at(d, c)) for d in ("mon", "sun") for c in ("00:00", "12:00", "23:59"))
    whole = BandwidthRule(0, 24 * 60, ALL_DAYS, 7)
    assert all(whole.covers(at(d, c)) for d in ("mon", "sun") for c in ("00:00", "23:59"))
    assert whole.describe() == "00:00-24:00 every day"


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1439), st.integers(1, 1440), st.frozensets(st.integers(0, 6), min_size=1),
       st.integers(0, 6), st.integers(0, 1439))
def test_a_window_covers_exactly_its_minutes(start, end, days, day, minute):
    r = BandwidthRule(start, end, days, 1)
    when = datetime.datetime(2024, 6, 3 + day, minute // 60, minute % 60)
    # The window as a set of minutes of the week, laid out one day after another.
    length = end - start if start < end else end + 1440 - start
    week = 7 * 1440
    covered = {(d * 1440 + start + k) % week for d in days for k in range(length)}
    assert r.covers(when) == ((day * 1440 + minute) in covered)


# ------------------------------------------------------------------ the pacer


async def test_a_pacer_without_a_limit_grants_everything_and_counts_bytes():
    p = Pacer()
    assert not p.limited
    assert await p.reserve(10 << 20) == 10 << 20
    assert p.try_reserve(1 << 30)
    p.sent(123)
    p.sent(7)
    assert p.wire_bytes == 130


async def test_a_pacer_holds_several_senders_together_to_the_limit(autojump_clock):
    p = Pacer(BandwidthSchedule(1_000_000))
    sent = [0, 0]

    async def sender(i):
        while trio.current_time() < 10.0:
            n = await p.reserve(256 * 1024)
            sent[i] += n
            p.sent(n)

    start = trio.current_time()
    async with trio.open_nursery() as n:
        n.start_soon(sender, 0)
        n.start_soon(sender, 1)
    elapsed = trio.current_time() - start
    total = sum(sent)
    assert total == p.wire_bytes
    assert abs(total - 1_000_000 * elapsed) <= 2 * MIN_BURST + 256 * 1024
    assert min(sent) > 0.3 * total  # neither path starves the other


async def test_the_pacer_follows_the_schedule_as_the_clock_moves(autojump_clock):
    wall = [at("mon", "07:59")]
    p = Pacer(BandwidthSchedule(0, (rule("08:00", "18:00", 100_000, WEEKDAYS),)), wall=lambda: wall[0])
    assert p.in_force() == (0, None)
    assert await p.reserve(1 << 20) == 1 << 20  # no limit before 08:00
    wall[0] = at("mon", "08:00")
    await trio.sleep(1.0)  # the pacer looks at the wall clock once a second
    assert p.in_force() == (100_000, 0)
    assert p.limited
    start = trio.current_time()
    got = 0
    while got < 500_000:
        got += await p.reserve(1 << 20)
    assert trio.current_time() - start == pytest.approx((got - MIN_BURST) / 100_000, rel=0.05)


async def test_try_reserve_is_all_or_nothing(autojump_clock):
    p = Pacer(BandwidthSchedule(1_000_000))
    assert p.try_reserve(MIN_BURST - 10)
    assert not p.try_reserve(100)  # 10 bytes left: refused, and the bucket keeps them
    assert p.try_reserve(10)
    await trio.sleep(1.0)
    assert not p.try_reserve(MIN_BURST + 1)  # never more than one burst at once
    assert p.try_reserve(MIN_BURST // 2 + 100)  # more than a piece, less than the bucket holds
