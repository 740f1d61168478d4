"""The write path of one volume: ordering, intent, shipping, completion, barriers, retirement.

Write path on the primary (docs/DESIGN.md, "The write path"):

1. bounds: a request that does not fit is refused whole (EINVAL/ENOSPC);
2. order: a write waits for every in-flight write it overlaps, then gets the
   next sequence number, so all members apply conflicting writes in one order;
3. intent (``mwc``/``async``): its extents are hot on disk before data moves;
4. the local write and the shipments to members run concurrently; ``sync`` and
   ``mwc`` members are waited for, ``async`` ones are queued;
5. a member that cannot take the write (away, behind, its session died before
   the ack) gets the write's regions marked out of sync, durably where the
   invariant needs it, *before* the write completes;
6. the write completes. Its intent is released when every member's part is
   settled (acked, or marked out of sync).

A flush is a barrier: local fdatasync plus a flush on every connected
``sync``/``mwc`` member, waited for; an ``async`` member gets the flush queued.
Extents retire only up to the point every connected member acked a flush.

Concurrency rules: sequence numbers are assigned and shipments queued with no
``await`` in between; a member session's failure settles all its shipments in one
synchronous sweep; state-map changes happen on the event loop only. Cancelling
a writer after its shipments were queued leaves them to settle normally.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import trio

from statemap import CopyKind, DiskState, Role
from transport.link import LinkClosed

from .copystate import RemarkedRegions, UnsentRegions
from .disk import check_range
from .errors import errno_for
from .latency import LatencyHistogram
from .replication import MemberLink, Shipment

if TYPE_CHECKING:
    from .config import VolumeConfig
    from .copyengine import CopyEngine
    from .peerstate import PeerState
    from .quorum_keeper import QuorumKeeper
    from .volume import LocalVolume

log = logging.getLogger(__name__)

AUTO_FLUSH_INTERVAL = 2.0  # retire extents even if the application never fsyncs
MAX_REMOTE_READ = 4 * 1024 * 1024  # per Read frame when a read goes to a member


class WritePathVolume(Protocol):
    """What the write path needs of its volume (the engine provides it)."""

    config: VolumeConfig
    copier: CopyEngine
    local: LocalVolume | None
    members: dict[str, MemberLink]
    @property
    def name(self) -> str: ...
    node: str
    peerstate: PeerState
    quorum: QuorumKeeper
    def require_primary(self) -> LocalVolume: ...
    def require_up(self) -> LocalVolume: ...
    role: Role
    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None: ...


@dataclass(eq=False)
class _WriteCtx:
    """Bookkeeping of one write until every member's part is settled."""

    offset: int
    length: int
    gseq: int
    pending: int = 1  # the writer itself, plus one per async shipment


class RangeLocks:
    """Serializes overlapping in-flight writes and copy reads: intervals, first
    come first served per overlap. A request waits for every earlier one it
    overlaps, held or itself still waiting, so a copy's long chunk is not
    starved by a stream of short application writes (which, to an ``async``
    member fallen behind, complete at local speed). One request may cover
    several ranges, taken together: waits only ever point at earlier
    requests, so there is no deadlock."""

    def __init__(self):
        self._held: dict[int, tuple[list[tuple[int, int]], trio.Event]] = {}  # held or waiting, by age
        self._next = 0

    async def acquire(self, start: int, end: int) -> int:
        return await self.acquire_many([(start, end)])

    async def acquire_many(self, ranges: list[tuple[int, int]]) -> int:
        """Take every [start, end) of ``ranges`` at once; returns the token."""
        self._next += 1
        token = self._next
        ahead = [ev for held, ev in self._held.values()
                 if any(s < e2 and s2 < e for s, e in ranges for s2, e2 in held)]
        self._held[token] = (list(ranges), trio.Event())
        try:
            for ev in ahead:
                await ev.wait()
        except BaseException:  # cancelled while waiting: later requests must not wait for it
            self.release(token)
            raise
        return token

    def release(self, token: int) -> None:
        _ranges, ev = self._held.pop(token)
        ev.set()

    async def wait_held(self) -> None:
        """Wait until every request made until now is released (not those made later)."""
        for _ranges, ev in list(self._held.values()):
            await ev.wait()

    @property
    def busy(self) -> int:
        return len(self._held)


