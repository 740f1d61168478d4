"""Who may write: the votes of one volume on this node (docs/DESIGN.md,
"Who may write: votes, quorum, witness").

Votes present are this member's, every connected member's, and a witness's
while it grants them. A primary completes a write only with a quorum (a strict
majority of the expected votes) that knows about it:

* before a write touches the disk, and again before it completes if a member
  missed it, the primary makes sure the members it writes without are fenced:
  a new generation is started (once per loss) and made known to the connected
  members (a flush round trip after the STATE frame), and to the witnesses
  (registered *before* it is committed here) when their votes are needed;
* without quorum the write waits (``on_quorum_loss = "suspend"``, the default)
  until quorum returns, or fails with EIO after ``quorum_timeout`` seconds
  (``"fail"``); it never completes in between;
* except under ``"continue"`` (two sites without a witness, checked by the
  config): the primary writes on without its only peer, fencing it like any
  member it writes without (outdated in the committed map before the write
  completes), and nobody else may be promoted without ``--force``;
* a primary told by a witness that another node holds the lease, while it has
  no quorum itself, steps down: its waiting writes fail, and it comes back as a
  secondary that is copied from the new primary.

``gmd primary --force`` (persisted as ``forced_primary`` in the state map, until
demotion) and ``gmd quorum VOLUME --expected-votes N`` are the operator's
overrides.
"""

from __future__ import annotations

import errno
import logging
import secrets
from typing import TYPE_CHECKING, Any, Protocol

import trio

from quorum import (
    Grant,
    answer_counts,
    answered_votes,
    expected_votes,
    granted_votes,
    has_quorum,
    member_votes,
    votes_needed,
)
from quorum.witness import LEASE, RENEW_INTERVAL
from statemap import DiskState, Role

from .configvalues import QUORUM_LOSS_NOTES
from .replication import MemberLink

if TYPE_CHECKING:
    from statemap.statemap import StateMap

    from .config import VolumeConfig
    from .engine import NodePorts
    from .volume import LocalVolume

log = logging.getLogger(__name__)

WAIT_POLL = 0.5  # a suspended write re-checks at least this often



class QuorumVolume(Protocol):
    """What the quorum keeper needs of its volume (the engine provides it)."""

    config: VolumeConfig
    local: LocalVolume | None
    @property
    def name(self) -> str: ...
    ports: NodePorts
    @property
    def statemap(self) -> StateMap: ...


class NoQuorum(OSError):
    """A write could not complete with quorum (EIO)."""


