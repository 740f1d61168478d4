"""Automatic takeover and the service commands of one volume (docs/DESIGN.md,
"Automatic takeover").

With ``auto_promote = true``:

* a secondary whose disk is ``uptodate`` and that has seen no primary for
  :data:`~quorum.takeover.TAKEOVER_GRACE` seconds promotes itself, unless a
  connected member ahead of it in the promotion order could (the order and
  the rules are :mod:`quorum.takeover`). The promotion is the operator's
  ``gmd primary`` without ``--force``: it needs quorum (member votes, or the
  witness's ``promote``, which it grants only once the old primary's lease has
  ended), so an automatic takeover can never make a second primary that
  writes;
* a primary that has lost quorum, and whose witness lease is no longer being
  renewed, fences itself before that lease can end: it runs the stop command
  and steps down (its waiting writes fail with EIO; none of them was
  acknowledged).

Independently of ``auto_promote``, a configured ``start_command`` runs after
this node becomes primary and ``stop_command`` before it stops being primary
(HACMP's application server start and stop scripts), with the ``GMD_*``
variables of :meth:`ServiceCommands.environment`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any, Protocol

import trio

from quorum import member_votes
from quorum.takeover import (
    FENCE_AFTER,
    SILENT_AFTER,
    TAKEOVER_GRACE,
    PeerView,
    defer_to,
    fresh_votes,
    lease_left,
    must_fence,
    promotion_order,
)
from statemap import DiskState, Role

from .commands import run_command
from .errors import GmdError

if TYPE_CHECKING:
    from .config import VolumeConfig
    from .engine import NodePorts
    from .quorum_keeper import QuorumKeeper
    from .replication import MemberLink
    from .roles import Roles
    from .volume import LocalVolume

log = logging.getLogger(__name__)

POLL = 0.25  # seconds between takeover checks (a fence must start well within LEASE - FENCE_AFTER)
RETRY = 1.0  # seconds between promotion attempts (each may ask the witnesses)


class TakeoverVolume(Protocol):
    """What the takeover needs of its volume (the engine provides it)."""

    config: VolumeConfig
    local: LocalVolume | None
    members: dict[str, MemberLink]
    @property
    def name(self) -> str: ...
    node: str
    ports: NodePorts
    quorum: QuorumKeeper
    role: Role
    roles: Roles


class ServiceCommands:
    """Runs the volume's start and stop commands and remembers how they ended."""

    def __init__(self, engine: TakeoverVolume):
        self.engine = engine
        self.last: dict[str, dict[str, Any]] = {}  # "start"/"stop" -> how it last ended

    def environment(self, event: str, reason: str) -> dict[str, str]:
        """The command's environment: ours plus ``GMD_EVENT`` (start, stop),
        ``GMD_VOLUME``, ``GMD_NODE``, ``GMD_REASON`` (operator, auto-promote,
        switchover, self-fence, step-down, down), ``GMD_DEVICE`` (the volume's
        file in the FUSE mount) and ``GMD_LOOP`` (its loop device, or empty)."""
        engine = self.engine
        env = dict(os.environ)
        env.update(GMD_EVENT=event, GMD_VOLUME=engine.name, GMD_NODE=engine.node, GMD_REASON=reason,
                   GMD_DEVICE=engine.roles.device_path or "", GMD_LOOP=engine.roles.loop_device or "")
        return env

    async def run(self, event: str, reason: str, timeout: float | None = None) -> dict[str, Any] | None:
        """Run the ``event`` ("start" or "stop") command if one is configured,
        at most ``timeout`` seconds (default: ``command_timeout``); its whole
        process group is killed after that. Returns how it ended (None: no
        command). Never raises for the command's own failure: a failed start
        or stop is logged and shown in status, and the role change it belongs
        to goes on (data safety never depends on it; quorum does)."""
        cfg = self.engine.config
        argv = cfg.start_command if event == "start" else cfg.stop_command
        if not argv:
            return None
        limit = cfg.command_timeout if timeout is None else max(0.1, min(timeout, cfg.command_timeout))
        log.info("%s: running the %s command (%s, at most %.1f s): %s", self.engine.name, event, reason, limit,
                 " ".join(argv))
        result = {**(await run_command(argv, self.environment(event, reason), limit)), "reason": reason}
        if result["rc"] is None and result["error"]:
            log.error("%s: the %s command could not be started: %s", self.engine.name, event, result["error"])
            self.last[event] = result
            return result
        text = result["output"]
        level = logging.INFO if result["ok"] else logging.ERROR
        log.log(level, "%s: the %s command %s in %.2f s%s", self.engine.name, event,
                "succeeded" if result["ok"] else (result["error"] or f"failed (exit {result['rc']})"),
                result["seconds"], f"; output: {text[-500:]}" if text else "")
        self.last[event] = result
        return result


def _kind(state: str) -> str:
    """A state without its numbers: what the log compares."""
    return re.sub(r"\d+(\.\d+)?", "N", state)


