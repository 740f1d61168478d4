"""What a copy pass knows and keeps: its progress (shown in the status), the
regions each member surely misses or had marked again since a pass read them,
which chunks of a pass are taken, acknowledged and recorded, and the pacing
(rate limit, room left for application writes on the member's link).

No I/O: :mod:`gmd.copy` runs the passes with these.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import trio
from bitarray import bitarray

log = logging.getLogger(__name__)

CHUNK = 8 * 1024 * 1024  # bytes compared per hash request, read at once, locked while read
YIELD_FOR = 0.1  # seconds after an application write during which the copy keeps one chunk in flight
PACE_STEP = 0.1  # seconds' worth of bytes per chunk when a rate limit is set
SKIP_COMPARE_AFTER = 64  # regions a mini-copy compares before it may stop comparing


class PassKind(StrEnum):
    """What a pass does, with the values the status shows."""

    FULL = "full"  # a full copy behind its fence (CopyKind.FULL)
    MERGE = "merge"  # a full merge after a sync-mode crash (CopyKind.MERGE)
    MINI = "mini"  # the regions of the member's bitmap
    VERIFY = "verify"  # a compare only (gmd verify)


@dataclass
class CopyProgress:
    """How far one pass (or verify) has come; its to_json is what the status shows."""

    kind: PassKind
    total_bytes: int
    done_bytes: int = 0
    sent_bytes: int = 0  # bytes that differed and were shipped
    compared_bytes: int = 0  # bytes whose hashes were requested (paced by the rate limit)
    compare: bool = True  # compare hashes before shipping (see note_compared)
    regions_compared: int = 0
    regions_differing: int = 0

    def note_compared(self, regions: int, differing: int) -> None:
        """A mini-copy's regions were written while the member was away: when
        nearly all of the first ones differ, comparing the rest only costs a
        round trip and a read on the member each, so the pass ships them
        directly. (A merge after a crash, or a full copy to a target restored
        from a backup, finds most regions equal: those keep comparing.)"""
        self.regions_compared += regions
        self.regions_differing += differing
        if (self.compare and self.kind is PassKind.MINI and self.regions_compared >= SKIP_COMPARE_AFTER
                and self.regions_differing >= 0.9 * self.regions_compared):
            self.compare = False
            log.info("mini-copy: %d of the first %d regions differ; shipping the rest without comparing",
                     self.regions_differing, self.regions_compared)
    started: float = field(default_factory=trio.current_time)
    number: int = 0  # which pass of the volume this is (1, 2, ...): names it in events
    ended: float | None = None  # trio time the pass ended (None: running)

    def history_json(self, member: str, now: float, wall_now: float) -> dict[str, Any]:
        """One entry of the status's ``copies`` list: what a finished (or the running) pass moved."""
        end = self.ended if self.ended is not None else now
        return {"member": member, "kind": self.kind.value, "pass": self.number, "sent_bytes": self.sent_bytes,
                "done_bytes": self.done_bytes, "total_bytes": self.total_bytes,
                "started_at": round(wall_now - (now - self.started), 3), "seconds": round(end - self.started, 3),
                "running": self.ended is None}

    def to_json(self) -> dict[str, Any]:
        elapsed = max(1e-6, trio.current_time() - self.started)
        rate = self.done_bytes / elapsed
        left = self.total_bytes - self.done_bytes
        return {"kind": self.kind.value, "done_bytes": self.done_bytes, "total_bytes": self.total_bytes,
                "sent_bytes": self.sent_bytes, "rate_bytes_per_s": int(rate),
                "eta_s": round(left / rate, 1) if rate > 0 and left > 0 else (0.0 if left <= 0 else None),
                **({"differing_regions": self.regions_differing} if self.kind is PassKind.VERIFY else {})}


