"""The volume engine: one volume on one node, its role, write pipeline and member links.

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
import secrets
import time
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from bitarray import bitarray

from quorum.generations import GenerationView, Verdict, compare
from statemap import CopyKind, DiskState, Fence, Role
from statemap.format import PAGE
from transport.codec import (
    Bitmap,
    Flush,
    FlushAck,
    HashReply,
    HashRequest,
    Intro,
    Ping,
    Pong,
    Read,
    ReadReply,
    State,
    Write,
    WriteAck,
)
from transport.link import LinkClosed, LinkRefused, PeerLink

from .config import VolumeConfig
from .disk import check_range
from .errors import GmdError, UsageError, errno_for
from . import splitbrain
from .disk import _pread_full
from .quorum_keeper import QuorumKeeper
from .copy import RemarkedRegions, UnsentRegions
from .replication import Applier, HashAnswerer, LinkState, MemberLink, Replication, Shipment
from .volume import LocalVolume

if TYPE_CHECKING:
    from .daemon import NodeDaemon

log = logging.getLogger(__name__)

PING_INTERVAL = 1.0
PATH_TIMEOUT = 6.0  # no frame for this long: the path is dead (a blackholed partition)
BITMAP_CHUNK_BITS = 8 * PAGE * 64  # 256 KiB of bitmap per frame at most
SWITCHOVER_TIMEOUT = 30.0  # seconds the target of a switchover has to take over
REDIAL_MIN = 0.1  # seconds before the first redial of a member that went away
REDIAL_MAX = 0.25  # seconds between dials of an unreachable member at most: a returning member is caught up at once
AUTO_FLUSH_INTERVAL = 2.0  # retire extents even if the application never fsyncs
MAX_REMOTE_READ = 4 * 1024 * 1024  # per Read frame when a read goes to a member


class NotPrimary(GmdError):
    pass


@dataclass(eq=False)
class _WriteCtx:
    """Bookkeeping of one write until every member's part is settled."""

    offset: int
    length: int
    gseq: int
    pending: int = 1  # the writer itself, plus one per async shipment


class _RangeLocks:
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


