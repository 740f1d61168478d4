"""Automatic takeover decisions, as pure logic (docs/DESIGN.md, "Automatic
takeover"); :mod:`gmd.takeover` does the I/O.

Two questions are answered here:

* *Which secondary takes over?* Every node reads the same config, so every
  node computes the same :func:`promotion_order`: members of a synchronous
  mode (``sync``, ``mwc``) before ``async`` ones (an async copy may lack
  acknowledged writes), then in the config's order. A secondary defers to
  every connected member ahead of it that could promote itself
  (:func:`defer_to`). Two secondaries that cannot see each other cannot both
  pass the quorum check either (a strict majority, or the witness's single
  lease), so the order only has to settle the case in which they can.
* *Must a primary fence itself?* A primary whose member votes alone are not a
  quorum lives on its witness leases. When no lease has been renewed for
  :data:`FENCE_AFTER` seconds, the lease will end within
  ``LEASE - FENCE_AFTER`` seconds and another node may then take over, so
  the primary stops its application and steps down first
  (:func:`must_fence`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .votes import Grant
from .witness import LEASE, RENEW_INTERVAL

# A lease not renewed for this long is being lost: renewals go out every
# RENEW_INTERVAL and a witness answers a live node within milliseconds, so one
# missed renewal plus a half-interval's slack is a real loss, while
# LEASE - FENCE_AFTER (2.5 s) is left for the stop command and the step-down.
FENCE_AFTER = 1.5 * RENEW_INTERVAL

# How long a secondary waits, after it last saw a primary, before it may
# promote itself: longer than the node's lease, so that a primary that lost
# quorum has fenced itself first, even where member votes alone decide and
# no witness lease holds the others back.
TAKEOVER_GRACE = LEASE + 2.0

# A connected member that has sent nothing for this long is not counted by a
# fencing decision, nor as a primary in sight: members ping every second, and
# a blackholed link is declared dead only after a longer path timeout.
SILENT_AFTER = 2.0 * RENEW_INTERVAL

SYNCHRONOUS_MODES = ("sync", "mwc")


@dataclass(frozen=True)
class PeerView:
    """What a secondary knows of another member for the takeover decision
    (``connected``: connected and heard from within :data:`SILENT_AFTER`)."""

    connected: bool
    primary: bool  # it says it is primary
    uptodate: bool  # its disk, as it last said or as our map records it


def promotion_order(members: Iterable[tuple[str, str]]) -> list[str]:
    """Member names (from ``(name, mode)`` in config order) in the order in
    which they take over: synchronous modes first, then ``async``."""
    members = list(members)
    return ([n for n, mode in members if mode in SYNCHRONOUS_MODES]
            + [n for n, mode in members if mode not in SYNCHRONOUS_MODES])


def defer_to(me: str, order: list[str], peers: Mapping[str, PeerView]) -> str | None:
    """The connected member that ``me`` leaves the takeover to (a primary in
    sight, or a promotable member ahead of it in ``order``), or None."""
    for name, p in peers.items():
        if p.connected and p.primary:
            return name
    for name in order:
        if name == me:
            return None
        p = peers.get(name)
        if p is not None and p.connected and p.uptodate:
            return name
    return None


def fresh_votes(answers: Mapping[str, tuple[bool, str, float]], votes_of: Mapping[str, int], now: float) -> int:
    """Votes of the witnesses that granted a claim of ours sent within the
    last :data:`FENCE_AFTER` seconds (``answers``: witness -> (granted,
    reason, when the claim was sent)). A grant for an older generation or
    outdated set still counts: the next renewal carries the new ones, and
    a witness that refuses it for good says so (the step-down)."""
    return sum(votes for w, votes in votes_of.items()
               if (a := answers.get(w)) is not None and a[0] and now - a[2] <= FENCE_AFTER)


def must_fence(member_votes: int, needed: int, fresh_witness_votes: int) -> bool:
    """A primary must fence itself: its member votes are no quorum, and the
    witness leases it would need are not being renewed."""
    return member_votes < needed and member_votes + fresh_witness_votes < needed


def lease_left(grants: Mapping[str, Grant], now: float) -> float:
    """Seconds until the last running grant ends (0 when none runs)."""
    return max([0.0, *(g.until - now for g in grants.values())])