class MemberRegions:
    """A set of regions per member, in memory (one bit per region)."""

    def __init__(self, size: int, region_size: int):
        self.regions = (size + region_size - 1) // region_size
        self.region_size = region_size
        self._bits: dict[str, bitarray] = {}

    def _span(self, offset: int, length: int) -> slice:
        return slice(offset // self.region_size, (offset + max(length, 1) - 1) // self.region_size + 1)

    def note(self, member: str, offset: int, length: int) -> None:
        """Add the regions of [offset, offset+length) for ``member``."""
        bits = self._bits.get(member)
        if bits is None:
            bits = self._bits[member] = bitarray(self.regions)
            bits.setall(0)
        bits[self._span(offset, length)] = 1

    def forget(self, member: str, offset: int, length: int) -> None:
        """Remove the regions of [offset, offset+length) for ``member``."""
        bits = self._bits.get(member)
        if bits is not None:
            bits[self._span(offset, length)] = 0


class UnsentRegions(MemberRegions):
    """Per member, the regions written while it could not be sent the write
    (away, or an ``async`` member fallen behind): those surely differ on it,
    so its mini-copy ships them without comparing hashes first, as DRBD and
    OpenVMS mini-copy do. Comparing pays off only for regions that *may*
    differ: writes in flight when a link broke, hot extents after a crash.

    Kept in memory only: it is an optimisation, never needed for
    correctness (shipping an equal region costs bytes, nothing else), so after
    a restart every out-of-sync region is compared again.

    :meth:`note`: ``member`` was not sent a write to the range;
    :meth:`forget`: the range was copied to it."""

    def all_unsent(self, member: str, offset: int, length: int) -> bool:
        """Every region of [offset, offset+length) had a write ``member`` was not sent."""
        bits = self._bits.get(member)
        span = self._span(offset, length)
        return bits is not None and span.stop <= len(bits) and bits[span].all()


class RemarkedRegions(MemberRegions):
    """Per member, the regions marked out of sync since a copy pass last read
    them (:meth:`note` at every mark, :meth:`forget` when a pass reads the
    range under its range lock). A pass clears a region's bit only if it is
    not here (:meth:`kept`): a member that fell behind gets no application
    writes, so a write racing with the copy of its region reaches it only by
    the next pass. (A member that takes writes gets them after the copied
    data, in link order; one it failed is marked and kept too, which costs
    a region's copy, nothing else.)

    In memory only: the marks themselves are in the state map; a pass after a
    restart reads every region it clears."""

    def kept(self, member: str, first: int, end: int) -> list[int]:
        """The regions of [first, end) marked since a pass read them."""
        bits = self._bits.get(member)
        if bits is None:
            return []
        return [first + i for i in bits[first:end].search(1)]


def chunk_for_rate(rate: int, region_size: int) -> int:
    """Bytes per chunk for a pass under a rate limit of ``rate`` bytes/s (0:
    none): about :data:`PACE_STEP` seconds' worth, in whole regions, at most
    :data:`CHUNK`. A copy paced in 8 MiB steps at 1 MiB/s would send 8 MiB
    at once and then fall silent for 8 s: the average is right, but a WAN
    link sees bursts."""
    if not rate:
        return CHUNK
    regions = int(rate * PACE_STEP) // region_size
    return max(region_size, min(CHUNK, regions * region_size))


class RatePacer:
    """Holds a copy pass to the rate limit, read afresh at every step, so a
    rate changed mid-copy (``gmd resync --rate``) applies from then on: a
    pacer that divided all bytes so far by the new rate would stall a copy
    slowed down after a fast start for as long as its history at the new
    rate would have taken. A step waits for its own bytes' time before it
    goes (the limit is never exceeded); time lost while the copy ran slower
    than the limit is not made up in a burst."""

    def __init__(self, rate):
        self._rate = rate  # () -> bytes/s now; 0 for none
        self._next: float | None = None  # when the next step may start

    async def pace(self, nbytes: int) -> None:
        rate = self._rate()
        if not rate:
            self._next = None
            return
        now = trio.current_time()
        start = now if self._next is None else max(now, self._next)
        self._next = start + nbytes / rate
        await trio.sleep_until(self._next)


class PassTracker:
    """Which chunks of a pass are taken and acknowledged, and which of those
    still wait to be made durable and recorded."""

    def __init__(self, work: list[tuple[int, int]]):
        self.work = work
        self.next = 0  # the shared cursor: chunks [0, next) are taken
        self.unrecorded: set[int] = set()  # acknowledged since the last record
        self._ahead: set[int] = set()  # acknowledged beyond the prefix
        self.prefix = 0  # chunks [0, prefix) are all acknowledged
        self.recorded_prefix = 0

    def take(self, max_bytes: int) -> list[int]:
        """The next chunks in order, as many as fit in ``max_bytes`` (at least
        one while any are left): a mini-copy's small regions travel together."""
        first = self.next
        taken = 0
        while self.next < len(self.work) and (self.next == first or taken + self.work[self.next][1] <= max_bytes):
            taken += self.work[self.next][1]
            self.next += 1
        return list(range(first, self.next))

    def ack(self, index: int) -> None:
        self.unrecorded.add(index)
        self._ahead.add(index)
        while self.prefix in self._ahead:
            self._ahead.remove(self.prefix)
            self.prefix += 1

    def pending_bytes(self) -> int:
        return sum(self.work[i][1] for i in self.unrecorded)

    def snapshot(self, *, full: bool) -> list[tuple[int, int]]:
        """What a flush sent now makes durable, as chunks to record: for a full
        copy the finished prefix (its end is the new fence), else every
        acknowledged chunk. Taken before the flush is sent."""
        if full:
            done = [self.work[i] for i in range(self.recorded_prefix, self.prefix)]
            self.recorded_prefix = self.prefix
            self.unrecorded = {i for i in self.unrecorded if i >= self.prefix}
        else:
            done = [self.work[i] for i in sorted(self.unrecorded)]
            self.unrecorded = set()
        return done


class CopyBudget:
    """How many copied bytes may be on their way to the member, unacknowledged.

    Copy data and application writes share the member's link, in order: an
    application write queued behind copy data waits for all of it to arrive
    (over a WAN, 64 MiB is half a second at 1 Gbit/s). While the application
    is writing (one started in the last :data:`YIELD_FOR` seconds) the copy
    keeps a single chunk in flight; otherwise the workers' windows alone
    bound it."""

    def __init__(self, last_write_at):
        self._last_write_at = last_write_at  # () -> trio time of the latest application write
        self.in_flight = 0
        self._room = trio.Event()

    def limit(self, chunk: int) -> float:
        busy = trio.current_time() - self._last_write_at() < YIELD_FOR
        return chunk if busy else float("inf")

    async def wait_room(self, length: int) -> None:
        """Wait until ``length`` more bytes may be shipped (one chunk always may)."""
        while self.in_flight > 0 and self.in_flight + length > self.limit(length):
            if self._room.is_set():
                self._room = trio.Event()
            with trio.move_on_after(YIELD_FOR):  # the application may stop writing meanwhile
                await self._room.wait()

    def shipped(self, length: int) -> None:
        self.in_flight += length

    def settled(self, sh) -> None:
        """A shipment's ack (or failure) arrived: its bytes are no longer in flight."""
        self.in_flight -= len(sh.data)
        self._room.set()
