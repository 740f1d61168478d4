"""The witness's decisions: who may count its votes, per volume. Pure logic.

A witness holds votes and no data. Its votes must never help two partitions at
once, or both could write and the data diverge. It gives them out as a
**primary lease** per volume: one node at a time may count them while it is
primary, for :data:`LEASE` seconds from when it asked (the node measures that
on its own clock, from the moment it sent the request; the witness keeps the
lease a :data:`MARGIN` longer on its clock, from when the request arrived, so
the node's lease always ends first).

* A primary renews its lease every :data:`RENEW_INTERVAL`. The lease stays
  with it while it keeps renewing: the witness prefers the partition holding
  the current primary.
* A secondary gets the votes for a **promotion** only when no other node's
  lease is running, and only if its data is not behind: with each renewal the
  primary registers its current generation and the members it writes without
  (the *outdated* set); a node in that set, or whose generation history lacks
  the registered generation, is refused. So a primary that wrote without a
  member (with the witness's votes) can never be replaced by that member.
* A restarted witness has forgotten the running leases: it grants nothing for
  ``LEASE + MARGIN`` (every lease of its previous life has ended by then), and
  then prefers a primary that renewed during that wait. The registration (the
  generation and the outdated set) survives restarts: the witness daemon keeps
  it in a small state file, written before any grant that changed it.

Times are seconds on a monotonic clock, passed in (testable without sleeping).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LEASE = 4.0  # seconds a grant lets a node count the witness's votes (its clock)
MARGIN = 1.5  # the witness's extra wait beyond a lease: clock rates, scheduling
RENEW_INTERVAL = 1.0  # how often a primary renews (and a secondary asks)


@dataclass
class VolumeRecord:
    """What the witness keeps about one volume across restarts."""

    generation: str = ""  # the newest generation a primary registered ("" = none yet)
    # The generation it forked from. A primary registers a new generation before
    # it commits it, and completes no write in it before then: a node still at
    # the parent (and not outdated) lacks no completed write.
    parent: str = ""
    outdated: set[str] = field(default_factory=set)  # members the primary writes without
    primary: str | None = None  # the node that holds (or last held) the lease

    def to_json(self) -> dict[str, Any]:
        return {"generation": self.generation, "parent": self.parent, "outdated": sorted(self.outdated),
                "primary": self.primary}

    @classmethod
    def from_json(cls, raw: Any) -> VolumeRecord:
        if not isinstance(raw, dict):
            raise ValueError("a volume record is not an object")
        gen, parent = raw.get("generation", ""), raw.get("parent", "")
        out, primary = raw.get("outdated", []), raw.get("primary")
        if not isinstance(gen, str) or not isinstance(parent, str):
            raise ValueError("a volume record has a bad generation")
        if not isinstance(out, list) or not all(isinstance(n, str) for n in out):
            raise ValueError("a volume record has a bad outdated list")
        if primary is not None and not isinstance(primary, str):
            raise ValueError("a volume record has a bad primary")
        return cls(gen, parent, set(out), primary)


@dataclass(frozen=True)
class Claim:
    """A node's request for the witness's votes for one volume."""

    volume: str
    node: str
    current: str  # the node's current generation
    history: tuple[str, ...] = ()  # its older generations, newest first
    outdated: frozenset[str] = frozenset()  # primary only: members it writes without

    @property
    def lineage(self) -> set[str]:
        return {self.current, *self.history}


@dataclass(frozen=True)
class Decision:
    granted: bool
    reason: str  # why not, or what was granted
    superseded: bool = False  # another node is primary now, or holds newer data
    record_changed: bool = False  # the persistent record changed (write it before answering)


@dataclass
class _Lease:
    node: str
    expires: float  # witness clock


class WitnessBook:
    """The witness's state: persistent records and the running leases."""

    def __init__(self, now: float, records: dict[str, VolumeRecord] | None = None, *, fresh_start: bool = True):
        self.records: dict[str, VolumeRecord] = records or {}
        self.leases: dict[str, _Lease] = {}
        # After a (re)start, leases granted by an earlier life may still run.
        self.quiet_until = now + LEASE + MARGIN if fresh_start else now
        # volume -> (primary that renewed while quiet, when it last did)
        self._waiting_primary: dict[str, tuple[str, float]] = {}

    def _record(self, volume: str) -> VolumeRecord:
        return self.records.setdefault(volume, VolumeRecord())

    def _lease(self, volume: str, now: float) -> _Lease | None:
        lease = self.leases.get(volume)
        if lease is not None and lease.expires <= now:
            del self.leases[volume]
            return None
        return lease

    def _behind(self, rec: VolumeRecord, claim: Claim) -> str | None:
        if claim.node in rec.outdated:
            return (f"{claim.node} is outdated: primary {rec.primary} registered generation {rec.generation} "
                    "without it")
        if rec.generation and not ({rec.generation, rec.parent} & claim.lineage):
            return (f"{claim.node} does not hold generation {rec.generation} (registered by {rec.primary}); "
                    "its data is behind or diverged")
        return None

    def renew(self, claim: Claim, now: float) -> Decision:
        """A primary renews its lease and registers its generation and outdated set."""
        rec = self._record(claim.volume)
        if now < self.quiet_until:
            self._waiting_primary[claim.volume] = (claim.node, now)
            return Decision(False, f"witness restarted; granting nothing for {self.quiet_until - now:.1f} s "
                                   "more (leases of its previous life may still run)")
        lease = self._lease(claim.volume, now)
        if lease is not None and lease.node != claim.node:
            return Decision(False, f"{lease.node} holds the primary lease for {claim.volume}", superseded=True)
        if lease is None:
            # Taking a lease that nobody holds: the same checks as a promotion.
            why = self._behind(rec, claim)
            if why is not None:
                return Decision(False, why, superseded=True)
        return self._grant(rec, claim, now)

    def promote(self, claim: Claim, now: float) -> Decision:
        """A secondary asks for the votes to become primary; granted, it holds the lease."""
        why = self._refusal(claim, now)
        if why is not None:
            return Decision(False, why)
        return self._grant(self._record(claim.volume), claim, now)

    def query(self, claim: Claim, now: float) -> Decision:
        """Would :meth:`promote` grant this now? Changes nothing (status)."""
        why = self._refusal(claim, now)
        return Decision(why is None, why or "a promotion would be granted")

    def _refusal(self, claim: Claim, now: float) -> str | None:
        """Why a promotion of ``claim`` is refused now, or None."""
        if now < self.quiet_until:
            return f"witness restarted; granting nothing for {self.quiet_until - now:.1f} s more"
        waiting = self._waiting_primary.get(claim.volume)
        if waiting is not None and waiting[0] != claim.node and now < waiting[1] + LEASE + MARGIN:
            # The partition holding the primary goes first after a restart.
            return f"{waiting[0]} renewed as primary while the witness restarted; it goes first"
        lease = self._lease(claim.volume, now)
        if lease is not None and lease.node != claim.node:
            return f"{lease.node} holds the primary lease for {claim.volume}"
        return self._behind(self._record(claim.volume), claim)

    def release(self, volume: str, node: str) -> None:
        """A primary stepped down cleanly: its lease ends now."""
        lease = self.leases.get(volume)
        if lease is not None and lease.node == node:
            del self.leases[volume]

    def _grant(self, rec: VolumeRecord, claim: Claim, now: float) -> Decision:
        changed = (rec.generation != claim.current or rec.outdated != set(claim.outdated)
                   or rec.primary != claim.node)
        if rec.generation != claim.current:
            rec.parent = claim.history[0] if claim.history else ""
        rec.generation, rec.outdated, rec.primary = claim.current, set(claim.outdated), claim.node
        self.leases[claim.volume] = _Lease(claim.node, now + LEASE + MARGIN)
        self._waiting_primary.pop(claim.volume, None)
        return Decision(True, f"lease for {LEASE:.0f} s", record_changed=changed)

    # -------------------------------------------------------------- persistence

    def to_json(self) -> dict[str, Any]:
        return {"format": 1, "volumes": {v: r.to_json() for v, r in sorted(self.records.items())}}

    @staticmethod
    def records_from_json(raw: Any) -> dict[str, VolumeRecord]:
        if not isinstance(raw, dict) or raw.get("format") != 1 or not isinstance(raw.get("volumes"), dict):
            raise ValueError("not a gmd witness state (format 1)")
        return {str(v): VolumeRecord.from_json(r) for v, r in raw["volumes"].items()}
