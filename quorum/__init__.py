"""Votes, expected votes, the quorum decision, the witness and generation comparison.

Knows nothing of disks and never imports ``gmd``.
"""