class Takeover:
    """The ``auto_promote`` loop of one volume: promote when the primary is
    gone, fence when this primary has lost quorum."""

    def __init__(self, engine: TakeoverVolume):
        self.engine = engine
        self.state = "off"
        self.since = time.time()
        self._primary_seen = 0.0  # trio time a primary was last in sight (or we came up)
        self._next_try = 0.0
        self.promotions = 0  # automatic promotions since the daemon started
        self.fences = 0  # self-fencing step-downs since the daemon started
        self.last_event: dict[str, Any] | None = None

    def _set(self, state: str, level: int = logging.DEBUG) -> None:
        if state != self.state:
            # Logged when its kind changes: "granting nothing for 4.7 s more"
            # and "... 3.7 s more" are one state for the log, asked every second.
            if _kind(state) != _kind(self.state):
                log.log(level, "%s: takeover: %s", self.engine.name, state)
                self.since = time.time()
            self.state = state

    def order(self) -> list[str]:
        return promotion_order((name, m.mode) for name, m in self.engine.config.members.items())

    def status(self) -> dict[str, Any]:
        """The ``takeover`` part of ``gmd status``."""
        return {"auto_promote": self.engine.config.auto_promote, "state": self.state, "since": self.since,
                "order": self.order(), "promotions": self.promotions, "fences": self.fences,
                "last": self.last_event}

    async def run(self) -> None:
        """Check every :data:`POLL` seconds while the volume is up."""
        self._primary_seen = trio.current_time()  # a primary gets the grace period to be seen first
        while self.engine.local is not None:
            if not self.engine.config.auto_promote:  # a reload may switch it on or off
                self._set("off")
            elif self.engine.role == Role.PRIMARY:
                self._primary_seen = trio.current_time()
                await self._check_fence()
            else:
                await self._consider_promotion()
            await trio.sleep(POLL)

    async def _consider_promotion(self) -> None:
        engine = self.engine
        now = trio.current_time()
        peers = {name: PeerView(self._live(m, now), m.peer_role == Role.PRIMARY, m.peer_disk == DiskState.UPTODATE)
                 for name, m in engine.members.items()}
        primary = next((n for n, p in peers.items() if p.connected and p.primary), None)
        if primary is not None:
            self._primary_seen = now
            self._set(f"following primary {primary}")
            return
        disk = engine.local.statemap.sb.disk
        if disk != DiskState.UPTODATE:
            self._set(f"not promotable: disk {disk.value}")
            return
        if now - self._primary_seen < TAKEOVER_GRACE:
            self._set(f"no primary in sight; promoting after {TAKEOVER_GRACE:.0f} s without one")
            return
        ahead = defer_to(engine.node, self.order(), peers)
        if ahead is not None:
            self._set(f"leaving the takeover to {ahead} (ahead in the promotion order)")
            return
        if now < self._next_try:
            return
        self._next_try = now + RETRY
        try:
            await engine.roles.promote(reason="auto-promote")
        except GmdError as ex:
            self._set(f"cannot promote yet: {ex}", logging.INFO)
            return
        except Exception as ex:  # a takeover's failure never takes the volume down
            log.error("%s: automatic promotion failed: %s: %s", engine.name, type(ex).__name__, ex)
            self._set(f"cannot promote: {type(ex).__name__}: {ex}")
            return
        if engine.role == Role.PRIMARY:
            self.promotions += 1
            self.last_event = {"event": "auto-promote", "at": time.time()}
            log.warning("%s: took over automatically as primary (no primary for %.1f s, quorum and an "
                        "uptodate disk here)", engine.name, now - self._primary_seen)
            self._set("primary (promoted automatically)", logging.INFO)

    @staticmethod
    def _live(m: MemberLink, now: float) -> bool:
        return m.connected and now - m.last_heard <= SILENT_AFTER

    async def _check_fence(self) -> None:
        engine = self.engine
        q = engine.quorum
        sm = engine.local.statemap
        if sm.sb.forced_primary:
            self._set("primary (forced by the operator: never fenced automatically)")
            return
        now = trio.current_time()
        votes_of = {w: c.votes for w, c in engine.ports.witnesses.items()}
        fresh = fresh_votes(q.answers, votes_of, now)
        # Members that still answer: a blackholed link looks connected until
        # the path times out, long after the lease would have ended.
        votes = engine.config.members
        member = member_votes(votes[engine.node].votes, (votes[n].votes for n, m in engine.members.items()
                                                   if self._live(m, now)))
        needed = q.needed()
        if not must_fence(member, needed, fresh):
            self._set("primary")
            return
        left = lease_left(q.grants, now)
        log.warning("%s: quorum lost as primary (%d votes of members heard within %.0f s, %d needed; no witness "
                    "renewal granted for %.1f s; the lease ends in %.1f s): fencing: stop command, then stepping "
                    "down", engine.name, member, SILENT_AFTER, needed, FENCE_AFTER, left)
        self._set("fencing: quorum lost", logging.WARNING)
        self.fences += 1
        self.last_event = {"event": "self-fence", "at": time.time(), "lease_left": round(left, 3)}
        try:
            await engine.roles.demote(force=True, reason="self-fence", command_deadline=max(0.5, left - 0.25))
        except Exception as ex:  # a failed step-down is logged; the writes still wait for quorum
            log.error("%s: fencing: stepping down failed: %s: %s", engine.name, type(ex).__name__, ex)
        self._primary_seen = trio.current_time()
