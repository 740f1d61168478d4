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
* A registration belongs to one **life** of a volume: records are keyed by the
  volume's name *and its identity* (an opaque string created once, when the
  volume is first made), so a volume rebuilt with the same name, or another
  cluster that reuses it, is never judged by the old life's registration. A
  claim without an identity (a map from before identities) is its own key,
  ``None``. A claim is judged only against its own record; records of the same
  name under other identities are named in the answer, never applied. The
  primary lease stays one per volume *name*, held by a node *of one identity*:
  votes for a name never help two nodes at once, whatever identities they
  claim (two lives running at once on one witness only wait for each other's
  lease; neither is told to step down).

Times are seconds on a monotonic clock, passed in (testable without sleeping).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

LEASE = 4.0  # seconds a grant lets a node count the witness's votes (its clock)
MARGIN = 1.5  # the witness's extra wait beyond a lease: clock rates, scheduling
RENEW_INTERVAL = 1.0  # how often a primary renews (and a secondary asks)
STATE_FORMAT = 2  # the state file's format: records keyed by (volume, identity)

# An identity is opaque; bounded and printable so it fits a log line and a file.
_IDENTITY = re.compile(r"[!-~]{1,128}")

RecordKey = tuple[str, "str | None"]  # (volume name, volume identity or None)


def check_identity(identity: Any) -> str | None:
    """``identity`` if it is a valid volume identity or None; else ValueError."""
    if identity is None or (isinstance(identity, str) and _IDENTITY.fullmatch(identity)):
        return identity
    raise ValueError("the volume identity is not 1 to 128 printable characters")


def short_identity(identity: str | None) -> str:
    """An identity as logs and reasons show it: its first 8 characters."""
    if identity is None:
        return "(none)"
    return identity if len(identity) <= 8 else identity[:8] + "\u2026"


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
            raise ValueError("not an object")
        gen, parent = raw.get("generation", ""), raw.get("parent", "")
        out, primary = raw.get("outdated", []), raw.get("primary")
        if not isinstance(gen, str) or not isinstance(parent, str):
            raise ValueError("bad generation")
        if not isinstance(out, list) or not all(isinstance(n, str) for n in out):
            raise ValueError("bad outdated list")
        if primary is not None and not isinstance(primary, str):
            raise ValueError("bad primary")
        return cls(gen, parent, set(out), primary)


@dataclass(frozen=True)
class Claim:
    """A node's request for the witness's votes for one volume."""

    volume: str
    node: str
    current: str  # the node's current generation
    history: tuple[str, ...] = ()  # its older generations, newest first
    outdated: frozenset[str] = frozenset()  # primary only: members it writes without
    identity: str | None = None  # the volume's identity (None: a map from before identities)

    @property
    def lineage(self) -> set[str]:
        return {self.current, *self.history}

    @property
    def key(self) -> RecordKey:
        return (self.volume, self.identity)


@dataclass(frozen=True)
class Decision:
    granted: bool
    reason: str  # why not, or what was granted (followed by the notes, if any)
    superseded: bool = False  # another node is primary now, or holds newer data
    record_changed: bool = False  # the persistent record changed (write it before answering)
    # Records of the same volume name under other identities: named, not applied.
    notes: tuple[str, ...] = ()


@dataclass
class _Lease:
    node: str
    identity: str | None
    expires: float  # witness clock

    def held_by(self, claim: Claim) -> bool:
        return self.node == claim.node and self.identity == claim.identity

    def holder(self, claim: Claim) -> str:
        """The holder as ``claim``'s node should read it."""
        return _describe(self.node, self.identity, claim)


