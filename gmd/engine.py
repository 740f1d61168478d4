"""The volume engine: one volume on one node, as a small composition of parts.

:class:`VolumeEngine` owns what every part shares (the local volume, the
member links, the role and its epoch, the quorum keeper) and the lifecycle
(up/down); the work is done by its parts, each a module with one job:

* :mod:`gmd.writepath` — ordering, intent, shipping, completion, barriers and
  retirement (docs/DESIGN.md, "The write path");
* :mod:`gmd.roles` — promote, demote, switchover, the loop device;
* :mod:`gmd.handshake` — our intro and the verdict on a peer's;
* :mod:`gmd.sessions` — dialling, paths, session open/end, bitmap exchange,
  the lost-primary fold;
* :mod:`gmd.dispatch` — frames from members, by kind;
* :mod:`gmd.peerstate` — STATE messages;
* :mod:`gmd.copyengine` — copy and verify orchestration;
* :mod:`gmd.resolution` — split-brain resolution;
* :mod:`gmd.takeover` — automatic takeover, self-fencing, start/stop commands;
* :mod:`gmd.testfailover` — a test failover's image on a secondary member;
* :mod:`gmd.status` — the status snapshot.

The public methods below are the engine's interface to the daemon, the FUSE
front and the control requests; they delegate to the part that owns the job.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from statemap import Role
from transport.codec import Intro
from transport.link import PeerLink

from .config import Address, VolumeConfig
from .backlog import Backlog, Journal
from .copyengine import CopyEngine
from .dispatch import FrameDispatch
from .groups import GroupHold
from .errors import GmdError, Refused
from .handshake import Handshake
from .peerstate import PeerState
from .quorum_keeper import QuorumKeeper
from .replication import LinkState, MemberLink
from .resolution import SplitBrainResolver
from .roles import Roles
from .rpo import RpoWatch
from .sessions import Sessions
from .status import volume_status
from .takeover import ServiceCommands, Takeover
from .testfailover import TestFailover
from .volume import LocalVolume
from .witness import WitnessClient
from .writepath import WritePath

log = logging.getLogger(__name__)

DOWN_GRACE = 30.0  # seconds a volume's tasks have to end once cancelled (they end at their next checkpoint)


class NotPrimary(GmdError):
    """A request that needs the primary reached a node that is not (reads, writes, flushes)."""


@dataclass(frozen=True)
class NodePorts:
    """What a volume engine needs of the node that hosts it, and nothing more."""

    # (engine, address, path index, session id, *, poke=False) -> an authenticated path to a member
    dial: Callable[..., Awaitable[PeerLink]]
    peer_addresses: Callable[[str], Sequence[Address]]  # a member node's addresses, as configured now
    limiter: trio.CapacityLimiter  # threads for the local volume's blocking disk calls
    witnesses: Mapping[str, WitnessClient]  # witness name -> its client (its votes, its answers)
    host: Callable[[], trio.Nursery]  # hosts the volume's runner task, which owns all its other tasks


@dataclass(frozen=True)
class DeviceFront:
    """Where the volume's file is shown while this node is primary (the node's
    FUSE mount), and how many handles of it are open."""

    path: str
    open_handles: Callable[[], int]


class VolumeEngine:
    """One volume on this node: up/down, the shared state, and its parts.

    Every task of the volume runs in its own nursery, opened by :meth:`up`
    and gone when :meth:`down` returns. Whoever shows the volume's file (the
    FUSE front) attaches itself with :meth:`attach_front` and learns of role
    changes through :meth:`subscribe_role_change`."""

    def __init__(self, config: VolumeConfig, node: str, ports: NodePorts):
        self.ports = ports
        self.config = config
        self.node = node
        self.local: LocalVolume | None = None
        self.role = Role.SECONDARY
        self.role_epoch = 0  # bumped on every role change: FUSE handles of an older epoch get EIO
        self.members: dict[str, MemberLink] = {
            name: self._member_link(config, name) for name in config.members if name != self.node
        }
        self._nursery: trio.Nursery | None = None
        self._cancel: trio.CancelScope | None = None
        self._stopped: trio.Event | None = None  # set when the runner and every task of the volume ended
        self.going_down = False
        self.front: DeviceFront | None = None
        self._role_watchers: list[Callable[[VolumeEngine], None]] = []
        self.quorum = QuorumKeeper(self)
        self.writepath = WritePath(self)
        self.roles = Roles(self)
        self.handshake = Handshake(self)
        self.sessions = Sessions(self)
        self.frames = FrameDispatch(self)
        self.peerstate = PeerState(self)
        self.copier = CopyEngine(self)
        self.resolver = SplitBrainResolver(self)
        self.service = ServiceCommands(self)
        self.takeover = Takeover(self)
        self.rpo = RpoWatch(self)
        self.group_hold: GroupHold | None = None  # set by the daemon: our async member of a group holds (gmd.groups)
        self.testfailover = TestFailover(self)

    def _member_link(self, config: VolumeConfig, name: str) -> MemberLink:
        """The link to member ``name``; an async one keeps a backlog of its
        unacknowledged writes, with this node's journal file for it if set."""
        mode = config.members[name].mode
        m = MemberLink(name, mode, queue_limit=config.async_queue, volume=config.name,
                       shipping=config.members[name].shipping)
        if mode == "async":
            mine = config.members[self.node]
            journal = (Journal(mine.journal.with_name(f"{mine.journal.name}.{name}"), mine.journal_size)
                       if mine.journal is not None else None)
            m.backlog = Backlog(name, config.async_queue, journal, volume=config.name)
        return m

    # --------------------------------------------------------------- naming

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def is_up(self) -> bool:
        return self.local is not None

    @property
    def statemap(self):
        return self.require_up().statemap

    def require_up(self) -> LocalVolume:
        if self.local is None:
            raise Refused("volume-down", volume=self.name, node=self.node)
        return self.local

    async def up(self, *, loop: bool = False) -> None:
        """Attach the local member and start connecting to the others. With
        ``loop``, a loop device is attached to the volume's file whenever this
        node is primary (and detached when it stops being primary)."""
        self.roles.want_loop = self.roles.want_loop or loop
        if self.local is not None:
            return
        self.local = await LocalVolume.open(self.config, self.node, self.ports.limiter)
        self.going_down = False
        self.role = Role.SECONDARY
        sm = self.local.statemap
        if sm.sb.role != Role.SECONDARY:
            sm.set_role(Role.SECONDARY)  # a daemon always comes up secondary
            await self.local.writer.sync_all()
        for name, m in self.members.items():
            m.peer_disk = sm.sb.peers[name].disk if name in sm.sb.peers else None
        self.rpo.note_up()
        # Started, not just scheduled: a path accepted right after finds the nursery.
        await self.ports.host().start(self._run)
        log.info("%s: up (disk %s)", self.name, sm.sb.disk.value)

    async def _run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The volume's runner: owns its nursery, and every task in it, until down."""
        stopped = self._stopped = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._cancel = scope
                async with trio.open_nursery() as n:
                    self._nursery = n
                    for peer in self.members:
                        if self.node < peer:  # the lower name dials; the other accepts
                            n.start_soon(self.sessions.dial_loop, peer)
                        else:
                            n.start_soon(self.sessions.poke, peer)
                    n.start_soon(self.writepath.auto_flush)
                    n.start_soon(self.quorum.run)
                    n.start_soon(self.takeover.run)
                    n.start_soon(self.rpo.run)
                    task_status.started()
        finally:
            self._nursery = None
            stopped.set()

    @property
    def running(self) -> bool:
        """The volume's nursery is open: its tasks may be started."""
        return self._nursery is not None

    @property
    def nursery(self) -> trio.Nursery:
        """The volume's own nursery (only while :attr:`running`)."""
        if self._nursery is None:
            raise Refused("volume-down", volume=self.name, node=self.node)
        return self._nursery

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start a task of this volume in its own nursery. Once the volume is
        going down there is nothing left for one to do (no local volume, no
        role, no session), so none starts."""
        if self._nursery is None:
            log.debug("%s: volume down; %s not started", self.name, getattr(fn, "__name__", fn))
            return
        self._nursery.start_soon(fn, *args)

    def attach_front(self, front: DeviceFront) -> None:
        """The front that shows this volume's file (see :attr:`Roles.device_path`)."""
        self.front = front

    def subscribe_role_change(self, callback: Callable[[VolumeEngine], None]) -> None:
        """Call ``callback(engine)`` after every role change (promote, demote)."""
        self._role_watchers.append(callback)

    def front_changed(self) -> None:
        """What the front shows of this volume changed (a test image came or
        went): its watchers are told as of a role change."""
        for callback in list(self._role_watchers):
            callback(self)

    def role_changed(self) -> None:
        if self.role == Role.PRIMARY:
            self.frames.forget_resume()  # our disk now changes by our own writes
        else:
            for m in self.members.values():
                if m.backlog is not None and m.backlog.entries:
                    m.backlog.drop("no longer primary")  # the next primary ships from its own term
        for callback in list(self._role_watchers):
            callback(self)

    async def down(self, *, force: bool = False) -> None:
        """Demote if primary, close member sessions, close the local member cleanly."""
        if self.local is None:
            return
        if self.role == Role.PRIMARY:
            await self.roles.demote(force=force, reason="down")
        self.going_down = True  # refuse new sessions while closing
        for m in self.members.values():
            s = m.session
            if s is not None:
                for p in list(s.paths):
                    await p.aclose(f"volume {self.name} going down on {self.node}")
                self.sessions.end_session(m, "volume down")
        if self._cancel is not None:
            self._cancel.cancel()
        if self._stopped is not None:
            # Every task of the volume ends before its files close: none is left behind.
            with trio.move_on_after(DOWN_GRACE) as waited:
                await self._stopped.wait()
            if waited.cancelled_caught:
                raise Refused("volume-tasks-stuck", volume=self.name, timeout=DOWN_GRACE)
        local, self.local = self.local, None
        await local.close()
        for m in self.members.values():
            m.set_state(LinkState.DISCONNECTED, "volume down")
            if m.backlog is not None:
                m.backlog.close()
        log.info("%s: down", self.name)

    def require_primary(self) -> LocalVolume:
        local = self.require_up()
        if self.role != Role.PRIMARY:
            raise NotPrimary(f"{self.name} is not primary on {self.node}")
        return local

    async def add_members(self, config: VolumeConfig) -> list[str]:
        """Take a config that adds members to this volume (``gmd reload``), while
        it runs: each new member gets a link, a slot in the state map and, once
        it connects, a full copy; its votes count from then on. How data is
        shipped to each member (compression, bandwidth) takes the new
        settings at once."""
        new = [name for name in config.members if name != self.node and name not in self.members]
        self.config = config
        self.rpo.alert.seconds, self.rpo.alert.bytes = config.rpo_alert_seconds, config.rpo_alert_bytes
        for name, m in self.members.items():
            m.reship(config.members[name].shipping)
        for name in new:
            self.members[name] = self._member_link(config, name)
        if self.local is not None:
            self.local.config = config
            self.local.add_new_members()
            await self.local.writer.sync_all()
            for name in new:
                if self.node < name and self._nursery is not None:
                    self._nursery.start_soon(self.sessions.dial_loop, name)
        self.quorum.notify()
        return new

    def resize_undo_log(self) -> None:
        """The config (reloaded) may bound the local member's undo log anew."""
        if self.local is not None:
            self.local.resize_undo(self.config.members[self.node])

    async def set_expected_votes(self, votes: int | None) -> dict[str, Any]:
        """``gmd quorum VOLUME --expected-votes N`` (None: back to the configured sum)."""
        sm = self.require_up().statemap
        if votes is not None and votes < 1:
            raise Refused("expected-votes-too-small", votes=votes)
        before = sm.sb.expected_votes
        sm.set_expected_votes(votes)
        await self.local.writer.sync_all()
        log.warning("%s: expected votes set by the operator: %s -> %s (quorum now needs %d)", self.name,
                    before if before is not None else "configured sum",
                    votes if votes is not None else "configured sum", self.quorum.needed())
        self.quorum.notify()
        return self.quorum.status()


    # ----------------------------------------------------- the public face

    async def promote(self, *, force: bool = False, reason: str = "operator") -> None:
        await self.roles.promote(force=force, reason=reason)

    async def demote(self, *, force: bool = False, reason: str = "operator") -> None:
        await self.roles.demote(force=force, reason=reason)

    async def switchover(self, target: str) -> dict[str, Any]:
        return await self.roles.switchover(target)

    @property
    def device_path(self) -> str | None:
        return self.roles.device_path

    @property
    def loop_device(self) -> str | None:
        return self.roles.loop_device

    async def read(self, offset: int, length: int) -> bytes:
        return await self.writepath.read(offset, length)

    async def write(self, offset: int, data: bytes) -> int:
        return await self.writepath.write(offset, data)

    async def flush(self) -> None:
        await self.writepath.flush()

    def check_peer_hello(self, hello: Intro) -> str | None:
        return self.handshake.check_peer_hello(hello)

    def make_intro(self, path: int, session: str, *, poke: bool = False) -> Intro:
        return self.handshake.make_intro(path, session, poke=poke)

    async def run_accepted_path(self, link: PeerLink) -> None:
        """Run a path a member dialled to us as a task of this volume, so that
        :meth:`down` ends it with every other task of the volume; the listener
        that accepted it only waits here for it to end."""
        if self._nursery is None or self.going_down:
            await link.aclose(f"volume {self.name} is down on {self.node}")
            return
        ended = trio.Event()

        async def path() -> None:
            try:
                await self.sessions.run_path(link, link.remote, dialled=False)
            finally:
                ended.set()

        self._nursery.start_soon(path)
        await ended.wait()

    def poked(self, peer: str) -> None:
        self.sessions.poked(peer)

    def start_verify(self) -> dict[str, str]:
        return self.copier.start_verify()

    async def verify(self) -> dict[str, Any]:
        return await self.copier.verify()

    def resync(self, rate: int | None = None) -> list[str]:
        return self.copier.resync(rate)

    async def resolve(self, *, dry_run: bool) -> dict[str, Any]:
        return await self.resolver.resolve(dry_run=dry_run)

    async def start_test_failover(self, *, loop: bool = False, space: int | None = None) -> dict[str, Any]:
        return await self.testfailover.start(loop=loop, space=space)

    async def end_test_failover(self) -> dict[str, Any]:
        return await self.testfailover.end()

    def status(self) -> dict[str, Any]:
        """``gmd status VOLUME --json`` from the running daemon."""
        return volume_status(self)
