"""Role changes of one volume: promotion (with its quorum, newer-data and
disk checks, and the survivors' reconciliation), demotion, the planned
switchover and the take-over it asks of the target, and the loop device a
primary may attach to its file.
"""

from __future__ import annotations

import logging
import secrets
import subprocess
import time
from typing import TYPE_CHECKING, Any, Protocol

import trio

from quorum.generations import Verdict
from statemap import DiskState, Role

from .errors import GmdError, Refused
from .replication import MemberLink
from .undolog import iso_utc

if TYPE_CHECKING:
    from .engine import DeviceFront
    from .peerstate import PeerState
    from .quorum_keeper import QuorumKeeper
    from .sessions import Sessions
    from .takeover import ServiceCommands
    from .volume import LocalVolume
    from .writepath import WritePath

log = logging.getLogger(__name__)

SWITCHOVER_TIMEOUT = 30.0  # seconds the target of a switchover has to take over


class RolesVolume(Protocol):
    """What the roles needs of its volume (the engine provides it)."""

    front: DeviceFront | None
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
    def role_changed(self) -> None: ...
    role_epoch: int
    service: ServiceCommands
    sessions: Sessions
    def spawn(self, fn: Any, *args: Any) -> None: ...
    writepath: WritePath


class Roles:
    """Promote, demote, switch over; owns the loop device."""

    def __init__(self, engine: RolesVolume):
        self.engine = engine
        self.want_loop = False
        self.loop_device: str | None = None

    async def promote(self, *, force: bool = False, reason: str = "operator") -> None:
        """Become primary (docs/DESIGN.md, "Promotion"); ``reason`` (operator,
        auto-promote, switchover) is passed to the start command."""
        local = self.engine.require_up()
        if self.engine.role == Role.PRIMARY:
            return
        other = [m.name for m in self.engine.members.values() if m.connected and m.peer_role == Role.PRIMARY]
        if other:
            raise Refused("other-primary", volume=self.engine.name, others=", ".join(other))
        sm = local.statemap
        # A verdict from before we caught up (and adopted a newer generation) is stale.
        newer = [m.name for m in self.engine.members.values()
                 if m.connected and m.verdict in (Verdict.LOCAL_BEHIND, Verdict.LOCAL_NEEDS_FULL)
                 and m.verdict_generation == sm.sb.generations.current]
        if newer and not force:
            raise Refused("peer-newer", volume=self.engine.name, newer=", ".join(newer), node=self.engine.node,
                          first=newer[0])
        q = self.engine.quorum
        votes, needed = q.member_votes(), q.needed()
        if votes < needed and sm.sb.disk == DiskState.UPTODATE:
            g = sm.sb.generations
            votes += await q.ask_witnesses("promote", g.current, g.history, q.outdated())
        if votes < needed:
            if not force and q.primary_writes_alone:
                raise Refused("no-quorum-primary-writes-alone", volume=self.engine.name, votes=votes, needed=needed)
            if not force:
                witnesses = "; ".join(f"witness {w}: {a[1]}" for w, a in q.answers.items())
                raise Refused("no-quorum", volume=self.engine.name, votes=votes, needed=needed,
                              expected=q.expected(), witnesses=f" ({witnesses})" if witnesses else "")
            log.warning("%s: promoted WITHOUT quorum (%d of %d votes) by the operator's --force; writes go on "
                        "without quorum until demoted", self.engine.name, votes, needed)
            sm.set_forced_primary(True)
        if local.test is not None:
            # The member's disk serves writes now: a test image of it ends.
            local.end_test("the member was promoted")
        rolled_back = None
        if sm.sb.disk != DiskState.UPTODATE:
            if not force:
                raise Refused("not-uptodate", volume=self.engine.name, disk=sm.sb.disk.value)
            # Lost mid-catch-up: the disk is out of write order. Its undo log
            # returns it to the image it held before the catch-up began.
            rolled_back = await local.roll_back()
            log.warning("%s: forced promotion of a %s disk; it becomes the copy source", self.engine.name,
                        sm.sb.disk.value)
            sm.make_copy_source()
            sm.begin_use()
        elif local.catching_up:
            # Told uptodate, not yet flushed: the disk holds every write; make
            # it durable and end the catch-up (nothing to roll back).
            await local.device.flush()
            await local.end_catch_up("promoted with every write")
        if rolled_back is not None:
            # The other members may hold the newer contents of these regions
            # (the lost primary's, or what the copy sent them): without marks
            # a later reconciliation would leave them diverged.
            for name in sm.sb.peers:
                for first, end in rolled_back.runs:
                    sm.mark_regions_out_of_sync(name, range(first, end))
            log.warning("%s: rolled back the interrupted catch-up: %d bytes in %d regions restored from the undo "
                        "log; the disk is its consistent image of %s, and those regions are marked for every other "
                        "member", self.engine.name, rolled_back.bytes, rolled_back.regions,
                        iso_utc(rolled_back.consistent_at))
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
            known = sorted({i for m in self.engine.members.values() if m.connected
                            and isinstance(i := (m.peer_hello_info or {}).get("identity"), str) and i})
            sm.adopt_identity(known[0] if len(known) == 1 else secrets.token_hex(16))
            log.info("%s: volume identity %s… %s", self.engine.name, sm.identity[:8],
                     "learned from a member" if len(known) == 1 else "created by the primary")
        reconcile = self.engine.sessions.lost_primary
        if reconcile is not None:
            self.engine.sessions.fold_lost_primary(reconcile, f"taking over from lost primary {reconcile}")
        self.engine.writepath.continue_sequence()
        g = sm.sb.generations.current
        for name, rec in sm.sb.peers.items():
            if rec.copy is None and not sm.out_of_sync_bytes(name) and rec.bitmap_gen != g:
                sm.set_bitmap_generation(g, member=name)
        self.engine.role = Role.PRIMARY
        self.engine.role_epoch += 1
        sm.set_role(Role.PRIMARY)
        sm.set_promoted_at(time.time())
        await local.writer.sync_all()
        self.engine.role_changed()
        if self.want_loop and self.device_path is not None:
            self.loop_device = await trio.to_thread.run_sync(losetup_attach, self.device_path)
            log.info("%s: loop device %s", self.engine.name, self.loop_device)
        for m in self.engine.members.values():
            if not m.connected:
                continue
            if reconcile is not None and m.session is not None:
                log.info("%s: reopening the session with %s to reconcile after the loss of %s",
                         self.engine.name, m.name, reconcile)
                for p in list(m.session.paths):
                    await p.aclose(f"new primary {self.engine.node} reconciles after the loss of {reconcile}")
            else:
                await self.engine.peerstate.tell_member_state(m)
        self.engine.sessions.lost_primary = None
        log.info("%s: primary", self.engine.name)
        # The application starts in the background: the role is ours already,
        # and a slow start must not hold up the operator's command or a takeover.
        self.engine.spawn(self.engine.service.run, "start", reason)

    async def device_holders(self) -> list[str]:
        """Who keeps the device in use: open handles of the volume file (other than
        our own loop device's) and mounts of the loop device."""
        holders = []
        front = self.engine.front
        if front is not None:
            n = front.open_handles() - (1 if self.loop_device else 0)
            if n > 0:
                holders.append(f"{n} open handle(s) of {self.device_path}")
        if self.loop_device is not None:
            mounts = await trio.to_thread.run_sync(_mounts_of, self.loop_device)  # no file I/O on the event loop
            holders.extend(f"{self.loop_device} mounted on {where}" for where in mounts)
        return holders

    async def demote(self, *, force: bool = False, reason: str = "operator",
                     command_deadline: float | None = None) -> None:
        """Become secondary: run the stop command (at most ``command_deadline``
        seconds when given: a fencing node's lease is running out), then drain
        and flush writes everywhere. Refuses while the device is in use (a
        mounted file system, an open file) unless ``force``: taking it away
        would turn that user's I/O into errors."""
        local = self.engine.require_up()
        if self.engine.role != Role.PRIMARY:
            return
        await self.engine.service.run("stop", reason, command_deadline)
        holders = await self.device_holders()
        if holders and not force:
            raise Refused("device-in-use", volume=self.engine.name, holders="; ".join(holders))
        if holders:
            log.warning("%s: demoting with the device in use (%s)", self.engine.name, "; ".join(holders))
        if self.loop_device is not None:
            # Detach first: the loop driver flushes through us while we are primary.
            await trio.to_thread.run_sync(losetup_detach, self.loop_device)
            self.loop_device = None
        self.engine.role = Role.SECONDARY  # no new writes from here on
        self.engine.role_epoch += 1
        self.engine.role_changed()
        self.engine.quorum.notify()  # suspended writes wake and fail
        await self.engine.writepath.idle.wait()
        await self.engine.writepath.flush_barrier()
        local.statemap.set_role(Role.SECONDARY)
        local.statemap.set_forced_primary(False)
        await local.writer.sync_all()
        await self.engine.quorum.release()
        for m in self.engine.members.values():
            if m.connected:
                await self.engine.peerstate.send_state(m, {"role": Role.SECONDARY.value})
        log.info("%s: secondary", self.engine.name)

    @property
    def device_path(self) -> str | None:
        """The volume's file in the node's mount, while this node is primary."""
        if self.engine.role == Role.PRIMARY and self.engine.front is not None:
            return self.engine.front.path
        return None

    async def switchover(self, target: str) -> dict[str, Any]:
        """``gmd switchover VOLUME --to NODE``: a planned role swap. Refused, with
        this node staying primary, unless ``target`` is connected and holds
        every write (uptodate, nothing marked, no async backlog). Then new
        writes stop here, those in flight drain and are flushed everywhere,
        this node demotes and the target promotes itself; replication then
        runs the other way. If the target does not take over in time, this
        node becomes primary again."""
        self.engine.require_primary()
        m = self.engine.members.get(target)
        if m is None:
            raise Refused("not-a-member", target=target, volume=self.engine.name,
                          members=", ".join(self.engine.members))
        sm = self.engine.local.statemap
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
            raise Refused("switchover-refused", volume=self.engine.name, target=target, problems="; ".join(problems),
                          node=self.engine.node)
        log.info("%s: switchover to %s: draining writes", self.engine.name, target)
        await self.demote(reason="switchover")  # refuses, changing nothing, while the device is in use
        with trio.move_on_after(SWITCHOVER_TIMEOUT):
            while m.connected and m.queued_bytes:  # an async member drains its queue
                await m.wait_queue_at_most(0)
        if not (m.connected and sm.sb.peers[target].disk == DiskState.UPTODATE and not m.queued_bytes):
            await self.promote(reason="switchover")
            raise Refused("switchover-target-lost", volume=self.engine.name, target=target, node=self.engine.node)
        await self.engine.peerstate.send_state(m, {"take_over": True})
        with trio.move_on_after(SWITCHOVER_TIMEOUT):
            while not (m.connected and m.peer_role == Role.PRIMARY):
                await m.changed.wait()
        if m.connected and m.peer_role == Role.PRIMARY:
            log.info("%s: switchover done: %s is primary, %s secondary", self.engine.name, target, self.engine.node)
            return {"primary": target, "secondary": self.engine.node}
        reason = m.reason or "no answer"
        try:
            await self.promote(reason="switchover")
        except GmdError as e:
            raise Refused("switchover-stranded", volume=self.engine.name, target=target, why=reason,
                          node=self.engine.node, error=e) from None
        raise Refused("switchover-no-take-over", volume=self.engine.name, target=target, timeout=SWITCHOVER_TIMEOUT,
                      why=reason, node=self.engine.node)

    async def take_over(self, m: MemberLink) -> None:
        """The old primary handed over (switchover): promote, or say why not."""
        try:
            await self.promote(reason="switchover")
        except Exception as e:
            log.error("%s: switchover from %s: cannot take over: %s", self.engine.name, m.name, e)
            await self.engine.peerstate.send_state(m, {"take_over_failed": str(e)})

def losetup_attach(path: str) -> str:
    """Attach a loop device to ``path`` (the volume's file, or a test image); its name."""
    r = subprocess.run(["losetup", "--find", "--show", path], capture_output=True, text=True)
    if r.returncode != 0:
        raise Refused("losetup-failed", path=path, why=r.stderr.strip())
    return r.stdout.strip()


def losetup_detach(dev: str) -> None:
    """Detach loop device ``dev`` (a busy one is detached once its last user closes it)."""
    r = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True)
    if r.returncode != 0:
        log.warning("losetup -d %s: %s", dev, r.stderr.strip())




def _mounts_of(device: str) -> list[str]:
    """Where ``device`` is mounted, from /proc/self/mounts (empty if unreadable)."""
    try:
        with open("/proc/self/mounts") as f:
            return [parts[1] for line in f if (parts := line.split()) and parts[0] == device]
    except OSError:
        return []
