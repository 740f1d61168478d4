"""Shipping writes to members (the receiving side is :mod:`gmd.receiver`).

:class:`MemberLink` is the primary's handle on one remote member: its live paths
(one :class:`transport.link.PeerLink` each), the shipments in flight to it, and
for an ``async`` member the byte-bounded queue. Every write and flush shipped
to a member in one session gets the next *link sequence number*; the receiver
(:class:`Applier`) issues them in that order, whatever path they came by, so
overlapping writes land in the primary's order on every member.

Settlement: each shipment ends exactly once, ``ok`` (the member acked it) or not
(the session died, or the member answered with an error). The engine turns an
unsuccessful settlement into out-of-sync bits; nothing is ever assumed delivered.

An ``async`` member's queue is bounded in bytes (:attr:`MemberLink.queue_limit`).
When a write would overflow it, the member falls *behind*: from then on writes
are not queued but marked in its out-of-sync bitmap, and the engine catches it
up by mini-copy while the link stays up (:class:`Replication` has the states
and the transitions). Copy data is shipped in link order like any write but
counted apart from the queue: the copy bounds its own bytes in flight.

Concurrency rules: link sequence numbers are assigned and frames queued without
an ``await`` in between, so queue order is sequence order; a session's
shipments are failed in one synchronous sweep when its last path closes.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import trio

from quorum.generations import Verdict
from statemap import DiskState, Role
from transport.codec import WRITE_COPY, Flush, FlushAck, HashReply, HashRequest, Read, ReadReply, Write, WriteAck
from transport.compression import Compressor
from transport.link import LinkClosed, PeerLink
from transport.pacing import Pacer

from .configmodel import Shipping

from .backlog import Backlog, Entry
from .latency import LatencyHistogram


log = logging.getLogger(__name__)


class LinkState(StrEnum):
    """A member link as operators see it (docs/DESIGN.md, "States")."""

    LOCAL = "local"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    STANDALONE = "standalone"  # refused: mismatch, bad secret, split-brain
    UNKNOWN = "unknown"


class Replication(StrEnum):
    """How the primary keeps a connected member current (DRBD's replication
    state, beside the link and disk states); ``gmd status`` shows it.

    ``shipping`` → ``behind``: an ``async`` member's queue overflowed; writes
    are marked in its bitmap, not queued. ``behind`` → ``catching-up``: a
    mini-copy runs (at once; also for a member returning with marked regions).
    While catching up, an overflowed member goes back to having writes queued
    once a pass left little to copy and the queue has room
    (:meth:`MemberLink.ship_again`); the copy then finishes as it does for a
    returning member. ``catching-up`` → ``shipping``: nothing is left to copy
    and writes are queued again. A new session starts at ``shipping``."""

    SHIPPING = "shipping"
    BEHIND = "behind"
    CATCHING_UP = "catching-up"
    REPLAYING = "replaying"  # its backlog is sent in order before any copy (gmd.backlog)


@dataclass(eq=False)
class Shipment:
    """One write or flush sent to one member."""

    link_seq: int
    gseq: int  # the volume's sequence number of the write (or flush point)
    kind: str  # "write" or "flush"
    offset: int = 0
    data: bytes = b""
    queued_at: float = 0.0
    done: trio.Event = field(default_factory=trio.Event)
    ok: bool = False
    status: int = 0
    path: PeerLink | None = None
    on_settled: Callable[[Shipment], None] | None = None
    in_sync: int = 0  # a flush's: the volume sequence durable on every member in sync
    copy: bool = False  # copy data: outside the async queue and its limit
    entry: Entry | None = None  # its place in the member's backlog (async, gmd.backlog)
    group_point: int = 0  # a flush that is a consistency group's mark (gmd.groups)

    @property
    def length(self) -> int:
        return len(self.data)

    def settle(self, ok: bool, status: int = 0) -> None:
        if self.done.is_set():
            return
        self.ok = ok
        self.status = status
        self.done.set()
        if self.on_settled is not None:
            self.on_settled(self)


class Session:
    """One connection lifetime of a member link (one or more paths)."""

    def __init__(self, session_id: str, member: str):
        self.id = session_id
        self.member = member
        self.paths: list[PeerLink] = []
        self.next_link_seq = 1
        self.unsettled: dict[int, Shipment] = {}
        self.closed = False
        self._rr = 0

    def pick_path(self) -> PeerLink | None:
        live = [p for p in self.paths if not p.closed]
        if not live:
            return None
        self._rr = (self._rr + 1) % len(live)
        return live[self._rr]


class MemberLink:
    """The primary's (and the secondary's) state for one remote member."""

    def __init__(self, name: str, mode: str, *, queue_limit: int, volume: str = "",
                 shipping: Shipping | None = None):
        self.name = name
        self.volume = volume  # for log lines
        self.mode = mode
        self.queue_limit = queue_limit
        self.state = LinkState.DISCONNECTED
        self.reason: str | None = None  # why standalone/disconnected, for status
        self.session: Session | None = None
        self.peer_role: Role | None = None  # what the member says it is (None: unknown)
        self.peer_disk: DiskState | None = None  # its disk, as it or this primary says (None: unknown)
        self.peer_hello_info: dict = {}
        self.queued_bytes = 0  # async: bytes of writes shipped, not yet acked (copy data apart)
        self.copy_bytes = 0  # bytes of copy data shipped, not yet acked
        self.behind = False  # async overflow: writes are marked in the bitmap, not queued
        self.replication = Replication.SHIPPING
        self.flushed_gseq = 0  # highest flush point the member acked
        self.changed = trio.Event()  # set on every state change (status --watch, tests)
        self._queue_waiters: list[tuple[int, trio.Event]] = []  # (bytes, woken when the queue is at most that)
        self.bytes_shipped = 0  # data of writes (and copy data) handed to the link, before compression
        # Writes (not copy data) from being queued for it to its ack (gmd.metrics).
        self.ack_latency = LatencyHistogram()
        # How data goes to this member, over all its paths and sessions: the
        # bandwidth limit (and every byte sent, counted) and the compression.
        self.shipping = shipping or Shipping()
        self.pacer = Pacer(self.shipping.schedule, label=f"{volume}: member {name}")
        self.compressor = Compressor(enabled=self.shipping.compress == "zstd", level=self.shipping.compress_level)
        self.lacking_since: float | None = None  # wall time of the first write marked for it (gmd.rpo)
        self.last_heard = 0.0  # trio time a frame last arrived from it (a live member pings every second)
        self.reads: dict[int, trio.MemorySendChannel] = {}  # request id -> waiting reader
        self._next_request = 1
        self.session_started_gseq = 0  # writes before this were settled by the last session
        # Writes the member acked but has not yet made durable with a flush it
        # acked: (gseq, offset, length). If the member is lost, these are what
        # its own crash could have dropped, so they become out-of-sync regions.
        self.acked_unflushed: list[tuple[int, int, int]] = []
        self.bitmap_done = trio.Event()  # the peer's bitmap arrived in this session
        self.verdict: Verdict | None = None  # generation comparison of this session
        self.verdict_generation: str | None = None  # our current generation when the verdict was made
        # async: the writes it has not acknowledged, in order, kept across
        # sessions (and spilled to a journal if configured); None: not async.
        self.backlog: Backlog | None = None
        # Consistent catch-up, as the primary sees it (docs/DESIGN.md,
        # "Consistent catch-up: the undo log"): since when the member's disk
        # is out of write order (told it is behind, or sent copy data; wall
        # clock; None: in order), its last answer to a catch-up question, and
        # why it refused the last one.
        self.out_of_order_since: float | None = None
        self.catch_up_answer: dict | None = None
        self.catch_up_refused: str | None = None
        self.test_failover: dict | None = None  # what the member last said of a test failover there (STATE)

    def reship(self, shipping: Shipping) -> None:
        """New settings for how data goes to this member (``gmd reload``):
        the paths use them from their next piece on."""
        if shipping != self.shipping:
            log.info("%s: member %s: shipping now compress=%s level=%d bandwidth=%d with %d scheduled limits",
                     self.volume, self.name, shipping.compress, shipping.compress_level, shipping.bandwidth,
                     len(shipping.bandwidth_schedule))
        self.shipping = shipping
        self.pacer.set_schedule(shipping.schedule)
        self.compressor.configure(enabled=shipping.compress == "zstd", level=shipping.compress_level)

    def wire_status(self) -> dict:
        """The ``wire`` part of this member's status (docs/DESIGN.md, "WAN economy")."""
        limit, rule = self.pacer.in_force()
        c = self.compressor
        return {"compress": self.shipping.compress, "level": self.shipping.compress_level,
                "data_bytes": self.bytes_shipped, "wire_bytes": self.pacer.wire_bytes,
                "compressed_writes": c.compressed_writes, "incompressible_writes": c.incompressible_writes,
                "untried_writes": c.untried_writes, "bandwidth_limit": limit, "bandwidth_rule": rule}

    @property
    def connected(self) -> bool:
        return self.state is LinkState.CONNECTED and self.session is not None and not self.session.closed

    @property
    def is_async(self) -> bool:
        return self.mode == "async"

    def notify_changed(self) -> None:
        """Wake whoever waits on :attr:`changed` (and every queue waiter, who
        re-checks the link): the member's state, session or replication moved."""
        self.changed.set()
        self.changed = trio.Event()
        self._wake_queue_waiters(force=True)

    async def wait_queue_at_most(self, limit: int) -> None:
        """Return once at most ``limit`` bytes of writes are queued to this
        member, or its state changed (callers re-check :attr:`connected`)."""
        if self.queued_bytes <= limit:
            return
        waiter = (limit, trio.Event())
        self._queue_waiters.append(waiter)
        try:
            await waiter[1].wait()
        finally:
            if waiter in self._queue_waiters:
                self._queue_waiters.remove(waiter)

    def _wake_queue_waiters(self, *, force: bool = False) -> None:
        for limit, event in self._queue_waiters:
            if force or self.queued_bytes <= limit:
                event.set()

    def set_state(self, state: LinkState, reason: str | None = None) -> None:
        if state is LinkState.CONNECTED and self.state is not LinkState.CONNECTED:
            self.last_heard = trio.current_time()
        if state != self.state or reason != self.reason:
            self.state = state
            self.reason = reason
            self.notify_changed()

    def set_replication(self, state: Replication, why: str, level: int = logging.INFO) -> None:
        """Move to replication ``state``, logging one line saying ``why``."""
        if state is self.replication:
            return
        log.log(level, "%s: member %s: replication %s -> %s: %s", self.volume, self.name,
                self.replication.value, state.value, why)
        self.replication = state
        self.notify_changed()

    def ship_again(self, why: str) -> None:
        """A member that fell behind takes writes in its queue again (the
        caller waits for the writes already refused to be marked, see
        :meth:`VolumeEngine.drain_writes_in_flight`)."""
        if self.behind:
            self.behind = False
            if self.backlog is not None:
                self.backlog.restart()  # every write from here on is kept in order again
            log.info("%s: member %s: writes are queued to it again: %s", self.volume, self.name, why)
            self.notify_changed()

    def note_out_of_order(self) -> None:
        """The member's disk leaves write order (it misses writes, or gets copy data)."""
        if self.out_of_order_since is None:
            self.out_of_order_since = time.time()

    def consistency(self, now: float, wall: float, undo_configured: bool) -> tuple[bool, float | None]:
        """(consistent, consistent_at) of the member's disk as this primary
        sees it: in write order, it holds every write up to the oldest one it
        has not acknowledged (``now``/``wall``: trio and wall-clock time now);
        out of order, it is consistent only if its undo log keeps the image
        from before (its last answer says so, or the config, before it answered)."""
        if self.out_of_order_since is None:
            if not self.connected:
                return True, wall - max(0.0, now - self.last_heard) if self.last_heard else None
            s = self.session
            queued = [sh.queued_at for sh in s.unsettled.values() if not sh.copy and sh.kind == "write"] if s else []
            return True, wall - max(0.0, now - min(queued)) if queued else wall
        answer = self.catch_up_answer
        preserving = answer.get("preserving", False) if answer is not None else undo_configured
        if not preserving:
            return False, None
        at = answer.get("consistent_at") if answer is not None else None
        return True, at if at else self.out_of_order_since

    def lag(self, now: float) -> tuple[int, float]:
        """(bytes, seconds) an async member trails the primary by (queued
        writes; copy data is not counted)."""
        s = self.session
        queued = [sh.queued_at for sh in s.unsettled.values() if not sh.copy] if s is not None else []
        if not queued:
            return 0, 0.0
        return self.queued_bytes, max(0.0, now - min(queued))

    # -------------------------------------------------------------- shipping

    def ship_write(self, gseq: int, offset: int, data: bytes, on_settled: Callable[[Shipment], None], *,
                   copy: bool = False) -> Shipment | None:
        """Queue a write to this member; None if it cannot take it (not connected,
        behind, or the async queue is full — the caller marks it out of sync).
        ``copy`` data is taken while behind too, outside the queue's limit.
        Synchronous: queue order is sequence order."""
        s = self.session
        if not copy and self.backlog is not None and self.backlog.valid and not self.behind:
            return self._ship_kept(gseq, offset, data, on_settled)
        if not self.connected or s is None or (self.behind and not copy):
            return None
        if not copy and self.is_async and self.queued_bytes + len(data) > self.queue_limit:
            full = f"async queue full ({self.queued_bytes} of {self.queue_limit} bytes)"
            self.behind = True
            if self.replication is Replication.SHIPPING:
                self.set_replication(Replication.BEHIND, f"{full}; writes are marked in the bitmap until a "
                                     "mini-copy catches it up", logging.WARNING)
            else:
                log.warning("%s: member %s: %s while catching up; writes are marked in the bitmap again",
                            self.volume, self.name, full)
            self.notify_changed()
            return None
        path = s.pick_path()
        if path is None:
            return None
        if copy:
            self.note_out_of_order()
        sh = Shipment(s.next_link_seq, gseq, "write", offset, data, trio.current_time(), on_settled=on_settled,
                      copy=copy)
        s.next_link_seq += 1
        s.unsettled[sh.link_seq] = sh
        if copy:
            self.copy_bytes += len(data)
        else:
            self.queued_bytes += len(data)
        self._send(path, sh)
        return sh

    def _ship_kept(self, gseq: int, offset: int, data: bytes,
                   on_settled: Callable[[Shipment], None]) -> Shipment | None:
        """An async member's write, kept in its backlog until acknowledged:
        on the wire now if it is connected, nothing waits ahead of it and the
        queue has room; else it waits (in memory, then the journal) and None
        is returned, so the caller marks it like any write not shipped. When
        the backlog cannot keep it, the backlog is dropped: bitmap tracking."""
        b = self.backlog
        s = self.session
        now = trio.current_time()
        direct = (self.connected and s is not None and not b.has_waiting
                  and self.queued_bytes + len(data) <= self.queue_limit)
        entry = b.add(gseq, offset, data, now, waiting=not direct)
        if entry is None and direct:
            direct = False
            entry = b.add(gseq, offset, data, now, waiting=True)  # memory full: to the journal, and wait
        if entry is None:
            full = (f"async queue full ({self.queued_bytes} of {self.queue_limit} bytes"
                    f"{', no journal' if b.journal is None else ''})")
            if b.valid:  # (a journal that failed dropped it already)
                b.drop(full)
            if self.connected and s is not None:
                self.behind = True
                if self.replication is Replication.SHIPPING:
                    self.set_replication(Replication.BEHIND, f"{b.dropped_reason or full}; writes are marked "
                                         "in the bitmap until a mini-copy catches it up", logging.WARNING)
                self.notify_changed()
            return None
        if not direct:
            return None
        path = s.pick_path()
        if path is None:
            entry.waiting = True
            b.waiting.appendleft(entry)
            return None
        sh = Shipment(s.next_link_seq, gseq, "write", offset, data, now, on_settled=on_settled, entry=entry)
        s.next_link_seq += 1
        s.unsettled[sh.link_seq] = sh
        self.queued_bytes += len(data)
        self._send(path, sh)
        return sh

    async def wait_replayed(self) -> None:
        """Return once nothing waits in the backlog and what was replayed is
        acknowledged, or the link went (a copy then follows the replay)."""
        b = self.backlog
        while b is not None and self.connected and b.valid and not b.caught_up():
            changed, link_changed = b.changed, self.changed
            async with trio.open_nursery() as n:
                async def wait(event: trio.Event) -> None:
                    await event.wait()
                    n.cancel_scope.cancel()
                n.start_soon(wait, changed)
                n.start_soon(wait, link_changed)

    def kept(self, gseq: int) -> bool:
        """Write ``gseq`` waits in this member's backlog (it will be sent in order)."""
        return self.backlog is not None and self.backlog.holds(gseq)

    async def pump_backlog(self, still_primary: Callable[[], bool]) -> None:
        """Send the backlog's waiting writes, in order, while connected and
        the queue has room; returns when none waits (or the link went)."""
        b = self.backlog
        while b is not None and still_primary():
            s = self.session
            entry = b.next_waiting()
            if entry is None or not self.connected or s is None:
                return
            if self.queued_bytes and self.queued_bytes + entry.length > self.queue_limit:
                await self.wait_queue_at_most(max(0, self.queue_limit - entry.length))
                continue
            if entry.kind == "flush":
                if self._ship_flush_entry(entry) is None:
                    return
                continue
            data = await b.data_of(entry)
            if self.session is not s or not self.connected or b.next_waiting() is not entry:
                continue  # the link went, or the backlog was dropped, while the journal was read
            path = s.pick_path()
            if path is None:
                return
            sh = Shipment(s.next_link_seq, entry.gseq, "write", entry.offset, data, entry.queued_at, entry=entry)
            s.next_link_seq += 1
            s.unsettled[sh.link_seq] = sh
            self.queued_bytes += len(data)
            b.sent(entry)
            self._send(path, sh)

    def ship_group_mark(self, point: int, gseq: int, in_sync: int = 0) -> None:
        """A consistency group's mark ``point``, after write ``gseq``, in this
        async member's order: on the wire now, or waiting in the backlog
        behind the writes before it (gmd.groups). Nothing to a member behind
        (its catch-up copy is out of order anyway) or away without a backlog."""
        if self.behind:
            return
        b = self.backlog
        if b is not None and b.valid:
            direct = self.connected and self.session is not None and not b.has_waiting
            entry = b.add_flush(gseq, trio.current_time(), waiting=not direct, group_point=point, in_sync=in_sync)
            if direct and entry is not None:
                self._ship_flush_entry(entry)
            return
        self.ship_flush(gseq, in_sync=in_sync, group_point=point)

    def _ship_flush_entry(self, entry: Entry) -> Shipment | None:
        s = self.session
        path = s.pick_path() if s is not None and self.connected else None
        if path is None:
            return None
        sh = Shipment(s.next_link_seq, entry.gseq, "flush", queued_at=entry.queued_at, entry=entry,
                      group_point=entry.group_point, in_sync=entry.in_sync)
        s.next_link_seq += 1
        s.unsettled[sh.link_seq] = sh
        if self.backlog is not None and self.backlog.next_waiting() is entry:
            self.backlog.sent(entry)
        else:
            entry.waiting = False
        self._send(path, sh)
        return sh

    def ship_flush(self, gseq: int, on_settled: Callable[[Shipment], None] | None = None, *,
                   in_sync: int = 0, group_point: int = 0) -> Shipment | None:
        """Queue a barrier up to ``gseq``; ``in_sync`` tells the member how far
        every write is durable on every member in sync (it retires its mirror
        of our intents up to there). An async member whose backlog has
        writes waiting gets it behind them, in its order (it covers them): kept
        in the backlog, and None is returned."""
        b = self.backlog
        if b is not None and b.valid and b.has_waiting and not self.behind:
            b.add_flush(gseq, trio.current_time(), waiting=True, group_point=group_point, in_sync=in_sync)
            return None
        s = self.session
        if not self.connected or s is None:
            return None
        path = s.pick_path()
        if path is None:
            return None
        sh = Shipment(s.next_link_seq, gseq, "flush", queued_at=trio.current_time(), on_settled=on_settled,
                      in_sync=in_sync, group_point=group_point)
        s.next_link_seq += 1
        s.unsettled[sh.link_seq] = sh
        self._send(path, sh)
        return sh

    def _send(self, path: PeerLink, sh: Shipment) -> None:
        sh.path = path
        # Copy data is flagged: the member's disk leaves write order with it
        # (its undo log, if any, saves what it overwrites).
        event = (Write(sh.link_seq, sh.offset, sh.data, WRITE_COPY if sh.copy else 0, gseq=sh.gseq)
                 if sh.kind == "write" else Flush(sh.link_seq, in_sync=sh.in_sync, group_point=sh.group_point))
        try:
            path.send_nowait(event)
            self.bytes_shipped += len(sh.data)
        except LinkClosed:
            self.resend_from(path)

    def resend_from(self, dead: PeerLink) -> None:
        """A path died: re-send what it carried and was not acked on another path.
        The receiver acks duplicates it already applied."""
        s = self.session
        if s is None:
            return
        for sh in sorted(s.unsettled.values(), key=lambda x: x.link_seq):
            if sh.path is dead:
                path = s.pick_path()
                if path is None:
                    return  # no path left: the session ends and settles everything
                self._send(path, sh)

    def on_ack(self, ack: WriteAck | FlushAck) -> None:
        s = self.session
        if s is None:
            return
        sh = s.unsettled.pop(ack.seq, None)
        if sh is None:
            return  # a duplicate ack for a resent shipment
        if sh.kind == "write":
            if sh.copy:
                self.copy_bytes -= sh.length
            else:
                self.queued_bytes -= sh.length
                self.ack_latency.observe(trio.current_time() - sh.queued_at)
                if self._queue_waiters:
                    self._wake_queue_waiters()
            if ack.status == 0:
                self.acked_unflushed.append((sh.gseq, sh.offset, sh.length))
                if sh.entry is not None and self.backlog is not None:
                    self.backlog.acked(sh.entry)
            elif sh.entry is not None and self.backlog is not None and self.backlog.valid:
                # It could not apply it: its disk is no longer the primary's at any earlier instant.
                self.backlog.drop(f"{self.name} failed a write (errno {ack.status})")
        elif ack.status == 0:
            self.flushed_gseq = max(self.flushed_gseq, sh.gseq)
            self.acked_unflushed = [w for w in self.acked_unflushed if w[0] > sh.gseq]
            if sh.entry is not None and self.backlog is not None:
                self.backlog.acked(sh.entry)
        sh.settle(ack.status == 0, ack.status)

    async def _request(self, make_event):
        """Send a request frame built by ``make_event(request_id)`` and wait for
        the reply with that id (a read or hash reply)."""
        s = self.session
        path = s.pick_path() if s is not None and self.connected else None
        if path is None:
            raise LinkClosed(f"{self.name} is not connected")
        request = self._next_request
        self._next_request += 1
        send, recv = trio.open_memory_channel(1)
        self.reads[request] = send
        try:
            path.send_nowait(make_event(request))
            return await recv.receive()
        except trio.EndOfChannel:
            raise LinkClosed(f"{self.name} went away during a request") from None
        finally:
            self.reads.pop(request, None)

    async def read(self, offset: int, length: int) -> bytes:
        """Read bytes from this member's disk over the link (any live path)."""
        reply = await self._request(lambda r: Read(r, offset, length))
        if not isinstance(reply, ReadReply):  # read and hash replies share the request ids
            raise OSError(errno.EIO, f"{self.name} answered a read with a {type(reply).__name__}")
        if reply.status:
            raise OSError(reply.status, f"read from {self.name} failed")
        if len(reply.data) != length:
            raise OSError(errno.EIO, f"{self.name} returned {len(reply.data)} of {length} bytes")
        return bytes(reply.data)

    async def region_hashes(self, offset: int, length: int, block: int) -> tuple[int, ...]:
        """xxh3_64 of each ``block`` of [offset, offset+length) on this member's disk."""
        reply = await self._request(lambda r: HashRequest(r, offset, length, block))
        if not isinstance(reply, HashReply):
            raise OSError(errno.EIO, f"{self.name} answered a hash request with a {type(reply).__name__}")
        if reply.status:
            raise OSError(reply.status, f"hashing on {self.name} failed")
        if len(reply.hashes) != (length + block - 1) // block:
            raise OSError(errno.EIO, f"{self.name} returned {len(reply.hashes)} hashes for "
                                     f"{(length + block - 1) // block} blocks")
        return reply.hashes

    def on_read_reply(self, reply) -> None:
        send = self.reads.pop(reply.request, None)
        if send is not None:
            send.send_nowait(reply)

    def end_session(self, reason: str) -> list[Shipment]:
        """The last path closed: fail every unsettled shipment (the caller marks
        their regions out of sync). Returns them."""
        s = self.session
        failed: list[Shipment] = []
        if s is not None:
            s.closed = True
            failed = sorted(s.unsettled.values(), key=lambda x: x.link_seq)
            writes = [sh.queued_at for sh in failed if sh.kind == "write" and not sh.copy]
            if writes:
                # What it now lacks, it has lacked since the oldest of these was queued (gmd.rpo).
                since = time.time() - max(0.0, trio.current_time() - min(writes))
                self.lacking_since = since if self.lacking_since is None else min(self.lacking_since, since)
            s.unsettled.clear()
            self.queued_bytes = 0
            self._wake_queue_waiters()
            self.copy_bytes = 0
            self.behind = False  # the next session starts afresh from the bitmap exchange
            self.replication = Replication.SHIPPING
            if self.backlog is not None:
                self.backlog.session_ended()  # kept, to be replayed in order (gmd.backlog)
            for send in self.reads.values():
                send.close()  # waiting readers see EndOfChannel and try elsewhere
            self.reads.clear()
            self.session = None
            for sh in failed:
                sh.settle(False, errno.ECONNRESET)
        self.set_state(LinkState.DISCONNECTED, reason)
        return failed


def role_of(value: object) -> Role | None:
    """A role as a peer sent it (hello or STATE); None when missing or unknown."""
    try:
        return Role(value)
    except ValueError:
        return None


def disk_of(value: object) -> DiskState | None:
    """A disk state as a peer sent it; None when missing or unknown."""
    try:
        return DiskState(value)
    except ValueError:
        return None
