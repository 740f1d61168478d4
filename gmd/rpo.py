"""Each member's recovery point as the primary sees it (what that member
would lack if the primary were lost now), and the volume's alert when it
crosses the configured threshold (docs/DESIGN.md, "RPO and lag").

A member lacks two kinds of writes: those shipped and not yet acknowledged
(an ``async`` member's queue; a ``sync`` member's few in flight), and those
marked in its out-of-sync bitmap (it was away, or fell behind). The first
kind has exact ages; the second only the time its first mark was made, kept
in memory (:attr:`MemberLink.lacking_since`). Marks older than this daemon
are dated from its start, and the status says the figure is a lower bound.

:func:`member_rpo` and :class:`RpoAlert` are pure; :class:`RpoWatch` is the
primary's once-a-second check that logs each crossing once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import trio

from statemap import Role

if TYPE_CHECKING:
    from .config import VolumeConfig
    from .replication import MemberLink
    from .volume import LocalVolume

log = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0  # seconds between the primary's RPO checks


@dataclass(frozen=True)
class MemberRpo:
    """What one member lacks of the primary's writes."""

    bytes: int  # shipped and unacknowledged, plus marked out of sync
    seconds: float  # age of the oldest write it lacks (0: it lacks none)
    lower_bound: bool  # marks older than this daemon: ``seconds`` is at least this
    queued_bytes: int
    oldest_unacked_seconds: float
    out_of_sync_bytes: int

    def to_json(self, alert: bool) -> dict[str, Any]:
        return {"bytes": self.bytes, "seconds": round(self.seconds, 3), "seconds_lower_bound": self.lower_bound,
                "queued_bytes": self.queued_bytes,
                "oldest_unacked_seconds": round(self.oldest_unacked_seconds, 3),
                "out_of_sync_bytes": self.out_of_sync_bytes, "alert": alert}


def member_rpo(*, queued_bytes: int, oldest_unacked_age: float, out_of_sync_bytes: int,
               marked_for: float | None, marked_before_start: bool) -> MemberRpo:
    """The recovery point of a member from the primary's figures: bytes queued
    to it and unacknowledged (the oldest of them ``oldest_unacked_age``
    seconds old), bytes marked for it, marked ``marked_for`` seconds ago."""
    seconds = max(oldest_unacked_age, 0.0)
    lower = False
    if out_of_sync_bytes and marked_for is not None:
        seconds = max(seconds, marked_for)
        lower = marked_before_start
    return MemberRpo(queued_bytes + out_of_sync_bytes, seconds, lower, queued_bytes, max(oldest_unacked_age, 0.0),
                     out_of_sync_bytes)


class RpoAlert:
    """The alert threshold of a volume and which members are over it."""

    def __init__(self, seconds: float | None, limit_bytes: int | None):
        self.seconds = seconds
        self.bytes = limit_bytes
        self.over: dict[str, float] = {}  # member -> wall time it went over

    @property
    def enabled(self) -> bool:
        return self.seconds is not None or self.bytes is not None

    def exceeded(self, rpo: MemberRpo) -> list[str]:
        """Which thresholds ``rpo`` is past, in words (empty: within)."""
        why = []
        if self.seconds is not None and rpo.seconds > self.seconds:
            why.append(f"{rpo.seconds:.1f} s of writes > {self.seconds} s")
        if self.bytes is not None and rpo.bytes > self.bytes:
            why.append(f"{rpo.bytes} bytes > {self.bytes} bytes")
        return why

    def judge(self, member: str, rpo: MemberRpo, now: float) -> tuple[str, list[str]] | None:
        """("over", reasons) when ``member`` just went past the threshold,
        ("within", []) when it just came back, None when nothing changed."""
        why = self.exceeded(rpo)
        if why and member not in self.over:
            self.over[member] = now
            return "over", why
        if not why and member in self.over:
            del self.over[member]
            return "within", []
        return None

    def forget(self, member: str) -> None:
        self.over.pop(member, None)

    def to_json(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "bytes": self.bytes,
                "members_over": {m: round(t, 3) for m, t in self.over.items()}}


