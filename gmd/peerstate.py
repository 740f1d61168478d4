"""STATE messages of one volume: as primary, telling a member what its disk
is (on connect, when it falls behind, when a copy brought it level); as any
member, taking what a peer says about its role, our disk, the generation and
the volume's identity.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from quorum.generations import Verdict
from statemap import CopyKind, DiskState, Fence, Role
from transport.codec import State
from transport.messages import PeerState as PeerStateMessage
from transport.messages import decode
from transport.link import LinkClosed, PeerLink

from .replication import MemberLink, disk_of, role_of

if TYPE_CHECKING:
    from .config import VolumeConfig
    from .copyengine import CopyEngine
    from .quorum_keeper import QuorumKeeper
    from .resolution import SplitBrainResolver
    from .roles import Roles
    from .sessions import Sessions
    from .testfailover import TestFailover
    from .volume import LocalVolume

log = logging.getLogger(__name__)


class PeerStateVolume(Protocol):
    """What the peer-state messages needs of its volume (the engine provides it)."""

    config: VolumeConfig
    copier: CopyEngine
    local: LocalVolume | None
    @property
    def name(self) -> str: ...
    quorum: QuorumKeeper
    resolver: SplitBrainResolver
    role: Role
    roles: Roles
    sessions: Sessions
    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None: ...
    testfailover: TestFailover


class PeerState:
    """STATE frames to and from the members of one volume; owns no state of its own."""

    def __init__(self, engine: PeerStateVolume):
        self.engine = engine

    async def member_caught_up(self, m: MemberLink) -> None:
        """The copy engine brought ``m`` level with us: it is uptodate again."""
        sm = self.engine.local.statemap
        if sm.sb.peers[m.name].copy is not None:
            sm.set_peer_copy(m.name, None)
        sm.set_peer_disk(m.name, DiskState.UPTODATE)
        sm.set_bitmap_generation(sm.sb.generations.current, member=m.name)
        m.peer_disk = DiskState.UPTODATE  # before the await: a write marked meanwhile sets it back
        m.out_of_order_since = None  # level: back in write order (a write marked meanwhile says otherwise)
        await self.engine.local.writer.sync_all()
        if sm.sb.peers[m.name].disk != DiskState.UPTODATE:
            return  # a write was marked for it meanwhile (and it was told); the copy loop goes on
        log.info("%s: member %s is uptodate", self.engine.name, m.name)
        # The witnesses learn at once that it holds every write again: until
        # they do, they would refuse it the takeover if this primary were lost.
        self.engine.quorum.renew_soon()
        await self.send_state(m, {"your_disk": DiskState.UPTODATE.value, "generation": sm.sb.generations.current,
                                   "identity": sm.identity})

    async def tell_member_state(self, m: MemberLink) -> None:
        """As primary: decide a newly connected member's disk state and tell it."""
        sm = self.engine.local.statemap
        verdict = m.verdict
        rec = sm.sb.peers[m.name]
        if verdict == Verdict.PEER_NEEDS_FULL and rec.copy is None:
            sm.set_peer_copy(m.name, Fence(CopyKind.FULL, 0))
        if (m.peer_hello_info or {}).get("awaiting_full_copy") is True and rec.copy is None:
            sm.set_peer_copy(m.name, Fence(CopyKind.FULL, 0))  # cleaned by its operator: replace it all
        if verdict == Verdict.SPLIT_BRAIN and rec.copy is None and not self.engine.resolver.bitmaps_share_ancestor(m):
            sm.set_peer_copy(m.name, Fence(CopyKind.FULL, 0))  # the peer discards; no common bitmap base
        if rec.copy is not None and rec.copy.fence < self.engine.config.size:
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
        await self.engine.local.writer.sync_all()
        m.peer_disk = disk
        fields: dict[str, Any] = {"role": self.engine.role.value, "your_disk": disk.value, "identity": sm.identity}
        if disk == DiskState.UPTODATE:
            fields["generation"] = sm.sb.generations.current
        await self.send_state(m, fields)
        if disk != DiskState.UPTODATE and self.engine.role == Role.PRIMARY:
            self.engine.copier.start_copy(m)

    def _state_path(self, m: MemberLink, fields: dict[str, Any]) -> PeerLink | None:
        s = m.session
        path = s.pick_path() if s else None
        if path is None:
            return None
        decode(PeerStateMessage, fields, "our own STATE")  # a key we send must be one the peer knows
        if fields.get("your_disk") == DiskState.UPTODATE.value:
            m.out_of_order_since = None  # level with us: in write order from here
        elif fields.get("your_disk") is not None:
            m.note_out_of_order()  # what it gets from now on leaves a gap
        return path

    async def send_state(self, m: MemberLink, fields: dict[str, Any]) -> None:
        path = self._state_path(m, fields)
        if path is None:
            return
        try:
            await path.send(State(fields))
        except LinkClosed:
            pass

    def send_state_nowait(self, m: MemberLink, fields: dict[str, Any]) -> None:
        """:meth:`send_state` without waiting for room on the link: for the
        write path, which must not stall behind a member's full socket (a
        blackholed link holds it until the path times out). One STATE per
        change of the member's disk, so what it queues is bounded."""
        path = self._state_path(m, fields)
        if path is None:
            return
        try:
            path.send_nowait(State(fields))
        except LinkClosed:
            pass

    async def on_state(self, m: MemberLink, fields: dict[str, Any]) -> None:
        sm = self.engine.local.statemap
        if "role" in fields:
            was = m.peer_role
            m.peer_role = role_of(fields["role"])
            if m.peer_role == Role.PRIMARY and was != m.peer_role:
                self.engine.sessions.primary_claimed(m)
        if "take_over_failed" in fields:
            m.reason = f"refused to take over: {fields['take_over_failed']}"
            m.notify_changed()
        if fields.get("take_over") and self.engine.role != Role.PRIMARY:
            self.engine.spawn(self.engine.roles.take_over, m)
        if "your_disk" in fields:
            try:
                disk = DiskState(fields["your_disk"])
            except ValueError:
                log.warning("%s: %s sent unknown disk state %r", self.engine.name, m.name, fields["your_disk"])
                return
            from_primary = fields.get("role", m.peer_role) == Role.PRIMARY
            identity = fields.get("identity")
            if from_primary and isinstance(identity, str) and identity and sm.identity != identity:
                if sm.identity is not None:
                    log.error("%s: primary %s speaks for another life of the volume (identity %s…, ours %s…); "
                              "closing the session", self.engine.name, m.name, identity[:8], sm.identity[:8])
                    for p in list(m.session.paths) if m.session else []:
                        await p.aclose("another life of the volume")
                    return
                sm.adopt_identity(identity)  # our data becomes a copy of that volume's
                log.info("%s: volume identity %s… learned from primary %s", self.engine.name, identity[:8], m.name)
            sm.set_disk(disk)
            if from_primary:
                self.engine.sessions.lost_primary = None  # a live primary has judged us: we follow it now
                await self._catch_up_told(m, disk)
                await self.engine.testfailover.tell_primary(m)  # a session began: it learns of our test
            if disk == DiskState.UPTODATE and sm.sb.local_copy is not None:
                sm.set_local_copy(None)  # the copy we were waiting for is done
            if disk == DiskState.UPTODATE and fields.get("role", m.peer_role) == Role.PRIMARY:
                # Level with the primary: nothing of ours is missing there.
                sm.clear_out_of_sync(m.name, range(sm.layout.regions))
                if self.engine.resolver.discarding == m.name:
                    log.warning("%s: split-brain with %s resolved: this side now holds %s's data", self.engine.name,
                                m.name, m.name)
                    self.engine.resolver.discarding = None
            log.info("%s: %s says our disk is %s", self.engine.name, m.name, disk.value)
        if "generation" in fields and sm.sb.disk == DiskState.UPTODATE:
            sm.adopt_generation(str(fields["generation"]))
        if "disk" in fields:
            m.peer_disk = disk_of(fields["disk"])
        if fields.get("catch_up") is not None:
            answer = self.engine.local.catch_up_answer(fields["catch_up"])
            if not answer["ok"]:
                log.error("%s: refusing %s's catch-up: %s", self.engine.name, m.name, answer.get("reason"))
            await self.send_state(m, {"catch_up_answer": answer})
        if fields.get("catch_up_answer") is not None:
            self.engine.copier.on_catch_up_answer(m, fields["catch_up_answer"])
        if fields.get("test_failover") is not None:
            self.engine.testfailover.member_said(m, fields["test_failover"])
        await self.engine.local.writer.sync_all()
        m.notify_changed()

    async def _catch_up_told(self, m: MemberLink, disk: DiskState) -> None:
        """The primary judged our disk: behind (what we get from now on leaves a
        gap, so the catch-up begins: the undo log, if any, goes active), level
        (the catch-up ends at the next flush) or to be replaced whole."""
        local = self.engine.local
        if disk == DiskState.UPTODATE:
            local.told_uptodate()
        elif disk in (DiskState.OUTDATED, DiskState.MERGING):
            await local.begin_catch_up(f"primary {m.name} says our disk is {disk.value}")
        elif disk in (DiskState.COPYING, DiskState.INCONSISTENT):
            await local.abandon_catch_up(f"primary {m.name} says our disk is {disk.value}")

