"""The receiving member's side of replication: applying a session's writes and
flushes in the primary's link order (:class:`Applier`), and answering a copy's
hash requests in batches (:class:`HashAnswerer`). The sending side is
:mod:`gmd.replication`.
"""

from __future__ import annotations

import logging
from collections import deque

import trio

from transport.codec import WRITE_COPY, Flush, FlushAck, HashReply, HashRequest, Write, WriteAck
from transport.link import LinkClosed, PeerLink

from .errors import errno_for

log = logging.getLogger(__name__)

FAILURE_LOG_EVERY = 10.0  # seconds between log lines about failing writes (the first is logged at once)


class FailureLog:
    """Log lines for a member's failing writes, bounded: a full disk fails
    every write, and one line per write would bury the log. The first failure
    is logged at once; later ones are counted and summed up at most every
    :data:`FAILURE_LOG_EVERY` seconds, with the last one as the example."""

    def __init__(self) -> None:
        self._next = 0.0
        self._count = 0

    def failed(self, seq: int, offset: int, error: BaseException) -> None:
        now = trio.current_time()
        self._count += 1
        if now < self._next:
            return
        if self._count == 1:
            log.error("applying write seq %d at %d failed: %s", seq, offset, error)
        else:
            log.error("applying writes failed: %d writes in the last %.0f s (the last: seq %d at %d: %s)",
                      self._count, FAILURE_LOG_EVERY, seq, offset, error)
        self._count = 0
        self._next = now + FAILURE_LOG_EVERY