class VolumeEngine:
    """One volume on this node: up/down, role, I/O (primary), member links."""

    def __init__(self, daemon: NodeDaemon, config: VolumeConfig):
        self.daemon = daemon
        self.config = config
        self.node = daemon.node
        self.local: LocalVolume | None = None
        self.role = Role.SECONDARY
        self.members: dict[str, MemberLink] = {
            name: MemberLink(name, m.mode, queue_limit=config.async_queue, volume=config.name)
            for name, m in config.members.items() if name != self.node
        }
        self._nursery: trio.Nursery | None = None
        self._cancel: trio.CancelScope | None = None
        self._locks = _RangeLocks()
        self._gseq = 0
        self._completed_gseq = 0
        self._local_flushed_gseq = 0
        self._in_sync_gseq = 0  # durable on us and every member in sync (told to members with flushes)
        self._seen_gseq = 0  # highest sequence of a primary's write applied here (a new primary goes on from it)
        # A primary we followed went away without handing over: until the next
        # primary has reconciled the survivors, what each may lack is unknown.
        self.lost_primary: str | None = None
        self._inflight = 0
        self._idle = trio.Event()
        self._idle.set()
        self._appliers: dict[str, Applier] = {}
        self.unsent = UnsentRegions(config.size, config.region_size)  # regions members surely miss
        self.remarked = RemarkedRegions(config.size, config.region_size)  # marked since a copy pass read them
        self._hash_answerers: dict[str, HashAnswerer] = {}  # member -> answers its hash requests
        self._dirty_since_flush = False
        self.role_epoch = 0  # bumped on every role change: FUSE handles of an older epoch get EIO
        self.want_loop = False
        self.loop_device: str | None = None
        self.copies: dict[str, Any] = {}  # member -> CopyProgress of a running copy
        self.copy_bytes_sent = 0  # bytes the copy engine shipped (after hash compare)
        self.copy_rate = config.copy_rate  # bytes/s per member copy; 0: unlimited
        self.copy_history: list[tuple[str, Any]] = []  # (member, CopyProgress) of every pass started
        self.verifying: dict[str, Any] = {}  # member -> CopyProgress of a running verify
        self.verify_reports: dict[str, dict[str, Any]] = {}  # member -> its last verify's report
        self._verify_done: dict[str, trio.Event] = {}  # member -> set when its running verify ends
        self._copying: set[str] = set()
        self._going_down = False
        self._dial_now: dict[str, trio.Event] = {}  # member -> set when it pokes us (see _poke)
        self.discarding: str | None = None  # split-brain peer whose data replaces ours (gmd resolve)
        self.saved_images: list[str] = []  # images of discarded regions saved by gmd resolve
        self.writes = 0
        self.last_write_at = -1e9  # trio time an application write last started (the copy yields to them)
        self.bytes_written = 0
        self.quorum = QuorumKeeper(self)

    # --------------------------------------------------------------- naming

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def is_up(self) -> bool:
        return self.local is not None

    @property
    def statemap(self):
        return self._require_up().statemap

    def _require_up(self) -> LocalVolume:
        if self.local is None:
            raise UsageError(f"volume {self.name} is down on {self.node} (run 'gmd up {self.name}')")
        return self.local

    # ------------------------------------------------------------ lifecycle

    async def up(self, *, loop: bool = False) -> None:
        """Attach the local member and start connecting to the others. With
        ``loop``, a loop device is attached to the volume's file whenever this
        node is primary (and detached when it stops being primary)."""
        self.want_loop = self.want_loop or loop
        if self.local is not None:
            return
        self.local = await LocalVolume.open(self.config, self.node, self.daemon.limiter)
        self._going_down = False
        self.role = Role.SECONDARY
        sm = self.local.statemap
        if sm.sb.role != Role.SECONDARY:
            sm.set_role(Role.SECONDARY)  # a daemon always comes up secondary
            await self.local.writer.sync_all()
        for name, m in self.members.items():
            m.peer_disk = sm.sb.peers[name].disk.value if name in sm.sb.peers else None
        self.daemon.nursery.start_soon(self._run)
        log.info("%s: up (disk %s)", self.name, sm.sb.disk.value)

    async def _run(self) -> None:
        with trio.CancelScope() as scope:
            self._cancel = scope
            async with trio.open_nursery() as n:
                self._nursery = n
                for peer in self.members:
                    if self.node < peer:  # the lower name dials; the other accepts
                        n.start_soon(self._dial_loop, peer)
                    else:
                        n.start_soon(self._poke, peer)
                n.start_soon(self._auto_flush)
                n.start_soon(self.quorum.run)
        self._nursery = None

    async def down(self, *, force: bool = False) -> None:
        """Demote if primary, close member sessions, close the local member cleanly."""
        if self.local is None:
            return
        if self.role == Role.PRIMARY:
            await self.demote(force=force)
        self._going_down = True  # refuse new sessions while closing
        for m in self.members.values():
            s = m.session
            if s is not None:
                for p in list(s.paths):
                    await p.aclose(f"volume {self.name} going down on {self.node}")
                self._end_session(m, "volume down")
        if self._cancel is not None:
            self._cancel.cancel()
        local, self.local = self.local, None
        await local.close()
        for m in self.members.values():
            m.set_state(LinkState.DISCONNECTED, "volume down")
        log.info("%s: down", self.name)

    # ---------------------------------------------------------------- roles

    async def promote(self, *, force: bool = False) -> None:
        local = self._require_up()
        if self.role == Role.PRIMARY:
            return
        other = [m.name for m in self.members.values() if m.connected and m.peer_role == Role.PRIMARY]
        if other:
            raise GmdError(f"{self.name}: {', '.join(other)} is primary; demote it first (or use switchover)")
        sm = local.statemap
        # A verdict from before we caught up (and adopted a newer generation) is stale.
        newer = [m.name for m in self.members.values()
                 if m.connected and m.verdict in (Verdict.LOCAL_BEHIND, Verdict.LOCAL_NEEDS_FULL)
                 and getattr(m, "verdict_generation", None) == sm.sb.generations.current]
        if newer and not force:
            raise GmdError(f"{self.name}: {', '.join(newer)} holds newer data than {self.node}; promoting "
                           f"{self.node} would lose it. Promote {newer[0]} instead")
        q = self.quorum
        votes, needed = q.member_votes(), q.needed()
        if votes < needed and sm.sb.disk == DiskState.UPTODATE:
            g = sm.sb.generations
            votes += await q.ask_witnesses("promote", g.current, g.history, q.outdated())
        if votes < needed:
            if not force:
                witnesses = "; ".join(f"witness {w}: {a[1]}" for w, a in q.answers.items())
                raise GmdError(
                    f"{self.name}: no quorum: {votes} of {needed} votes needed ({q.expected()} expected) are "
                    f"present{' (' + witnesses + ')' if witnesses else ''}. A primary out of sight may still be "
                    f"writing. If it is known to be down: 'gmd primary {self.name} --force' (or 'gmd quorum "
                    f"{self.name} --expected-votes N'); if both sides are forced, their data diverges")
            log.warning("%s: promoted WITHOUT quorum (%d of %d votes) by the operator's --force; writes go on "
                        "without quorum until demoted", self.name, votes, needed)
            sm.set_forced_primary(True)
        if sm.sb.disk != DiskState.UPTODATE:
            if not force:
                raise GmdError(
                    f"{self.name}: local disk is {sm.sb.disk.value}, not uptodate; promoting it would "
                    "serve stale or inconsistent data. 'gmd primary --force' makes this copy the source "
                    "(other members then get a full copy)")
            log.warning("%s: forced promotion of a %s disk; it becomes the copy source", self.name, sm.sb.disk.value)
            sm.make_copy_source()
            sm.begin_use()
        # Our bitmap for a member we track nothing for starts now, at our current
        # generation: the first write without it then starts a new generation,
        # so a member that also wrote meanwhile is seen as split-brain, never
        # silently overwritten (a map from our secondary days may hold an
        # older generation here).
        # Survivors of a lost primary reconcile before anyone is called up to
        # date: what we mirrored of its intents is marked for every member
        # now, and each connected member's session is reopened below, so that
        # its bitmap (with its own marks of that primary's writes) reaches us.
        if sm.identity is None:
            # A map from before volume identities: take the one a connected
            # member already learned, or give the volume one now; members
            # learn it when told their disk state.
            known = sorted({i for m in self.members.values() if m.connected
                            and isinstance(i := (m.peer_hello_info or {}).get("identity"), str) and i})
            sm.adopt_identity(known[0] if len(known) == 1 else secrets.token_hex(16))
            log.info("%s: volume identity %s… %s", self.name, sm.identity[:8],
                     "learned from a member" if len(known) == 1 else "created by the primary")
        reconcile = self.lost_primary
        if reconcile is not None:
            self._fold_lost_primary(reconcile, f"taking over from lost primary {reconcile}")
        # Our sequence goes on from the last primary's, so members retire what
        # they mirror of its writes and ours in one order.
        self._gseq = max(self._gseq, self._seen_gseq)
        self._completed_gseq = max(self._completed_gseq, self._gseq)
        g = sm.sb.generations.current
        for name, rec in sm.sb.peers.items():
            if rec.copy is None and not sm.out_of_sync_bytes(name) and rec.bitmap_gen != g:
                sm.set_bitmap_generation(g, member=name)
        self.role = Role.PRIMARY
        self.role_epoch += 1
        sm.set_role(Role.PRIMARY)
        sm.set_promoted_at(time.time())
        await local.writer.sync_all()
        self._role_changed()
        if self.want_loop and self.device_path is not None:
            self.loop_device = await trio.to_thread.run_sync(_losetup_attach, self.device_path)
            log.info("%s: loop device %s", self.name, self.loop_device)
        for m in self.members.values():
            if not m.connected:
                continue
            if reconcile is not None and m.session is not None:
                log.info("%s: reopening the session with %s to reconcile after the loss of %s",
                         self.name, m.name, reconcile)
                for p in list(m.session.paths):
                    await p.aclose(f"new primary {self.node} reconciles after the loss of {reconcile}")
            else:
                await self._tell_member_state(m)
        self.lost_primary = None
        log.info("%s: primary", self.name)

    def device_holders(self) -> list[str]:
        """Who keeps the device in use: open handles of the volume file (other than
        our own loop device's) and mounts of the loop device."""
        holders = []
        fs = self.daemon.fs
        if fs is not None:
            n = fs.open_handles(self) - (1 if self.loop_device else 0)
            if n > 0:
                holders.append(f"{n} open handle(s) of {self.device_path}")
        if self.loop_device is not None:
            try:
                with open("/proc/self/mounts") as f:
                    for line in f:
                        parts = line.split()
                        if parts and parts[0] == self.loop_device:
                            holders.append(f"{self.loop_device} mounted on {parts[1]}")
            except OSError:
                pass
        return holders

    async def demote(self, *, force: bool = False) -> None:
        """Become secondary: drain and flush writes everywhere. Refuses while the
        device is in use (a mounted file system, an open file) unless ``force``:
        taking it away would turn that user's I/O into errors."""
        local = self._require_up()
        if self.role != Role.PRIMARY:
            return
        holders = self.device_holders()
        if holders and not force:
            raise GmdError(f"{self.name}: device in use ({'; '.join(holders)}); unmount or close it first, "
                           "or add --force to demote anyway (its users then get I/O errors)")
        if holders:
            log.warning("%s: demoting with the device in use (%s)", self.name, "; ".join(holders))
        if self.loop_device is not None:
            # Detach first: the loop driver flushes through us while we are primary.
            await trio.to_thread.run_sync(_losetup_detach, self.loop_device)
            self.loop_device = None
        self.role = Role.SECONDARY  # no new writes from here on
        self.role_epoch += 1
        self._role_changed()
        self.quorum.notify()  # suspended writes wake and fail
        await self._idle.wait()
        await self.flush_barrier()
        local.statemap.set_role(Role.SECONDARY)
        local.statemap.set_forced_primary(False)
        await local.writer.sync_all()
        await self.quorum.release()
        for m in self.members.values():
            if m.connected:
                await self._send_state(m, {"role": Role.SECONDARY.value})
        log.info("%s: secondary", self.name)

    def _role_changed(self) -> None:
        if self.daemon.fs is not None:
            self.daemon.fs.role_changed(self)

    @property
    def device_path(self) -> str | None:
        """The volume's file in the node's mount, while this node is primary."""
        if self.role == Role.PRIMARY and self.daemon.fs is not None:
            return str(self.daemon.node_config.mount / self.name)
        return None

    # ----------------------------------------------------------------- I/O

    def _require_primary(self) -> LocalVolume:
        local = self._require_up()
        if self.role != Role.PRIMARY:
            raise NotPrimary(f"{self.name} is not primary on {self.node}")
        return local

    async def read(self, offset: int, length: int) -> bytes:
        """Read from the local disk when it holds current data for the range;
        otherwise from an up-to-date member over the link, never stale bytes."""
        local = self._require_primary()
        check_range(offset, length, self.config.size, writing=False)
        if self._local_current(offset, length):
            await self._merge_before_read(offset, length)
            return await local.read(offset, length)
        for m in self.members.values():
            if m.connected and m.peer_disk == DiskState.UPTODATE.value:
                try:
                    data = b""
                    for start in range(offset, offset + length, MAX_REMOTE_READ):
                        data += await m.read(start, min(MAX_REMOTE_READ, offset + length - start))
                    return data
                except LinkClosed:
                    continue
        raise OSError(errno.EIO, f"{self.name}: local copy is {local.statemap.sb.disk.value} and no "
                                 "up-to-date member is reachable for this read")

    async def _merge_before_read(self, offset: int, length: int) -> None:
        """A read of regions a connected member still has marked (a merge after
        a crash, or a mini-copy, not there yet) first brings those regions to the
        member, so after the read every member returns the same bytes for them.
        The bits stay until the copy pass clears them after a flush."""
        sm = self.local.statemap
        regions = sm.regions_of(offset, length)
        rs = self.config.region_size
        for m in self.members.values():
            if not m.connected or m.behind:
                continue
            marked = set(sm.out_of_sync_in(m.name, regions))
            rec = sm.sb.peers.get(m.name)
            if rec is not None and rec.copy is not None and rec.copy.kind is CopyKind.MERGE:
                # A full merge (sync mode, no intent log) has no bits: every
                # region at or above its fence is still to be merged.
                marked.update(r for r in regions if r * rs >= rec.copy.fence)
            for r in sorted(marked):
                token = await self._locks.acquire(r * rs, (r + 1) * rs)
                try:
                    data = await self.local.read(r * rs, rs)
                    sh = m.ship_write(self._completed_gseq, r * rs, data, lambda sh: None)
                finally:
                    self._locks.release(token)
                if sh is not None:
                    await sh.done.wait()

    def _local_current(self, offset: int, length: int) -> bool:
        sm = self.local.statemap
        if sm.sb.disk == DiskState.UPTODATE:
            return True
        fence = sm.sb.local_copy
        return fence is not None and sm.sb.disk == DiskState.COPYING and offset + length <= fence.fence

    async def write(self, offset: int, data: bytes) -> int:
        """Write through the mode's completion rule; returns its sequence number
        once it is complete."""
        local = self._require_primary()
        length = len(data)
        check_range(offset, length, self.config.size, writing=True)
        self._inflight += 1
        self.last_write_at = trio.current_time()
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        token = await self._locks.acquire(offset, offset + length)
        try:
            # Quorum first, and members already away fenced, before the disk is touched.
            away_before = [m for m in self.members.values() if not (m.connected and not m.behind)]
            await self.quorum.settle(away_before)
            await local.begin_intent(offset, length)
            if self.role != Role.PRIMARY:
                # Demoted while this write waited (a switchover, or stepping down):
                # it must not reach any disk now.
                raise OSError(errno.EIO, f"{self.name}: no longer primary on {self.node}; write not done")
            self._gseq += 1
            ctx = _WriteCtx(offset, length, self._gseq)
            waits: list[tuple[MemberLink, Shipment]] = []
            away: list[MemberLink] = []
            unsent: list[MemberLink] = []  # away, and never sent this write
            # No await from here until every shipment is queued: queue order is gseq order.
            for m in self.members.values():
                sh = m.ship_write(ctx.gseq, offset, data, self._settled_callback(m, ctx))
                if sh is None:
                    away.append(m)
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
                await self._mark_away(m, offset, length, sent=m not in unsent)
            lost = [m for m in away if m not in away_before]
            if lost:
                # A member missed it: it completes only once quorum knows that member is behind.
                await self.quorum.settle(lost)
            if failed_local is not None:
                await self._local_failed(failed_local)
                raise OSError(errno_for(failed_local), f"local write failed: {failed_local}")
            self._completed_gseq = max(self._completed_gseq, ctx.gseq)
            self._dirty_since_flush = True
            self.writes += 1
            self.bytes_written += length
            self._settle_part(ctx)
            return ctx.gseq
        finally:
            self._locks.release(token)
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    def _settled_callback(self, m: MemberLink, ctx: _WriteCtx) -> Callable[[Shipment], None]:
        def settled(sh: Shipment) -> None:
            if not m.is_async:
                return  # the writer waits for sync shipments itself
            if sh.ok:
                self._settle_part(ctx)
            else:
                self._nursery_or_daemon().start_soon(self._async_failed, m, ctx)
        return settled

    async def _async_failed(self, m: MemberLink, ctx: _WriteCtx) -> None:
        await self._mark_away(m, ctx.offset, ctx.length)
        self._settle_part(ctx)

    def _settle_part(self, ctx: _WriteCtx) -> None:
        ctx.pending -= 1
        if ctx.pending == 0 and self.local is not None:
            self.local.end_intent(ctx.offset, ctx.length, ctx.gseq)

    async def _mark_away(self, m: MemberLink, offset: int, length: int, *, sent: bool = True) -> None:
        """``m`` missed a write: it was never ``sent`` it, or it may not have applied it."""
        local = self.local
        if local is None:
            return
        if not sent:
            self.unsent.note(m.name, offset, length)
        self.remarked.note(m.name, offset, length)  # a copy pass that read these regions before keeps their bits
        sm = local.statemap
        rec = sm.sb.peers.get(m.name)
        if rec is not None and rec.disk == DiskState.UPTODATE:
            sm.set_peer_disk(m.name, DiskState.OUTDATED)
        await local.mark_out_of_sync(m.name, offset, length)
        if m.connected and m.peer_disk == DiskState.UPTODATE.value:
            m.peer_disk = DiskState.OUTDATED.value
            await self._send_state(m, {"your_disk": DiskState.OUTDATED.value})
        if m.behind and m.connected and self.role == Role.PRIMARY:
            self._start_copy(m)  # an async member that fell behind is caught up while its link is up

    async def commit_fork(self, generation: str, newly_away: list[MemberLink]) -> None:
        """Start generation ``generation`` because the members in ``newly_away``
        miss writes (their bitmaps stay relative to the old one), and make it
        durable on every connected member in sync before any write relies on it:
        the STATE frame, then a flush acknowledged after it."""
        sm = self.local.statemap
        old = sm.sb.generations.current
        for m in newly_away:
            sm.set_peer_disk(m.name, DiskState.OUTDATED)
        sm.start_new_generation(generation)
        for m in self.members.values():
            if m.connected and not m.behind and sm.sb.peers[m.name].bitmap_gen == old:
                sm.set_bitmap_generation(generation, member=m.name)  # still in sync: it moves along
        await self.local.writer.sync_all()
        log.info("%s: new generation %s (members away: %s)", self.name, generation,
                 ", ".join(m.name for m in newly_away))
        waits = []
        for m in self.members.values():
            if m.connected and not m.behind and m.peer_disk == DiskState.UPTODATE.value:
                await self._send_state(m, {"generation": generation})
                sh = m.ship_flush(self._completed_gseq, in_sync=self._in_sync_gseq)
                if sh is not None and not m.is_async:
                    waits.append(sh)
        for sh in waits:
            await sh.done.wait()

    async def flush(self) -> None:
        """The application's fsync: a barrier on the local disk and every member."""
        self._require_primary()
        await self.flush_barrier()

    async def flush_barrier(self) -> None:
        local = self._require_up()
        point = self._completed_gseq
        self._dirty_since_flush = False
        waits = []
        for m in self.members.values():
            sh = m.ship_flush(point, on_settled=lambda sh, m=m: self._maybe_retire(), in_sync=self._in_sync_gseq)
            if sh is not None and not m.is_async:
                waits.append((m, sh))
        await local.device.flush()
        self._local_flushed_gseq = max(self._local_flushed_gseq, point)
        for m, sh in waits:
            await sh.done.wait()
        self._maybe_retire()

    def _maybe_retire(self) -> None:
        """Tell the state map how far writes are durable on every member."""
        if self.local is None:
            return
        point = self._local_flushed_gseq
        for m in self.members.values():
            if m.connected and not m.behind and m.session is not None:
                point = min(point, max(m.flushed_gseq, m.session_started_gseq))
        self._in_sync_gseq = max(self._in_sync_gseq, point)
        self.local.note_flushed(point)

    async def _auto_flush(self) -> None:
        while True:
            await trio.sleep(AUTO_FLUSH_INTERVAL)
            if self.role == Role.PRIMARY and self._dirty_since_flush and self.local is not None:
                try:
                    await self.flush_barrier()
                    await self.local.writer.sync_all()
                except Exception as e:  # keep serving; the error is logged
                    log.error("%s: background flush failed: %s", self.name, e)

    async def _local_failed(self, exc: BaseException) -> None:
        log.error("%s: local disk failed: %s", self.name, exc)
        if self.local is not None:
            self.local.statemap.set_disk(DiskState.FAILED)
            try:
                await self.local.writer.sync_all()
            except Exception:
                pass

    def _nursery_or_daemon(self) -> trio.Nursery:
        return self._nursery or self.daemon.nursery

    # ------------------------------------------------------------ handshake

    def hello_info(self) -> dict[str, Any]:
        sm = self._require_up().statemap
        return {
            "role": self.role.value,
            "disk": sm.sb.disk.value,
            "generation": self._generation_info(),
            # What we wrote that each peer lacks: lets a peer in split-brain plan
            # a resolution (gmd resolve --dry-run) before any session exists.
            "marked": {name: splitbrain.marked_summary(sm.out_of_sync_regions(name)) for name in sm.sb.peers},
            "discard_local": self.discarding,  # the peer we yield to in a split-brain resolution
            "promoted_at": sm.sb.promoted_at,
            "identity": sm.identity,  # which life of the volume our data belongs to
            # A copy target (gmd clean) waits for a full copy whatever the
            # primary's map says about it.
            "awaiting_full_copy": sm.sb.local_copy is not None and sm.sb.local_copy.kind == CopyKind.FULL,
        }

    def _generation_info(self) -> dict[str, Any]:
        g = self._require_up().statemap.sb.generations
        peers = self.local.statemap.sb.peers
        return {"current": g.current, "history": list(g.history),
                "bitmap_for": {name: p.bitmap_gen for name, p in peers.items()}}

    def make_intro(self, path: int, session: str, *, poke: bool = False) -> Intro:
        """What this member says about the volume to a peer that has proved the
        secret (never before: see transport.link)."""
        info = self.hello_info()
        if poke:
            info["poke"] = True
        return Intro(node=self.node, volume=self.name, size=self.config.size,
                     region_size=self.config.region_size, extent_size=self.config.extent_size,
                     path=path, session=session, info=info)

    def check_peer_hello(self, hello: Intro) -> str | None:
        """A refusal reason for an authenticated peer's intro, or None (used by
        both ends). Only ever called after the peer proved the secret."""
        if self.local is None or self._going_down:
            return f"volume {self.name} is down on {self.node}"
        if hello.node not in self.members:
            return f"node {hello.node} is not a member of volume {self.name}"
        self.members[hello.node].peer_hello_info = hello.info  # also when refused: resolve plans from it
        for field_name in ("size", "region_size", "extent_size"):
            ours, theirs = getattr(self.config, field_name), getattr(hello, field_name)
            if ours != theirs:
                return (f"volume {self.name} {field_name} mismatch: {self.node} has {ours}, "
                        f"{hello.node} has {theirs}")
        info = hello.info
        ours, theirs = self.local.statemap.identity, info.get("identity")
        if ours and isinstance(theirs, str) and theirs and theirs != ours:
            return (f"{hello.node} holds another life of volume {self.name} (identity {theirs[:8]}…, ours "
                    f"{ours[:8]}…): it was created or rebuilt apart from ours, so nothing of it relates to "
                    f"our data; run 'gmd clean {self.name}' on the member that is to receive a full copy")
        if info.get("role") == Role.PRIMARY and self.role == Role.PRIMARY:
            return f"both {self.node} and {hello.node} are primary for {self.name} (split-brain risk)"
        verdict = self._verdict(hello)
        resolving = self.discarding == hello.node or info.get("discard_local") == self.node
        if verdict == Verdict.SPLIT_BRAIN and resolving:
            return None  # one side discards its changes (gmd resolve): it becomes the copy target
        if verdict == Verdict.SPLIT_BRAIN and self.config.split_brain != "disconnect":
            loser, why = splitbrain.policy_loser(self.config.split_brain, self.node, self.hello_info(),
                                                 hello.node, info)
            loser_role = self.role.value if loser == self.node else info.get("role")
            if loser is not None and loser_role != Role.PRIMARY.value:
                if loser == self.node:
                    self.discarding = hello.node
                log.warning("%s: split-brain with %s resolved by %s: %s's changes are discarded (saved first)",
                            self.name, hello.node, why, loser)
                return None
            if loser is not None:
                why += f", but {loser} is primary: demote it and it resolves"
        if verdict == Verdict.UNRELATED and ours and theirs == ours:
            return self._too_old(hello)
        if verdict in (Verdict.SPLIT_BRAIN, Verdict.UNRELATED):
            reason = (f"{verdict.value}: {self.node} and {hello.node} hold diverging data of {self.name}; "
                      "nothing is overwritten, the link stays down")
            if verdict == Verdict.SPLIT_BRAIN and self.config.split_brain != "disconnect":
                reason += f" ({why})"
            m = self.members[hello.node]
            if not m.connected:  # both ends show it, the accepting one too
                m.set_state(LinkState.STANDALONE, reason)
            return reason
        if self.role == Role.PRIMARY and verdict in (Verdict.LOCAL_BEHIND, Verdict.LOCAL_NEEDS_FULL):
            return (f"{hello.node} holds newer data of {self.name} than primary {self.node}; "
                    "refusing to connect (split-brain risk)")
        return None

    def _too_old(self, hello: Intro) -> str:
        """Same volume identity, no generation in common: one side's map comes
        from a time further back than the history reaches (a restored backup).
        Nothing relates the two by bitmap; the older one needs a full copy, and
        is not up to date meanwhile."""
        sm = self.local.statemap
        peer_primary = hello.info.get("role") == Role.PRIMARY.value
        if peer_primary and self.role != Role.PRIMARY:
            old = self.node
            if sm.sb.disk == DiskState.UPTODATE:
                sm.set_disk(DiskState.OUTDATED)
        elif self.role == Role.PRIMARY:
            old = hello.node
            rec = sm.sb.peers.get(hello.node)
            if rec is not None and rec.disk == DiskState.UPTODATE:
                sm.set_peer_disk(hello.node, DiskState.OUTDATED)
            self.members[hello.node].peer_disk = DiskState.OUTDATED.value
        else:
            old = None
        who = (f"{old}'s data" if old else f"the data of {self.node} or {hello.node}")
        clean_on = old or "the member whose map was restored"
        reason = (f"{who} is too old to relate by history to the other's: both are volume {self.name} "
                  f"(identity {sm.identity[:8]}…), but no generation is in common (a map restored from an "
                  f"old backup?). A full copy is needed: run 'gmd clean {self.name}' on {clean_on}, then "
                  "'gmd up' it")
        m = self.members[hello.node]
        if not m.connected:
            m.set_state(LinkState.STANDALONE, reason)
        return reason

    def _verdict(self, hello: Intro) -> Verdict:
        g = hello.info.get("generation", {})
        peer = GenerationView(str(g.get("current", "")), tuple(g.get("history", ())),
                              dict(g.get("bitmap_for", {})))
        mine = self._generation_info()
        local = GenerationView(mine["current"], tuple(mine["history"]), mine["bitmap_for"])
        return compare(self.node, local, hello.node, peer)

    # --------------------------------------------------------------- sessions

    async def _dial_loop(self, peer: str) -> None:
        """Keep a session to ``peer`` up: dial its addresses with backoff; once one
        path is in, keep every other path dialled into the same session. The
        session lives while any path lives."""
        m = self.members[peer]
        node = self.daemon.config.node(peer)
        backoff = REDIAL_MIN
        while self.local is not None:
            session_id = secrets.token_hex(8)
            poked = self._dial_now[peer] = trio.Event()  # a poke during this dial counts too
            if m.state is not LinkState.STANDALONE:
                m.set_state(LinkState.CONNECTING, m.reason)
            first: PeerLink | None = None
            first_index = 0
            last_error = "no address"
            for i, addr in enumerate(node.addresses):
                try:
                    first = await self.daemon.dial(self, addr, i, session_id)
                    first_index = i
                    break
                except LinkRefused as e:
                    last_error = str(e)
            if first is None:
                refused = "refus" in last_error or "authentication" in last_error
                m.set_state(LinkState.STANDALONE if refused else LinkState.DISCONNECTED, last_error)
                with trio.move_on_after(backoff):
                    await poked.wait()
                if poked.is_set():
                    log.info("%s: %s came up (poked us); dialling it now", self.name, peer)
                    backoff = REDIAL_MIN
                else:
                    backoff = min(backoff * 2, REDIAL_MAX)
                continue
            backoff = REDIAL_MIN
            async with trio.open_nursery() as n:
                for i, addr in enumerate(node.addresses):
                    n.start_soon(self._keep_path, m, i, addr, session_id, first if i == first_index else None)

    async def _poke(self, peer: str) -> None:
        """Coming up, tell a member that dials us (a lower name) to dial now
        rather than at its next retry: an authenticated handshake whose hello
        says "poke", closed at once; no session. A returning member is then
        caught up within a round trip, not a redial interval."""
        node = self.daemon.config.node(peer)
        for i, addr in enumerate(node.addresses):
            try:
                link = await self.daemon.dial(self, addr, i, "poke", poke=True)
            except LinkRefused as e:
                log.debug("%s: poking %s at %s: %s", self.name, peer, addr, e)
                continue
            await link.aclose("poked", tell_peer=False)
            return

    def poked(self, peer: str) -> None:
        """``peer`` came up: dial it now if we are waiting to retry."""
        event = self._dial_now.get(peer)
        if event is not None:
            event.set()

    def _session_alive(self, m: MemberLink, session_id: str) -> bool:
        s = m.session
        return s is not None and s.id == session_id and not s.closed

    async def _keep_path(self, m: MemberLink, index: int, addr, session_id: str, link: PeerLink | None) -> None:
        """One path of a dialled session: run it, redial it while the session lives."""
        if link is None:
            with trio.move_on_after(10):
                while not self._session_alive(m, session_id):
                    await trio.sleep(0.05)
        while True:
            if link is None:
                if not self._session_alive(m, session_id):
                    return
                try:
                    link = await self.daemon.dial(self, addr, index, session_id)
                except LinkRefused:
                    await trio.sleep(0.5)
                    continue
            await self.run_path(link, link.remote, dialled=True)
            link = None
            if not self._session_alive(m, session_id):
                return
            await trio.sleep(0.2)

    async def run_path(self, link: PeerLink, hello: Intro, *, dialled: bool) -> None:
        """Run one path (from dial or accept) until it closes."""
        m = self.members.get(hello.node)
        if m is None or self.local is None:
            await link.aclose("not a member here")
            return
        sid = hello.session
        new_session = m.session is None or m.session.id != sid
        if new_session:
            if m.session is not None:
                old = m.session
                for p in list(old.paths):
                    await p.aclose("replaced by a new session")
                self._end_session(m, "replaced by a new session")
            from .replication import Session
            m.session = Session(sid, m.name)
            m.session_started_gseq = self._completed_gseq
            m.flushed_gseq = self._completed_gseq
            m.peer_role = hello.info.get("role")
            m.peer_disk = hello.info.get("disk")
            m.peer_hello_info = hello.info
            m.behind = False
            m.bitmap_done = trio.Event()
            m.verdict = self._verdict(hello)
            m.verdict_generation = self.local.statemap.sb.generations.current
            if m.peer_role == Role.PRIMARY.value:
                self._primary_claimed(m)
        session = m.session
        session.paths.append(link)
        try:
            async with trio.open_nursery() as n:
                link.start(n)
                n.start_soon(self._pinger, link)
                if new_session:
                    n.start_soon(self._open_session, m, link)
                await self._receive_loop(m, link)
                n.cancel_scope.cancel()
        finally:
            if link in session.paths:
                session.paths.remove(link)
            with trio.CancelScope(shield=True):
                await link.aclose(link.close_reason or "path closed", tell_peer=not link.closed)
            if m.session is session:
                if not any(not p.closed for p in session.paths):
                    self._end_session(m, link.close_reason or "connection lost")
                else:
                    m.resend_from(link)

    def _end_session(self, m: MemberLink, reason: str) -> None:
        if m.session is None:
            return
        # Before anything can retire: what the member acked but never flushed
        # may be gone with it. Marked in memory now (no await), committed lazily:
        # those extents are still hot, because retirement waits for its flush.
        unflushed, m.acked_unflushed = m.acked_unflushed, []
        if unflushed and self.local is not None:
            for _gseq, offset, length in unflushed:
                self.local.statemap.mark_out_of_sync(m.name, offset, length)
            rec = self.local.statemap.sb.peers.get(m.name)
            if rec is not None and rec.disk == DiskState.UPTODATE:
                self.local.statemap.set_peer_disk(m.name, DiskState.OUTDATED)
        failed = m.end_session(reason)
        applier = self._appliers.pop(m.name, None)
        if applier is not None:
            applier.close()  # nothing more of this session reaches the disk
        if m.peer_role == Role.PRIMARY.value and self.role != Role.PRIMARY:
            self._fold_lost_primary(m.name, f"primary {m.name} lost ({reason})")
        self._hash_answerers.pop(m.name, None)
        if failed:
            log.warning("%s: member %s lost with %d shipments unacked: %s", self.name, m.name, len(failed), reason)
        else:
            log.info("%s: member %s disconnected: %s", self.name, m.name, reason)
        self._maybe_retire()
        self.quorum.notify()

    def _fold_lost_primary(self, primary: str, why: str) -> None:
        """The primary we followed is gone without handing over (killed, cut
        off, or replaced by another): a write of it not yet durable on every
        member in sync may be on some survivors and not on others. Mark the
        extents we hold hot for it (our mirror of its intents) out of sync for
        every other member (it lacks none of its own writes; what it wrote that
        nobody got, its own crash recovery marks). The next primary collects these marks from every survivor
        through the bitmap exchange of a new session, and copies them before it
        calls anyone up to date."""
        if self.local is None:
            return
        sm = self.local.statemap
        empty = [name for name in sm.sb.peers if name != primary and not sm.out_of_sync_bytes(name)]
        folded = sm.fold_intents(source=primary)
        # The marks are relative to our current generation. A bitmap that was
        # empty is now a bitmap of this generation: so the first write a new
        # primary makes without that member forks the generation, and a member
        # that wrote meanwhile is seen as split-brain, never silently behind.
        g = sm.sb.generations.current
        for name in empty:
            if sm.sb.peers[name].bitmap_gen != g:
                sm.set_bitmap_generation(g, member=name)
        self.lost_primary = primary
        if folded:
            log.warning("%s: %s: the %d extents it was writing are marked out of sync for every member until a "
                        "primary has reconciled them", self.name, why, len(folded))
        else:
            log.info("%s: %s; none of its writes were in flight here", self.name, why)

    def _primary_claimed(self, m: MemberLink) -> None:
        """``m`` says it is primary. Another member we still took for primary is
        not any more: no write of it reaches our disk again, and what it was
        writing is folded now, before our bitmap goes to ``m``."""
        if self.role == Role.PRIMARY:
            return
        for other in self.members.values():
            if other is m or other.peer_role != Role.PRIMARY.value or other.session is None:
                continue
            applier = self._appliers.pop(other.name, None)
            if applier is not None:
                applier.close()
            self._fold_lost_primary(other.name, f"{m.name} took over from primary {other.name}")
            for p in list(other.session.paths):
                self._nursery_or_daemon().start_soon(p.aclose, f"{m.name} is primary now")

    async def _open_session(self, m: MemberLink, link: PeerLink) -> None:
        """First path of a session: exchange bitmaps, then the primary tells the
        member its disk state. A path that closes meanwhile just ends it."""
        try:
            await self._open_session_on(m, link)
        except LinkClosed as e:
            log.info("%s: session with %s closed while opening: %s", self.name, m.name, e)

    async def _open_session_on(self, m: MemberLink, link: PeerLink) -> None:
        if self.discarding == m.name:
            # Resolving a split-brain by discarding our changes: first learn what
            # the peer changed, and save our data of every diverging region,
            # before our bitmap lets the peer start copying over it.
            with trio.move_on_after(60):
                await m.bitmap_done.wait()
            if not m.bitmap_done.is_set():
                await link.aclose("bitmap exchange timed out")
                return
            await self._save_discarded(m)
        await self._send_bitmap(m, link)
        patience = 600 if m.verdict == Verdict.SPLIT_BRAIN else 30  # the loser saves its data first
        with trio.move_on_after(patience):
            await m.bitmap_done.wait()
        if not m.bitmap_done.is_set():
            await link.aclose("bitmap exchange timed out")
            return
        await self.local.writer.sync_all()  # ORed bits durable before we rely on them
        m.set_state(LinkState.CONNECTED, None)
        self.quorum.notify()
        log.info("%s: member %s connected (%s)", self.name, m.name, m.verdict.value)
        if self.role == Role.PRIMARY:
            await self._tell_member_state(m)

    async def _send_bitmap(self, m: MemberLink, link: PeerLink) -> None:
        bits = self.local.statemap.out_of_sync_regions(m.name)
        n = len(bits)
        start = 0
        while start < n:
            stop = min(n, start + BITMAP_CHUNK_BITS)
            chunk = bits[start:stop]
            if chunk.any():
                await link.send(Bitmap(start, stop - start, chunk.tobytes()))
            start = stop
        await link.send(Bitmap(n, 0, b"", last=True))

    def _receive_bitmap(self, m: MemberLink, ev: Bitmap) -> None:
        if ev.nbits:
            chunk = bitarray(endian="little")
            chunk.frombytes(ev.data)
            chunk = chunk[: ev.nbits]
            regions = self.local.statemap.layout.regions
            for i in chunk.search(1):
                r = ev.start + i
                if r < regions:
                    self.local.statemap.mark_regions_out_of_sync(m.name, range(r, r + 1))
        if ev.last:
            m.bitmap_done.set()

    # ------------------------------------------------------------ copy engine

    async def lock_range(self, start: int, end: int) -> int:
        return await self._locks.acquire(start, end)

    async def lock_ranges(self, ranges: list[tuple[int, int]]) -> int:
        """Lock several (offset, length) ranges together (one token)."""
        return await self._locks.acquire_many([(offset, offset + length) for offset, length in ranges])

    def unlock_range(self, token: int) -> None:
        self._locks.release(token)

    @property
    def completed_sequence(self) -> int:
        return self._completed_gseq

    async def tell_member(self, m: MemberLink, fields: dict[str, Any]) -> None:
        await self._send_state(m, fields)

    def _start_copy(self, m: MemberLink) -> None:
        if m.name not in self._copying:
            self._copying.add(m.name)
            self._nursery_or_daemon().start_soon(self._copy_loop, m)

    async def drain_writes_in_flight(self) -> None:
        """Wait until every application write in flight now has finished (not
        those started later): each one a member refused is marked by then."""
        await self._locks.wait_held()

    async def _copy_loop(self, m: MemberLink) -> None:
        """Copy to ``m`` while it is connected and this node primary, pass after
        pass, until it is level and takes writes (also an ``async`` member that
        fell behind: it is caught up while its link stays up)."""
        from .copy import CopyAborted, copy_member

        try:
            while self.role == Role.PRIMARY and self.local is not None and m.connected:
                m.set_replication(Replication.CATCHING_UP, f"{self.statemap.out_of_sync_bytes(m.name)} bytes out "
                                  f"of sync; copying{' while writes are marked' if m.behind else ''}")
                try:
                    await copy_member(self, m)
                except (CopyAborted, LinkClosed) as e:
                    log.info("%s: copy to %s stopped: %s", self.name, m.name, e)
                    await trio.sleep(0.1)
                    continue
                except Exception as e:  # a copy's failure never takes the daemon (and the volume) down
                    log.error("%s: copy to %s failed: %r; retrying", self.name, m.name, e)
                    await trio.sleep(1.0)
                    continue
                # No await from this check to the end of the loop: a member that
                # falls behind after it starts a new loop (_mark_away).
                if not m.behind and not self.statemap.out_of_sync_bytes(m.name):
                    m.set_replication(Replication.SHIPPING, "level with the primary; writes are shipped to it")
                    return
        finally:
            self._copying.discard(m.name)
            self.copies.pop(m.name, None)
            if m.connected and m.replication is Replication.CATCHING_UP:
                # Stopped short (demoted, volume down): say how writes reach it now.
                m.set_replication(Replication.BEHIND if m.behind else Replication.SHIPPING, "copy stopped")

    def start_verify(self) -> dict[str, str]:
        """``gmd verify``: start comparing every connected up-to-date member with
        this primary, online, in the background (a large volume takes hours);
        progress is in :meth:`status`, and so is each member's last report.
        Returns, per member, "started" or why it is not verified."""
        from .copy import CopyProgress

        self._require_primary()
        answer: dict[str, str] = {}
        for m in self.members.values():
            if m.name in self.verifying:
                answer[m.name] = "already being verified"
            elif not (m.connected and m.peer_disk == DiskState.UPTODATE.value):
                answer[m.name] = f"not connected and uptodate ({m.peer_disk or 'unknown'})"
            else:
                self.verifying[m.name] = CopyProgress("verify", self.config.size)
                self._nursery_or_daemon().start_soon(self._verify_member, m, self.verifying[m.name])
                answer[m.name] = "started"
        return answer

    async def _verify_member(self, m: MemberLink, progress) -> None:
        from .copy import CopyAborted, verify_member

        started = time.time()
        report: dict[str, Any] = {"skipped": "interrupted: the volume went down"}
        try:
            report = await verify_member(self, m, progress)
        except CopyAborted as e:
            report = {"skipped": str(e)}
            log.warning("%s: verify of %s stopped after %d bytes: %s", self.name, m.name, progress.done_bytes, e)
        except Exception as e:  # a local read error: reported, never fatal to the daemon
            report = {"skipped": f"failed: {e}"}
            log.error("%s: verify of %s failed: %s", self.name, m.name, e)
        else:
            found = report["differing_regions"]
            if found:
                log.warning("%s: verify found %d differing regions on %s (first at %d); marked for resync",
                            self.name, found, m.name, report["first_offsets"][0])
            else:
                log.info("%s: verify of %s found no differences", self.name, m.name)
        finally:
            if "skipped" in report:
                report["compared_bytes"] = progress.done_bytes
            self.verifying.pop(m.name, None)
            self.verify_reports[m.name] = {**report, "started": started, "finished": time.time()}
            done = self._verify_done.pop(m.name, None)
            if done is not None:
                done.set()

    async def verify(self) -> dict[str, Any]:
        """Verify every eligible member and wait for the reports (see
        :meth:`start_verify`); a member not verified says why."""
        answer = self.start_verify()
        # No checkpoint since the start: no verify can have ended yet.
        done = {name: self._verify_done.setdefault(name, trio.Event())
                for name, what in answer.items() if what == "started"}
        for ev in done.values():
            await ev.wait()
        return {name: self.verify_reports[name] if name in done else {"skipped": what}
                for name, what in answer.items()}

    def _bitmaps_share_ancestor(self, m: MemberLink) -> bool:
        """Both sides' bitmaps for each other start at one common generation:
        their union is every region that differs (a bitmap copy suffices)."""
        sm = self.local.statemap
        g = (m.peer_hello_info or {}).get("generation", {})
        ours = sm.sb.peers[m.name].bitmap_gen
        theirs = g.get("bitmap_for", {}).get(self.node)
        lineage = {g.get("current"), *g.get("history", [])}
        return ours == theirs and ours in lineage and (
            ours == sm.sb.generations.current or ours in sm.sb.generations.history)

    def _split_brain_peer(self) -> MemberLink:
        for m in self.members.values():
            if m.state == LinkState.STANDALONE and m.reason and "split-brain" in m.reason:
                return m
        if self.discarding:
            return self.members[self.discarding]
        raise GmdError(f"{self.name}: no split-brain to resolve on {self.node} (no member is standalone "
                       "for diverging data)")

    def resolve_plan(self, peer: MemberLink, rule: str):
        sm = self._require_up().statemap
        info = peer.peer_hello_info or {}
        mine = self._generation_info()
        return splitbrain.plan(self.name, self.node, peer.name, local_gens=mine,
                               peer_gens=info.get("generation", {}), local_bits=sm.out_of_sync_regions(peer.name),
                               peer_marked=(info.get("marked") or {}).get(self.node),
                               region_size=self.config.region_size, size=self.config.size, rule=rule)

    async def resolve(self, *, dry_run: bool) -> dict[str, Any]:
        """``gmd resolve VOLUME --discard-local [--dry-run]`` on the side whose
        changes since the split are to go (see :mod:`gmd.splitbrain`)."""
        peer = self._split_brain_peer()
        rule = f"operator: gmd resolve --discard-local on {self.node}"
        p, _union = self.resolve_plan(peer, rule)
        out = {"plan": p.to_json(), "dry_run": dry_run}
        if dry_run:
            return out
        if self.role == Role.PRIMARY:
            raise GmdError(f"{self.name}: {self.node} is primary; demote it first ('gmd secondary {self.name}'), "
                           "then resolve: the side that discards must not be in use")
        self.discarding = peer.name
        log.warning("%s: resolving split-brain with %s by discarding this side's changes (%s); they are saved "
                    "first", self.name, peer.name, rule)
        peer.set_state(LinkState.CONNECTING, "resolving split-brain: discarding local changes")
        return out

    async def _save_discarded(self, m: MemberLink) -> None:
        """Our data of the union of both sides' marked regions, saved before any
        of it is overwritten. The peer's bits were just ORed into ours."""
        sm = self.local.statemap
        union = sm.out_of_sync_regions(m.name)
        fd = self.local.device._fd

        class _Reader:
            @staticmethod
            def pread(offset: int, length: int) -> bytes:
                return _pread_full(fd, length, offset)

        meta = {"volume": self.name, "node": self.node, "kept": m.name,
                "local_generation": sm.sb.generations.current}
        image = await trio.to_thread.run_sync(
            splitbrain.save_discarded, Path(self.config.members[self.node].statemap), m.name, _Reader, union,
            self.config.region_size, self.config.size, meta)
        self.saved_images.append(str(image))
        log.warning("%s: %d bytes of this side's diverging data saved to %s (read-only) before %s's copy",
                    self.name, union.count(1) * self.config.region_size, image, m.name)

    async def switchover(self, target: str) -> dict[str, Any]:
        """``gmd switchover VOLUME --to NODE``: a planned role swap. Refused, with
        this node staying primary, unless ``target`` is connected and holds
        every write (uptodate, nothing marked, no async backlog). Then new
        writes stop here, those in flight drain and are flushed everywhere,
        this node demotes and the target promotes itself; replication then
        runs the other way. If the target does not take over in time, this
        node becomes primary again."""
        self._require_primary()
        m = self.members.get(target)
        if m is None:
            raise UsageError(f"{target} is not a member of {self.name} (members: {', '.join(self.members)})")
        sm = self.local.statemap
        rec = sm.sb.peers.get(target)
        problems = []
        if not m.connected:
            problems.append(f"{target} is not connected ({m.reason or m.state.value})")
        elif rec is None or rec.disk != DiskState.UPTODATE:
            problems.append(f"{target}'s disk is {rec.disk.value if rec else 'unknown'}, not uptodate")
        if sm.out_of_sync_bytes(target):
            problems.append(f"{sm.out_of_sync_bytes(target)} bytes are marked out of sync for {target}")
        if m.behind:
            problems.append(f"{target}'s async queue overflowed; it is tracked in the bitmap until caught up")
        if problems:
            raise GmdError(f"{self.name}: switchover to {target} refused: {'; '.join(problems)}. "
                           f"{self.node} stays primary")
        log.info("%s: switchover to %s: draining writes", self.name, target)
        await self.demote()  # refuses, changing nothing, while the device is in use
        with trio.move_on_after(SWITCHOVER_TIMEOUT):
            while m.connected and m.queued_bytes:  # an async member drains its queue
                await trio.sleep(0.01)
        if not (m.connected and sm.sb.peers[target].disk == DiskState.UPTODATE and not m.queued_bytes):
            await self.promote()
            raise GmdError(f"{self.name}: {target} was lost during the switchover; {self.node} is primary again")
        await self._send_state(m, {"take_over": True})
        with trio.move_on_after(SWITCHOVER_TIMEOUT):
            while not (m.connected and m.peer_role == Role.PRIMARY.value):
                await m.changed.wait()
        if m.connected and m.peer_role == Role.PRIMARY.value:
            log.info("%s: switchover done: %s is primary, %s secondary", self.name, target, self.node)
            return {"primary": target, "secondary": self.node}
        reason = m.reason or "no answer"
        try:
            await self.promote()
        except GmdError as e:
            raise GmdError(f"{self.name}: {target} did not take over ({reason}), and {self.node} could not "
                           f"become primary again: {e}") from None
        raise GmdError(f"{self.name}: {target} did not take over within {SWITCHOVER_TIMEOUT:.0f} s ({reason}); "
                       f"{self.node} is primary again")

    async def _take_over(self, m: MemberLink) -> None:
        """The old primary handed over (switchover): promote, or say why not."""
        try:
            await self.promote()
        except Exception as e:
            log.error("%s: switchover from %s: cannot take over: %s", self.name, m.name, e)
            await self._send_state(m, {"take_over_failed": str(e)})

    async def add_members(self, config: VolumeConfig) -> list[str]:
        """Take a config that adds members to this volume (``gmd reload``), while
        it runs: each new member gets a link, a slot in the state map and, once
        it connects, a full copy; its votes count from then on."""
        new = [name for name in config.members if name != self.node and name not in self.members]
        self.config = config
        for name in new:
            self.members[name] = MemberLink(name, config.members[name].mode, queue_limit=config.async_queue,
                                            volume=config.name)
        if self.local is not None:
            self.local.config = config
            self.local.add_new_members()
            await self.local.writer.sync_all()
            for name in new:
                if self.node < name and self._nursery is not None:
                    self._nursery.start_soon(self._dial_loop, name)
        self.quorum.notify()
        return new

    async def set_expected_votes(self, votes: int | None) -> dict[str, Any]:
        """``gmd quorum VOLUME --expected-votes N`` (None: back to the configured sum)."""
        sm = self._require_up().statemap
        if votes is not None and votes < 1:
            raise UsageError(f"expected votes must be at least 1, not {votes}")
        before = sm.sb.expected_votes
        sm.set_expected_votes(votes)
        await self.local.writer.sync_all()
        log.warning("%s: expected votes set by the operator: %s -> %s (quorum now needs %d)", self.name,
                    before if before is not None else "configured sum",
                    votes if votes is not None else "configured sum", self.quorum.needed())
        self.quorum.notify()
        return self.quorum.status()

    def resync(self, rate: int | None = None) -> list[str]:
        """``gmd resync``: start copying the marked regions to every connected
        member; ``rate`` (bytes/s, 0 for none) replaces the copy rate limit."""
        self._require_primary()
        if rate is not None:
            self.copy_rate = rate
        started = []
        for m in self.members.values():
            if m.connected and (self.statemap.out_of_sync_bytes(m.name) or m.peer_disk != DiskState.UPTODATE.value):
                self._start_copy(m)
                started.append(m.name)
        return started

    async def member_caught_up(self, m: MemberLink) -> None:
        """The copy engine brought ``m`` level with us: it is uptodate again."""
        sm = self.local.statemap
        if sm.sb.peers[m.name].copy is not None:
            sm.set_peer_copy(m.name, None)
        sm.set_peer_disk(m.name, DiskState.UPTODATE)
        sm.set_bitmap_generation(sm.sb.generations.current, member=m.name)
        m.peer_disk = DiskState.UPTODATE.value  # before the await: a write marked meanwhile sets it back
        await self.local.writer.sync_all()
        if sm.sb.peers[m.name].disk != DiskState.UPTODATE:
            return  # a write was marked for it meanwhile (and it was told); the copy loop goes on
        log.info("%s: member %s is uptodate", self.name, m.name)
        await self._send_state(m, {"your_disk": DiskState.UPTODATE.value, "generation": sm.sb.generations.current,
                                   "identity": sm.identity})

    async def _tell_member_state(self, m: MemberLink) -> None:
        """As primary: decide a newly connected member's disk state and tell it."""
        sm = self.local.statemap
        verdict = m.verdict
        rec = sm.sb.peers[m.name]
        if verdict == Verdict.PEER_NEEDS_FULL and rec.copy is None:
            sm.set_peer_copy(m.name, Fence(CopyKind.FULL, 0))
        if (m.peer_hello_info or {}).get("awaiting_full_copy") is True and rec.copy is None:
            sm.set_peer_copy(m.name, Fence(CopyKind.FULL, 0))  # cleaned by its operator: replace it all
        if verdict == Verdict.SPLIT_BRAIN and rec.copy is None and not self._bitmaps_share_ancestor(m):
            sm.set_peer_copy(m.name, Fence(CopyKind.FULL, 0))  # the peer discards; no common bitmap base
        if rec.copy is not None and rec.copy.fence < self.config.size:
            # A full copy's target is inconsistent; a member awaiting a full merge
            # (sync-mode crash) holds consistent data that may differ in places.
            disk = DiskState.INCONSISTENT if rec.copy.kind == CopyKind.FULL else DiskState.OUTDATED
        elif sm.out_of_sync_bytes(m.name) > 0 or verdict in (Verdict.PEER_NEEDS_FULL, Verdict.SPLIT_BRAIN):
            disk = DiskState.OUTDATED
        else:
            disk = DiskState.UPTODATE
        sm.set_peer_disk(m.name, disk)
        if disk == DiskState.UPTODATE:
            sm.set_bitmap_generation(sm.sb.generations.current, member=m.name)
        await self.local.writer.sync_all()
        m.peer_disk = disk.value
        fields: dict[str, Any] = {"role": self.role.value, "your_disk": disk.value, "identity": sm.identity}
        if disk == DiskState.UPTODATE:
            fields["generation"] = sm.sb.generations.current
        await self._send_state(m, fields)
        if disk != DiskState.UPTODATE and self.role == Role.PRIMARY:
            self._start_copy(m)

    async def _send_state(self, m: MemberLink, fields: dict[str, Any]) -> None:
        s = m.session
        path = s.pick_path() if s else None
        if path is None:
            return
        try:
            await path.send(State(fields))
        except LinkClosed:
            pass

    async def _on_state(self, m: MemberLink, fields: dict[str, Any]) -> None:
        sm = self.local.statemap
        if "role" in fields:
            was = m.peer_role
            m.peer_role = fields["role"]
            if m.peer_role == Role.PRIMARY.value and was != m.peer_role:
                self._primary_claimed(m)
        if "take_over_failed" in fields:
            m.reason = f"refused to take over: {fields['take_over_failed']}"
            m._notify()
        if fields.get("take_over") and self.role != Role.PRIMARY:
            self._nursery_or_daemon().start_soon(self._take_over, m)
        if "your_disk" in fields:
            try:
                disk = DiskState(fields["your_disk"])
            except ValueError:
                log.warning("%s: %s sent unknown disk state %r", self.name, m.name, fields["your_disk"])
                return
            from_primary = fields.get("role", m.peer_role) == Role.PRIMARY.value
            identity = fields.get("identity")
            if from_primary and isinstance(identity, str) and identity and sm.identity != identity:
                if sm.identity is not None:
                    log.error("%s: primary %s speaks for another life of the volume (identity %s…, ours %s…); "
                              "closing the session", self.name, m.name, identity[:8], sm.identity[:8])
                    for p in list(m.session.paths) if m.session else []:
                        await p.aclose("another life of the volume")
                    return
                sm.adopt_identity(identity)  # our data becomes a copy of that volume's
                log.info("%s: volume identity %s… learned from primary %s", self.name, identity[:8], m.name)
            sm.set_disk(disk)
            if from_primary:
                self.lost_primary = None  # a live primary has judged us: we follow it now
            if disk == DiskState.UPTODATE and sm.sb.local_copy is not None:
                sm.set_local_copy(None)  # the copy we were waiting for is done
            if disk == DiskState.UPTODATE and fields.get("role", m.peer_role) == Role.PRIMARY.value:
                # Level with the primary: nothing of ours is missing there.
                sm.clear_out_of_sync(m.name, range(sm.layout.regions))
                if self.discarding == m.name:
                    log.warning("%s: split-brain with %s resolved: this side now holds %s's data", self.name,
                                m.name, m.name)
                    self.discarding = None
            log.info("%s: %s says our disk is %s", self.name, m.name, disk.value)
        if "generation" in fields and sm.sb.disk == DiskState.UPTODATE:
            sm.adopt_generation(str(fields["generation"]))
        if "disk" in fields:
            m.peer_disk = fields["disk"]
        await self.local.writer.sync_all()
        m._notify()

    async def _pinger(self, link: PeerLink) -> None:
        token = 0
        while not link.closed:
            await trio.sleep(PING_INTERVAL)
            token += 1
            try:
                await link.send(Ping(token))
            except LinkClosed:
                return

    async def _receive_loop(self, m: MemberLink, link: PeerLink) -> None:
        while True:
            with trio.move_on_after(PATH_TIMEOUT) as timeout:
                try:
                    ev = await link.receive()
                except LinkClosed:
                    return
            if timeout.cancelled_caught:
                log.warning("%s: path %d to %s silent for %.0f s; closing it",
                            self.name, link.remote.path, m.name, PATH_TIMEOUT)
                await link.aclose("path timed out", tell_peer=False)
                return
            await self._dispatch(m, link, ev)

    async def _dispatch(self, m: MemberLink, link: PeerLink, ev) -> None:
        match ev:
            case WriteAck() | FlushAck():
                m.on_ack(ev)
            case Write() | Flush():
                if self.role == Role.PRIMARY:
                    await link.aclose(f"{m.name} sent a write to primary {self.node}")
                    return
                applier = self._appliers.get(m.name)
                if applier is None or applier.session_id != m.session.id:
                    applier = Applier(self._nursery_or_daemon(), self._apply_write, self._apply_flush)
                    applier.session_id = m.session.id
                    self._appliers[m.name] = applier
                applier.submit(ev, link)
            case Bitmap():
                self._receive_bitmap(m, ev)
            case State():
                await self._on_state(m, ev.fields)
            case Ping():
                link.send_nowait(Pong(ev.token))
            case Pong():
                pass
            case Read():
                self._nursery_or_daemon().start_soon(self._answer_read, link, ev)
            case ReadReply() | HashReply():
                m.on_read_reply(ev)
            case HashRequest():
                answerer = self._hash_answerers.get(m.name)
                if answerer is None:
                    answerer = HashAnswerer(
                        self._nursery_or_daemon(),
                        lambda ranges, block: self._require_up().hashes_of_ranges(ranges, block),
                        lambda offset, length, block: self._require_up().device.check_hash_request(
                            offset, length, block))
                    self._hash_answerers[m.name] = answerer
                answerer.submit(ev, link)
            case _:
                log.warning("%s: unexpected %s from %s", self.name, type(ev).__name__, m.name)

    async def _apply_write(self, item: Write) -> None:
        """Apply a primary's write, mirroring its intent: the extent stays hot
        here until the primary says the write is durable on every member in
        sync. Should the primary be lost, the survivors' hot extents cover
        every write one of them may have and another lack (see
        _fold_lost_primary). The extent is hot before any await, so a session
        that ends meanwhile finds it in the fold."""
        local = self._require_up()
        length = len(item.data)
        await local.begin_intent(item.offset, length, mirror=True)
        try:
            await local.apply(item.offset, item.data)
        finally:
            local.end_intent(item.offset, length, item.gseq, mirror=True)
        self._seen_gseq = max(self._seen_gseq, item.gseq)

    async def _apply_flush(self, item: Flush) -> None:
        local = self._require_up()
        await local.flush(durable_everywhere=item.in_sync)

    async def _answer_read(self, link: PeerLink, ev: Read) -> None:
        """Send the data, or the errno when the local read fails; a closed link
        just drops the answer."""
        try:
            reply = ReadReply(ev.request, 0, await self._require_up().read(ev.offset, ev.length))
        except Exception as e:
            reply = ReadReply(ev.request, errno_for(e))
        try:
            await link.send(reply)
        except LinkClosed:
            pass

    # ---------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        """``gmd status VOLUME --json`` from the running daemon."""
        cfg = self.config
        if self.local is None:
            raise UsageError(f"volume {self.name} is down on {self.node}")
        sm = self.local.statemap
        now = trio.current_time()
        members: dict[str, Any] = {
            self.node: {
                "disk": sm.sb.disk.value, "link": LinkState.LOCAL.value,
                "mode": cfg.members[self.node].mode,
                "out_of_sync_bytes": sm.local_out_of_sync_bytes(), "copy": None,
                "pending_copy": _fence_json(sm.sb.local_copy),
            }
        }
        for name, m in self.members.items():
            rec = sm.sb.peers.get(name)
            lag_bytes, lag_s = m.lag(now) if m.is_async else (0, 0.0)
            disk = m.peer_disk if m.connected else DiskState.UNKNOWN.value
            if m.connected and self.role == Role.PRIMARY and rec is not None:
                disk = rec.disk.value
            elif not m.connected and rec is not None and rec.disk in (DiskState.OUTDATED, DiskState.INCONSISTENT):
                # Out of sight, but our own map proves it is behind; never claim
                # uptodate for a member we cannot see.
                disk = rec.disk.value
            members[name] = {
                "disk": disk or DiskState.UNKNOWN.value,
                "link": m.state.value,
                "mode": m.mode,
                "out_of_sync_bytes": sm.out_of_sync_bytes(name) if rec else cfg.size,
                "lag_bytes": lag_bytes,
                "lag_seconds": round(lag_s, 3),
                "copy": self.copies[name].to_json() if name in self.copies else None,
                "verify": self.verifying[name].to_json() if name in self.verifying else None,
                "last_verify": self.verify_reports.get(name),
                "pending_copy": _fence_json(rec.copy if rec else None),
                "behind": m.behind,
                # shipping / behind (async queue overflowed) / catching-up (a copy runs): see Replication
                "replication": m.replication.value if m.connected and self.role == Role.PRIMARY else None,
                "reason": m.reason,
                "peer_role": m.peer_role if m.connected else None,
                "paths": len([p for p in m.session.paths if not p.closed]) if m.session else 0,
            }
        return {
            "volume": cfg.name, "node": self.node, "daemon": True, "role": self.role.value,
            "mode": cfg.members[self.node].mode, "size": cfg.size, "region_size": cfg.region_size,
            "device": self.device_path,
            "loop": self.loop_device,
            "quorum": self.quorum.status(),
            "members": members,
            "state_map": {
                "path": str(cfg.members[self.node].statemap), "clean": sm.sb.clean,
                "recovery_needed": False, "hot_extents": len(sm.hot_extents()),
                "generation": sm.sb.generations.current, "updated": sm.sb.updated,
                "identity": sm.identity,
                "warnings": list(sm.warnings),
            },
            "copy_rate": self.copy_rate,
            "split_brain": {"resolving_towards": self.discarding, "saved_images": list(self.saved_images)},
            "lost_primary": self.lost_primary,
            "io": {"writes": self.writes, "bytes_written": self.bytes_written,
                   "sequence": self._gseq, "in_flight": self._inflight},
        }


def _losetup_attach(path: str) -> str:
    import subprocess

    r = subprocess.run(["losetup", "--find", "--show", path], capture_output=True, text=True)
    if r.returncode != 0:
        raise GmdError(f"losetup could not attach {path}: {r.stderr.strip()}")
    return r.stdout.strip()


def _losetup_detach(dev: str) -> None:
    import subprocess

    r = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True)
    if r.returncode != 0:
        log.warning("losetup -d %s: %s", dev, r.stderr.strip())


def _fence_json(fence) -> dict[str, Any] | None:
    return None if fence is None else {"kind": fence.kind.value, "fence": fence.fence}
