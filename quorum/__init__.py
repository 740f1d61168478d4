"""Votes, expected votes, the quorum decision, the witness and generation comparison.

Knows nothing of disks and never imports ``gmd``; of ``statemap`` it reads only
the generation format (:mod:`statemap.format`, no I/O).
"""

from .votes import (
    Grant,
    answer_counts,
    answered_votes,
    expected_votes,
    granted_votes,
    has_quorum,
    member_votes,
    votes_needed,
)

__all__ = ["Grant", "answer_counts", "answered_votes", "expected_votes", "granted_votes", "has_quorum",
           "member_votes", "votes_needed"]
