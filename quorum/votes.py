"""The quorum arithmetic: a strict majority of the expected votes, and which
votes are present (members in sight, witness grants still running).

Pure: times are passed in (the caller's clock), nothing is awaited or stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .witness import RENEW_INTERVAL

ANSWER_FRESH_FOR = 2 * RENEW_INTERVAL + 1  # seconds a secondary counts a witness's "granted" answer


def expected_votes(votes: Iterable[int], override: int | None = None) -> int:
    """Expected votes: the operator's override if set, else the sum of all votes."""
    if override is not None:
        if override <= 0:
            raise ValueError(f"expected votes must be positive, not {override}")
        return override
    return sum(votes)


def votes_needed(expected: int) -> int:
    """Votes that make a quorum: a strict majority of ``expected``."""
    return expected // 2 + 1


def has_quorum(votes: int, expected: int, *, forced: bool = False) -> bool:
    """``votes`` make a quorum of ``expected``, or the operator forced it (a
    primary promoted with ``--force`` writes on without one)."""
    return forced or votes >= votes_needed(expected)


def member_votes(own: int, connected: Iterable[int]) -> int:
    """Votes of the members present: this one's and every connected member's."""
    return own + sum(connected)


@dataclass(frozen=True)
class Grant:
    """A witness's lease held by a primary: until when (the primary's clock,
    a lease after the request was sent), for which generation, and which
    members the witness knows the primary writes without."""

    until: float
    generation: str
    outdated: frozenset[str]

    def covers(self, generation: str, outdated: frozenset[str], now: float) -> bool:
        """The grant still runs and vouches for ``generation`` written without
        (at most) the members in ``outdated``."""
        return self.until > now and self.generation == generation and self.outdated >= outdated


def granted_votes(grants: Mapping[str, Grant], votes_of: Mapping[str, int], generation: str,
                  outdated: frozenset[str], now: float) -> int:
    """As primary: votes of the witnesses (``votes_of``: witness -> votes) whose
    grant covers ``generation`` and ``outdated`` at ``now``."""
    return sum(votes for w, votes in votes_of.items()
               if (g := grants.get(w)) is not None and g.covers(generation, outdated, now))


def answer_counts(granted: bool, answered_at: float, now: float) -> bool:
    """As secondary: a witness's answer counts while it granted and is fresh."""
    return granted and now - answered_at < ANSWER_FRESH_FOR


def answered_votes(answers: Mapping[str, tuple[bool, str, float]], votes_of: Mapping[str, int],
                   now: float) -> int:
    """As secondary: votes of the witnesses whose last answer (granted, why,
    when) counts at ``now``."""
    return sum(votes for w, votes in votes_of.items()
               if (a := answers.get(w)) is not None and answer_counts(a[0], a[2], now))
