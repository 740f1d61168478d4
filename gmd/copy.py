"""Bringing a member back: full copy behind a fence, mini-copy from its bitmap.

One engine, two region sets (docs/DESIGN.md, "Bringing members back"):

* **full copy**: regions from the member's persisted fence to the end of the
  volume; the fence advances (and is committed) only after the member has
  acknowledged a flush covering everything below it, so a restart resumes;
* **mini-copy**: the regions set in the member's out-of-sync bitmap; a bit is
  cleared only after the member acknowledged a flush covering its data.

For each chunk the member's region hashes (xxh3) are compared with ours and only
differing regions move (a target seeded from a backup copies fast). A region is
read and queued to the member under the write path's range lock, so the copy can
never reorder with an application write to it: whichever takes the lock first
is applied first on the member, in link order. The copy stops, leaving its
bits and fence for the next attempt, as soon as the member is lost.

An ``async`` member whose queue overflowed (*behind*) is sent no application
writes, only copy data: a write to a region the copy has already read is in
the bitmap alone. So a pass clears a region's bit only if the region was not
marked again after the pass read it (:class:`RemarkedRegions`); the next pass
takes it. Once a pass leaves little to copy and the queue has room, the member
takes writes in its queue again and the last pass runs as for a returning
member (:func:`_ship_again_if_room`).

The verify pass, which compares a member in full without copying, is
:mod:`gmd.verify`; it needs the same :class:`CopySource`.
"""

from __future__ import annotations

import logging
from collections import deque
from contextlib import contextmanager
from typing import Any, Protocol

import trio

from statemap import CopyKind, DiskState, StateMap
from transport.link import LinkClosed

from .config import VolumeConfig
from .copystate import (
    CHUNK,
    SKIP_COMPARE_AFTER,
    CopyBudget,
    CopyProgress,
    PassKind,
    PassTracker,
    RatePacer,
    RemarkedRegions,
    UnsentRegions,
    chunk_for_rate,
)
from .replication import MemberLink
from .volume import LocalVolume

log = logging.getLogger(__name__)

FLUSH_EVERY = 32 * 1024 * 1024  # bytes copied between durable progress points
COPY_WORKERS = 4  # chunks hashed, read and shipped concurrently
WINDOW = 1  # CHUNKs' worth of bytes per worker shipped and not yet acknowledged (besides the one being shipped)
HASH_AHEAD = 4 * CHUNK  # bytes of a pass whose member hashes are asked for ahead of the copy cursor
READ_AHEAD = 64 * 1024 * 1024  # bytes of the pass the primary's disk is asked to read ahead of the cursor
BATCH = 1024 * 1024  # bytes of small work items (a mini-copy's regions) a worker takes, reads and ships at once


class CopyAborted(Exception):
    """The member went away, or regions were marked again; progress so far is kept."""


class CatchUpRefused(CopyAborted):
    """The member's undo log cannot keep its consistent image through the
    pass: nothing is copied, its marks stay, the pass is tried again later."""


