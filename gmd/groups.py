"""Consistency groups: volumes whose far (``async``) members stop at one
instant of all of them (docs/DESIGN.md, "Consistency groups").

A database spread over several volumes is recoverable at the far site only
if all its volumes there hold the primary's data as of the same moment.

* **The primary** (:class:`GroupMarks`) puts a *mark* into every async
  member's stream of every volume of the group at once, every
  :data:`MARK_INTERVAL` seconds, with no ``await`` between them: a FLUSH
  carrying the mark's point, queued in each member's write order (behind
  the writes before it, in its backlog if they wait). A write that completed
  before another was issued is before any mark the other is after, so the
  writes before a mark, over all the group's volumes, are a consistent cut.
* **The far member** (:class:`GroupHold`, one per group on a node) applies a
  volume's writes only up to a mark that every volume of the group has
  received in order from the same primary; later writes wait, unapplied and
  unacknowledged (the primary's queue bound keeps that memory bounded). When
  the primary is lost, each volume still applies what came before that
  mark and drops the rest: all the group's volumes stop at the same mark.

The hold is only for a member whose own mode is ``async``: a ``sync`` or
``mwc`` member acknowledges every write before it completes, and holds
nothing back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio

from statemap import Role

if TYPE_CHECKING:
    from .replication import MemberLink
    from .writepath import WritePath

log = logging.getLogger(__name__)

MARK_INTERVAL = 0.1  # seconds between a group's marks: the far site's extra RPO at most


class GroupVolume(Protocol):
    """What a group needs of a volume on the primary (the engine provides it)."""

    members: dict[str, MemberLink]
    role: Role
    writepath: WritePath
    @property
    def name(self) -> str: ...


class GroupMarks:
    """The primary's marks of one consistency group."""

    def __init__(self, name: str):
        self.name = name
        self.volumes: list[GroupVolume] = []
        self.point = 0
        self.marks = 0

    def mark(self) -> int:
        """One mark, into every async member of every volume of the group
        this node is primary for, at once (no await). Returns its point."""
        # Microseconds of the wall clock, and always more than the last: a
        # restarted primary's marks go on rising.
        self.point = max(self.point + 1, int(time.time() * 1_000_000))
        for v in self.volumes:
            if v.role != Role.PRIMARY:
                continue
            wp = v.writepath
            for m in v.members.values():
                if m.is_async:
                    m.ship_group_mark(self.point, wp.gseq, wp.in_sync_gseq)
        self.marks += 1
        return self.point

    async def run(self) -> None:
        while True:
            await trio.sleep(MARK_INTERVAL)
            if any(v.role == Role.PRIMARY for v in self.volumes):
                try:
                    self.mark()
                except Exception as e:  # a mark is an accelerator of nothing: never take the daemon down
                    log.error("group %s: mark failed: %s", self.name, e)


class GroupHold:
    """A far node's view of one group: how far each volume received the
    marks of which primary, and so how far every volume may apply."""

    def __init__(self, name: str, volumes: list[str]):
        self.name = name
        self.volumes = list(volumes)  # the group's volumes whose member here is async
        self._received: dict[str, tuple[str, int]] = {}  # volume -> (primary, last mark received in order)
        self._waiters: dict[str, Callable[[], None]] = {}  # volume -> its applier's wake-up

    def received(self, volume: str, primary: str, point: int) -> None:
        """``volume`` received, in order, every write of ``primary`` before mark ``point``."""
        before = self.safe(primary)
        self._received[volume] = (primary, point)
        if self.safe(primary) != before:
            for wake in list(self._waiters.values()):
                wake()

    def safe(self, primary: str) -> int:
        """The mark up to which every volume of the group may apply
        ``primary``'s writes: one all have received from it (0: none)."""
        points = []
        for v in self.volumes:
            got = self._received.get(v)
            if got is None or got[0] != primary:
                return 0
            points.append(got[1])
        return min(points) if points else 0

    def watch(self, volume: str, wake: Callable[[], None]) -> None:
        """Call ``wake()`` whenever the safe mark moves (the volume's applier)."""
        self._waiters[volume] = wake

    def unwatch(self, volume: str, wake: Callable[[], None]) -> None:
        if self._waiters.get(volume) is wake:
            del self._waiters[volume]

    def status(self) -> dict:
        return {"volumes": list(self.volumes),
                "received": {v: {"primary": p, "mark": pt} for v, (p, pt) in self._received.items()}}


class HoldView:
    """One volume's applier's handle on its group's hold, for the writes of
    one primary (what :class:`gmd.receiver.Applier` calls)."""

    def __init__(self, hold: GroupHold, volume: str, primary: str):
        self._hold, self._volume, self._primary = hold, volume, primary

    def received(self, point: int) -> None:
        self._hold.received(self._volume, self._primary, point)

    def safe(self) -> int:
        return self._hold.safe(self._primary)

    def watch(self, wake: Callable[[], None]) -> None:
        self._hold.watch(self._volume, wake)

    def unwatch(self, wake: Callable[[], None]) -> None:
        self._hold.unwatch(self._volume, wake)
