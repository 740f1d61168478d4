"""The writes an ``async`` member has not yet acknowledged, kept in order so
that it can be brought forward in the primary's write order after a
reconnect or a long outage (docs/DESIGN.md, "Write order towards a far
member").

The primary keeps one :class:`Backlog` per ``async`` member while it is
primary. Every write shipped (or to be shipped) to the member is an
:class:`Entry` until the member acknowledges it. Its data lives in memory up
to the member's queue limit (``async_queue``) and, with a journal configured,
beyond that in a :class:`Journal` file on the primary's disk, up to
``journal_size``. An entry that is not on the wire now (the link is down, or
the queue ahead of it is full) *waits*; :meth:`MemberLink.pump_backlog` sends
the waiting ones in order whenever the member is connected and its queue has
room, and new writes queue up behind them, so the member applies writes in
exactly the primary's order.

The backlog is an accelerator, never the record of what a member lacks: a
waiting write is also marked out of sync in the state map (the bitmap stays
the truth across a primary crash, which the backlog does not survive). When
the backlog cannot hold a write (memory and journal full, or the journal
failed), it is dropped whole and the member goes back to bitmap tracking and
a mini-copy, never to a full copy.

A new session replays the backlog only from the member's own word on how far
it applied the last session's writes in order (``resume`` in its intro): if
it says less than it acknowledged, or nothing (it restarted), the backlog is
dropped and the bitmap brings it back.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger(__name__)


class JournalFull(Exception):
    """The journal cannot take another write."""


@dataclass(eq=False)
class Entry:
    """One write the member has not acknowledged."""

    gseq: int
    offset: int
    length: int
    queued_at: float  # trio time it was first queued (its age is the member's lag)
    data: bytes | None = None  # in memory; None: in the journal at ``journal_at``
    journal_at: int = -1
    waiting: bool = True  # not on the wire in the current session
    kind: str = "write"  # or "flush": a barrier, or a consistency group's mark (no data)
    group_point: int = 0  # a flush that is a group's mark: its point (``gseq``: the last write before it)
    in_sync: int = 0  # a flush's in_sync (see transport.codec.Flush)
    key: int = 0  # its place in the backlog

class Journal:
    """An append-only spill file for a backlog's write data, reused from the
    start whenever it holds no live entry. Not kept across a restart of the
    daemon: :meth:`open` empties it (the bitmap covers what it held)."""

    def __init__(self, path: Path, limit: int):
        self.path = Path(path)
        self.limit = limit
        self.end = 0  # bytes appended since it was last emptied
        self.live = 0  # entries in it not yet acknowledged
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            self.end = 0
        return self._fd

    def append(self, data: bytes) -> int:
        """Append ``data``; its position. Raises :class:`JournalFull` or
        OSError (the caller drops the backlog). Synchronous: a write is put in
        its member's order without an ``await`` (a page-cache write)."""
        if self.end + len(data) > self.limit:
            raise JournalFull(f"journal {self.path} is full ({self.end} of {self.limit} bytes)")
        fd = self._open()
        at = self.end
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, at + len(data) - len(view))
            view = view[n:]
        self.end += len(data)
        self.live += 1
        return at

    async def read(self, at: int, length: int) -> bytes:
        fd = self._open()
        data = await trio.to_thread.run_sync(os.pread, fd, length, at)
        if len(data) != length:
            raise OSError(f"journal {self.path}: {len(data)} of {length} bytes at {at}")
        return data

    def released(self) -> None:
        """One entry in it was acknowledged (or dropped)."""
        self.live -= 1
        if self.live <= 0:
            self.empty()

    def empty(self) -> None:
        self.live = 0
        self.end = 0
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError as e:
                log.warning("journal %s: cannot truncate it: %s", self.path, e)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Backlog:
    """One async member's unacknowledged writes, in the primary's order."""

    def __init__(self, member: str, memory_limit: int, journal: Journal | None = None, *, volume: str = ""):
        self.member = member
        self.volume = volume
        self.memory_limit = memory_limit
        self.journal = journal
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # key -> entry, in order
        self._writes: dict[int, Entry] = {}  # gseq -> the write's entry
        self._next_key = 0
        self.waiting: deque[Entry] = deque()  # not on the wire now, in order
        self.memory_bytes = 0
        self.journal_bytes = 0
        # Valid: it holds every write shipped to the member since it was last
        # (re)started, so the member can be brought forward from it in order.
        self.valid = True
        self.acked_max = 0  # highest gseq the member acknowledged
        self.replayed_to = 0  # highest gseq sent from the waiting list (what a catch-up waits for)
        self.dropped_reason: str | None = None  # why it last went back to bitmap tracking
        self.dropped_count = 0
        self.replays = 0
        self._changed_event: trio.Event | None = None  # made only when someone waits (every write adds and acks)

    # ------------------------------------------------------------ adding

    def add(self, gseq: int, offset: int, data: bytes, now: float, *, waiting: bool) -> Entry | None:
        """Keep a write; None when it cannot (the caller drops the backlog)."""
        if not self.valid:
            return None
        e = Entry(gseq, offset, len(data), now, waiting=waiting)
        if self.memory_bytes + len(data) <= self.memory_limit:
            e.data = data
            self.memory_bytes += len(data)
        elif self.journal is not None and waiting:
            try:
                e.journal_at = self.journal.append(data)
            except (JournalFull, OSError) as err:
                self.drop(f"{err}" if isinstance(err, JournalFull) else f"journal write failed: {err}")
                return None
            self.journal_bytes += len(data)
        else:
            return None
        self._keep(e)
        self._writes[gseq] = e
        return e

    def add_flush(self, gseq: int, now: float, *, waiting: bool, group_point: int = 0,
                  in_sync: int = 0) -> Entry | None:
        """Keep a barrier (the application's fsync) or a consistency group's
        mark in the member's order, after write ``gseq``; None if the backlog
        is not valid."""
        if not self.valid:
            return None
        e = Entry(gseq, 0, 0, now, data=b"", waiting=waiting, kind="flush", group_point=group_point,
                  in_sync=in_sync)
        self._keep(e)
        return e

    def _keep(self, e: Entry) -> None:
        self._next_key += 1
        e.key = self._next_key
        self.entries[e.key] = e
        if e.waiting:
            self.waiting.append(e)
        self._changed()

    @property
    def has_waiting(self) -> bool:
        return bool(self.waiting)

    def holds(self, gseq: int) -> bool:
        return gseq in self._writes

    def next_waiting(self) -> Entry | None:
        return self.waiting[0] if self.waiting else None

    def sent(self, e: Entry) -> None:
        """The first waiting entry went on the wire."""
        if self.waiting and self.waiting[0] is e:
            self.waiting.popleft()
        e.waiting = False
        self.replayed_to = max(self.replayed_to, e.gseq)

    async def data_of(self, e: Entry) -> bytes:
        if e.data is not None:
            return e.data
        return await self.journal.read(e.journal_at, e.length)

    # ------------------------------------------------------------ settling

    def acked(self, e: Entry) -> None:
        if self.entries.pop(e.key, None) is None:
            return
        if e.kind == "write":
            self._writes.pop(e.gseq, None)
            self.acked_max = max(self.acked_max, e.gseq)
        self._release(e)
        self._changed()

    def _release(self, e: Entry) -> None:
        if e.data is not None:
            self.memory_bytes -= e.length
            e.data = None
        elif e.journal_at >= 0:
            self.journal_bytes -= e.length
            e.journal_at = -1
            if self.journal is not None:
                self.journal.released()

    def session_ended(self) -> None:
        """The session died: every entry not acknowledged waits again, in order."""
        self.waiting = deque(self.entries.values())
        for e in self.waiting:
            e.waiting = True
        self._changed()

    def resume(self, applied: int | None) -> bool:
        """A new session: the member says it applied our writes in order up to
        ``applied`` (None: it cannot say). True if the backlog brings it on
        from there: entries up to ``applied`` are dropped, the rest wait. False
        (the backlog is dropped) if it is not valid or the member applied less
        than it acknowledged."""
        if not self.entries and self.valid:
            return True
        if not self.valid:
            return False
        if applied is None:
            self.drop(f"{self.member} did not say how far it applied our writes (it restarted?)")
            return False
        if applied < self.acked_max:
            self.drop(f"{self.member} applied writes in order up to {applied}, less than it acknowledged "
                      f"({self.acked_max})")
            return False
        # (a mark right after the last write it applied may not have reached it: sent again, harmless)
        for e in [e for e in self.entries.values() if e.gseq < applied or (e.gseq == applied and e.kind == "write")]:
            self.acked(e)
        self.waiting = deque(self.entries.values())
        if self.waiting:
            self.replays += 1
        self._changed()
        return True

    def drop(self, reason: str) -> None:
        """Back to bitmap tracking: forget every entry (each is marked already)."""
        for e in self.entries.values():
            self._release(e)
        self.entries.clear()
        self._writes.clear()
        self.waiting.clear()
        if self.journal is not None:
            self.journal.empty()
        self.valid = False
        self.dropped_reason = reason
        self.dropped_count += 1
        log.warning("%s: member %s: write-order backlog dropped, back to bitmap tracking: %s", self.volume,
                    self.member, reason)
        self._changed()

    def restart(self) -> None:
        """From now on every write is kept again (it takes writes in order)."""
        if self.entries:
            self.drop("restarted")
        self.valid = True
        self.acked_max = 0
        self.replayed_to = 0
        self._changed()

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()

    # ------------------------------------------------------------ waiting

    @property
    def changed(self) -> trio.Event:
        """Set at the next change of the backlog (an entry added, sent,
        acknowledged, or the backlog dropped)."""
        if self._changed_event is None:
            self._changed_event = trio.Event()
        return self._changed_event

    def _changed(self) -> None:
        if self._changed_event is not None:
            self._changed_event.set()
            self._changed_event = None

    def caught_up(self) -> bool:
        """Nothing waits, and what was replayed is acknowledged (or dropped)."""
        if self.waiting:
            return False
        oldest = next(iter(self.entries.values()), None)
        return oldest is None or oldest.gseq > self.replayed_to

    def status(self, now: float) -> dict[str, Any]:
        oldest = next(iter(self.entries.values()), None)
        state = "bitmap" if not self.valid else ("waiting" if self.waiting else "shipping")
        return {
            "state": state,
            "writes": len(self._writes), "waiting_writes": sum(1 for e in self.waiting if e.kind == "write"),
            "memory_bytes": self.memory_bytes, "memory_limit": self.memory_limit,
            "journal": str(self.journal.path) if self.journal is not None else None,
            "journal_bytes": self.journal_bytes,
            "journal_used_bytes": self.journal.end if self.journal is not None else 0,
            "journal_limit": self.journal.limit if self.journal is not None else 0,
            "oldest_seconds": round(max(0.0, now - oldest.queued_at), 3) if oldest else 0.0,
            "replays": self.replays, "dropped": self.dropped_count, "dropped_reason": self.dropped_reason,
        }
