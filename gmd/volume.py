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

import logging
from pathlib import Path

import trio

from statemap import CopyKind, Fence, Role
from statemap.statemap import Recovery, StateMap

from .config import Member, VolumeConfig
from .disk import BackingDevice, check_range

log = logging.getLogger(__name__)

INTENT_MODES = ("mwc", "async")
INTENT_LOOKAHEAD = 3  # extents made hot ahead of a sequential stream


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
        self.recovery: Recovery | None = None
        self._seq = 0
        self._completed_seq = 0
        self._closed = False

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
        try:
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

    async def apply(self, offset: int, data: bytes) -> None:
        """Apply a primary's write as a member: bounds checked; the caller
        mirrors the primary's intent around it (see VolumeEngine._apply_write)."""
        check_range(offset, len(data), self.size, writing=True)
        await self.device.write(offset, data)

    def apply_now(self, offset: int, data: bytes, gseq: int) -> bool:
        """Apply a primary's write on the calling task, mirroring its intent,
        when nothing needs to wait: every extent it touches is hot on disk
        already and the data goes to the page cache on the event loop. False,
        having done nothing, otherwise (the caller takes the awaiting path)."""
        length = len(data)
        check_range(offset, length, self.size, writing=True)
        if not self.device.can_write_now(length) or not self.statemap.intent_acquire_if_ready(offset, length):
            return False
        try:
            done = self.device.write_now(offset, data)
        finally:
            self.end_intent(offset, length, gseq, mirror=True)
        return done

    async def flush(self, *, durable_everywhere: int | None = None) -> None:
        """Local barrier: every completed write is durable; idle extents may retire.

        As the primary, or alone, our own completed writes are the measure. A
        member mirroring the primary's intents passes ``durable_everywhere``,
        the primary's word on how far its writes are durable on every member in
        sync: only extents written before that may retire here."""
        done = self._completed_seq if durable_everywhere is None else durable_everywhere
        await self.device.flush()
        self.note_flushed(done)

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
                await self.flush()
                self.statemap.retire_idle()
                self.statemap.prepare_clean_close()
                await self.writer.sync_all()
        finally:
            self._close_files()

    def _close_files(self) -> None:
        self._closed = True
        self.device.close()
        self.statemap.close()
