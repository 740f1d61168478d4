"""The node's event feed: watches its volumes and serves ``gmd events``.

:class:`EventFeed` takes a status snapshot of every volume about every
:data:`WATCH_INTERVAL` seconds (sooner when poked: a role change, a control
request), turns the differences into events (:class:`gmd.events.VolumeEvents`)
and publishes them on its :class:`~gmd.events.EventHub`. A control connection
asking for ``events`` gets them as JSON lines until it closes
(:meth:`EventFeed.serve_reader`); it counts against the control socket's
connection limit, and its queue is bounded, so a reader can neither make the
daemon wait nor make it hold more than :data:`gmd.events.QUEUE_LIMIT` events:
:class:`EventHub` numbers and times events and hands them to subscribers,
each with a bounded queue; a reader that falls behind loses the oldest
events it has not read and is told so by one ``dropped`` event.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import trio

from transport import jsonlines

from .events import QUEUE_LIMIT, VolumeEvents, iso_now

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.2  # seconds between status snapshots (a milestone or state is told within this)


class Subscriber:
    """One reader of the event stream: a bounded queue, filled by the hub
    without waiting, emptied by the reader at its own pace."""

    def __init__(self, hub: EventHub, volume: str | None, limit: int, *, internal: bool = False):
        self.hub = hub
        self.volume = volume
        self.limit = limit
        self.internal = internal  # the daemon's own (the hook runner), not a gmd events reader
        self.queue: deque[dict[str, Any]] = deque()
        self.dropped = 0
        self._wake = trio.Event()

    def offer(self, event: dict[str, Any]) -> None:
        """Queue ``event`` if it is for this reader; when the queue is full the
        oldest unread event goes and is counted."""
        if self.volume is not None and event.get("volume") not in (self.volume, None):
            return
        if len(self.queue) >= self.limit:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append(event)
        self._wake.set()

    async def next(self) -> dict[str, Any]:
        """The next event; a ``dropped`` event first if some were lost."""
        while not self.queue and not self.dropped:
            self._wake = trio.Event()
            await self._wake.wait()
        if self.dropped:
            count, self.dropped = self.dropped, 0
            return self.hub.stamp({"kind": "dropped", "volume": self.volume, "count": count})
        return self.queue.popleft()

    def close(self) -> None:
        self.hub.subscribers.discard(self)


class EventHub:
    """The node's event stream: numbers, times and fans out events."""

    def __init__(self, node: str, *, limit: int = QUEUE_LIMIT):
        self.node = node
        self.limit = limit
        self.seq = 0
        self.subscribers: set[Subscriber] = set()

    def stamp(self, event: dict[str, Any]) -> dict[str, Any]:
        """``event`` with the next sequence number, the time and this node, first."""
        self.seq += 1
        return {"seq": self.seq, "time": iso_now(), "node": self.node, "volume": None, **event}

    def publish(self, events: Iterable[dict[str, Any]]) -> None:
        """Stamp and hand ``events`` to every subscriber (never waits)."""
        for event in events:
            stamped = self.stamp(event)
            for s in list(self.subscribers):
                s.offer(stamped)

    def subscribe(self, volume: str | None = None, *, limit: int | None = None, internal: bool = False) -> Subscriber:
        """A new reader of the events of ``volume`` (None: every volume, and the node's own)."""
        s = Subscriber(self, volume, self.limit if limit is None else limit, internal=internal)
        self.subscribers.add(s)
        return s

    @property
    def readers(self) -> int:
        """``gmd events`` readers subscribed now (the daemon's own not counted)."""
        return sum(1 for s in self.subscribers if not s.internal)


class WatchedVolume(Protocol):
    """What the feed needs of a volume (the engine provides it)."""

    @property
    def is_up(self) -> bool: ...
    def status(self) -> dict[str, Any]: ...


class EventFeed:
    """Events of the volumes ``volumes()`` returns, published on :attr:`hub`."""

    def __init__(self, node: str, volumes: Callable[[], Mapping[str, WatchedVolume]], *,
                 interval: float = WATCH_INTERVAL, wanted: Callable[[], bool] | None = None):
        self.hub = EventHub(node)
        self.volumes = volumes
        # Whether anyone needs the events now (a reader, or a volume with
        # hooks): if not, no snapshots are taken. A reader that comes looks
        # first, so it starts from the state of that moment all the same.
        self.wanted = wanted or (lambda: True)
        self.interval = interval
        self.watches: dict[str, VolumeEvents] = {}
        self._poked = trio.Event()
        self._failing: set[str] = set()  # volumes whose snapshot failed (logged once)

    def poke(self) -> None:
        """Look again now (something changed)."""
        self._poked.set()

    def look(self) -> None:
        """Snapshot every volume now and publish what changed."""
        for name, volume in self.volumes().items():
            watch = self.watches.get(name)
            if watch is None:
                watch = self.watches[name] = VolumeEvents(name)
            try:
                status = volume.status() if volume.is_up else None
            except Exception as e:  # a volume between states: next time; never a dead feed
                if name not in self._failing:
                    log.debug("%s: no status for events this time: %s", name, e)
                    self._failing.add(name)
                continue
            self._failing.discard(name)
            self.hub.publish(watch.update(status))

    async def run(self) -> None:
        """Watch until cancelled."""
        while True:
            if self.wanted():
                self.look()
            with trio.move_on_after(self.interval):
                await self._poked.wait()
            self._poked = trio.Event()

    def open_reader(self, volume: str | None, now: bool) -> tuple[Subscriber, list[dict[str, Any]]]:
        """Subscribe a reader; with ``now``, also the current state as events
        (then ``now_end``), to be sent before anything the subscriber gets.
        Nothing waits between the snapshot and the subscription, so the reader
        misses no change and sees none twice."""
        self.look()
        sub = self.hub.subscribe(volume)
        first: list[dict[str, Any]] = []
        if now:
            for name, watch in self.watches.items():
                if volume is None or name == volume:
                    first += [self.hub.stamp(e) for e in watch.now()]
            first.append(self.hub.stamp({"kind": "now_end", "volume": volume}))
        return sub, first

    async def serve_reader(self, stream: trio.abc.Stream, sub: Subscriber, first: list[dict[str, Any]]) -> None:
        """Send ``first``, then every event ``sub`` gets, until the client
        closes its end (or sends anything: the stream takes no requests)."""
        try:
            async with trio.open_nursery() as n:

                async def until_closed() -> None:
                    try:
                        await stream.receive_some(1)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    n.cancel_scope.cancel()

                n.start_soon(until_closed)
                for event in first:
                    await stream.send_all(jsonlines.encode(event))
                while True:
                    event = await sub.next()
                    await stream.send_all(jsonlines.encode(event))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            sub.close()
