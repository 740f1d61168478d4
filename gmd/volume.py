"""One member's local side of a volume: backing device plus state map.

:class:`LocalVolume` is what the write pipeline of the node daemon stands on: async
read/write/flush with bounds checks, and the state-map hooks the write path needs
(make a write's extents hot before its data is issued; mark regions out of sync
for a member that is away). It knows nothing of the network.

Concurrency rules:

* State-map commits run one at a time in a worker thread (:class:`MapWriter`);
  callers that need durability wait for a change number, so one commit serves
  every caller that was waiting (group commit).
* A commit, once started, is shielded from cancellation: a cancelled caller
  leaves behind a completed commit, never a half-known one.
* In-memory state-map changes happen only on the event loop thread, between
  awaits, so no lock is needed around them.
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from statemap import CopyKind, DiskState, Fence, Role
from statemap.statemap import Recovery, StateMap

from .config import Member, VolumeConfig
from .disk import BackingDevice, check_range
from .errors import Refused
from .keeper import Keeper
from .testimage import TestImage, remove_image_files
from .undolog import DATA_START, Rollback, UndoLog, iso_utc

log = logging.getLogger(__name__)

INTENT_MODES = ("mwc", "async")
INTENT_LOOKAHEAD = 3  # extents made hot ahead of a sequential stream


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class _Counter:
    """How many of something are under way, and an event for none."""

    def __init__(self) -> None:
        self.n = 0
        self._idle = trio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.n += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    def leave(self) -> None:
        self.n -= 1
        if self.n == 0:
            self._idle.set()

    async def idle(self) -> None:
        while self.n:
            await self._idle.wait()


class WriteTicket:
    """A primary's write as admitted (:meth:`LocalVolume.admit`): ``plain``
    (admitted before any catch-up began: it writes without saving, and the
    start of a catch-up waits for it) and the rollback epoch it belongs to.
    Every ticket counts as issued until released (the freeze of a test image
    waits for those). :meth:`release` once it is done or dropped (idempotent)."""

    def __init__(self, volume: LocalVolume, plain: bool, epoch: int):
        self.plain = plain
        self.epoch = epoch
        self._counters = [volume._issued, volume._plain] if plain else [volume._issued]
        for counter in self._counters:
            counter.enter()

    def release(self) -> None:
        for counter in self._counters:
            counter.leave()
        self._counters = []


class MapWriter:
    """Writes a state map's changes to disk, one commit at a time, off the loop."""

    def __init__(self, statemap: StateMap, limiter: trio.CapacityLimiter):
        self.statemap = statemap
        self._limiter = limiter
        self._running: trio.Event | None = None
        self.commits = 0
        self.bytes_written = 0

    async def sync_to(self, change: int) -> None:
        """Return once change number ``change`` (or everything, if 0 < it) is durable."""
        sm = self.statemap
        while sm.durable_changes < change:
            if self._running is not None:
                await self._running.wait()
                continue
            await self._commit_once()

    async def sync_all(self) -> None:
        """Make every change made so far durable."""
        await self.sync_to(self.statemap.changes)
        # A change can also be pending with durable_changes already past it (a
        # page re-dirtied after a plan captured it): commit until nothing is left.
        while self.statemap.has_unsaved_changes:
            if self._running is not None:
                await self._running.wait()
                continue
            await self._commit_once()

    async def _commit_once(self) -> None:
        sm = self.statemap
        done = self._running = trio.Event()
        try:
            with trio.CancelScope(shield=True):
                plan = sm.prepare_commit()
                if plan is None:
                    return
                try:
                    await trio.to_thread.run_sync(plan.run, sm.io, limiter=self._limiter)
                except BaseException:
                    sm.abort_commit(plan)
                    raise
                sm.finish_commit(plan)
                self.commits += 1
                self.bytes_written += plan.bytes
        finally:
            self._running = None
            done.set()