class RpoVolume(Protocol):
    """What the RPO check needs of its volume (the engine provides it)."""

    config: VolumeConfig
    local: LocalVolume | None
    members: dict[str, MemberLink]
    role: Role
    @property
    def name(self) -> str: ...


class RpoWatch:
    """The primary's view of every member's recovery point, and its alert."""

    def __init__(self, engine: RpoVolume):
        self.engine = engine
        self.alert = RpoAlert(engine.config.rpo_alert_seconds, engine.config.rpo_alert_bytes)
        self.started = time.time()
        self._from_start: set[str] = set()  # members whose marks predate this daemon

    def note_up(self) -> None:
        """The volume came up: members with marks already have lacked them
        since before now (how long, this daemon cannot know)."""
        local = self.engine.local
        if local is None:
            return
        self.started = time.time()
        for m in self.engine.members.values():
            if m.name in local.statemap.sb.peers and local.statemap.out_of_sync_bytes(m.name):
                m.lacking_since = self.started
                self._from_start.add(m.name)

    def of(self, m: MemberLink, now_trio: float | None = None, now_wall: float | None = None) -> MemberRpo | None:
        """``m``'s recovery point; None when this node is not primary (a
        secondary does not know what the primary has that it lacks)."""
        local = self.engine.local
        if local is None or self.engine.role != Role.PRIMARY:
            return None
        now_trio = trio.current_time() if now_trio is None else now_trio
        now_wall = time.time() if now_wall is None else now_wall
        oos = local.statemap.out_of_sync_bytes(m.name) if m.name in local.statemap.sb.peers else self.engine.config.size
        if not oos and m.connected and not m.behind and not (m.backlog is not None and m.backlog.has_waiting):
            # Level (as far as marks go) and taking writes: it lacks only what
            # is in flight. Not while it is away: a session that just ended
            # has its lost writes marked a moment later (its lacking_since is
            # kept from their age).
            m.lacking_since = None
            self._from_start.discard(m.name)
        queued, age = m.lag(now_trio)
        marked_for = now_wall - m.lacking_since if m.lacking_since is not None else None
        return member_rpo(queued_bytes=queued, oldest_unacked_age=age, out_of_sync_bytes=oos,
                          marked_for=marked_for, marked_before_start=m.name in self._from_start)

    def status(self, m: MemberLink) -> dict[str, Any] | None:
        rpo = self.of(m)
        return None if rpo is None else rpo.to_json(m.name in self.alert.over)

    def check(self) -> None:
        """Log each member's crossing of the alert threshold, once each way."""
        if not self.alert.enabled:
            return
        if self.engine.role != Role.PRIMARY or self.engine.local is None:
            self.alert.over.clear()
            return
        now = time.time()
        for m in self.engine.members.values():
            rpo = self.of(m, now_wall=now)
            if rpo is None:
                continue
            change = self.alert.judge(m.name, rpo, now)
            if change is None:
                continue
            state, why = change
            if state == "over":
                log.warning("%s: member %s: RPO alert: it would lose %s if the primary were lost now (%s)",
                            self.engine.name, m.name, _amount(rpo), "; ".join(why))
            else:
                log.info("%s: member %s: RPO back within the alert threshold (%s)", self.engine.name, m.name,
                         _amount(rpo))

    async def run(self) -> None:
        while True:
            await trio.sleep(CHECK_INTERVAL)
            try:
                self.check()
            except Exception as e:  # a status figure must never take the volume down
                log.error("%s: RPO check failed: %s", self.engine.name, e)


def _amount(rpo: MemberRpo) -> str:
    return f"{rpo.bytes} bytes, {rpo.seconds:.1f} s{' or more' if rpo.lower_bound else ''} of writes"
