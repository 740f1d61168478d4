"""The keeper of old contents: before a write overwrites a region, its
current contents are saved to a log (:class:`gmd.undolog.UndoLog`), once per
region, and concurrent writes share one trip to a thread (and, for a durable
log, one ``fdatasync``).

Two logs use it on a member: the undo log of a consistent catch-up
(docs/DESIGN.md, "Consistent catch-up: the undo log"), which must be durable
before the overwrite, and the kept contents of a test failover's image
("Test failover"), which a crash discards and so need not be.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .undolog import Device, UndoLog

log = logging.getLogger(__name__)


class _Batch:
    """Keep requests that share one trip to a thread (and one fdatasync)."""

    def __init__(self) -> None:
        self.requests: list[list[tuple[int, int]]] = []
        self.answers: list[BaseException | None] = []
        self.done = trio.Event()

    def add(self, ranges: list[tuple[int, int]]) -> int:
        self.requests.append(ranges)
        return len(self.requests) - 1


class Keeper:
    """Saves old contents into ``log`` before writes overwrite them.

    ``call(fn, *args)`` runs a blocking call of the log in a worker thread;
    ``lock`` is held around every call of the log (the owner takes it too for
    its own calls: begin, discard, rollback); ``active()`` says whether
    anything is to be kept still (a batch that finds it false keeps nothing
    and lets its writes go on); ``name`` names the volume in log lines."""

    def __init__(self, log_: UndoLog, device: Device, *, call: Callable[..., Awaitable[Any]], lock: trio.Lock,
                 active: Callable[[], bool], name: str):
        self.log = log_
        self.device = device
        self.lock = lock
        self._call = call
        self._active = active
        self._name = name
        self._batch: _Batch | None = None  # requests gathered for the next trip to a thread
        self._running = False

    async def keep(self, offset: int, length: int) -> None:
        """Return once the old contents of [offset, offset+length) are in the
        log (at once if they are already); raise what refused them
        (:class:`~gmd.undolog.UndoLogFull`, or the log file's error), with
        nothing of this request kept. A cancelled caller leaves its batch to
        finish: the other writers of the batch wait for it."""
        if self.log.holds(offset, length):
            return
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch()
        index = batch.add([(offset, length)])
        if not self._running:
            self._running = True
            try:
                with trio.CancelScope(shield=True):  # the others wait for these batches too
                    while self._batch is not None:
                        running, self._batch = self._batch, None
                        await self._run(running)
            finally:
                self._running = False
        await batch.done.wait()
        error = batch.answers[index]
        if error is not None:
            raise error

    async def _run(self, batch: _Batch) -> None:
        try:
            async with self.lock:
                if not self._active():  # nothing to keep any more: the writes go on
                    batch.answers = [None] * len(batch.requests)
                else:
                    batch.answers = await self._call(self.log.preserve, self.device, batch.requests)
        except Exception as e:  # the log's file failed: no write of the batch may overwrite
            log.error("%s: %s: %s", self._name, self.log.path, e)
            batch.answers = [e] * len(batch.requests)
        finally:
            batch.done.set()