class LocalVolume:
    """The local member of a volume, opened for use by this node.

    Open with :meth:`open` (an async context manager is :func:`opened`), which
    recovers the state map if the last stop was unclean and marks it in use.
    """

    def __init__(self, config: VolumeConfig, member: Member, statemap: StateMap,
                 device: BackingDevice, limiter: trio.CapacityLimiter):
        self.config = config
        self.member = member
        self.statemap = statemap
        self.device = device
        self.writer = MapWriter(statemap, limiter)
        self._limiter = limiter
        self.recovery: Recovery | None = None
        self._seq = 0
        self._completed_seq = 0
        self._closed = False
        # Consistent catch-up (docs/DESIGN.md, "Consistent catch-up: the undo log").
        self.undo: UndoLog | None = None
        self.catching_up = False  # the disk left write order (a catch-up runs); with a log: it is active
        self.in_order_at: float | None = None  # wall-clock time the disk was last known in write order
        self.discard_pending = False  # told uptodate: the next flush ends the catch-up
        self._starting: trio.Event | None = None  # a catch-up is starting (or rolling back): writes wait
        self._epoch = 0  # bumped by a rollback: writes admitted before it are dropped
        self._plain = _Counter()  # admitted before any catch-up: they write without saving
        self._writing = _Counter()  # past the gate, saving or writing
        self._undo_lock = trio.Lock()  # one undo-log call at a time (they run in threads)
        self._undo_keeper: Keeper | None = None  # saves old contents to the undo log before overwrites
        # Test failover (docs/DESIGN.md, "Test failover"): the image, and
        # what keeps the contents it needs before the member overwrites them.
        self.test: TestImage | None = None
        self.test_ended: str | None = None  # why the last test ended (None: none ended since the daemon started)
        self._test_keeper: Keeper | None = None
        self._test_lock = trio.Lock()  # one call of the image's files at a time (keeps, image writes, removal)
        self._test_on_end: Callable[[TestImage, str], None] | None = None
        self._freezing: trio.Event | None = None  # a test image is being frozen: no write is issued meanwhile
        self._issued = _Counter()  # writes admitted and not yet done (the freeze waits for them)
        self._image_ops = _Counter()  # reads and writes of the test image in worker threads
        self._ended_images: list[TestImage] = []  # ended, files not removed yet

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def size(self) -> int:
        return self.config.size

    @property
    def uses_intent(self) -> bool:
        return self.member.mode in INTENT_MODES

    @classmethod
    async def open(cls, config: VolumeConfig, node: str, limiter: trio.CapacityLimiter) -> LocalVolume:
        """Open the member of ``config`` on ``node``: map (checked against the
        config, recovered if needed, marked in use) and backing device."""
        member = config.members[node]
        sm = await trio.to_thread.run_sync(StateMap.open, member.statemap, limiter=limiter)
        try:
            sm.check_geometry(
                volume=config.name, size=config.size, region_size=config.region_size,
                extent_size=config.extent_size, member=node,
            )
            device = BackingDevice(Path(member.device), config.size, limiter, volume=config.name)
        except BaseException:
            sm.close()
            raise
        vol = cls(config, member, sm, device, limiter)
        last_use = sm.sb.clean_stop or sm.sb.updated  # before this open commits anything
        try:
            # A test failover does not outlive its daemon: what a killed one left is discarded.
            left = await trio.to_thread.run_sync(remove_image_files, member.statemap, limiter=limiter)
            if left:
                vol.test_ended = "the daemon stopped while the test ran; its image was discarded at the restart"
                log.warning("%s: a test failover was running when the daemon stopped; its image is discarded "
                            "(removed %s)", config.name, ", ".join(map(str, left)))
            if member.undo_log is not None:
                vol.undo = await trio.to_thread.run_sync(
                    lambda: UndoLog.open(member.undo_log, volume=config.name, size=config.size,
                                         region_size=config.region_size, limit=member.undo_log_size,
                                         identity=sm.identity), limiter=limiter)
                vol._undo_opened(last_use)
            elif sm.sb.disk in (DiskState.OUTDATED, DiskState.MERGING):
                # Without a log nothing says whether a catch-up was under way
                # when the daemon stopped: not claimed consistent.
                vol.catching_up = True
            else:
                vol.in_order_at = last_use or None
            vol.recovery = sm.recover()
            vol.add_new_members()
            if vol.recovery.needed and not member.mode in INTENT_MODES and sm.sb.role == Role.PRIMARY:
                # sync mode logs no intent: any region may have been in flight
                # when the primary died, so every member gets a full merge (a
                # fence-driven pass comparing hashes: only differing regions move).
                for peer, rec in sm.sb.peers.items():
                    if rec.copy is None:
                        sm.set_peer_copy(peer, Fence(CopyKind.MERGE, 0))
                log.warning("%s: unclean stop of a sync-mode primary; full merge to every member", config.name)
            elif vol.recovery.needed:
                log.warning(
                    "%s: unclean stop; %d hot extents (%d bytes) marked for a mini-merge on every member",
                    config.name, len(vol.recovery.hot_extents), vol.recovery.bytes,
                )
            sm.begin_use()
            await vol.writer.sync_all()
        except BaseException:
            vol._close_files()
            raise
        return vol

    def add_new_members(self) -> list[str]:
        """Members in the config that this map does not know yet get a slot,
        and a full copy once they connect (a member added to the volume)."""
        added = []
        for name in self.config.members:
            if name != self.member.node and name not in self.statemap.sb.peers:
                self.statemap.add_peer(name)
                added.append(name)
                log.info("%s: new member %s: it gets a full copy when it connects", self.config.name, name)
        return added

    # ------------------------------------------------------------------ I/O

    def next_seq(self) -> int:
        """Sequence number for a new write (in the order writes were accepted)."""
        self._seq += 1
        return self._seq

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """The local disk's bytes (see :meth:`BackingDevice.read` for where it reads)."""
        return await self.device.read(offset, length)

    async def region_hashes(self, offset: int, length: int, block: int) -> list[int]:
        """xxh3_64 of each ``block`` of [offset, offset+length) (holes are not read)."""
        (hashes,) = await self.hashes_of_ranges([(offset, length)], block)
        return hashes

    async def hashes_of_ranges(self, ranges: list[tuple[int, int]], block: int) -> list[list[int]]:
        """:meth:`region_hashes` of each (offset, length) in ``ranges``, read in one go."""
        answers = await self.device.read_hashed_ranges(ranges, block, keep_data=False)
        return [hashes for hashes, _ in answers]

    async def write(self, offset: int, data: bytes) -> int:
        """Write locally with the mode's intent rule; returns the write's sequence.

        For a local-only write the intent is released at once; the replication
        pipeline instead calls :meth:`begin_intent` / :meth:`end_intent` itself
        around the local write and the members' acks.
        """
        check_range(offset, len(data), self.size, writing=True)
        seq = self.next_seq()
        await self.begin_intent(offset, len(data))
        try:
            await self.device.write(offset, data)
        finally:
            self.end_intent(offset, len(data), seq)
        return seq

    def admit(self, *, copy: bool = False) -> WriteTicket:
        """Admit a primary's write, synchronously and in the primary's link
        order (the receiver calls this as it issues the write, before any
        await): whether it may write without saving depends on whether a
        catch-up had begun *before it in that order*, not on when its task
        gets to the disk, so the image an undo log keeps is a prefix."""
        plain = (not self.preserving and self._starting is None
                 and not (copy and (not self.catching_up or self.discard_pending)))
        return WriteTicket(self, plain, self._epoch)

    async def apply(self, offset: int, data: bytes, *, copy: bool = False,
                    ticket: WriteTicket | None = None) -> None:
        """Apply a primary's write as a member: bounds checked; the caller
        mirrors the primary's intent around it (see VolumeEngine._apply_write).

        ``copy`` data (WRITE_COPY) takes the disk out of write order: the
        catch-up begins with it if the primary has not said so before. While
        a catch-up is preserved, every write (copy or not) admitted after it
        began (``ticket``, from :meth:`admit`; taken now if not given) first
        saves the old contents of the regions it overwrites in the undo log,
        durably; a write the log cannot hold fails (ENOSPC) and leaves the
        disk as it was. A write admitted before a rollback is dropped (EIO):
        it came from the primary that was lost."""
        if ticket is None:
            await self.issue_gate()  # as the receiver's pump does before it admits a write
            ticket = self.admit(copy=copy)
        try:
            length = len(data)
            check_range(offset, length, self.size, writing=True)
            if not ticket.plain:
                if copy and (not self.catching_up or self.discard_pending):
                    await self.begin_catch_up("copy data arrived")
                while self._starting is not None:  # no later write overtakes the start of a catch-up
                    await self._starting.wait()
                if ticket.epoch != self._epoch:
                    raise OSError(errno.EIO, f"{self.name}: write of the lost primary dropped: the catch-up it "
                                             "belonged to was rolled back")
            self._writing.enter()
            try:
                if not ticket.plain and self.preserving:
                    await self._preserve(offset, length)
                if self.test is not None:
                    await self._keep_for_test(offset, length)
                await self.device.write(offset, data)
            finally:
                self._writing.leave()
            if not self.catching_up and not copy:
                self.in_order_at = time.time()
        finally:
            ticket.release()

    def apply_now(self, offset: int, data: bytes, gseq: int) -> bool:
        """Apply a primary's write on the calling task, mirroring its intent,
        when nothing needs to wait: every extent it touches is hot on disk
        already and the data goes to the page cache on the event loop. False,
        having done nothing, otherwise (the caller takes the awaiting path):
        also while a catch-up is preserved or starting, since the old
        contents must reach the undo log first."""
        length = len(data)
        check_range(offset, length, self.size, writing=True)
        if self.preserving or self._starting is not None or self._freezing is not None:
            return False
        if self.test is not None and not self.test.holds(offset, length):
            return False  # the image's contents of these regions must be kept first
        if not self.device.can_write_now(length) or not self.statemap.intent_acquire_if_ready(offset, length):
            return False
        try:
            done = self.device.write_now(offset, data)
        finally:
            self.end_intent(offset, length, gseq, mirror=True)
        if done and not self.catching_up:
            self.in_order_at = time.time()
        return done

    # ------------------------------------------------------ consistent catch-up

    def _undo_opened(self, last_use: float) -> None:
        undo = self.undo
        if undo.active:
            self.catching_up = True
            log.warning("%s: undo log %s is active: a catch-up was under way (%d regions, %d bytes saved); this "
                        "member can return to its image of %s with 'gmd primary --force' should the primary be lost",
                        self.name, undo.path, undo.regions, undo.used - DATA_START, iso_utc(undo.consistent_at))
            if undo.torn_tail:
                log.info("%s: undo log %s: %s", self.name, undo.path, undo.torn_tail)
        else:
            self.in_order_at = max(undo.consistent_at, last_use) or None

    @property
    def preserving(self) -> bool:
        """A catch-up is under way and the undo log keeps the image before it."""
        return self.undo is not None and self.undo.active

    def disk_consistent(self) -> bool:
        """The disk, as it stands, is an instant of the primary's (before any catch-up began)."""
        sb = self.statemap.sb
        return sb.disk in (DiskState.UPTODATE, DiskState.OUTDATED, DiskState.MERGING) and sb.local_copy is None

    @property
    def consistent(self) -> bool:
        """The disk holds, or can be rolled back to, an instant of the primary's disk."""
        return self.preserving or (not self.catching_up and self.disk_consistent())


    async def begin_catch_up(self, why: str) -> None:
        """The disk is about to leave write order (the primary said it is
        behind, or copy data arrived). With an undo log and a consistent
        disk, the log goes active first, once every write issued before has
        landed (they belong to the image it keeps); writes arriving
        meanwhile wait. A catch-up that was over but not yet flushed ends
        first, so the image kept is the newest."""
        while self._starting is not None:
            await self._starting.wait()
        restart = self.catching_up and self.discard_pending
        if self.catching_up and not restart:
            return
        self.discard_pending = False
        if self.undo is None or not self.disk_consistent():
            if not self.catching_up:
                self.catching_up = True
                log.warning("%s: catch-up begins (%s) without %s: the disk holds no consistent image until it "
                            "is done", self.name, why, "an undo log" if self.undo is None
                            else f"a consistent image to keep (disk {self.statemap.sb.disk.value})")
            return
        started = self._starting = trio.Event()
        try:
            with trio.CancelScope(shield=True):  # a half-started catch-up would leave writes waiting
                await self._plain.idle()
                async with self._undo_lock:
                    if restart:
                        await self.device.flush()
                        await self._undo_call(self.undo.discard)
                        self.in_order_at = time.time()
                    point = self.in_order_at or time.time()
                    await self._undo_call(self.undo.begin, point, self.statemap.identity)
            self.catching_up = True
            log.warning("%s: catch-up begins (%s): the disk leaves write order; undo log %s keeps its image of %s "
                        "(up to %d bytes)", self.name, why, self.undo.path, iso_utc(point), self.undo.limit)
        finally:
            self._starting = None
            started.set()

    async def _undo_call(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _preserve(self, offset: int, length: int) -> None:
        """Return once the old contents of [offset, offset+length) are durable
        in the undo log (at once if they are already). Concurrent writes share
        one trip to a thread and one fdatasync (:class:`gmd.keeper.Keeper`)."""
        if self._undo_keeper is None:
            # Keeps what the catch-up overwrites; a batch finding it ended keeps nothing.
            self._undo_keeper = Keeper(self.undo, self.device, call=self._undo_call, lock=self._undo_lock,
                                       active=lambda: self.preserving, name=f"{self.name}: undo log")
        await self._undo_keeper.keep(offset, length)

    def resize_undo(self, member: Member) -> None:
        """A reloaded config gives the undo log another bound (``undo_log_size``).
        A smaller bound than what it holds refuses further saves, keeps the records."""
        self.member = member
        if self.undo is not None and member.undo_log_size != self.undo.limit:
            log.info("%s: undo log %s bound %s -> %s", self.name, self.undo.path, _mib(self.undo.limit),
                     _mib(member.undo_log_size))
            self.undo.limit = member.undo_log_size

    async def abandon_catch_up(self, why: str) -> None:
        """The primary gives this disk a full copy (``copying``/``inconsistent``):
        every region is replaced, and the image kept cannot come back; the
        undo log is emptied (it could never hold the whole volume's old
        contents as cheaply as a copy rewrites them)."""
        if not self.preserving:
            self.catching_up = True
            return
        async with self._undo_lock:
            at = self.undo.consistent_at
            await self._undo_call(self.undo.discard, at)
        self.catching_up = True
        log.warning("%s: %s: a full copy replaces the disk; the image of %s kept in undo log %s is given up",
                    self.name, why, iso_utc(at), self.undo.path)

    def told_uptodate(self) -> None:
        """The primary says we hold every write: the catch-up ends at the next
        flush (its data is durable then), and the undo log is emptied."""
        if self.catching_up:
            self.discard_pending = True

    async def end_catch_up(self, why: str) -> None:
        """The catch-up is over and what it wrote is durable: the disk is in
        write order again, and the undo log is emptied."""
        if not self.catching_up:
            return
        async with self._undo_lock:
            if self.preserving:
                await self._undo_call(self.undo.discard)
        self.catching_up = False
        self.discard_pending = False
        self.in_order_at = time.time()
        log.info("%s: catch-up over (%s): the disk is in write order again%s", self.name, why,
                 f"; undo log {self.undo.path} emptied" if self.undo is not None else "")

    async def roll_back(self) -> Rollback | None:
        """Return the disk to the image before the catch-up (the primary is
        lost mid-catch-up and this member takes over): every saved region is
        written back and synced, then the log is emptied. None if no catch-up
        is preserved. The caller marks the regions for the other members."""
        if not self.preserving:
            return None
        started = self._starting = trio.Event()
        try:
            with trio.CancelScope(shield=True):  # half rolled back is safe (it is redone), but finish it
                await self._plain.idle()
                await self._writing.idle()
                self._epoch += 1  # what the lost primary still had on its way is dropped at the gate
                async with self._undo_lock:
                    report = await self._undo_call(self.undo.rollback, self.device)
        finally:
            self._starting = None
            started.set()
        self.catching_up = False
        self.discard_pending = False
        self.in_order_at = report.consistent_at
        return report

    def catch_up_answer(self, question: dict[str, Any]) -> dict[str, Any]:
        """Our answer to the primary's question before a catch-up pass (STATE
        ``catch_up``): can the undo log hold the old contents of what the
        pass overwrites? See :class:`transport.messages.CatchUpAnswer`."""
        answer: dict[str, Any] = {"id": question["id"], "ok": True}
        if self.undo is None:
            return answer
        undo = self.undo
        answer["undo_log"] = True
        if not self.preserving and not self.disk_consistent():
            answer["reason"] = f"disk is {self.statemap.sb.disk.value}: no consistent image to keep"
            return answer
        regions = self.statemap.layout.regions
        runs = question.get("runs")
        nbytes = question["bytes"]
        if nbytes > self.size or (runs is not None and any(f + c > regions for f, c in runs)):
            answer.update(ok=False, reason=f"the catch-up question names bytes beyond the volume ({nbytes} bytes, "
                                           f"{len(runs or ())} runs)")
            return answer
        needed = undo.needed([(f, f + c) for f, c in runs]) if runs is not None else undo.needed_at_most(nbytes)
        capacity = undo.remaining if self.preserving else max(0, undo.limit - DATA_START)
        answer.update(preserving=True, needed=needed, capacity=capacity, ok=needed <= capacity,
                      consistent_at=undo.consistent_at if self.preserving else self.in_order_at)
        if needed > capacity:
            answer["reason"] = (f"undo log {undo.path} holds {_mib(capacity)} more, the catch-up needs {_mib(needed)} "
                                f"(undo_log_size {_mib(undo.limit)})")
        return answer

    def consistency_status(self) -> dict[str, Any]:
        """``consistency`` of this member in the status."""
        consistent = self.consistent
        at = None
        if self.preserving:
            at = self.undo.consistent_at
        elif consistent and self.statemap.sb.role == Role.PRIMARY:
            at = time.time()  # the primary's own disk is the write order
        elif consistent:
            at = self.in_order_at
        return {"consistent": consistent, "consistent_at": iso_utc(at) if at else None,
                "catching_up": self.catching_up,
                "undo_log": self.undo.status() if self.undo is not None else None}

    # ------------------------------------------------------------ test failover

    async def issue_gate(self) -> bool:
        """Wait while a test image is being frozen: the receiver issues no
        write meanwhile, so the image holds exactly the writes issued before
        (it waits before admitting, holding no ticket). True if it waited."""
        if self._freezing is None:
            return False
        while self._freezing is not None:
            await self._freezing.wait()
        return True

    def test_refusal(self) -> str | None:
        """Why no test image can be frozen now, or None."""
        if self.test is not None:
            return "a test failover runs already; end it first ('gmd test-failover end')"
        if self.statemap.sb.role == Role.PRIMARY:
            return "this node is primary: a test failover runs on a secondary member"
        if self.catching_up:
            return ("the disk is out of write order (a catch-up runs"
                    + (", its undo log keeps the image before it" if self.preserving else "")
                    + "): no consistent point to freeze; try again once it is uptodate")
        if not self.disk_consistent():
            return f"the disk is {self.statemap.sb.disk.value}: it holds no consistent image to test"
        return None

    async def start_test(self, space: int, on_end: Callable[[TestImage, str], None]) -> TestImage:
        """Freeze a test image of this member's disk: every write issued
        before has landed, none issued after is on the disk (the receiver
        waits at :meth:`issue_gate` meanwhile). From then on every write
        keeps the old contents of the regions it overwrites for the image
        first. ``on_end(image, reason)`` is called (synchronously) if the
        volume ends the test itself (space used up). Refused, with the reason,
        if the disk holds no consistent point."""
        while self._starting is not None or self._freezing is not None:
            await (self._starting or self._freezing).wait()
        why = self.test_refusal()
        if why:
            raise Refused("test-failover-refused", volume=self.name, node=self.member.node, reason=why)
        freezing = self._freezing = trio.Event()
        try:
            with trio.CancelScope(shield=True):  # a half-frozen image would leave writes waiting
                await self._issued.idle()
                why = self.test_refusal()  # a catch-up may have begun with a write that was in flight
                if why:
                    raise Refused("test-failover-refused", volume=self.name, node=self.member.node, reason=why)
                at = self.in_order_at or time.time()
                image = await trio.to_thread.run_sync(functools.partial(
                    TestImage.create, self.member.statemap, volume=self.name, size=self.size,
                    region_size=self.config.region_size, space=space, consistent_at=at,
                    identity=self.statemap.identity), limiter=self._limiter)
                image.started_at, image.consistent_at = time.time(), at
                self.test, self.test_ended, self._test_on_end = image, None, on_end
                self._test_keeper = Keeper(image.kept, self.device, call=self._undo_call, lock=self._test_lock,
                                           active=lambda: self.test is image, name=f"{self.name}: test image")
        finally:
            self._freezing = None
            freezing.set()
        return image

    async def _keep_for_test(self, offset: int, length: int) -> None:
        """Keep the image's contents of [offset, offset+length) before the
        member overwrites them. Never fails the member's write: when the
        space is used up (or the file fails) the test ends first."""
        image, keeper = self.test, self._test_keeper
        try:
            await keeper.keep(offset, length)
        except Exception as e:
            if self.test is image:
                full = isinstance(e, OSError) and e.errno == errno.ENOSPC
                self.end_test(f"out of space: {image.kept_bytes} bytes kept and {image.overlay_bytes} written of "
                              f"{image.space}, and a replicated write needed more (give --space or "
                              f"test_image_size more)" if full else f"keeping the image's contents failed: {e}")

    def end_test(self, reason: str) -> TestImage | None:
        """End the test failover now: nothing more is kept, and the image
        can no longer be read or written (operations in flight fail). Its
        files are removed by :meth:`discard_test`. Returns the image (None
        if no test ran)."""
        image = self.test
        if image is None:
            return None
        self.test, self._test_keeper, self.test_ended = None, None, reason
        self._ended_images.append(image)
        # Running out of space or a failing file is news the operator did not ask for.
        log_at = log.error if reason.startswith(("out of space", "keeping")) else log.info
        log_at("%s: test failover ended: %s (%d bytes kept, %d written to the image)", self.name, reason,
               image.kept_bytes, image.overlay_bytes)
        on_end, self._test_on_end = self._test_on_end, None
        if on_end is not None:
            on_end(image, reason)
        return image

    async def discard_test(self, image: TestImage) -> None:
        """Remove an ended image's files, once no operation of it is in flight."""
        if image not in self._ended_images:
            return
        with trio.CancelScope(shield=True):
            await self._image_ops.idle()
            async with self._test_lock:
                await self._undo_call(image.remove)
            self._ended_images.remove(image)

    async def _image_op(self, image: TestImage, fn, *args):
        if self.test is not image:
            raise OSError(errno.EIO, f"{self.name}: the test failover ended ({self.test_ended})")
        self._image_ops.enter()
        try:
            result = await trio.to_thread.run_sync(fn, self.device, *args, limiter=self._limiter)
        finally:
            self._image_ops.leave()
        if self.test is not image:  # ended meanwhile: what was read may be newer than the image
            raise OSError(errno.EIO, f"{self.name}: the test failover ended ({self.test_ended})")
        return result

    async def read_test(self, image: TestImage, offset: int, length: int) -> bytes:
        """Read the test image (EIO once it ended)."""
        return await self._image_op(image, image.read, offset, length)

    async def write_test(self, image: TestImage, offset: int, data: bytes) -> None:
        """Write into the test image (its overlay; the member's disk is never touched)."""
        async with self._test_lock:  # against the keeps: one exact account of the space
            await self._image_op(image, image.write, offset, data)

    async def flush(self, *, durable_everywhere: int | None = None) -> None:
        """Local barrier: every completed write is durable; idle extents may retire.

        As the primary, or alone, our own completed writes are the measure. A
        member mirroring the primary's intents passes ``durable_everywhere``,
        the primary's word on how far its writes are durable on every member in
        sync: only extents written before that may retire here."""
        done = self._completed_seq if durable_everywhere is None else durable_everywhere
        await self.device.flush()
        self.note_flushed(done)
        if self.discard_pending:
            await self.end_catch_up("uptodate, and flushed")

    # ------------------------------------------------------------ state-map hooks

    async def begin_intent(self, offset: int, length: int, *, mirror: bool = False) -> None:
        """Make the extents of a write hot on disk before its data is issued
        (``mwc``/``async``; a no-op in ``sync`` mode, which logs no intent of its
        own). With ``mirror`` (a member applying its primary's write) always:
        every member mirrors the primary's intents, whatever its own mode, so
        the survivors of a lost primary can reconcile."""
        if not (self.uses_intent or mirror):
            return
        sm = self.statemap
        need = sm.intent_acquire(offset, length)
        if need:
            # A write that opens an extent of a sequential stream (it starts at the
            # extent's first byte, or the extent before is hot) takes the next
            # few extents along in the same commit, so the stream does not stall
            # on an intent commit every extent.
            es = self.config.extent_size
            first, last = offset // es, (offset + length - 1) // es
            if offset % es == 0 or sm.is_hot(first - 1):
                need = max(need, sm.intent_prefetch(range(last + 1, last + 1 + INTENT_LOOKAHEAD)))
            await self.writer.sync_to(need)

    def end_intent(self, offset: int, length: int, seq: int, *, mirror: bool = False) -> None:
        """The write ``seq`` completed everywhere it was going (``mirror``: as
        for :meth:`begin_intent`)."""
        self._completed_seq = max(self._completed_seq, seq)
        if self.uses_intent or mirror:
            self.statemap.intent_release(offset, length, seq)

    def note_flushed(self, seq: int) -> None:
        """Writes up to ``seq`` are durable on every member (a barrier completed)."""
        self.statemap.note_flushed(seq)

    async def mark_out_of_sync(self, member: str, offset: int, length: int) -> None:
        """``member`` missed bytes [offset, offset+length). Returns once the mark is
        as durable as the invariant needs: at once inside a durably hot extent
        (recovery would OR the extent in), otherwise after a commit."""
        if self.statemap.mark_out_of_sync(member, offset, length) and not self.statemap.durably_hot(offset, length):
            await self.writer.sync_to(self.statemap.changes)

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        """Flush, retire every extent and mark the map clean; then close files."""
        if self._closed:
            return
        try:
            with trio.CancelScope(shield=True):
                if self.test is not None:
                    self.end_test("the volume went down")
                for image in list(self._ended_images):
                    await self.discard_test(image)
                await self.flush()
                self.statemap.retire_idle()
                self.statemap.prepare_clean_close()
                await self.writer.sync_all()
        finally:
            self._close_files()

    def _close_files(self) -> None:
        self._closed = True
        for image in self._ended_images + ([self.test] if self.test is not None else []):
            image.close()  # files removed at the next open
        self.device.close()
        self.statemap.close()
        if self.undo is not None:
            self.undo.close()