class Applier:
    """Applies a session's writes and flushes in link sequence order (receiver side).

    ``write(item)`` and ``flush(item)`` apply a Write or Flush event to the
    local volume; the ack goes back on the path the item came by. Writes are
    issued in order; a write that overlaps one still in flight waits for it; a
    flush waits for every write issued before it. Once :meth:`close` d (the
    session ended), nothing more is applied: what was received but not yet
    issued is dropped, never acknowledged.

    ``admit(item)``, if given, is called for each write as it is issued, in
    link order and before any await; what it returns (a ticket) is passed on
    as ``write(item, ticket)``, and released (``ticket.release()``) if the
    write is dropped instead (the session ended first).

    ``gate()``, if given, is awaited before each write is issued (before it
    is admitted, holding nothing): it returns True if it waited, and the pump
    then looks again (the session may have ended meanwhile). A test failover
    freezes its image behind it (see LocalVolume.issue_gate).

    ``write_now(item)``, if given, applies a write on the receiving task when
    it need not wait, returning False (having done nothing) when it must: a
    write that arrives in order, overlaps nothing in flight and finds nothing
    to wait for is then applied and acknowledged without a task of its own
    (two task switches and a wake-up less per replicated write).
    """

    def __init__(self, nursery: trio.Nursery, write, flush, *, on_applied=None, write_now=None, admit=None,
                 hold=None, gate=None):
        self._nursery = nursery
        self._write = write
        self._admit = admit
        self._gate = gate
        self._flush = flush
        self._write_now = write_now
        self._on_applied = on_applied
        self.next_seq = 1
        self._waiting: dict[int, tuple[Write | Flush, PeerLink]] = {}
        self._inflight: dict[int, tuple[int, int, trio.Event]] = {}  # seq -> (start, end, done)
        self._pump_running = False
        self.session_id: str | None = None
        self.closed = False
        self.failures = FailureLog()
        # How far this session's writes are applied in order: every item up
        # to ``_done_through`` (link sequence) finished, and ``applied_gseq``
        # is the highest primary sequence among those writes (copy data does
        # not count: it carries no place in the primary's order). A write
        # that failed stops it for good. A primary with a backlog for us
        # resumes from it in the next session (gmd.backlog).
        self._done_through = 0
        self._done: dict[int, int] = {}  # link seq finished out of order -> its gseq (0: none)
        self.applied_gseq = 0
        self._broken = False
        # A consistency group's hold (gmd.groups): writes are issued only up
        # to a mark every volume of the group received. ``hold`` has
        # received(point), safe() and watch(wake)/unwatch(wake).
        self._hold = hold
        self._received_through = 0  # every link sequence up to here arrived
        self._marks: deque[tuple[int, int]] = deque()  # (link seq, point) received in order, not yet released
        self._released_seq = 0 if hold is not None else 1 << 64  # items up to here may be issued
        self._drain_to = 0  # closed: items up to here are still applied (released before the end)
        if hold is not None:
            hold.watch(self._release)

    def _finished(self, item: Write | Flush, ok: bool) -> None:
        if self._broken:
            return
        if not ok:
            self._broken = True
            self._done.clear()
            return
        order = item.gseq if isinstance(item, Write) and not item.flags & WRITE_COPY else 0
        self._done[item.seq] = order
        while self._done_through + 1 in self._done:
            self._done_through += 1
            self.applied_gseq = max(self.applied_gseq, self._done.pop(self._done_through))

    def resume_point(self) -> int | None:
        """The primary sequence this session's writes are applied in order up
        to, once it is closed and nothing of it is in flight; None otherwise
        (still running, a write failed, or some write never finished)."""
        if not self.closed or self._inflight or self._broken or self._waiting:
            return None
        return self.applied_gseq

    def close(self) -> None:
        """The session ended: apply nothing more (writes in flight finish).
        Under a group's hold, what was released still is, so every volume of
        the group stops at the same mark; the rest is dropped."""
        self.closed = True
        if self._hold is None:
            self._waiting.clear()
            return
        self._hold.unwatch(self._release)
        self._drain_to = self._released_seq
        self._waiting = {s: v for s, v in self._waiting.items() if s <= self._drain_to}
        self._start_pump()

    def _received(self) -> None:
        """Note what arrived in order: a group's mark among it is received."""
        while True:
            nxt = self._received_through + 1
            if nxt < self.next_seq:
                self._received_through = nxt
                continue
            entry = self._waiting.get(nxt)
            if entry is None:
                break
            self._received_through = nxt
            item = entry[0]
            if isinstance(item, Flush) and item.group_point:
                self._marks.append((nxt, item.group_point))
                self._hold.received(item.group_point)  # may move the group's safe mark: _release
            elif isinstance(item, Write) and item.flags & WRITE_COPY:
                # Copy data: the primary is catching this volume up out of
                # order (it fell behind and gets no marks meanwhile). Held, it
                # would never be applied; released, with what waits before it,
                # it leaves write order, which the member's undo log (begun
                # when it was told it is outdated, before any of it) covers.
                # The group's other volumes hold at the last mark meanwhile.
                self._released_seq = max(self._released_seq, nxt)
                self._marks.clear()
        self._release()

    def _release(self) -> None:
        """Issue what lies before the group's safe mark."""
        if self.closed:
            return
        safe = self._hold.safe()
        while self._marks and self._marks[0][1] <= safe:
            self._released_seq = self._marks.popleft()[0]
        self._start_pump()

    def _issuable(self, seq: int) -> bool:
        return seq <= (self._drain_to if self.closed else self._released_seq)

    def _start_pump(self) -> None:
        if not self._pump_running and self.next_seq in self._waiting and self._issuable(self.next_seq):
            self._pump_running = True
            self._nursery.start_soon(self._pump)

    def submit(self, item: Write | Flush, path: PeerLink) -> None:
        if self.closed:
            return
        if item.seq < self.next_seq:
            self._nursery.start_soon(self._ack_duplicate, item, path)
            return
        if self._hold is not None:
            self._waiting[item.seq] = (item, path)
            self._received()
            return
        if (self._write_now is not None and item.seq == self.next_seq and not self._pump_running
                and isinstance(item, Write) and self._apply_now(item, path)):
            if self.next_seq not in self._waiting:
                return
        else:
            self._waiting[item.seq] = (item, path)
        if not self._pump_running:
            self._pump_running = True
            self._nursery.start_soon(self._pump)

    def _apply_now(self, item: Write, path: PeerLink) -> bool:
        """Apply ``item`` (the next in order) here and now if it overlaps no
        write in flight and ``write_now`` takes it; True once it is issued."""
        start, end = item.offset, item.offset + len(item.data)
        if any(s2 < end and start < e2 for s2, e2, _ in self._inflight.values()):
            return False
        status = 0
        try:
            if not self._write_now(item):
                return False
        except Exception as e:  # a data-path fault answers with an errno, as in _apply_write
            status = errno_for(e)
            self.failures.failed(item.seq, item.offset, e)
        self.next_seq += 1
        self._finished(item, status == 0)
        if self._on_applied is not None and status == 0:
            self._on_applied(item)
        try:
            path.send_nowait(WriteAck(item.seq, status))
        except LinkClosed:
            pass  # the primary settles it as failed when the session ends
        return True

    async def _ack_duplicate(self, item: Write | Flush, path: PeerLink) -> None:
        if isinstance(item, Flush):
            await self._wait_all_before(item.seq)
            await self._flush(item)
            await _reply(path, FlushAck(item.seq))
        else:
            # Everything below next_seq was issued; wait for this one if in flight.
            entry = self._inflight.get(item.seq)
            if entry:
                await entry[2].wait()
            await _reply(path, WriteAck(item.seq))

    async def _pump(self) -> None:
        try:
            while self.next_seq in self._waiting and self._issuable(self.next_seq):
                if (self._gate is not None and isinstance(self._waiting[self.next_seq][0], Write)
                        and await self._gate()):
                    continue
                item, path = self._waiting.pop(self.next_seq)
                seq = self.next_seq
                if isinstance(item, Write):
                    start, end = item.offset, item.offset + len(item.data)
                    for s2, e2, done in list(self._inflight.values()):
                        if s2 < end and start < e2:
                            await done.wait()
                    done = trio.Event()
                    self._inflight[seq] = (start, end, done)
                    self.next_seq += 1
                    ticket = self._admit(item) if self._admit is not None else None
                    self._nursery.start_soon(self._apply_write, item, path, done, ticket)
                else:
                    self.next_seq += 1
                    self._nursery.start_soon(self._apply_flush, item, path, seq)
        finally:
            self._pump_running = False

    async def _wait_all_before(self, seq: int) -> None:
        for s, (_a, _b, done) in list(self._inflight.items()):
            if s < seq:
                await done.wait()

    async def _apply_write(self, item: Write, path: PeerLink, done: trio.Event, ticket=None) -> None:
        status = 0
        if self.closed and item.seq > self._drain_to:  # issued, the session ended before it started: not applied
            self._inflight.pop(item.seq, None)
            self._broken = True  # it was issued in order and never applied: nothing after it counts
            done.set()
            if ticket is not None:
                ticket.release()
            return
        try:
            await (self._write(item) if ticket is None else self._write(item, ticket))
        except Exception as e:  # a data-path fault answers with an errno, never kills the daemon
            status = errno_for(e)
            self.failures.failed(item.seq, item.offset, e)
        finally:
            self._inflight.pop(item.seq, None)
            self._finished(item, status == 0)
            done.set()
        if self._on_applied is not None and status == 0:
            self._on_applied(item)
        await _reply(path, WriteAck(item.seq, status))

    async def _apply_flush(self, item: Flush, path: PeerLink, seq: int) -> None:
        await self._wait_all_before(seq)
        status = 0
        try:
            await self._flush(item)
        except Exception as e:
            status = errno_for(e)
            log.error("flush seq %d failed: %s", item.seq, e)
        self._finished(item, True)  # a failed flush loses no write: the order of what was applied stands
        await _reply(path, FlushAck(item.seq, status))


