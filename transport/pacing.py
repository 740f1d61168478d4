"""Bandwidth limits for what one node sends one peer: a token bucket, a
weekly schedule of limits, and the :class:`Pacer` that holds every path to a
peer to the limit in force together.

* :class:`TokenBucket` is pure arithmetic: ``rate`` bytes/s flow in, up to a
  *burst* of 20 ms worth (at least :data:`MIN_BURST`); a sender waits until
  the bucket holds half a burst (its *piece*) and then takes all it holds.
  Waiting for a whole burst would lose what flows in while the sender wakes
  up (a full bucket holds no more): 5% of a 4 MB/s limit, measured; half a
  burst leaves 10 ms for that. Times are passed in.
* :class:`BandwidthRule` and :class:`BandwidthSchedule` say which limit
  applies at a local date and time: the first rule whose window covers it,
  else the schedule's default. A window is ``[start, end)`` in minutes of the
  day on the listed weekdays; an ``end`` at or before ``start`` runs past
  midnight into the next day, and that part belongs to the day it started on.
* :class:`Pacer` is one bucket per peer and volume, shared by all its paths
  (:class:`transport.link.PeerLink` asks it before each piece it writes to a
  socket), counting the bytes sent. It re-reads the schedule at most once a
  second.

The pacer runs on the trio thread; its times are ``trio.current_time()``, so
trio's ``MockClock`` works, and its wall clock is injectable for tests.

Never imports ``gmd``.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)

BURST_SECONDS = 0.02  # a burst is 20 ms of traffic: small enough to look smooth to a router
MIN_BURST = 64 * 1024  # ... but never less than one 64 KiB piece (one sendmsg's worth at low rates)
MIN_BANDWIDTH = 64 * 1024  # bytes/s; see MIN_BANDWIDTH's use in gmd.configschema
SCHEDULE_RECHECK = 1.0  # seconds between looks at the wall clock for the rule in force
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # datetime.weekday() order
MINUTES_PER_DAY = 24 * 60
# A thousandth of a byte: tokens are floats, and a wait computed to the last
# bit can leave the bucket that much short of a piece, for ever in virtual time.
_SLACK = 1e-3


def burst_of(rate: int) -> int:
    """The bucket's size at ``rate`` bytes/s."""
    return max(MIN_BURST, int(rate * BURST_SECONDS))


class TokenBucket:
    """``rate`` bytes/s, at most one burst saved up; starts full."""

    def __init__(self, rate: int, now: float):
        if rate <= 0:
            raise ValueError(f"a token bucket needs a positive rate, not {rate}")
        self.rate = rate
        self.burst = burst_of(rate)
        self.piece = self.burst // 2
        self.tokens = float(self.burst)
        self._at = now

    def set_rate(self, rate: int, now: float) -> None:
        """A new rate from ``now`` on; what was saved up stays (capped by the new burst)."""
        self._refill(now)
        self.rate = rate
        self.burst = burst_of(rate)
        self.piece = self.burst // 2
        self.tokens = min(self.tokens, float(self.burst))

    def _refill(self, now: float) -> None:
        if now > self._at:
            self.tokens = min(float(self.burst), self.tokens + (now - self._at) * self.rate)
            self._at = now

    def take(self, want: int, now: float) -> int:
        """Bytes of ``want`` that may go now (0 until the bucket holds
        ``min(want, piece)``; then up to all it holds), taken from the bucket."""
        self._refill(now)
        if want <= 0 or self.tokens + _SLACK < min(want, self.piece):
            return 0
        n = min(want, int(self.tokens + _SLACK))
        self.tokens -= n
        return n

    def take_all(self, n: int, now: float) -> bool:
        """Take ``n`` bytes if the bucket holds them all now; else nothing."""
        self._refill(now)
        if self.tokens + _SLACK < n:
            return False
        self.tokens -= n
        return True

    def give_back(self, n: int) -> None:
        """Return ``n`` taken bytes that were not sent after all."""
        self.tokens = min(float(self.burst), self.tokens + n)

    def delay(self, want: int, now: float) -> float:
        """Seconds until :meth:`take` of ``want`` would grant something."""
        self._refill(now)
        short = min(want, self.piece) - self.tokens
        return 0.0 if short <= _SLACK else short / self.rate


