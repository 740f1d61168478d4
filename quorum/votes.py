"""The quorum arithmetic: a strict majority of the expected votes."""

from __future__ import annotations

from collections.abc import Iterable


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
