"""State-change events (``gmd events``): what changed in a volume, one JSON
object per event, in order.

Two parts, both free of sockets and disks:

* :class:`VolumeEvents` turns successive status snapshots of one volume (the
  dicts of :func:`gmd.status.volume_status`, or None while the volume is down)
  into events: role, disk and link of each member, open paths, replication
  state, quorum, suspended writes, copy/merge/verify start, progress
  milestones and end, split-brain, RPO alert, test failover. Deriving events
  from the snapshot (instead of a call at every place a state changes) means
  an event can never disagree with ``gmd status``, and ``--now`` is the same
  function run against an empty past.
* :class:`LogEvents` turns the warnings and errors the daemon logs into
  ``error`` events.

:class:`gmd.eventfeed.EventHub` numbers, times and hands them to readers.

Every event has ``seq`` (increasing per daemon; a reader of one volume sees
gaps), ``time`` (ISO 8601, UTC, milliseconds), ``node``, ``volume`` (null for
the node's own events) and ``kind``; the other fields depend on the kind and
are listed in :data:`KINDS` (documented in docs/DESIGN.md, "Events").
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .eventfeed import EventHub

#: Every kind of event and the fields it carries besides the common ones.
#: ``was`` is the previous value (null in ``--now`` events and when unknown).
KINDS: dict[str, tuple[str, ...]] = {
    "volume": ("state",),  # "up" or "down" on this node
    "role": ("role", "was"),
    "disk": ("member", "disk", "was"),
    "link": ("member", "link", "was", "reason"),
    "path": ("member", "path", "state"),  # one path of a member link: "up" or "down"
    "replication": ("member", "replication", "was"),
    "quorum": ("ok", "was", "votes", "needed", "expected"),
    "suspended": ("suspended", "since"),  # writes wait for quorum (true) or go on again (false)
    "copy_start": ("member", "copy", "pass", "total_bytes"),
    "copy_progress": ("member", "copy", "pass", "percent", "done_bytes", "total_bytes", "rate_bytes_per_s",
                      "eta_s"),
    "copy_end": ("member", "copy", "pass", "complete", "done_bytes", "total_bytes", "sent_bytes", "seconds"),
    "verify_start": ("member", "total_bytes"),
    "verify_progress": ("member", "percent", "done_bytes", "total_bytes", "eta_s"),
    "verify_end": ("member", "compared_bytes", "differing_regions", "skipped"),
    "split_brain": ("member", "reason"),
    "rpo_alert": ("alert", "members_over"),
    "test_failover": ("active", "reason"),
    "error": ("level", "message"),  # a warning or error the daemon logged
    "hook": ("hook", "on_seq", "on_kind", "ok", "rc", "error", "seconds"),  # how a hook run ended (gmd.hooks)
    "dropped": ("count",),  # this reader fell behind: ``count`` events it did not get
    "now_end": (),  # with --now: the current state has been told; changes follow
}

MILESTONES = (25, 50, 75)  # percent of a copy or verify announced by a progress event
QUEUE_LIMIT = 1024  # events one subscriber may have unread before the oldest go


def iso_now() -> str:
    """The current wall time as the events' ``time`` field."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _percent(done: int, total: int) -> int:
    return 100 if total <= 0 else min(100, done * 100 // total)


def _crossed(before: int, now: int) -> int | None:
    """The highest milestone passed going from ``before`` to ``now`` percent."""
    passed = [m for m in MILESTONES if before < m <= now]
    return passed[-1] if passed else None


class VolumeEvents:
    """The events of one volume, from its successive status snapshots.

    Call :meth:`update` with each new snapshot (None: the volume is down on
    this node); it returns what changed since the previous one. What a copy
    or verify already announced is remembered across a down and up, so a
    finished pass is told once. :meth:`now` tells the last snapshot as events
    (``--now``)."""

    def __init__(self, volume: str):
        self.volume = volume
        self.last: dict[str, Any] | None = None
        self._passes: dict[int, int] = {}  # pass number -> last percent announced (-1: ended)
        self._seen_history = False

    def update(self, status: dict[str, Any] | None) -> list[dict[str, Any]]:
        """Events for the change from the previous snapshot to ``status``."""
        old, self.last = self.last, status
        first = not self._seen_history
        events = list(self._changes(old, status))
        if status is not None:
            events += self._passes_changed(status, announce=not first)
            self._seen_history = True
        return events

    def now(self) -> list[dict[str, Any]]:
        """The current state as events (``was`` null), each marked ``now``."""
        if self.last is None:
            return [self._event("volume", state="down", now=True)]
        events = list(self._changes(None, self.last))
        if self.last is not None:
            for entry in self.last.get("copies") or []:
                if entry.get("running"):
                    events.append(self._copy_event("copy_start", entry))
        for e in events:
            e["now"] = True
        return events

    # ------------------------------------------------------------- changes

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"kind": kind, "volume": self.volume, **fields}

    def _changes(self, old: dict[str, Any] | None, new: dict[str, Any] | None) -> Iterable[dict[str, Any]]:
        if (old is None) != (new is None):
            yield self._event("volume", state="up" if new is not None else "down")
        if new is None:
            return
        o = old or {}
        if o.get("role") != new.get("role"):
            yield self._event("role", role=new.get("role"), was=o.get("role"))
        yield from self._quorum(o.get("quorum") or {}, new.get("quorum") or {})
        old_members, members = o.get("members") or {}, new.get("members") or {}
        for name, m in members.items():
            yield from self._member(name, old_members.get(name) or {}, m)
        ao, an = (o.get("rpo_alert") or {}), (new.get("rpo_alert") or {})
        if bool(ao.get("members_over")) != bool(an.get("members_over")) and (old is not None or an.get("members_over")):
            yield self._event("rpo_alert", alert=bool(an.get("members_over")), members_over=an.get("members_over") or [])
        to, tn = (o.get("test_failover") or {}), (new.get("test_failover") or {})
        if bool(to.get("active")) != bool(tn.get("active")) and (old is not None or tn.get("active")):
            yield self._event("test_failover", active=bool(tn.get("active")), reason=tn.get("ended_reason"))

    def _quorum(self, o: dict[str, Any], q: dict[str, Any]) -> Iterable[dict[str, Any]]:
        if not q:
            return
        if o.get("ok") != q.get("ok") or o.get("votes") != q.get("votes") or o.get("needed") != q.get("needed"):
            yield self._event("quorum", ok=q.get("ok"), was=o.get("ok"), votes=q.get("votes"),
                              needed=q.get("needed"), expected=q.get("expected"))
        since, before = q.get("suspended_writes_since"), o.get("suspended_writes_since")
        if (since is None) != (before is None) and (o or since is not None):
            yield self._event("suspended", suspended=since is not None, since=since)

    def _member(self, name: str, o: dict[str, Any], m: dict[str, Any]) -> Iterable[dict[str, Any]]:
        if o.get("disk") != m.get("disk"):
            yield self._event("disk", member=name, disk=m.get("disk"), was=o.get("disk"))
        if o.get("link") != m.get("link"):
            yield self._event("link", member=name, link=m.get("link"), was=o.get("link"), reason=m.get("reason"))
            if m.get("link") == "standalone" and str(m.get("reason") or "").startswith("split-brain"):
                yield self._event("split_brain", member=name, reason=m.get("reason"))
        old_paths, paths = set(o.get("open_paths") or ()), set(m.get("open_paths") or ())
        for p in sorted(paths - old_paths):
            yield self._event("path", member=name, path=p, state="up")
        for p in sorted(old_paths - paths):
            yield self._event("path", member=name, path=p, state="down")
        if o.get("replication") != m.get("replication") and (o or m.get("replication") is not None):
            yield self._event("replication", member=name, replication=m.get("replication"),
                              was=o.get("replication"))
        yield from self._verify(name, o, m)

    def _verify(self, name: str, o: dict[str, Any], m: dict[str, Any]) -> Iterable[dict[str, Any]]:
        vo, vn = o.get("verify"), m.get("verify")
        if vn is not None:
            before = -1 if vo is None else _percent(vo["done_bytes"], vo["total_bytes"])
            if vo is None:
                yield self._event("verify_start", member=name, total_bytes=vn["total_bytes"])
            mark = _crossed(max(before, 0), _percent(vn["done_bytes"], vn["total_bytes"]))
            if mark is not None and vo is not None:
                yield self._event("verify_progress", member=name, percent=mark, done_bytes=vn["done_bytes"],
                                  total_bytes=vn["total_bytes"], eta_s=vn.get("eta_s"))
        report = m.get("last_verify")
        if o and report is not None and report != o.get("last_verify"):
            yield self._event("verify_end", member=name, compared_bytes=report.get("compared_bytes"),
                              differing_regions=report.get("differing_regions"), skipped=report.get("skipped"))

    # --------------------------------------------------------------- passes

    def _copy_event(self, kind: str, entry: dict[str, Any], **more: Any) -> dict[str, Any]:
        event = self._event(kind, member=entry["member"], copy=entry["kind"], **more)
        event["pass"] = entry.get("pass")  # a keyword in Python, a field name in the event
        if kind == "copy_start":
            event["total_bytes"] = entry["total_bytes"]
        return event

    def _passes_changed(self, status: dict[str, Any], *, announce: bool) -> list[dict[str, Any]]:
        """Copy passes (the status's ``copies`` history, running ones
        included) that started, passed a milestone or ended."""
        events = []
        members = status.get("members") or {}
        for entry in status.get("copies") or []:
            number = entry.get("pass")
            if number is None:
                continue
            said = self._passes.get(number)
            if said == -1:
                continue
            running = entry.get("running")
            if not announce:  # the history before we watched: nothing to tell of it
                self._passes[number] = _percent(entry["done_bytes"], entry["total_bytes"]) if running else -1
                continue
            if said is None:
                events.append(self._copy_event("copy_start", entry))
                said = 0
            live = (members.get(entry["member"]) or {}).get("copy") if running else None
            done, total = entry["done_bytes"], entry["total_bytes"]
            mark = _crossed(said, _percent(done, total)) if running else None
            if mark is not None:
                events.append(self._copy_event(
                    "copy_progress", entry, percent=mark, done_bytes=done, total_bytes=total,
                    rate_bytes_per_s=(live or {}).get("rate_bytes_per_s"), eta_s=(live or {}).get("eta_s")))
                said = mark
            if not running:
                events.append(self._copy_event(
                    "copy_end", entry, complete=done >= total, done_bytes=done, total_bytes=total,
                    sent_bytes=entry.get("sent_bytes"), seconds=entry.get("seconds")))
                said = -1
            self._passes[number] = said
        known = {e.get("pass") for e in status.get("copies") or []}
        for number in [n for n in self._passes if n not in known]:
            del self._passes[number]  # aged out of the history: its number never comes back
        return events


class LogEvents(logging.Handler):
    """Warnings and errors the daemon logs, as ``error`` events.

    Only records logged on the daemon's trio thread, and only those that name
    one of its volumes or its node first (``"appslv: ..."``, gmd's logging
    habit) are taken: several daemons may share a process in tests. Loggers
    under ``quiet`` (the hook runner's) are left out, so a failing hook on
    ``error`` events cannot feed itself."""

    def __init__(self, hub: EventHub, known: Callable[[str], bool], *, quiet: tuple[str, ...] = ()):
        super().__init__(level=logging.WARNING)
        self.hub = hub
        self.known = known  # is this the node's or one of its volumes' name?
        self.quiet = quiet
        self.thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if threading.get_ident() != self.thread or record.name.startswith(self.quiet):
            return
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging's own handlers report it
            return
        first = message.split(":", 1)[0].strip()
        if not self.known(first):
            return
        volume = None if first == self.hub.node else first
        self.hub.publish([{"kind": "error", "volume": volume, "level": record.levelname.lower(),
                           "message": message[:2000]}])
