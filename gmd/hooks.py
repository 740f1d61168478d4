"""Hooks: an administrator's commands run on a volume's events (drbd-reactor's
``umh``, HACMP's event scripts), e.g. to page someone on a split-brain or a
lost member.

A volume's ``[[volumes.V.hooks]]`` tables each name the event kinds they run
on (``on``), optionally conditions on the event's fields (``where``), and the
command (``run``). The :class:`HookRunner` reads the node's event stream like
any ``gmd events`` reader (so a hook can never hold the daemon up: its queue
is bounded too), and runs each matching hook with the event in ``GMD_*``
environment variables (:func:`hook_environment`). At most
:data:`MAX_RUNNING` hooks run at once and :data:`MAX_WAITING` wait; beyond
that a hook run is skipped and logged. How each run ended is published as a
``hook`` event (a hook cannot run on ``hook`` events, so none feeds itself).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import trio

from .commands import run_command
from .configmodel import Hook
from .eventfeed import EventHub

log = logging.getLogger(__name__)

MAX_RUNNING = 4  # hook commands running at once on a node
MAX_WAITING = 64  # hook runs waiting for one of those; more are skipped (and logged)


def matches(hook: Hook, event: dict[str, Any]) -> bool:
    """True if ``hook`` runs on ``event``: its kind is one of ``on`` and every
    ``where`` field of the event has one of the listed values."""
    if event.get("kind") not in hook.on:
        return False
    return all(event.get(name) in values for name, values in hook.where)


def _env_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return " ".join(_env_value(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def hook_environment(event: dict[str, Any], base: dict[str, str] | None = None) -> dict[str, str]:
    """The hook's environment: ``base`` (default: the daemon's), ``GMD_EVENT``
    (the kind), ``GMD_EVENT_JSON`` (the whole event) and each of the event's
    fields as ``GMD_<FIELD>`` (``GMD_VOLUME``, ``GMD_NODE``, ``GMD_MEMBER``,
    ``GMD_LINK``, ``GMD_WAS``, ``GMD_SEQ``, ...): true/false for booleans,
    empty for null, space-separated for lists."""
    env = dict(os.environ if base is None else base)
    for name, value in event.items():
        env["GMD_" + name.upper()] = _env_value(value)
    env["GMD_EVENT"] = str(event.get("kind", ""))
    env["GMD_EVENT_JSON"] = json.dumps(event)
    return env


class HookRunner:
    """Runs the hooks of the node's volumes on the node's events."""

    def __init__(self, hub: EventHub, hooks_of: Callable[[str], tuple[Hook, ...]]):
        self.hub = hub
        self.hooks_of = hooks_of
        self.limiter = trio.CapacityLimiter(MAX_RUNNING)
        self.waiting = 0
        self.runs = 0  # hook runs finished since the daemon started

    async def run(self) -> None:
        """Read events until cancelled, starting the matching hooks."""
        sub = self.hub.subscribe(None, internal=True)
        try:
            async with trio.open_nursery() as n:
                while True:
                    event = await sub.next()
                    if event["kind"] == "dropped":
                        log.warning("%s: hooks fell behind: %d events were not given to hooks", self.hub.node,
                                    event["count"])
                        continue
                    volume = event.get("volume")
                    if volume is None:
                        continue
                    for index, hook in enumerate(self.hooks_of(volume)):
                        if matches(hook, event):
                            self._start(n, volume, index, hook, event)
        finally:
            sub.close()

    def _start(self, n: trio.Nursery, volume: str, index: int, hook: Hook, event: dict[str, Any]) -> None:
        if self.waiting >= MAX_WAITING:
            log.warning("%s: hook %d not run on %s event %d: %d hook runs are already waiting", volume, index,
                        event["kind"], event["seq"], self.waiting)
            return
        self.waiting += 1
        n.start_soon(self._run_one, volume, index, hook, event)

    async def _run_one(self, volume: str, index: int, hook: Hook, event: dict[str, Any]) -> None:
        waiting = True
        try:
            async with self.limiter:
                self.waiting -= 1
                waiting = False
                result = await run_command(hook.run, hook_environment(event), hook.timeout)
        finally:
            if waiting:  # cancelled before its turn
                self.waiting -= 1
        self.runs += 1
        how = "succeeded" if result["ok"] else (result["error"] or f"failed (exit {result['rc']})")
        text = result["output"]
        log.log(logging.INFO if result["ok"] else logging.WARNING, "%s: hook %d on %s event %d %s in %.2f s%s",
                volume, index, event["kind"], event["seq"], how, result["seconds"],
                f"; output: {text[-500:]}" if text else "")
        self.hub.publish([{"kind": "hook", "volume": volume, "hook": index, "on_seq": event["seq"],
                           "on_kind": event["kind"], "ok": result["ok"], "rc": result["rc"],
                           "error": result["error"], "seconds": result["seconds"]}])
