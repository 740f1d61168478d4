"""Frames from a member, by kind: acks to the shipments waiting for them, a
primary's writes and flushes to the applier, reads and hash requests answered,
bitmaps and STATE messages to their owners (DRBD's receiver dispatch table).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from statemap import Role
from transport.codec import (
    Bitmap,
    Flush,
    FlushAck,
    HashReply,
    HashRequest,
    Ping,
    Pong,
    Read,
    ReadReply,
    RemoteProtocolError,
    WRITE_COPY,
    State,
    Write,
    WriteAck,
)
from transport.link import LinkClosed, PeerLink
from transport.messages import PeerState, decode

from .errors import errno_for
from .groups import GroupHold, HoldView
from .receiver import Applier, HashAnswerer
from .replication import MemberLink

if TYPE_CHECKING:
    import trio

    from .peerstate import PeerState as PeerStatePart  # the part; PeerState here is the message
    from .sessions import Sessions
    from .volume import LocalVolume
    from .writepath import WritePath

log = logging.getLogger(__name__)


class DispatchVolume(Protocol):
    """What the frame dispatch needs of its volume (the engine provides it)."""

    group_hold: GroupHold | None
    local: LocalVolume | None
    @property
    def name(self) -> str: ...
    node: str
    @property
    def nursery(self) -> trio.Nursery: ...
    peerstate: PeerStatePart
    def require_up(self) -> LocalVolume: ...
    role: Role
    @property
    def running(self) -> bool: ...
    sessions: Sessions
    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None: ...
    writepath: WritePath


class FrameDispatch:
    """Routes a session's frames; owns the appliers of primaries' writes and the hash answerers, one per member."""

    def __init__(self, engine: DispatchVolume):
        self.engine = engine
        self._appliers: dict[str, Applier] = {}  # member (a primary) -> applies its writes in order
        self._hash_answerers: dict[str, HashAnswerer] = {}  # member -> answers its hash requests
        # The last primary session that ended, while nothing else has changed
        # our disk since: how far its writes are applied in order is what we
        # tell that primary in our next intro (``resume``, gmd.backlog).
        self._last_ended: tuple[str, Applier] | None = None

    def stop_applying(self, member: str) -> None:
        """Nothing more of ``member``'s current session reaches our disk."""
        applier = self._appliers.pop(member, None)
        if applier is not None:
            applier.close()
            self._last_ended = (member, applier)

    def forget_resume(self) -> None:
        """Our disk changes by other means now (we became primary)."""
        self._last_ended = None

    def resume_points(self) -> dict[str, int]:
        """{primary: its sequence our disk holds its writes in order up to},
        for the last primary session that ended, if it can say."""
        if self._last_ended is None:
            return {}
        member, applier = self._last_ended
        point = applier.resume_point()
        return {} if point is None else {member: point}

    def forget(self, member: str) -> None:
        """``member``'s session ended: drop what served it."""
        self.stop_applying(member)
        self._hash_answerers.pop(member, None)

    async def dispatch(self, m: MemberLink, link: PeerLink, ev) -> None:
        if not self.engine.running:  # going down: its tasks are gone, and so is what they served
            await link.aclose(f"volume {self.engine.name} going down on {self.engine.node}")
            return
        match ev:
            case WriteAck() | FlushAck():
                m.on_ack(ev)
            case Write() | Flush():
                if self.engine.role == Role.PRIMARY:
                    await link.aclose(f"{m.name} sent a write to primary {self.engine.node}")
                    return
                applier = self._appliers.get(m.name)
                if applier is None or applier.session_id != m.session.id:
                    hold = self.engine.group_hold
                    applier = Applier(self.engine.nursery, self._apply_write, self._apply_flush,
                                      write_now=self._apply_write_now, admit=self._admit, gate=self._gate,
                                      hold=HoldView(hold, self.engine.name, m.name) if hold is not None else None)
                    self._last_ended = None  # a new session writes to our disk: the old point is gone
                    applier.session_id = m.session.id
                    self._appliers[m.name] = applier
                applier.submit(ev, link)
            case Bitmap():
                self.engine.sessions.receive_bitmap(m, ev)
            case State():
                try:
                    decode(PeerState, ev.fields, f"STATE from {m.name}")
                except RemoteProtocolError as e:
                    log.warning("%s: closing the link to %s: %s", self.engine.name, m.name, e)
                    await link.aclose(f"protocol error: {e}")
                    return
                await self.engine.peerstate.on_state(m, ev.fields)
            case Ping():
                link.send_nowait(Pong(ev.token))
            case Pong():
                pass
            case Read():
                self.engine.spawn(self._answer_read, link, ev)
            case ReadReply() | HashReply():
                m.on_read_reply(ev)
            case HashRequest():
                answerer = self._hash_answerers.get(m.name)
                if answerer is None:
                    answerer = HashAnswerer(
                        self.engine.nursery,
                        lambda ranges, block: self.engine.require_up().hashes_of_ranges(ranges, block),
                        lambda offset, length, block: self.engine.require_up().device.check_hash_request(
                            offset, length, block))
                    self._hash_answerers[m.name] = answerer
                answerer.submit(ev, link)
            case _:
                log.warning("%s: unexpected %s from %s", self.engine.name, type(ev).__name__, m.name)

    def _admit(self, item: Write):
        """The write is issued (in link order): see LocalVolume.admit. None
        while the volume goes down (the write then fails where it is applied)."""
        local = self.engine.local
        return local.admit(copy=bool(item.flags & WRITE_COPY)) if local is not None else None

    async def _gate(self) -> bool:
        """Before a write is issued: wait while a test image freezes (LocalVolume.issue_gate)."""
        local = self.engine.local
        return await local.issue_gate() if local is not None else False

    async def _apply_write(self, item: Write, ticket=None) -> None:
        """Apply a primary's write, mirroring its intent: the extent stays hot
        here until the primary says the write is durable on every member in
        sync. Should the primary be lost, the survivors' hot extents cover
        every write one of them may have and another lack (see
        Sessions.fold_lost_primary). The extent is hot before any await, so a session
        that ends meanwhile finds it in the fold."""
        try:
            local = self.engine.require_up()
            length = len(item.data)
            await local.begin_intent(item.offset, length, mirror=True)
            try:
                await local.apply(item.offset, item.data, copy=bool(item.flags & WRITE_COPY), ticket=ticket)
            finally:
                local.end_intent(item.offset, length, item.gseq, mirror=True)
        finally:
            if ticket is not None:
                ticket.release()  # however it ended: a catch-up's start waits for it
        self.engine.writepath.note_applied(item.gseq)

    def _apply_write_now(self, item: Write) -> bool:
        """:meth:`_apply_write` on the receiving task, when it need not wait
        (its extents hot on disk, the data small enough for the page cache on
        the event loop); False, having done nothing, otherwise. Copy data
        never: it may begin a catch-up (see LocalVolume.apply)."""
        if item.flags & WRITE_COPY or not self.engine.require_up().apply_now(item.offset, item.data, item.gseq):
            return False
        self.engine.writepath.note_applied(item.gseq)
        return True

    async def _apply_flush(self, item: Flush) -> None:
        local = self.engine.require_up()
        await local.flush(durable_everywhere=item.in_sync)

    async def _answer_read(self, link: PeerLink, ev: Read) -> None:
        """Send the data, or the errno when the local read fails; a closed link
        just drops the answer."""
        try:
            reply = ReadReply(ev.request, 0, await self.engine.require_up().read(ev.offset, ev.length))
        except Exception as e:
            reply = ReadReply(ev.request, errno_for(e))
        try:
            await link.send(reply)
        except LinkClosed:
            pass

