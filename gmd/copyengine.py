"""Copy orchestration of one volume: which member is copied or verified, and how far.

:mod:`gmd.copy` and :mod:`gmd.verify` hold the passes themselves (hash
compare, ranges, fences); this module decides when a pass runs (a member
connects behind, falls behind, ``gmd resync``), keeps copying pass after pass
until the member is level, and owns what the status shows of it: the running
passes, every pass started, the bytes shipped, the running verifies and each
member's last verify report. The passes see only :class:`CopyEngine`'s narrow
interface, never the volume engine.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from statemap import DiskState, Role
from transport.link import LinkClosed
from transport.messages import MAX_CATCH_UP_RUNS

from .copy import CatchUpRefused, CopyAborted, copy_member
from .copystate import CopyProgress, PassKind
from .replication import MemberLink, Replication
from .verify import verify_member

HISTORY = 16  # copy passes kept for the status (the running ones and the last finished)
RETRY_FIRST = 0.1  # seconds before the copy retries after a pass stopped short (doubling each time)
RETRY_MAX = 5.0  # seconds between retries at most
CATCH_UP_ANSWER_TIMEOUT = 10.0  # seconds a member has to answer a catch-up question

if TYPE_CHECKING:
    from statemap.statemap import StateMap

    from .config import VolumeConfig
    from .peerstate import PeerState
    from .volume import LocalVolume
    from .writepath import WritePath

log = logging.getLogger(__name__)


class CopyVolume(Protocol):
    """What the copy orchestration needs of its volume (the engine provides it)."""

    config: VolumeConfig
    local: LocalVolume | None
    members: dict[str, MemberLink]
    @property
    def name(self) -> str: ...
    peerstate: PeerState
    def require_primary(self) -> LocalVolume: ...
    def require_up(self) -> LocalVolume: ...
    role: Role
    @property
    def running(self) -> bool: ...
    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None: ...
    @property
    def statemap(self) -> StateMap: ...
    writepath: WritePath


class CopyEngine:
    """Copies and verifies of one volume, as its primary."""

    def __init__(self, engine: CopyVolume):
        self.engine = engine
        self.running: dict[str, CopyProgress] = {}  # member -> its running copy pass
        self.bytes_sent = 0  # bytes the copy passes shipped (after hash compare)
        self.rate = engine.config.copy_rate  # bytes/s per member copy; 0: unlimited
        # (member, progress) of the last passes started, for the status's "copies"
        self.history: deque[tuple[str, CopyProgress]] = deque(maxlen=HISTORY)
        self.passes = 0  # copy passes begun since the daemon started (numbers them)
        self.verifying: dict[str, CopyProgress] = {}  # member -> its running verify
        self.verify_reports: dict[str, dict[str, Any]] = {}  # member -> its last verify's report
        self._verify_done: dict[str, trio.Event] = {}  # member -> set when its running verify ends
        self._copying: set[str] = set()
        self._questions = 0  # catch-up questions asked (their ids)
        self._answers: dict[tuple[str, int], list] = {}  # (member, id) -> [answered, answer]

    # ------------------------------------------------ what the passes use

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def config(self):
        return self.engine.config

    @property
    def statemap(self):
        return self.engine.statemap

    @property
    def local(self):
        """The local volume (its device, writer and region hashes)."""
        return self.engine.require_up()

    @property
    def unsent(self):
        return self.engine.writepath.unsent

    @property
    def remarked(self):
        return self.engine.writepath.remarked

    @property
    def last_write_at(self) -> float:
        return self.engine.writepath.last_write_at

    @property
    def completed_sequence(self) -> int:
        return self.engine.writepath.completed_gseq

    def pass_started(self, member: str, progress: CopyProgress) -> None:
        """A copy pass to ``member`` begins: it is shown as running, and kept in the history."""
        before = self.running.get(member)
        if before is not None and before.ended is None:
            before.ended = trio.current_time()
        self.passes += 1
        progress.number = self.passes
        self.running[member] = progress
        self.history.append((member, progress))

    async def lock_range(self, start: int, end: int) -> int:
        return await self.engine.writepath.lock_range(start, end)

    async def lock_ranges(self, ranges: list[tuple[int, int]]) -> int:
        return await self.engine.writepath.lock_ranges(ranges)

    def unlock_range(self, token: int) -> None:
        self.engine.writepath.unlock_range(token)

    async def drain_writes_in_flight(self) -> None:
        await self.engine.writepath.drain_writes_in_flight()

    async def member_caught_up(self, m: MemberLink) -> None:
        await self.engine.peerstate.member_caught_up(m)

    async def check_catch_up(self, m: MemberLink, kind: str, nbytes: int,
                             runs: list[tuple[int, int]] | None) -> None:
        """Before a pass that overwrites ``nbytes`` of ``m``'s regions (``runs``
        of regions (first, count), when known) out of write order: ask the
        member whether its undo log can keep its consistent image through
        it. Raises :class:`CatchUpRefused` (the pass does not run; its marks
        stay) when it cannot, with the member's reason."""
        if runs is not None and len(runs) > MAX_CATCH_UP_RUNS:
            runs = None  # too many to list: the member assumes the worst of the byte count
        self._questions += 1
        ident = self._questions
        slot: list = [trio.Event(), None]
        self._answers[(m.name, ident)] = slot
        try:
            if not m.connected:
                raise CopyAborted(f"{m.name} went away")
            question: dict[str, Any] = {"id": ident, "bytes": nbytes}
            if runs is not None:
                question["runs"] = [list(r) for r in runs]
            await self.engine.peerstate.send_state(m, {"catch_up": question})
            with trio.move_on_after(CATCH_UP_ANSWER_TIMEOUT):
                await slot[0].wait()
        finally:
            self._answers.pop((m.name, ident), None)
        answer = slot[1]
        if answer is None:
            raise CopyAborted(f"{m.name} did not answer the catch-up question within {CATCH_UP_ANSWER_TIMEOUT:.0f} s")
        m.catch_up_answer = answer
        if not answer["ok"]:
            why = answer.get("reason") or "its undo log cannot hold it"
            m.catch_up_refused = why
            m.notify_changed()
            raise CatchUpRefused(f"{m.name} refuses the {kind} pass of {nbytes} bytes: {why}; its regions stay "
                                 "marked, and the pass is tried again (enlarge its undo_log_size to let it run)")
        if m.catch_up_refused is not None:
            log.info("%s: %s accepts the catch-up now", self.engine.name, m.name)
            m.catch_up_refused = None
            m.notify_changed()

    def on_catch_up_answer(self, m: MemberLink, answer: dict[str, Any]) -> None:
        """A member answered a catch-up question (an answer nobody waits for is dropped)."""
        slot = self._answers.get((m.name, answer.get("id")))
        if slot is not None:
            slot[1] = answer
            slot[0].set()

    # ------------------------------------------------------- orchestration

    async def tell_member(self, m: MemberLink, fields: dict[str, Any]) -> None:
        await self.engine.peerstate.send_state(m, fields)

    def start_copy(self, m: MemberLink) -> None:
        if m.name not in self._copying and self.engine.running:
            self._copying.add(m.name)
            self.engine.spawn(self._copy_loop, m)

    async def _copy_loop(self, m: MemberLink) -> None:
        """Copy to ``m`` while it is connected and this node primary, pass after
        pass, until it is level and takes writes (also an ``async`` member that
        fell behind: it is caught up while its link stays up)."""
        failures = 0  # passes in a row that stopped short: the wait before the next one grows
        last_reason = None
        try:
            while self.engine.role == Role.PRIMARY and self.engine.local is not None and m.connected:
                if m.backlog is not None and m.backlog.valid and not m.backlog.caught_up():
                    # Its backlog first, in order; then the copy finds those
                    # regions equal (hashes) and clears their marks.
                    m.set_replication(Replication.REPLAYING, f"{len(m.backlog.waiting)} writes wait in its "
                                      "backlog; sent in the primary's order before anything is copied")
                    await m.wait_replayed()
                    continue
                behind = self.engine.statemap.out_of_sync_bytes(m.name)
                m.set_replication(Replication.CATCHING_UP, f"{behind} bytes out "
                                  f"of sync; copying{' while writes are marked' if m.behind else ''}")
                try:
                    await copy_member(self, m)
                except Exception as e:  # a copy's failure never takes the daemon (and the volume) down
                    # A member that refuses the data (its disk full, say) stays
                    # connected: retry, backing off, and log each new reason once.
                    failures += 1
                    stopped = isinstance(e, (CopyAborted, LinkClosed))
                    reason = str(e) if stopped else repr(e)
                    if reason != last_reason:
                        quiet = stopped and not isinstance(e, CatchUpRefused)
                        log.log(logging.INFO if quiet else logging.ERROR, "%s: copy to %s %s: %s; retrying",
                                self.engine.name, m.name, "stopped" if stopped else "failed", reason)
                        last_reason = reason
                    await trio.sleep(min(RETRY_FIRST * 2 ** (failures - 1), RETRY_MAX))
                    continue
                failures, last_reason = 0, None
                # No await from this check to the end of the loop: a member that
                # falls behind after it starts a new loop (_mark_away).
                if not m.behind and not self.engine.statemap.out_of_sync_bytes(m.name):
                    m.set_replication(Replication.SHIPPING, "level with the primary; writes are shipped to it")
                    return
        finally:
            self._copying.discard(m.name)
            last = self.running.pop(m.name, None)
            if last is not None and last.ended is None:
                last.ended = trio.current_time()
            if m.connected and m.replication in (Replication.CATCHING_UP, Replication.REPLAYING):
                # Stopped short (demoted, volume down): say how writes reach it now.
                m.set_replication(Replication.BEHIND if m.behind else Replication.SHIPPING, "copy stopped")

    def start_verify(self) -> dict[str, str]:
        """``gmd verify``: start comparing every connected up-to-date member with
        this primary, online, in the background (a large volume takes hours);
        progress is in the status, and so is each member's last report.
        Returns, per member, "started" or why it is not verified."""
        self.engine.require_primary()
        answer: dict[str, str] = {}
        for m in self.engine.members.values():
            if m.name in self.verifying:
                answer[m.name] = "already being verified"
            elif not (m.connected and m.peer_disk == DiskState.UPTODATE):
                answer[m.name] = f"not connected and uptodate ({m.peer_disk or 'unknown'})"
            else:
                self.verifying[m.name] = CopyProgress(PassKind.VERIFY, self.engine.config.size)
                self.engine.spawn(self._verify_member, m, self.verifying[m.name])
                answer[m.name] = "started"
        return answer

    async def _verify_member(self, m: MemberLink, progress) -> None:
        started = time.time()
        report: dict[str, Any] = {"skipped": "interrupted: the volume went down"}
        try:
            report = await verify_member(self, m, progress)
        except CopyAborted as e:
            report = {"skipped": str(e)}
            log.warning("%s: verify of %s stopped after %d bytes: %s", self.engine.name, m.name, progress.done_bytes, e)
        except Exception as e:  # a local read error: reported, never fatal to the daemon
            report = {"skipped": f"failed: {e}"}
            log.error("%s: verify of %s failed: %s", self.engine.name, m.name, e)
        else:
            found = report["differing_regions"]
            if found:
                log.warning("%s: verify found %d differing regions on %s (first at %d); marked for resync",
                            self.engine.name, found, m.name, report["first_offsets"][0])
            else:
                log.info("%s: verify of %s found no differences", self.engine.name, m.name)
        finally:
            if "skipped" in report:
                report["compared_bytes"] = progress.done_bytes
            self.verifying.pop(m.name, None)
            self.verify_reports[m.name] = {**report, "started": started, "finished": time.time()}
            done = self._verify_done.pop(m.name, None)
            if done is not None:
                done.set()

    async def verify(self) -> dict[str, Any]:
        """Verify every eligible member and wait for the reports (see
        :meth:`start_verify`); a member not verified says why."""
        answer = self.start_verify()
        # No checkpoint since the start: no verify can have ended yet.
        done = {name: self._verify_done.setdefault(name, trio.Event())
                for name, what in answer.items() if what == "started"}
        for ev in done.values():
            await ev.wait()
        return {name: self.verify_reports[name] if name in done else {"skipped": what}
                for name, what in answer.items()}

    def resync(self, rate: int | None = None) -> list[str]:
        """``gmd resync``: start copying the marked regions to every connected
        member; ``rate`` (bytes/s, 0 for none) replaces the copy rate limit."""
        self.engine.require_primary()
        if rate is not None:
            self.rate = rate
        started = []
        for m in self.engine.members.values():
            marked = self.engine.statemap.out_of_sync_bytes(m.name)
            if m.connected and (marked or m.peer_disk != DiskState.UPTODATE):
                self.start_copy(m)
                started.append(m.name)
        return started

