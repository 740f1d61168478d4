"""Generation comparison on connect: who is newer, and whether a bitmap suffices.

Each member's state map holds a generation history (DRBD's UUIDs): ``current``,
the previous ones newest first, and per peer the generation its out-of-sync
bitmap for that peer started at. Two members comparing theirs on connect reach
one of the verdicts of :class:`Verdict`. Pure functions; no disks, no sockets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

# The state map creates and persists generations, so the format is its own;
# this module only compares them. statemap.format is pure (no I/O), and it is
# the one part of statemap the quorum may import (pyproject.toml, contract
# "foundations-independent").
from statemap.format import NO_GENERATION  # a member that never held data of any generation


@dataclass(frozen=True)
class GenerationView:
    """What one side tells the other about its data on connect."""

    current: str
    history: tuple[str, ...] = ()
    # peer name -> generation at which this side started tracking that peer in a bitmap
    bitmap_for: dict[str, str] = field(default_factory=dict)


class Verdict(Enum):
    SAME = "same"  # same generation: the bitmaps alone say what differs
    PEER_BEHIND = "peer-behind"  # peer misses what our bitmap for it says
    LOCAL_BEHIND = "local-behind"  # we miss what the peer's bitmap for us says
    PEER_NEEDS_FULL = "peer-needs-full"  # peer is behind beyond any bitmap, or new
    LOCAL_NEEDS_FULL = "local-needs-full"
    PEER_EMPTY = "peer-empty"  # peer never held data: our map decides what it needs
    LOCAL_EMPTY = "local-empty"
    SPLIT_BRAIN = "split-brain"  # both wrote since a common ancestor
    UNRELATED = "unrelated"  # no common generation at all


def compare(local_name: str, local: GenerationView, peer_name: str, peer: GenerationView) -> Verdict:
    """The verdict from the local side's point of view; ``compare`` of the swapped
    arguments gives the mirror verdict, so both ends agree."""
    if local.current == peer.current:
        return Verdict.SAME
    if peer.current == NO_GENERATION:
        return Verdict.PEER_EMPTY
    if local.current == NO_GENERATION:
        return Verdict.LOCAL_EMPTY
    if local.bitmap_for.get(peer_name) == peer.current:
        return Verdict.PEER_BEHIND
    if peer.bitmap_for.get(local_name) == local.current:
        return Verdict.LOCAL_BEHIND
    if peer.current in local.history:
        return Verdict.PEER_NEEDS_FULL
    if local.current in peer.history:
        return Verdict.LOCAL_NEEDS_FULL
    if set(local.history) & set(peer.history) or (
        local.bitmap_for.get(peer_name) and local.bitmap_for.get(peer_name) == peer.bitmap_for.get(local_name)
    ):
        return Verdict.SPLIT_BRAIN
    return Verdict.UNRELATED


MIRROR = {
    Verdict.SAME: Verdict.SAME,
    Verdict.PEER_BEHIND: Verdict.LOCAL_BEHIND,
    Verdict.LOCAL_BEHIND: Verdict.PEER_BEHIND,
    Verdict.PEER_NEEDS_FULL: Verdict.LOCAL_NEEDS_FULL,
    Verdict.LOCAL_NEEDS_FULL: Verdict.PEER_NEEDS_FULL,
    Verdict.PEER_EMPTY: Verdict.LOCAL_EMPTY,
    Verdict.LOCAL_EMPTY: Verdict.PEER_EMPTY,
    Verdict.SPLIT_BRAIN: Verdict.SPLIT_BRAIN,
    Verdict.UNRELATED: Verdict.UNRELATED,
}
