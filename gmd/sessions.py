"""Member sessions of one volume: dialling, paths, session open and end, the
bitmap exchange, and the fold when the primary we followed is lost
(docs/DESIGN.md, "Links and sessions", "Survivor reconciliation").

The lower node name dials, the other accepts (and pokes the dialler when it
comes up). A session is one or more paths with one id; it lives while any path
does. Opening it exchanges out-of-sync bitmaps (ORed into ours, made durable)
before the member counts as connected; ending it marks what the member acked
but never flushed.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio
from bitarray import bitarray

from quorum.generations import Verdict
from statemap import DiskState, Role
from statemap.format import PAGE
from transport.codec import Bitmap, Intro, Ping
from transport.link import LinkClosed, LinkRefused, PeerLink

from .replication import LinkState, MemberLink, Session, disk_of, role_of

if TYPE_CHECKING:
    from .dispatch import FrameDispatch
    from .engine import NodePorts
    from .handshake import Handshake
    from .peerstate import PeerState
    from .quorum_keeper import QuorumKeeper
    from .resolution import SplitBrainResolver
    from .volume import LocalVolume
    from .writepath import WritePath

log = logging.getLogger(__name__)

PING_INTERVAL = 1.0
SESSION_WAIT = 10.0  # seconds a dialled session's other paths wait for its first path to open it
PATH_TIMEOUT = 6.0  # no frame for this long: the path is dead (a blackholed partition)
BITMAP_CHUNK_BITS = 8 * PAGE * 64  # 256 KiB of bitmap per frame at most
REDIAL_MIN = 0.1  # seconds before the first redial of a member that went away
REDIAL_MAX = 0.25  # seconds between dials of an unreachable member at most: a returning member is caught up at once


class SessionsVolume(Protocol):
    """What the sessions needs of its volume (the engine provides it)."""

    frames: FrameDispatch
    handshake: Handshake
    local: LocalVolume | None
    members: dict[str, MemberLink]
    @property
    def name(self) -> str: ...
    node: str
    peerstate: PeerState
    ports: NodePorts
    quorum: QuorumKeeper
    resolver: SplitBrainResolver
    role: Role
    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None: ...
    writepath: WritePath


class Sessions:
    """The sessions to every member of one volume; owns the dial pokes and the lost primary awaiting reconciliation."""

    def __init__(self, engine: SessionsVolume):
        self.engine = engine
        self._dial_now: dict[str, trio.Event] = {}  # member -> set when it pokes us (see poke)
        # A primary we followed went away without handing over: until the next
        # primary has reconciled the survivors, what each may lack is unknown.
        self.lost_primary: str | None = None

    async def dial_loop(self, peer: str) -> None:
        """Keep a session to ``peer`` up: dial its addresses with backoff; once one
        path is in, keep every other path dialled into the same session. The
        session lives while any path lives."""
        m = self.engine.members[peer]
        backoff = REDIAL_MIN
        while self.engine.local is not None:
            session_id = secrets.token_hex(8)
            poked = self._dial_now[peer] = trio.Event()  # a poke during this dial counts too
            if m.state is not LinkState.STANDALONE:
                m.set_state(LinkState.CONNECTING, m.reason)
            first: PeerLink | None = None
            first_index = 0
            last_error = "no address"
            addresses = self.engine.ports.peer_addresses(peer)
            for i, addr in enumerate(addresses):
                try:
                    first = await self.engine.ports.dial(self.engine, addr, i, session_id)
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
                    log.info("%s: %s came up (poked us); dialling it now", self.engine.name, peer)
                    backoff = REDIAL_MIN
                else:
                    backoff = min(backoff * 2, REDIAL_MAX)
                continue
            backoff = REDIAL_MIN
            async with trio.open_nursery() as n:
                for i, addr in enumerate(addresses):
                    n.start_soon(self._keep_path, m, i, addr, session_id, first if i == first_index else None)

    async def poke(self, peer: str) -> None:
        """Coming up, tell a member that dials us (a lower name) to dial now
        rather than at its next retry: an authenticated handshake whose hello
        says "poke", closed at once; no session. A returning member is then
        caught up within a round trip, not a redial interval."""
        for i, addr in enumerate(self.engine.ports.peer_addresses(peer)):
            try:
                link = await self.engine.ports.dial(self.engine, addr, i, "poke", poke=True)
            except LinkRefused as e:
                log.debug("%s: poking %s at %s: %s", self.engine.name, peer, addr, e)
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
            with trio.move_on_after(SESSION_WAIT):  # the first path opens the session
                while not self._session_alive(m, session_id):
                    await m.changed.wait()
        while True:
            if link is None:
                if not self._session_alive(m, session_id):
                    return
                try:
                    link = await self.engine.ports.dial(self.engine, addr, index, session_id)
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
        m = self.engine.members.get(hello.node)
        if m is None or self.engine.local is None:
            await link.aclose("not a member here")
            return
        sid = hello.session
        new_session = m.session is None or m.session.id != sid
        if new_session:
            if m.session is not None:
                old = m.session
                for p in list(old.paths):
                    await p.aclose("replaced by a new session")
                self.end_session(m, "replaced by a new session")
            m.session = Session(sid, m.name)
            m.session_started_gseq = self.engine.writepath.completed_gseq
            m.flushed_gseq = self.engine.writepath.completed_gseq
            m.peer_role = role_of(hello.info.get("role"))
            m.peer_disk = disk_of(hello.info.get("disk"))
            m.peer_hello_info = hello.info
            m.behind = False
            m.catch_up_answer = None  # asked afresh: it may have come back with another undo log
            m.catch_up_refused = None
            m.bitmap_done = trio.Event()
            m.verdict = self.engine.handshake.verdict(hello)
            m.verdict_generation = self.engine.local.statemap.sb.generations.current
            if m.peer_role == Role.PRIMARY:
                self.primary_claimed(m)
            m.notify_changed()  # the other paths of a dialled session wait for it
        session = m.session
        session.paths.append(link)
        try:
            async with trio.open_nursery() as n:
                link.start(n, pacer=m.pacer, compressor=m.compressor)
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
                    self.end_session(m, link.close_reason or "connection lost")
                else:
                    m.resend_from(link)

    def end_session(self, m: MemberLink, reason: str) -> None:
        if m.session is None:
            return
        # Before anything can retire: what the member acked but never flushed
        # may be gone with it. Marked in memory now (no await), committed lazily:
        # those extents are still hot, because retirement waits for its flush.
        unflushed, m.acked_unflushed = m.acked_unflushed, []
        if unflushed and self.engine.local is not None:
            for _gseq, offset, length in unflushed:
                self.engine.local.statemap.mark_out_of_sync(m.name, offset, length)
            rec = self.engine.local.statemap.sb.peers.get(m.name)
            if rec is not None and rec.disk == DiskState.UPTODATE:
                self.engine.local.statemap.set_peer_disk(m.name, DiskState.OUTDATED)
        failed = m.end_session(reason)
        self.engine.frames.stop_applying(m.name)  # nothing more of this session reaches the disk
        if m.peer_role == Role.PRIMARY and self.engine.role != Role.PRIMARY:
            self.fold_lost_primary(m.name, f"primary {m.name} lost ({reason})")
        self.engine.frames.forget(m.name)
        if failed:
            log.warning("%s: member %s lost with %d shipments unacked: %s", self.engine.name, m.name, len(failed),
                        reason)
        else:
            log.info("%s: member %s disconnected: %s", self.engine.name, m.name, reason)
        self.engine.writepath.maybe_retire()
        self.engine.quorum.notify()

    def fold_lost_primary(self, primary: str, why: str) -> None:
        """The primary we followed is gone without handing over (killed, cut
        off, or replaced by another): a write of it not yet durable on every
        member in sync may be on some survivors and not on others. Mark the
        extents we hold hot for it (our mirror of its intents) out of sync for
        every other member (it lacks none of its own writes; what it wrote that
        nobody got, its own crash recovery marks). The next primary collects these marks from every survivor
        through the bitmap exchange of a new session, and copies them before it
        calls anyone up to date."""
        if self.engine.local is None:
            return
        sm = self.engine.local.statemap
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
                        "primary has reconciled them", self.engine.name, why, len(folded))
        else:
            log.info("%s: %s; none of its writes were in flight here", self.engine.name, why)

    def primary_claimed(self, m: MemberLink) -> None:
        """``m`` says it is primary. Another member we still took for primary is
        not any more: no write of it reaches our disk again, and what it was
        writing is folded now, before our bitmap goes to ``m``."""
        if self.engine.role == Role.PRIMARY:
            return
        for other in self.engine.members.values():
            if other is m or other.peer_role != Role.PRIMARY or other.session is None:
                continue
            self.engine.frames.stop_applying(other.name)
            self.fold_lost_primary(other.name, f"{m.name} took over from primary {other.name}")
            for p in list(other.session.paths):
                self.engine.spawn(p.aclose, f"{m.name} is primary now")

    async def _open_session(self, m: MemberLink, link: PeerLink) -> None:
        """First path of a session: exchange bitmaps, then the primary tells the
        member its disk state. A path that closes meanwhile just ends it."""
        try:
            await self._open_session_on(m, link)
        except LinkClosed as e:
            log.info("%s: session with %s closed while opening: %s", self.engine.name, m.name, e)

    async def _open_session_on(self, m: MemberLink, link: PeerLink) -> None:
        if self.engine.resolver.discarding == m.name:
            # Resolving a split-brain by discarding our changes: first learn what
            # the peer changed, and save our data of every diverging region,
            # before our bitmap lets the peer start copying over it.
            with trio.move_on_after(60):
                await m.bitmap_done.wait()
            if not m.bitmap_done.is_set():
                await link.aclose("bitmap exchange timed out")
                return
            await self.engine.resolver.save_discarded(m)
        await self._send_bitmap(m, link)
        patience = 600 if m.verdict == Verdict.SPLIT_BRAIN else 30  # the loser saves its data first
        with trio.move_on_after(patience):
            await m.bitmap_done.wait()
        if not m.bitmap_done.is_set():
            await link.aclose("bitmap exchange timed out")
            return
        await self.engine.local.writer.sync_all()  # ORed bits durable before we rely on them
        m.set_state(LinkState.CONNECTED, None)
        if m.backlog is not None and self.engine.role == Role.PRIMARY:
            self._resume_backlog(m)  # no await since CONNECTED: the next write finds it settled
        self.engine.quorum.notify()
        log.info("%s: member %s connected (%s)", self.engine.name, m.name, m.verdict.value)
        if self.engine.role == Role.PRIMARY:
            await self.engine.peerstate.tell_member_state(m)

    def _resume_backlog(self, m: MemberLink) -> None:
        """An async member is back: bring it on from its backlog, in order,
        from where it says its disk holds our writes; else the bitmap does."""
        b = m.backlog
        point = (m.peer_hello_info.get("resume") or {}).get(self.engine.node)
        waiting = len(b.entries)
        if b.resume(point):
            if b.has_waiting:
                log.info("%s: member %s: replaying %d writes from its backlog in order (it holds ours up to %s)",
                         self.engine.name, m.name, len(b.waiting), point)
                self.engine.writepath.start_pump(m)
        else:
            if waiting:
                log.info("%s: member %s: its backlog of %d writes is not replayed; the bitmap brings it back",
                         self.engine.name, m.name, waiting)
            b.restart()

    async def _send_bitmap(self, m: MemberLink, link: PeerLink) -> None:
        bits = self.engine.local.statemap.out_of_sync_regions(m.name)
        n = len(bits)
        start = 0
        while start < n:
            stop = min(n, start + BITMAP_CHUNK_BITS)
            chunk = bits[start:stop]
            if chunk.any():
                await link.send(Bitmap(start, stop - start, chunk.tobytes()))
            start = stop
        await link.send(Bitmap(n, 0, b"", last=True))

    def receive_bitmap(self, m: MemberLink, ev: Bitmap) -> None:
        if ev.nbits:
            chunk = bitarray(endian="little")
            chunk.frombytes(ev.data)
            chunk = chunk[: ev.nbits]
            regions = self.engine.local.statemap.layout.regions
            for i in chunk.search(1):
                r = ev.start + i
                if r < regions:
                    self.engine.local.statemap.mark_regions_out_of_sync(m.name, range(r, r + 1))
        if ev.last:
            m.bitmap_done.set()

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
        # A path is alive while bytes arrive, not only whole frames: under a
        # bandwidth limit one large frame (a copy chunk, a write behind queued
        # data) may take longer than PATH_TIMEOUT to arrive, and no keepalive
        # can pass it on the stream. A partial frame stays with the codec when
        # the wait is cut short, so waiting again loses nothing.
        while True:
            with trio.move_on_at(link.last_received_at + PATH_TIMEOUT) as timeout:
                try:
                    ev = await link.receive()
                except LinkClosed:
                    return
            if timeout.cancelled_caught:
                if trio.current_time() - link.last_received_at < PATH_TIMEOUT:
                    m.last_heard = link.last_received_at
                    continue  # part of a frame arrived meanwhile
                log.warning("%s: path %d to %s silent for %.0f s; closing it",
                            self.engine.name, link.remote.path, m.name, PATH_TIMEOUT)
                await link.aclose("path timed out", tell_peer=False)
                return
            m.last_heard = trio.current_time()
            await self.engine.frames.dispatch(m, link, ev)