@dataclass(frozen=True)
class BandwidthRule:
    """A limit for a weekly window: ``start``/``end`` minutes of the day
    (``end`` at or before ``start``: through midnight), ``days`` the weekdays
    (0 = Monday) on which the window starts, ``bandwidth`` bytes/s (0: none)."""

    start: int
    end: int
    days: frozenset[int]
    bandwidth: int

    def covers(self, when: datetime.datetime) -> bool:
        """Whether local time ``when`` falls in this window."""
        minute = when.hour * 60 + when.minute
        day = when.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        # Through midnight: the evening part on the day itself, the morning
        # part on the day after.
        return ((day in self.days and minute >= self.start)
                or ((day - 1) % 7 in self.days and minute < self.end))

    def describe(self) -> str:
        """``08:00-18:00 mon,tue,...`` for log lines."""
        days = ",".join(DAYS[d] for d in sorted(self.days)) if len(self.days) < 7 else "every day"
        return f"{clock_text(self.start)}-{clock_text(self.end)} {days}"


def clock_text(minutes: int) -> str:
    """Minutes since midnight as ``HH:MM``."""
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


@dataclass(frozen=True)
class BandwidthSchedule:
    """``bandwidth`` bytes/s (0: none) unless one of ``rules`` covers the time."""

    bandwidth: int = 0
    rules: tuple[BandwidthRule, ...] = ()

    def at(self, when: datetime.datetime) -> tuple[int, int | None]:
        """(bytes/s in force at local time ``when``, index of the rule that
        gives it or None for the default). The first rule that covers wins."""
        for i, rule in enumerate(self.rules):
            if rule.covers(when):
                return rule.bandwidth, i
        return self.bandwidth, None


class Pacer:
    """Everything one node sends one peer (on one volume) over all its paths:
    counted in :attr:`wire_bytes`, and held to the schedule's limit.

    A path asks :meth:`reserve` before each piece it writes to its socket and
    :meth:`sent` after, with what the socket took; paths share the bucket, so
    the limit holds for all of them together. ``wall`` gives local time (for
    the schedule)."""

    def __init__(self, schedule: BandwidthSchedule | None = None, *, label: str = "",
                 wall: Callable[[], datetime.datetime] = datetime.datetime.now):
        self.label = label
        self.wall = wall
        self.schedule = schedule or BandwidthSchedule()
        self.wire_bytes = 0
        self._bucket: TokenBucket | None = None
        self._checked: float | None = None
        self._rule: int | None = None
        self._limit = 0

    def set_schedule(self, schedule: BandwidthSchedule) -> None:
        """A new schedule (a reload): looked at on the next piece."""
        self.schedule = schedule
        self._checked = None

    def in_force(self) -> tuple[int, int | None]:
        """(bytes/s, rule index or None) now, as the schedule says at this
        moment (what the paths adopt within :data:`SCHEDULE_RECHECK`)."""
        return self.schedule.at(self.wall())

    @property
    def limited(self) -> bool:
        """Whether a limit is in force (as last looked up)."""
        self._refresh()
        return self._limit > 0

    def _refresh(self) -> None:
        now = trio.current_time()
        if self._checked is not None and now - self._checked < SCHEDULE_RECHECK:
            return
        self._checked = now
        limit, rule = self.in_force()
        if limit != self._limit:
            why = (f"bandwidth_schedule[{rule}] {self.schedule.rules[rule].describe()}" if rule is not None
                   else "bandwidth")
            log.info("%s: bandwidth limit now %s (%s)", self.label, f"{limit} bytes/s" if limit else "none", why)
        self._limit, self._rule = limit, rule
        if limit <= 0:
            self._bucket = None
        elif self._bucket is None:
            self._bucket = TokenBucket(limit, now)
        elif self._bucket.rate != limit:
            self._bucket.set_rate(limit, now)

    def try_reserve(self, nbytes: int) -> bool:
        """Take ``nbytes`` at once if the limit allows all of them now (a frame
        sent without waking the sender task); False leaves the bucket as it was."""
        self._refresh()
        return self._bucket is None or self._bucket.take_all(nbytes, trio.current_time())

    async def reserve(self, want: int) -> int:
        """Wait until a piece of ``want`` bytes (or less) may go, and take it:
        returns its size (at least ``min(want, piece)``; ``want`` when
        unlimited). Cancelled, it takes nothing."""
        while True:
            self._refresh()
            if self._bucket is None:
                return want
            now = trio.current_time()
            n = self._bucket.take(want, now)
            if n:
                return n
            await trio.sleep(min(SCHEDULE_RECHECK, self._bucket.delay(want, now)))

    def give_back(self, nbytes: int) -> None:
        """Bytes reserved but not sent (the socket took less)."""
        if self._bucket is not None and nbytes > 0:
            self._bucket.give_back(nbytes)

    def sent(self, nbytes: int) -> None:
        """Count ``nbytes`` written to a socket of this peer."""
        self.wire_bytes += nbytes