class HashAnswerer:
    """Answers hash requests (receiver side), small ones in batches.

    A mini-copy asks for dozens of 64 KiB regions at once; answered one by
    one, each costs a task, a hand-off to a disk thread and a wait for the
    GIL, many times the hashing itself. Requests of up to
    :data:`BATCH_REQUEST` bytes that arrive while a batch is being read are
    gathered into the next one (up to :data:`BATCH_BYTES`), read in one trip
    to a thread. Larger requests (a full copy's chunks) are answered on their
    own, concurrently, as before.

    ``hashes(ranges, block)`` returns the hashes of each (offset, length) of
    ``ranges``; ``check(offset, length, block)`` raises for a request that
    cannot be answered, so one bad request never fails the others."""

    BATCH_REQUEST = 1024 * 1024
    BATCH_BYTES = 8 * 1024 * 1024

    def __init__(self, nursery: trio.Nursery, hashes, check):
        self._nursery = nursery
        self._hashes = hashes
        self._check = check
        self._pending: deque[tuple[HashRequest, PeerLink]] = deque()
        self._draining = False

    def submit(self, request: HashRequest, path: PeerLink) -> None:
        if request.length > self.BATCH_REQUEST:
            self._nursery.start_soon(self._answer, [(request, path)])
            return
        self._pending.append((request, path))
        if not self._draining:
            self._draining = True
            self._nursery.start_soon(self._drain)

    async def _drain(self) -> None:
        try:
            await trio.lowlevel.checkpoint()  # the rest of a burst is queued meanwhile
            while self._pending:
                batch, taken = [], 0
                while self._pending and (not batch or taken + self._pending[0][0].length <= self.BATCH_BYTES):
                    batch.append(self._pending.popleft())
                    taken += batch[-1][0].length
                await self._answer(batch)
        finally:
            self._draining = False

    async def _answer(self, batch: list[tuple[HashRequest, PeerLink]]) -> None:
        valid = []
        for request, path in batch:
            try:
                self._check(request.offset, request.length, request.block)
            except Exception as e:
                await _reply(path, HashReply(request.request, errno_for(e)))
            else:
                valid.append((request, path))
        # One block size per read; a copy asks with the region size throughout.
        while valid:
            block = valid[0][0].block
            group = [(r, p) for r, p in valid if r.block == block]
            valid = [(r, p) for r, p in valid if r.block != block]
            try:
                answers = await self._hashes([(r.offset, r.length) for r, _ in group], block)
                replies = [HashReply(r.request, 0, tuple(h)) for (r, _), h in zip(group, answers)]
            except Exception as e:
                replies = [HashReply(r.request, errno_for(e)) for r, _ in group]
            for (_, path), reply in zip(group, replies):
                await _reply(path, reply)


async def _reply(path: PeerLink, event) -> None:
    try:
        await path.send(event)
    except LinkClosed:
        pass  # the primary settles it as failed when the session ends