class WritePath:
    """The primary's I/O of one volume, and the sequence a secondary follows.

    Owns the range locks, the write sequence (``gseq``: assigned, completed,
    locally flushed, durable on every member in sync, last seen from a
    primary), the writes in flight, the regions members surely miss or had
    marked again during a copy pass, and the I/O counters. Reads and writes
    the shared state of its :class:`~gmd.engine.VolumeEngine` (local volume,
    members, role, quorum)."""

    def __init__(self, engine: WritePathVolume):
        self.engine = engine
        config = engine.config
        self._locks = RangeLocks()
        self.gseq = 0
        self.completed_gseq = 0
        self._local_flushed_gseq = 0
        self._in_sync_gseq = 0  # durable on us and every member in sync (told to members with flushes)
        self.seen_gseq = 0  # highest sequence of a primary's write applied here (a new primary goes on from it)
        self.in_flight = 0
        self.idle = trio.Event()
        self.idle.set()
        self.unsent = UnsentRegions(config.size, config.region_size)  # regions members surely miss
        self.remarked = RemarkedRegions(config.size, config.region_size)  # marked since a copy pass read them
        self._dirty_since_flush = False
        self.writes = 0
        self.last_write_at = -1e9  # trio time an application write last started (the copy yields to them)
        self._pumping: set[str] = set()  # members whose backlog is being sent
        self.bytes_written = 0
        self.write_latency = LatencyHistogram()  # application writes, start to completion (gmd.metrics)

    def continue_sequence(self) -> None:
        """Becoming primary: our sequence goes on from the last primary's, so
        members retire what they mirror of its writes and ours in one order."""
        self.gseq = max(self.gseq, self.seen_gseq)
        self.completed_gseq = max(self.completed_gseq, self.gseq)
        for m in self.engine.members.values():
            if m.backlog is not None:
                m.backlog.restart()  # our own term: every write to it is kept from here

    def start_pump(self, m: MemberLink) -> None:
        """Send ``m``'s waiting backlog in order, if it is connected and no
        pump runs for it yet."""
        if m.connected and m.name not in self._pumping and self.engine.role == Role.PRIMARY:
            self._pumping.add(m.name)
            self.engine.spawn(self._pump, m)

    async def _pump(self, m: MemberLink) -> None:
        try:
            await m.pump_backlog(lambda: self.engine.role == Role.PRIMARY)
        except Exception as e:  # a journal that cannot be read: back to the bitmap, never down
            if m.backlog is not None and m.backlog.valid:
                m.backlog.drop(f"reading its journal failed: {e}")
            if m.connected:
                m.behind = True
                m.notify_changed()
                self.engine.copier.start_copy(m)
        finally:
            self._pumping.discard(m.name)

    def note_applied(self, gseq: int) -> None:
        """As secondary: a primary's write with sequence ``gseq`` is applied here."""
        self.seen_gseq = max(self.seen_gseq, gseq)

    async def read(self, offset: int, length: int) -> bytes:
        """Read from the local disk when it holds current data for the range;
        otherwise from an up-to-date member over the link, never stale bytes."""
        local = self.engine.require_primary()
        check_range(offset, length, self.engine.config.size, writing=False)
        if self._local_current(offset, length):
            await self._merge_before_read(offset, length)
            return await local.read(offset, length)
        for m in self.engine.members.values():
            if m.connected and m.peer_disk == DiskState.UPTODATE:
                try:
                    data = b""
                    for start in range(offset, offset + length, MAX_REMOTE_READ):
                        data += await m.read(start, min(MAX_REMOTE_READ, offset + length - start))
                    return data
                except LinkClosed:
                    continue
        raise OSError(errno.EIO, f"{self.engine.name}: local copy is {local.statemap.sb.disk.value} and no "
                                 "up-to-date member is reachable for this read")

    async def _merge_before_read(self, offset: int, length: int) -> None:
        """A read of regions a connected member still has marked (a merge after
        a crash, or a mini-copy, not there yet) first brings those regions to the
        member, so after the read every member returns the same bytes for them.
        The bits stay until the copy pass clears them after a flush."""
        sm = self.engine.local.statemap
        regions = sm.regions_of(offset, length)
        rs = self.engine.config.region_size
        for m in self.engine.members.values():
            if not m.connected or m.behind or (m.backlog is not None and m.backlog.has_waiting):
                continue  # (a member being brought forward in write order gets no region out of turn)
            marked = set(sm.out_of_sync_in(m.name, regions))
            rec = sm.sb.peers.get(m.name)
            if rec is not None and rec.copy is not None and rec.copy.kind is CopyKind.MERGE:
                # A full merge (sync mode, no intent log) has no bits: every
                # region at or above its fence is still to be merged.
                marked.update(r for r in regions if r * rs >= rec.copy.fence)
            for r in sorted(marked):
                token = await self._locks.acquire(r * rs, (r + 1) * rs)
                try:
                    data = await self.engine.local.read(r * rs, rs)
                    # Region contents out of write order: copy data (WRITE_COPY).
                    sh = m.ship_write(self.completed_gseq, r * rs, data, lambda sh: None, copy=True)
                finally:
                    self._locks.release(token)
                if sh is not None:
                    await sh.done.wait()

    def _local_current(self, offset: int, length: int) -> bool:
        sm = self.engine.local.statemap
        if sm.sb.disk == DiskState.UPTODATE:
            return True
        fence = sm.sb.local_copy
        return fence is not None and sm.sb.disk == DiskState.COPYING and offset + length <= fence.fence

    async def write(self, offset: int, data: bytes) -> int:
        """Write through the mode's completion rule; returns its sequence number
        once it is complete."""
        local = self.engine.require_primary()
        length = len(data)
        check_range(offset, length, self.engine.config.size, writing=True)
        self.in_flight += 1
        self.last_write_at = started = trio.current_time()
        self.idle = trio.Event() if self.idle.is_set() else self.idle
        token = await self._locks.acquire(offset, offset + length)
        try:
            # Quorum first, and members already away fenced, before the disk is touched.
            away_before = [m for m in self.engine.members.values() if not (m.connected and not m.behind)]
            await self.engine.quorum.settle(away_before)
            await local.begin_intent(offset, length)
            if self.engine.role != Role.PRIMARY:
                # Demoted while this write waited (a switchover, or stepping down):
                # it must not reach any disk now.
                raise OSError(errno.EIO, f"{self.engine.name}: no longer primary on {self.engine.node}; write not done")
            self.gseq += 1
            ctx = _WriteCtx(offset, length, self.gseq)
            waits: list[tuple[MemberLink, Shipment]] = []
            away: list[MemberLink] = []
            unsent: list[MemberLink] = []  # away, and never sent this write
            # No await from here until every shipment is queued: queue order is gseq order.
            for m in self.engine.members.values():
                sh = m.ship_write(ctx.gseq, offset, data, self._settled_callback(m, ctx))
                if sh is None:
                    away.append(m)
                    if m.kept(ctx.gseq):
                        # Waiting in its backlog: it will get it, in order;
                        # marked all the same (the bitmap is the record).
                        self.start_pump(m)
                    else:
                        unsent.append(m)
                elif m.is_async:
                    ctx.pending += 1
                else:
                    waits.append((m, sh))
            failed_local: BaseException | None = None
            try:
                await local.device.write(offset, data)
            except Exception as e:
                failed_local = e
            for m, sh in waits:
                await sh.done.wait()
                if not sh.ok:
                    away.append(m)
            for m in away:
                await self.mark_away(m, offset, length, sent=m not in unsent)
            lost = [m for m in away if m not in away_before]
            if lost:
                # A member missed it: it completes only once quorum knows that member is behind.
                await self.engine.quorum.settle(lost)
            if failed_local is not None:
                await self._local_failed(failed_local)
                raise OSError(errno_for(failed_local), f"local write failed: {failed_local}")
            self.completed_gseq = max(self.completed_gseq, ctx.gseq)
            self._dirty_since_flush = True
            self.writes += 1
            self.bytes_written += length
            self.write_latency.observe(trio.current_time() - started)
            self._settle_part(ctx)
            return ctx.gseq
        finally:
            self._locks.release(token)
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    def _settled_callback(self, m: MemberLink, ctx: _WriteCtx) -> Callable[[Shipment], None]:
        def settled(sh: Shipment) -> None:
            if not m.is_async:
                return  # the writer waits for sync shipments itself
            if sh.ok:
                self._settle_part(ctx)
            else:
                self.engine.spawn(self._async_failed, m, ctx)
        return settled

    async def _async_failed(self, m: MemberLink, ctx: _WriteCtx) -> None:
        await self.mark_away(m, ctx.offset, ctx.length)
        self._settle_part(ctx)

    def _settle_part(self, ctx: _WriteCtx) -> None:
        ctx.pending -= 1
        if ctx.pending == 0 and self.engine.local is not None:
            self.engine.local.end_intent(ctx.offset, ctx.length, ctx.gseq)

    async def mark_away(self, m: MemberLink, offset: int, length: int, *, sent: bool = True) -> None:
        """``m`` missed a write: it was never ``sent`` it, or it may not have applied it."""
        local = self.engine.local
        if local is None:
            return
        if m.lacking_since is None:
            # Its RPO in seconds counts from here, or from the oldest write
            # still unacknowledged by it, which it lacks too (gmd.rpo).
            _, age = m.lag(trio.current_time())
            m.lacking_since = time.time() - age
        if not sent:
            self.unsent.note(m.name, offset, length)
        self.remarked.note(m.name, offset, length)  # a copy pass that read these regions before keeps their bits
        sm = local.statemap
        rec = sm.sb.peers.get(m.name)
        if rec is not None and rec.disk == DiskState.UPTODATE:
            sm.set_peer_disk(m.name, DiskState.OUTDATED)
        await local.mark_out_of_sync(m.name, offset, length)
        if m.connected and m.peer_disk == DiskState.UPTODATE:
            m.peer_disk = DiskState.OUTDATED
            self.engine.peerstate.send_state_nowait(m, {"your_disk": DiskState.OUTDATED.value})
        if m.connected and self.engine.role == Role.PRIMARY:
            # Still connected: an async member that fell behind, or one that
            # answered a write with an error (its disk full, say). Either is
            # caught up while its link is up; the copy retries until it can.
            self.engine.copier.start_copy(m)

    async def commit_fork(self, generation: str, newly_away: list[MemberLink]) -> None:
        """Start generation ``generation`` because the members in ``newly_away``
        miss writes (their bitmaps stay relative to the old one), and make it
        durable on every connected member in sync before any write relies on it:
        the STATE frame, then a flush acknowledged after it."""
        sm = self.engine.local.statemap
        old = sm.sb.generations.current
        for m in newly_away:
            sm.set_peer_disk(m.name, DiskState.OUTDATED)
        sm.start_new_generation(generation)
        for m in self.engine.members.values():
            # A member newly away may still look connected (its loss not yet
            # noticed): its bitmap stays relative to the old generation all the same.
            if m not in newly_away and m.connected and not m.behind and sm.sb.peers[m.name].bitmap_gen == old:
                sm.set_bitmap_generation(generation, member=m.name)  # still in sync: it moves along
        await self.engine.local.writer.sync_all()
        log.info("%s: new generation %s (members away: %s)", self.engine.name, generation,
                 ", ".join(m.name for m in newly_away))
        waits = []
        for m in self.engine.members.values():
            if m not in newly_away and m.connected and not m.behind and m.peer_disk == DiskState.UPTODATE:
                await self.engine.peerstate.send_state(m, {"generation": generation})
                sh = m.ship_flush(self.completed_gseq, in_sync=self._in_sync_gseq)
                if sh is not None and not m.is_async:
                    waits.append(sh)
        for sh in waits:
            await sh.done.wait()

    async def flush(self) -> None:
        """The application's fsync: a barrier on the local disk and every member."""
        self.engine.require_primary()
        await self.flush_barrier()

    async def flush_barrier(self) -> None:
        local = self.engine.require_up()
        point = self.completed_gseq
        self._dirty_since_flush = False
        waits = []
        for m in self.engine.members.values():
            sh = m.ship_flush(point, on_settled=lambda sh, m=m: self.maybe_retire(), in_sync=self._in_sync_gseq)
            if sh is not None and not m.is_async:
                waits.append((m, sh))
        await local.device.flush()
        self._local_flushed_gseq = max(self._local_flushed_gseq, point)
        for m, sh in waits:
            await sh.done.wait()
        self.maybe_retire()

    def maybe_retire(self) -> None:
        """Tell the state map how far writes are durable on every member."""
        if self.engine.local is None:
            return
        point = self._local_flushed_gseq
        for m in self.engine.members.values():
            if m.connected and not m.behind and m.session is not None:
                point = min(point, max(m.flushed_gseq, m.session_started_gseq))
        self._in_sync_gseq = max(self._in_sync_gseq, point)
        self.engine.local.note_flushed(point)

    async def auto_flush(self) -> None:
        while True:
            await trio.sleep(AUTO_FLUSH_INTERVAL)
            if self.engine.role == Role.PRIMARY and self._dirty_since_flush and self.engine.local is not None:
                try:
                    await self.flush_barrier()
                    await self.engine.local.writer.sync_all()
                except Exception as e:  # keep serving; the error is logged
                    log.error("%s: background flush failed: %s", self.engine.name, e)

    async def _local_failed(self, exc: BaseException) -> None:
        log.error("%s: local disk failed: %s", self.engine.name, exc)
        if self.engine.local is not None:
            self.engine.local.statemap.set_disk(DiskState.FAILED)
            try:
                await self.engine.local.writer.sync_all()
            except Exception:
                pass

    async def lock_range(self, start: int, end: int) -> int:
        return await self._locks.acquire(start, end)

    async def lock_ranges(self, ranges: list[tuple[int, int]]) -> int:
        """Lock several (offset, length) ranges together (one token)."""
        return await self._locks.acquire_many([(offset, offset + length) for offset, length in ranges])

    def unlock_range(self, token: int) -> None:
        self._locks.release(token)

    @property
    def in_sync_gseq(self) -> int:
        """The sequence up to which every write is durable on every member in sync."""
        return self._in_sync_gseq

    @property
    def completed_sequence(self) -> int:
        return self.completed_gseq

    async def drain_writes_in_flight(self) -> None:
        """Wait until every application write in flight now has finished (not
        those started later): each one a member refused is marked by then."""
        await self._locks.wait_held()

