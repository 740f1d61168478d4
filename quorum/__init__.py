"""Votes, expected votes, the quorum decision, the witness and generation comparison.

Knows nothing of disks and never imports ``gmd``.
"""

from .votes import expected_votes, votes_needed

__all__ = ["expected_votes", "votes_needed"]