class WitnessBook:
    """The witness's state: persistent records (per volume name and identity)
    and the running leases (per volume name)."""

    def __init__(self, now: float, records: dict[RecordKey, VolumeRecord] | None = None, *,
                 fresh_start: bool = True):
        self.records: dict[RecordKey, VolumeRecord] = records or {}
        self.leases: dict[str, _Lease] = {}  # volume name -> its one lease
        # After a (re)start, leases granted by an earlier life may still run.
        self.quiet_until = now + LEASE + MARGIN if fresh_start else now
        # volume -> (primary that renewed while quiet, its identity, when it last did)
        self._waiting_primary: dict[str, tuple[str, str | None, float]] = {}

    def _lookup(self, claim: Claim) -> VolumeRecord:
        # Never inserts: a record exists only once a primary registered with it.
        return self.records.get(claim.key) or VolumeRecord()

    def _lease(self, volume: str, now: float) -> _Lease | None:
        lease = self.leases.get(volume)
        if lease is not None and lease.expires <= now:
            del self.leases[volume]
            return None
        return lease

    def others(self, claim: Claim) -> tuple[str, ...]:
        """Notes naming each record of ``claim``'s volume name under another
        identity: held, but never applied to this claim."""
        notes = []
        for volume, identity in sorted(self.records, key=_sort_key):
            if volume == claim.volume and identity != claim.identity:
                held = (f"under identity {short_identity(identity)}" if identity is not None
                        else "without an identity (registered from a map made before volume identities)")
                notes.append(f"witness also holds volume {volume} {held}, a different volume's life: not applied")
        return tuple(notes)

    def _noted(self, claim: Claim, decision: Decision) -> Decision:
        notes = self.others(claim)
        if not notes:
            return decision
        return replace(decision, reason="; ".join([decision.reason, *notes]), notes=notes)

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
        return self._noted(claim, self._renew(claim, now))

    def _renew(self, claim: Claim, now: float) -> Decision:
        if now < self.quiet_until:
            self._waiting_primary[claim.volume] = (claim.node, claim.identity, now)
            return Decision(False, f"witness restarted; granting nothing for {self.quiet_until - now:.1f} s "
                                   "more (leases of its previous life may still run)")
        lease = self._lease(claim.volume, now)
        if lease is not None and not lease.held_by(claim):
            # A node of another identity holding it says nothing about this
            # volume's primary: wait for the lease, but do not step down.
            return Decision(False, f"{lease.holder(claim)} holds the primary lease for {claim.volume}",
                            superseded=lease.identity == claim.identity)
        if lease is None:
            # Taking a lease that nobody holds: the same checks as a promotion.
            why = self._behind(self._lookup(claim), claim)
            if why is not None:
                return Decision(False, why, superseded=True)
        return self._grant(claim, now)

    def promote(self, claim: Claim, now: float) -> Decision:
        """A secondary asks for the votes to become primary; granted, it holds the lease."""
        why = self._refusal(claim, now)
        if why is not None:
            return self._noted(claim, Decision(False, why))
        return self._noted(claim, self._grant(claim, now))

    def query(self, claim: Claim, now: float) -> Decision:
        """Would :meth:`promote` grant this now? Changes nothing (status)."""
        why = self._refusal(claim, now)
        return self._noted(claim, Decision(why is None, why or "a promotion would be granted"))

    def _refusal(self, claim: Claim, now: float) -> str | None:
        """Why a promotion of ``claim`` is refused now, or None."""
        if now < self.quiet_until:
            return f"witness restarted; granting nothing for {self.quiet_until - now:.1f} s more"
        waiting = self._waiting_primary.get(claim.volume)
        if waiting is not None and waiting[:2] != (claim.node, claim.identity) and now < waiting[2] + LEASE + MARGIN:
            # The partition holding the primary goes first after a restart.
            return (f"{_describe(waiting[0], waiting[1], claim)} renewed as primary while the witness restarted; "
                    "it goes first")
        lease = self._lease(claim.volume, now)
        if lease is not None and not lease.held_by(claim):
            return f"{lease.holder(claim)} holds the primary lease for {claim.volume}"
        if claim.identity is None and any(v == claim.volume and i is not None for v, i in self.records):
            # Its map predates the identity its primary registered with (a
            # member learns it from the primary): it cannot be judged by that
            # registration, and a fresh one must not make it primary.
            return (f"{claim.node}'s state map carries no volume identity, but volume {claim.volume} is "
                    "registered here with one: its place in that volume's life is unknown")
        return self._behind(self._lookup(claim), claim)

    def release(self, volume: str, node: str, identity: str | None = None) -> None:
        """A primary stepped down cleanly: its lease ends now."""
        lease = self.leases.get(volume)
        if lease is not None and (lease.node, lease.identity) == (node, identity):
            del self.leases[volume]

    def _grant(self, claim: Claim, now: float) -> Decision:
        rec = self.records.get(claim.key)
        changed = rec is None or (rec.generation != claim.current or rec.outdated != set(claim.outdated)
                                  or rec.primary != claim.node)
        if rec is None:
            rec = self.records[claim.key] = VolumeRecord()
        if rec.generation != claim.current:
            rec.parent = claim.history[0] if claim.history else ""
        rec.generation, rec.outdated, rec.primary = claim.current, set(claim.outdated), claim.node
        self.leases[claim.volume] = _Lease(claim.node, claim.identity, now + LEASE + MARGIN)
        self._waiting_primary.pop(claim.volume, None)
        return Decision(True, f"lease for {LEASE:.0f} s", record_changed=changed)

    def holdings(self, now: float, volume: str | None = None) -> list[dict[str, Any]]:
        """Every record (or those of one volume name) as status shows it: volume,
        identity, the registration, and the node holding its lease (or None)."""
        out = []
        for key in sorted(self.records, key=_sort_key):
            if volume is not None and key[0] != volume:
                continue
            lease = self._lease(key[0], now)
            out.append({"volume": key[0], "identity": key[1], **self.records[key].to_json(),
                        "lease": lease.node if lease is not None and lease.identity == key[1] else None})
        return out

    # -------------------------------------------------------------- persistence

    def to_json(self) -> dict[str, Any]:
        """The state file's contents (format 2)::

            {"format": 2, "records": [{"volume": "appslv", "identity": "9f0c…" | null,
              "generation": GEN, "parent": GEN, "outdated": [NODE, ...], "primary": NODE | null}, ...]}
        """
        return {"format": STATE_FORMAT, "records": [
            {"volume": key[0], "identity": key[1], **self.records[key].to_json()}
            for key in sorted(self.records, key=_sort_key)]}

    @staticmethod
    def records_from_json(raw: Any) -> tuple[dict[RecordKey, VolumeRecord], list[str]]:
        """The records of a state file, and the volume names of a format-1 file's
        records, which are ignored: they name no identity, so they cannot be
        matched to any volume's life. ValueError says what is damaged."""
        if not isinstance(raw, dict) or type(raw.get("format")) is not int:
            raise ValueError("not a gmd witness state (no format number)")
        if raw["format"] == 1:
            if not isinstance(raw.get("volumes"), dict):
                raise ValueError("format 1 without a volumes object")
            return {}, sorted(str(v) for v in raw["volumes"])
        if raw["format"] != STATE_FORMAT:
            raise ValueError(f"unknown format {raw['format']} (this gmd reads formats 1 and {STATE_FORMAT})")
        entries = raw.get("records")
        if not isinstance(entries, list):
            raise ValueError("format 2 without a records list")
        records: dict[RecordKey, VolumeRecord] = {}
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("volume"), str) or not entry["volume"]:
                raise ValueError(f"record {n + 1} names no volume")
            try:
                key = (entry["volume"], check_identity(entry.get("identity")))
                rec = VolumeRecord.from_json(entry)
            except ValueError as e:
                raise ValueError(f"record {n + 1} (volume {entry['volume']}): {e}") from None
            if key in records:
                raise ValueError(f"volume {key[0]} identity {short_identity(key[1])} is recorded twice")
            records[key] = rec
        return records, []


def _sort_key(key: RecordKey) -> tuple[str, bool, str]:
    return (key[0], key[1] is not None, key[1] or "")


def _describe(node: str, identity: str | None, claim: Claim) -> str:
    if identity == claim.identity:
        return node
    return f"{node} of identity {short_identity(identity)} (a different volume's life)"