class CopySource(Protocol):
    """What a pass (copy, mini-copy, verify) needs of the primary's copy
    orchestration (:class:`gmd.copyengine.CopyEngine`), and nothing more."""

    rate: int  # bytes/s per member copy; 0: unlimited
    bytes_sent: int  # bytes the passes shipped (after hash compare)

    @property
    def name(self) -> str: ...
    @property
    def config(self) -> VolumeConfig: ...
    @property
    def statemap(self) -> StateMap: ...
    @property
    def local(self) -> LocalVolume: ...
    @property
    def unsent(self) -> UnsentRegions: ...
    @property
    def remarked(self) -> RemarkedRegions: ...
    @property
    def last_write_at(self) -> float: ...
    @property
    def completed_sequence(self) -> int: ...

    def pass_started(self, member: str, progress: CopyProgress) -> None: ...
    async def lock_range(self, start: int, end: int) -> int: ...
    async def lock_ranges(self, ranges: list[tuple[int, int]]) -> int: ...  # (offset, length) pairs, one token
    def unlock_range(self, token: int) -> None: ...
    async def drain_writes_in_flight(self) -> None: ...
    async def member_caught_up(self, m: MemberLink) -> None: ...
    async def tell_member(self, m: MemberLink, fields: dict[str, Any]) -> None: ...
    async def check_catch_up(self, m: MemberLink, kind: str, nbytes: int,
                             runs: list[tuple[int, int]] | None) -> None: ...


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted indexes as (first, end) pairs."""
    out: list[tuple[int, int]] = []
    for i in indexes:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


async def copy_member(copier: CopySource, m: MemberLink) -> None:
    """Bring member ``m`` up to date from this primary; returns when it is, or
    raises :class:`CopyAborted` with progress kept."""
    sm = copier.statemap
    size, rs = copier.config.size, copier.config.region_size
    rec = sm.sb.peers[m.name]
    chunk = chunk_for_rate(copier.rate, rs)
    if rec.copy is not None:
        start = rec.copy.fence - rec.copy.fence % rs
        progress = CopyProgress(PassKind(rec.copy.kind.value), size - start)  # full copy or merge
        copier.pass_started(m.name, progress)
        during = DiskState.COPYING if rec.copy.kind is CopyKind.FULL else DiskState.MERGING
        await copier.tell_member(m, {"your_disk": during.value})
        if rec.copy.kind is CopyKind.MERGE:
            # A member awaiting a full merge holds a consistent image; what
            # the merge will send is unknown until compared: the worst case.
            await copier.check_catch_up(m, PassKind.MERGE.value, size - start, [(start // rs, (size - start) // rs)])
        await _copy_ranges(copier, m, progress, [(off, min(chunk, size - off)) for off in range(start, size, chunk)],
                           chunk, full=True)
    # Regions written while it was away (also below a full copy's fence).
    regions = list(sm.out_of_sync_regions(m.name).search(1))
    if regions:
        # Out of write order from here: the member's undo log must hold what
        # the pass overwrites, or the pass waits (its marks stay).
        await copier.check_catch_up(m, PassKind.MINI.value, len(regions) * rs,
                                    [(first, end - first) for first, end in _runs(regions)])
        progress = CopyProgress(PassKind.MINI, len(regions) * rs)  # mini-copy, or the mini-merge after a crash
        copier.pass_started(m.name, progress)
        work = []
        for first, end in _runs(regions):
            for r in range(first, end, chunk // rs):
                work.append((r * rs, min(end, r + chunk // rs) * rs - r * rs))
        await _copy_ranges(copier, m, progress, work, chunk, full=False)
    if m.behind:
        await _ship_again_if_room(copier, m)
        if m.behind:
            raise CopyAborted(f"{m.name} is still behind ({sm.out_of_sync_bytes(m.name)} bytes marked during the "
                              "pass); another pass follows")
    if sm.out_of_sync_regions(m.name).any():
        raise CopyAborted("regions were marked again while copying; another pass follows")
    await copier.member_caught_up(m)




async def _ship_again_if_room(copier: CopySource, m: MemberLink) -> None:
    """A pass to ``m``, an ``async`` member that fell behind, is done. If the
    writes marked during it come to at most half its queue (the link keeps up
    with the application), queue writes to it again once the queue has
    drained to half as well, so one burst does not overflow it at once:
    that hysteresis keeps it from flapping. Writes refused before that are
    marked when this returns; the next pass copies them, and every later
    write is queued after the copied data (range lock, link order).
    Otherwise it stays behind, and the next pass copies what was marked."""
    sm = copier.statemap
    room = m.queue_limit // 2
    left = sm.out_of_sync_bytes(m.name)
    if left > room:
        return
    while m.queued_bytes > room:  # nothing is queued while behind: it only drains
        if not m.connected:
            raise CopyAborted(f"{m.name} went away")
        await m.wait_queue_at_most(room)  # woken by its acks, or by any change of the link
    if not m.connected:
        raise CopyAborted(f"{m.name} went away")
    m.ship_again(f"{left} bytes left to copy, {m.queued_bytes} of {m.queue_limit} bytes queued")
    await copier.drain_writes_in_flight()


async def _copy_ranges(copier: CopySource, m: MemberLink, progress: CopyProgress,
                       work: list[tuple[int, int]], chunk: int, *, full: bool) -> None:
    """Copy ``work`` (chunks in offset order) with :data:`COPY_WORKERS` workers.

    Workers take the next chunk from a shared cursor (small ones, a
    mini-copy's regions, up to :data:`BATCH` bytes at a time), so the chunks
    finished at any moment form a prefix with at most a few holes: a full
    copy's fence (the end of the finished prefix) trails the cursor by no more
    than the workers' windows. Each worker keeps up to :data:`WINDOW` chunks'
    worth of bytes shipped but not yet acknowledged, so hashing, reading and
    the member's writing overlap instead of taking turns on one round trip
    each (counted in bytes, not items: 64 KiB regions one round trip apiece
    would leave the link idle)."""
    tracker = PassTracker(work)
    record_lock = trio.Lock()
    ends = _ends(work)
    # Under a rate limit, chunks are smaller (chunk_for_rate), and so are a
    # worker's batches and the look-aheads: they would otherwise read ahead
    # of the limit the operator set to spare the disks.
    batch = min(BATCH, chunk)
    hashes = _HashPrefetch(m, work, ends, copier.config.region_size, progress, min(HASH_AHEAD, 4 * chunk),
                           surely_differ=lambda i: copier.unsent.all_unsent(m.name, *work[i]))
    budget = CopyBudget(lambda: copier.last_write_at)
    pacer = RatePacer(lambda: copier.rate)

    def settled(sh) -> None:
        budget.settled(sh)
        if sh.ok:
            # The member has the data now (not yet durably: its bit stays until
            # a flush is acknowledged). Should this pass be cut short, the next
            # compares these regions instead of shipping them again unasked.
            copier.unsent.forget(m.name, sh.offset, sh.length)

    read_ahead = _ReadAhead(copier.local.device, work, ends, min(READ_AHEAD, 8 * chunk))

    async def record_if_due(force: bool = False) -> None:
        if record_lock.locked() and not force:
            return  # another worker is recording; this one keeps copying
        async with record_lock:
            if tracker.pending_bytes() >= FLUSH_EVERY or (force and tracker.pending_bytes()):
                await _record(copier, m, tracker.snapshot(full=full), full=full)

    async def worker() -> None:
        window: deque[tuple[int, list]] = deque()
        in_window = 0  # bytes of the chunks in the window
        while True:
            indexes = tracker.take(batch)
            if not indexes:
                break
            hashes.ask_ahead(indexes)
            await read_ahead.advance(indexes[0])
            length = sum(work[i][1] for i in indexes)
            await budget.wait_room(length)
            shipped = await _copy_items(copier, m, progress, work, indexes, hashes, budget, pacer, settled)
            window.extend(zip(indexes, shipped))
            in_window += length
            # Settle what the member has acknowledged already (progress, the
            # fence and the bits stay current), and wait while the window is full.
            while window and (all(sh.done.is_set() for sh in window[0][1])
                              or in_window - work[window[0][0]][1] >= WINDOW * CHUNK):
                done = window.popleft()
                in_window -= work[done[0]][1]
                await _chunk_acked(m, tracker, progress, work, *done)
                await record_if_due()
        while window:
            await _chunk_acked(m, tracker, progress, work, *window.popleft())
        await record_if_due()

    with aborts_unwrapped():
        async with trio.open_nursery() as n:
            hashes.nursery = n
            for _ in range(min(COPY_WORKERS, len(work))):
                n.start_soon(worker)
    await record_if_due(force=True)
    log.info("%s: %s pass to %s done: %d bytes compared, %d bytes sent", copier.name, progress.kind.value,
             m.name, progress.done_bytes, progress.sent_bytes)


@contextmanager
def aborts_unwrapped():
    """A :class:`CopyAborted` raised inside a nursery reaches the caller as
    itself, not inside an exception group; anything else is re-raised as is."""
    try:
        yield
    except BaseExceptionGroup as group:
        aborted, rest = group.split(CopyAborted)
        if rest is not None or aborted is None:
            raise
        raise _first_leaf(aborted) from None


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    e: BaseException = group
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e


def _ends(work: list[tuple[int, int]]) -> list[int]:
    """Prefix sums of a pass's work: ``ends[i]`` is the bytes of items [0, i)."""
    ends = [0]
    for _, length in work:
        ends.append(ends[-1] + length)
    return ends


def _ahead_end(ends: list[int], index: int, start: int, limit: int) -> int:
    """The end of the items from ``start`` (>= ``index``) on that lie within
    ``limit`` bytes from the start of item ``index``; item ``index`` itself
    always counts."""
    end = start
    while end < len(ends) - 1 and (end == index or ends[end + 1] - ends[index] <= limit):
        end += 1
    return end


class _ReadAhead:
    """Asks the primary's disk to read the pass's next :data:`READ_AHEAD`
    bytes (less under a rate limit) ahead of the cursor. A full copy reads
    sequentially and the kernel's read-ahead covers it; a mini-copy reads
    scattered regions, each a disk round trip of its own unless they are
    asked for together."""

    def __init__(self, device, work: list[tuple[int, int]], ends: list[int], ahead: int = READ_AHEAD):
        self.device, self.work, self.ends, self.ahead = device, work, ends, ahead
        self.asked = 0  # work items [0, asked) are asked for
        self.lock = trio.Lock()

    async def advance(self, index: int) -> None:
        if self.lock.locked():
            return  # another worker is asking; it covers this index too
        async with self.lock:
            start = max(self.asked, index)
            if start >= len(self.work):
                return
            end = _ahead_end(self.ends, index, start, self.ahead)
            if end - start >= 8 or end == len(self.work):  # in batches, not item by item
                await self.device.will_need(self.work[start:end])
                self.asked = end


class _HashPrefetch:
    """The member's region hashes of the pass's work items, asked for up to
    :data:`HASH_AHEAD` bytes (less under a rate limit) ahead of the cursor; a
    mini-copy still deciding whether to compare at all asks for no more
    regions than it may compare, and none for items that surely differ.

    A hash request travels behind the copy data already queued on the link,
    so asking only when a chunk's turn comes would leave each worker waiting
    for a round trip through that queue; ahead of time, the answers are there
    when needed. (A member hash taken early is still safe: a write to its
    regions after it is shipped to the member too, and our side reads under
    the lock.)"""

    def __init__(self, m: MemberLink, work: list[tuple[int, int]], ends: list[int], block: int,
                 progress: CopyProgress, ahead: int = HASH_AHEAD, surely_differ=lambda index: False):
        self.m, self.work, self.ends, self.block, self.progress = m, work, ends, block, progress
        self.ahead = ahead  # bytes asked for ahead of the cursor
        self.surely_differ = surely_differ  # (index) -> the item is worth no comparison (UnsentRegions)
        self.nursery: trio.Nursery | None = None
        self.asked = 0  # the look-ahead has asked for work items up to here
        self._answers: dict[int, tuple[int, ...] | BaseException] = {}
        self._arrived: dict[int, trio.Event] = {}

    def ask_ahead(self, indexes: list[int]) -> None:
        """Ask for the items ``indexes`` (taken, needed now) and for those after
        them within the look-ahead."""
        assert self.nursery is not None
        if not self.progress.compare:
            return
        limit = self.ahead
        if self.progress.kind is PassKind.MINI and self.progress.regions_compared < SKIP_COMPARE_AFTER:
            limit = min(limit, SKIP_COMPARE_AFTER * self.block)
        start = max(self.asked, indexes[-1] + 1)
        end = _ahead_end(self.ends, indexes[0], start, limit)
        for i in [*indexes, *range(start, end)]:
            if i not in self._arrived and not self.surely_differ(i):
                self._arrived[i] = trio.Event()
                self.nursery.start_soon(self._ask, i)
        self.asked = max(self.asked, end)

    async def _ask(self, index: int) -> None:
        offset, length = self.work[index]
        try:
            self._answers[index] = await self.m.region_hashes(offset, length, self.block)
        except (LinkClosed, OSError) as e:
            self._answers[index] = e
        self._arrived[index].set()

    def wanted(self, index: int) -> bool:
        """Whether item ``index`` is to be compared before it is shipped."""
        return self.progress.compare and not self.surely_differ(index)

    async def get(self, index: int) -> tuple[int, ...]:
        """The member's hashes of chunk ``index`` (asked for now if not yet)."""
        if index not in self._arrived:
            self.ask_ahead([index])
        await self._arrived[index].wait()
        del self._arrived[index]
        answer = self._answers.pop(index)
        if isinstance(answer, BaseException):
            raise CopyAborted(f"hashing on {self.m.name}: {answer}")
        offset, length = self.work[index]
        blocks = (length + self.block - 1) // self.block
        if len(answer) != blocks:
            # Compared pairwise, a short answer would leave the last blocks
            # uncompared, unshipped and then cleared as copied.
            raise CopyAborted(f"hashing on {self.m.name}: {len(answer)} hashes for the {blocks} blocks at {offset}")
        return answer


async def _chunk_acked(m: MemberLink, tracker: PassTracker, progress: CopyProgress,
                       work: list[tuple[int, int]], index: int, shipments: list) -> None:
    for sh in shipments:
        await sh.done.wait()
        if not sh.ok:
            raise CopyAborted(f"{m.name} did not acknowledge a copied region")
    tracker.ack(index)
    progress.done_bytes += work[index][1]


async def _copy_items(copier: CopySource, m: MemberLink, progress: CopyProgress, work: list[tuple[int, int]],
                      indexes: list[int], hashes: _HashPrefetch, budget: CopyBudget,
                      pacer: RatePacer, settled) -> list[list]:
    """Ship the regions of the work items ``indexes`` that differ on the
    member; returns each item's shipments (not yet acknowledged)."""
    rs = copier.config.region_size
    local = copier.local
    ranges = [work[i] for i in indexes]
    nbytes = sum(length for _, length in ranges)
    progress.compared_bytes += nbytes
    # The limit counts compared bytes: hashing reads the chunk from disk on
    # both sides, which is the load an operator limits the copy for (a merge
    # that finds almost nothing to send still reads everything).
    await pacer.pace(nbytes)
    theirs = [await hashes.get(i) if hashes.wanted(i) else None for i in indexes]
    shipments: list[list] = []
    # Under the range locks (taken together, in turn with application
    # writes: see gmd.writepath.RangeLocks): no application write to these items is
    # in flight, and any later one is queued after this copy. The items are
    # read once, for hashing and shipping alike (holes are not read), in one
    # trip to a thread.
    token = await copier.lock_ranges(ranges)
    try:
        for offset, length in ranges:
            # Marks from here on (a write after the read) keep their bits.
            copier.remarked.forget(m.name, offset, length)
        read = await local.device.read_hashed_ranges(ranges, rs)
        for (offset, _), (ours, data), their in zip(ranges, read, theirs):
            if their is not None:
                differ = [i for i, (a, b) in enumerate(zip(ours, their)) if a != b]
                progress.note_compared(len(ours), len(differ))
            else:
                differ = list(range(len(ours)))
            item: list = []
            for first, end in _runs(differ):
                piece = data.blocks(first, end)
                sh = m.ship_write(copier.completed_sequence, offset + first * rs, piece, settled, copy=True)
                if sh is None:
                    raise CopyAborted(f"{m.name} went away")
                budget.shipped(len(piece))
                item.append(sh)
                progress.sent_bytes += len(piece)
                copier.bytes_sent += len(piece)
            shipments.append(item)
    finally:
        copier.unlock_range(token)
    await trio.lowlevel.checkpoint()  # let waiting application writes take the lock
    return shipments


async def _record(copier: CopySource, m: MemberLink, done: list[tuple[int, int]], *, full: bool) -> None:
    """Make the copied data durable on the member, then record the progress."""
    if not done:
        return
    sh = m.ship_flush(copier.completed_sequence)
    if sh is None:
        raise CopyAborted(f"{m.name} went away")
    await sh.done.wait()
    if not sh.ok:
        raise CopyAborted(f"{m.name} did not acknowledge a flush")
    if not m.connected:
        raise CopyAborted(f"{m.name} went away")
    sm = copier.statemap
    rs = copier.config.region_size
    if full:
        # Writes refused while it is behind are in the bitmap (below the fence
        # too), for the mini-copy that follows.
        end = max(off + length for off, length in done)
        sm.advance_peer_fence(m.name, end)
    else:
        for off, length in done:
            first, end = off // rs, (off + length) // rs
            kept = set(copier.remarked.kept(m.name, first, end))  # written after this pass read them
            for a, b in _runs([r for r in range(first, end) if r not in kept]):
                sm.clear_out_of_sync(m.name, range(a, b))
    await copier.local.writer.sync_all()