class QuorumKeeper:
    """The quorum state of one volume engine: the witness grants and answers,
    and the I/O that gets and uses them; the arithmetic is :mod:`quorum.votes`."""

    def __init__(self, engine: QuorumVolume):
        self.engine = engine
        self.grants: dict[str, Grant] = {}  # witness -> grant we hold as primary
        self.answers: dict[str, tuple[bool, str, float]] = {}  # witness -> (granted, why, when) as secondary
        self.changed = trio.Event()
        self._lock = trio.Lock()
        self._suspended_since: float | None = None
        self.superseded: str | None = None  # a witness said another node is primary
        self._renew_now = trio.Event()  # set: renew before the next interval is over

    # ------------------------------------------------------------- votes

    @property
    def _clients(self):
        return self.engine.ports.witnesses

    def notify(self) -> None:
        """Something that counts for quorum changed (a member, a witness, a role)."""
        self.changed.set()
        self.changed = trio.Event()

    def renew_soon(self) -> None:
        """The outdated set shrank (a member caught up): renew now, not at the
        next interval, so that the witnesses' registration follows."""
        self._renew_now.set()

    @property
    def primary_writes_alone(self) -> bool:
        """The volume's policy is ``on_quorum_loss = "continue"``: a primary
        writes on without its only peer, so a survivor can only be forced."""
        return self.engine.config.on_quorum_loss == "continue"

    def expected(self) -> int:
        e = self.engine
        all_votes = [m.votes for m in e.config.members.values()] + [c.votes for c in self._clients.values()]
        return expected_votes(all_votes, e.statemap.sb.expected_votes)

    def needed(self) -> int:
        return votes_needed(self.expected())

    def member_votes(self) -> int:
        e = self.engine
        return member_votes(e.config.members[e.node].votes,
                            (e.config.members[name].votes for name, m in e.members.items() if m.connected))

    def outdated(self, extra: list[MemberLink] = ()) -> frozenset[str]:
        """Members that miss writes: not uptodate in this primary's map (a member
        it wrote without is marked so before that write completes), and
        ``extra``, members missing the write at hand. A member merely out of
        sight holds every completed write until the primary writes without it:
        it stays promotable (the lease, not this set, keeps it out meanwhile)."""
        e = self.engine
        peers = e.statemap.sb.peers
        out = {name for name in e.members if name not in peers or peers[name].disk != DiskState.UPTODATE}
        return frozenset(out | {m.name for m in extra})

    def witness_votes(self, generation: str, outdated: frozenset[str]) -> int:
        """As primary: votes of witnesses whose running grant covers this
        generation and every member we write without."""
        return granted_votes(self.grants, self._votes_of(), generation, outdated, trio.current_time())

    def secondary_witness_votes(self) -> int:
        return answered_votes(self.answers, self._votes_of(), trio.current_time())

    def _votes_of(self) -> dict[str, int]:
        return {w: c.votes for w, c in self._clients.items()}

    def votes(self) -> int:
        e = self.engine
        if e.role == Role.PRIMARY:
            sm = e.statemap
            return self.member_votes() + self.witness_votes(sm.sb.generations.current, self.outdated())
        return self.member_votes() + self.secondary_witness_votes()

    def status(self) -> dict[str, Any]:
        e = self.engine
        sm = e.statemap
        expected = self.expected()
        votes = self.votes()
        now = trio.current_time()
        witnesses = {}
        for w, c in self._clients.items():
            registered = None
            if e.role == Role.PRIMARY:
                g = self.grants.get(w)
                granted = g is not None and g.covers(sm.sb.generations.current, self.outdated(), now)
                why = "lease running" if granted else (self.answers.get(w, (False, "no lease", 0))[1])
                # What the witness was last told we write without: it refuses those members a takeover.
                registered = sorted(g.outdated) if g is not None else None
            else:
                a = self.answers.get(w)
                granted = a is not None and answer_counts(a[0], a[2], now)
                why = a[1] if a else "not asked yet"
            last = self.answers.get(w)
            witnesses[w] = {"connected": c.connected, "reason": c.reason, "granted": granted, "why": why,
                            "votes": c.votes, "registered_outdated": registered,
                            # Its latest answer: a lease still running may already be refused renewal.
                            "last_answer": None if last is None else {
                                "granted": last[0], "reason": last[1], "age_seconds": round(now - last[2], 3)}}
        ok = has_quorum(votes, expected, forced=e.role == Role.PRIMARY and sm.sb.forced_primary)
        policy = e.config.on_quorum_loss
        return {"votes": votes, "needed": votes_needed(expected), "expected": expected, "ok": ok,
                "expected_override": sm.sb.expected_votes, "forced": sm.sb.forced_primary,
                "suspended_writes_since": self._suspended_since, "witnesses": witnesses,
                "policy": policy, "policy_note": QUORUM_LOSS_NOTES[policy],
                # A primary without quorum that completes writes all the same.
                "writing_alone": not ok and e.role == Role.PRIMARY and self.primary_writes_alone}

    # ---------------------------------------------------------- witnesses

    @property
    def identity(self) -> str | None:
        """The volume's identity, sent with every claim so a witness judges it only
        by this volume's own registration (None: a map from before identities)."""
        local = self.engine.local
        return local.statemap.identity if local is not None else None

    def _claim_fields(self, current: str, history: list[str], outdated: frozenset[str]) -> dict[str, Any]:
        return {"volume": self.engine.name, "identity": self.identity or None, "current": current,
                "history": list(history), "outdated": sorted(outdated)}

    async def ask_witnesses(self, op: str, current: str, history: list[str], outdated: frozenset[str]) -> int:
        """``renew`` or ``promote`` at every witness at once; the votes granted."""
        fields = self._claim_fields(current, history, outdated)
        granted = 0

        async def one(w: str, client) -> None:
            nonlocal granted
            sent = trio.current_time()
            reply = await client.ask(op, fields)
            if reply is None:
                self.answers[w] = (False, client.reason or "no answer", sent)
                return
            self.answers[w] = (bool(reply.get("granted")), str(reply.get("reason", "")), sent)
            if reply.get("granted"):
                self.grants[w] = Grant(sent + LEASE, current, outdated)
                granted += client.votes
            elif reply.get("superseded"):
                self.superseded = f"witness {w}: {reply.get('reason')}"

        async with trio.open_nursery() as n:
            for w, client in self._clients.items():
                n.start_soon(one, w, client)
        self.notify()
        return granted

    async def release(self) -> None:
        """A clean step-down: the witnesses may give the lease to another at once."""
        sm = self.engine.statemap
        fields = self._claim_fields(sm.sb.generations.current, sm.sb.generations.history, frozenset())
        self.grants.clear()
        async with trio.open_nursery() as n:
            for client in self._clients.values():
                n.start_soon(client.ask, "release", fields)

    async def run(self) -> None:
        """Renew as primary, ask as secondary, every RENEW_INTERVAL."""
        if not self._clients:
            return
        e = self.engine
        while e.local is not None:
            sm = e.statemap
            g = sm.sb.generations
            if e.role == Role.PRIMARY:
                self.superseded = None
                # Under the settle lock: a fork registers its new generation
                # with the witnesses before committing it here, and a renewal
                # of the old one in between would register the old one again.
                async with self._lock:
                    g = sm.sb.generations
                    await self.ask_witnesses("renew", g.current, g.history, self.outdated())
                if self.superseded and not self.status()["ok"]:
                    log.warning("%s: %s; no quorum here: stepping down (waiting writes fail, this member "
                                "is then copied from the new primary)", e.name, self.superseded)
                    try:
                        await e.demote(force=True, reason="step-down")
                    except Exception as ex:
                        log.error("%s: stepping down failed: %s", e.name, ex)
            else:
                fields = self._claim_fields(g.current, g.history, frozenset())

                async def query(w: str, client) -> None:
                    sent = trio.current_time()
                    reply = await client.ask("query", fields)
                    self.answers[w] = ((bool(reply.get("granted")), str(reply.get("reason", "")), sent)
                                       if reply else (False, client.reason or "no answer", sent))

                async with trio.open_nursery() as n:
                    for w, client in self._clients.items():
                        n.start_soon(query, w, client)
            with trio.move_on_after(RENEW_INTERVAL):
                await self._renew_now.wait()
            self._renew_now = trio.Event()

    # ---------------------------------------------------------------- writes

    async def settle(self, missed: list[MemberLink]) -> None:
        """Return once a write may proceed (before it touches the disk) or complete
        (after it): quorum present, and the members in ``missed`` fenced by a
        generation that quorum knows about. Raises :class:`NoQuorum` (EIO) when
        this node stops being primary meanwhile, or when quorum does not return
        within ``quorum_timeout`` under ``on_quorum_loss = "fail"``."""
        e = self.engine
        if self._fast_ok(missed):
            return
        started = trio.current_time()
        while True:
            if e.role != Role.PRIMARY or e.local is None:
                raise NoQuorum(errno.EIO, f"{e.name}: no longer primary on {e.node}; write not completed")
            async with self._lock:
                if await self._try_settle(missed):
                    if self._suspended_since is not None:
                        log.warning("%s: quorum is back; suspended writes continue", e.name)
                        self._suspended_since = None
                    return
            now = trio.current_time()
            if self._suspended_since is None:
                self._suspended_since = now
                log.warning("%s: no quorum (%d of %d votes needed); writes %s", e.name, self.votes(),
                            self.needed(), "suspended until it returns" if e.config.on_quorum_loss == "suspend"
                            else f"fail after {e.config.quorum_timeout} s")
            if e.config.on_quorum_loss == "fail" and now - started >= e.config.quorum_timeout:
                raise NoQuorum(errno.EIO, f"{e.name}: no quorum for {e.config.quorum_timeout} s "
                                          f"({self.votes()} of {self.needed()} votes); write failed")
            with trio.move_on_after(WAIT_POLL):
                await self.changed.wait()

    def _needs_fork(self, missed: list[MemberLink]) -> list[MemberLink]:
        sm = self.engine.statemap
        current = sm.sb.generations.current
        return [m for m in missed if sm.sb.peers[m.name].bitmap_gen == current]

    def _fast_ok(self, missed: list[MemberLink]) -> bool:
        if self._needs_fork(missed):
            return False
        sm = self.engine.statemap
        if sm.sb.forced_primary or self.primary_writes_alone:
            return True
        needed = self.needed()
        votes = self.member_votes()
        if votes >= needed:
            return True
        return votes + self.witness_votes(sm.sb.generations.current, self.outdated(missed)) >= needed

    async def _try_settle(self, missed: list[MemberLink]) -> bool:
        e = self.engine
        sm = e.statemap
        if self._fast_ok(missed):
            return True
        fork_for = self._needs_fork(missed)
        g = sm.sb.generations
        current, history = g.current, list(g.history)
        if fork_for:
            current, history = secrets.token_hex(8), [g.current, *g.history]
        outdated = self.outdated(missed)
        votes, needed = self.member_votes(), self.needed()
        alone = votes < needed and self.primary_writes_alone and not sm.sb.forced_primary
        if votes < needed and not sm.sb.forced_primary and not alone:
            # The witnesses' votes are needed: register the (new) generation and
            # the members we write without before anything relies on it.
            if votes + self.witness_votes(current, outdated) < needed:
                votes += await self.ask_witnesses("renew", current, history, outdated)
            else:
                votes += self.witness_votes(current, outdated)
            if votes < needed:
                return False
        if fork_for:
            await e.writepath.commit_fork(current, fork_for)
            if alone:
                log.warning('%s: writing on alone without %s (on_quorum_loss = "continue", %d of %d votes): it '
                            "is outdated in this map and gets a mini-copy when back; while this primary lives, "
                            "promoting it with --force makes a split-brain", e.name,
                            ", ".join(m.name for m in fork_for), votes, needed)
        return True
