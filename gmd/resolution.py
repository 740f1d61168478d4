"""Resolving a split-brain on one volume: the plan (``gmd resolve --dry-run``),
the operator's choice of the side that discards, and saving that side's
diverging data before the copy overwrites it. The planning itself is
:mod:`gmd.splitbrain`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from statemap import Role

from . import splitbrain
from .disk import _pread_full
from .errors import Refused
from .replication import LinkState, MemberLink

if TYPE_CHECKING:
    from .config import VolumeConfig
    from .handshake import Handshake
    from .volume import LocalVolume

log = logging.getLogger(__name__)


class ResolutionVolume(Protocol):
    """What the split-brain resolution needs of its volume (the engine provides it)."""

    config: VolumeConfig
    handshake: Handshake
    local: LocalVolume | None
    members: dict[str, MemberLink]
    @property
    def name(self) -> str: ...
    node: str
    def require_up(self) -> LocalVolume: ...
    role: Role


class SplitBrainResolver:
    """Split-brain resolution of one volume; owns the peer we yield to and the images saved."""

    def __init__(self, engine: ResolutionVolume):
        self.engine = engine
        self.discarding: str | None = None  # split-brain peer whose data replaces ours (gmd resolve)
        self.saved_images: list[str] = []  # images of discarded regions saved by gmd resolve

    def bitmaps_share_ancestor(self, m: MemberLink) -> bool:
        """Both sides' bitmaps for each other start at one common generation:
        their union is every region that differs (a bitmap copy suffices)."""
        sm = self.engine.local.statemap
        g = (m.peer_hello_info or {}).get("generation", {})
        ours = sm.sb.peers[m.name].bitmap_gen
        theirs = g.get("bitmap_for", {}).get(self.engine.node)
        lineage = {g.get("current"), *g.get("history", [])}
        return ours == theirs and ours in lineage and (
            ours == sm.sb.generations.current or ours in sm.sb.generations.history)

    def _split_brain_peer(self) -> MemberLink:
        for m in self.engine.members.values():
            if m.state == LinkState.STANDALONE and m.reason and "split-brain" in m.reason:
                return m
        if self.discarding:
            return self.engine.members[self.discarding]
        raise Refused("no-split-brain", volume=self.engine.name, node=self.engine.node)

    def resolve_plan(self, peer: MemberLink, rule: str):
        sm = self.engine.require_up().statemap
        info = peer.peer_hello_info or {}
        mine = self.engine.handshake.generation_info()
        return splitbrain.plan(self.engine.name, self.engine.node, peer.name, local_gens=mine,
                               peer_gens=info.get("generation", {}), local_bits=sm.out_of_sync_regions(peer.name),
                               peer_marked=(info.get("marked") or {}).get(self.engine.node),
                               region_size=self.engine.config.region_size, size=self.engine.config.size, rule=rule)

    async def resolve(self, *, dry_run: bool) -> dict[str, Any]:
        """``gmd resolve VOLUME --discard-local [--dry-run]`` on the side whose
        changes since the split are to go (see :mod:`gmd.splitbrain`)."""
        peer = self._split_brain_peer()
        rule = f"operator: gmd resolve --discard-local on {self.engine.node}"
        p, _union = self.resolve_plan(peer, rule)
        out = {"plan": p.to_json(), "dry_run": dry_run}
        if dry_run:
            return out
        if self.engine.role == Role.PRIMARY:
            raise Refused("resolve-on-primary", volume=self.engine.name, node=self.engine.node)
        self.discarding = peer.name
        log.warning("%s: resolving split-brain with %s by discarding this side's changes (%s); they are saved "
                    "first", self.engine.name, peer.name, rule)
        peer.set_state(LinkState.CONNECTING, "resolving split-brain: discarding local changes")
        return out

    async def save_discarded(self, m: MemberLink) -> None:
        """Our data of the union of both sides' marked regions, saved before any
        of it is overwritten. The peer's bits were just ORed into ours."""
        sm = self.engine.local.statemap
        union = sm.out_of_sync_regions(m.name)
        fd = self.engine.local.device._fd

        class _Reader:
            @staticmethod
            def pread(offset: int, length: int) -> bytes:
                return _pread_full(fd, length, offset)

        meta = {"volume": self.engine.name, "node": self.engine.node, "kept": m.name,
                "local_generation": sm.sb.generations.current}
        image = await trio.to_thread.run_sync(
            splitbrain.save_discarded, Path(self.engine.config.members[self.engine.node].statemap), m.name,
            _Reader, union,
            self.engine.config.region_size, self.engine.config.size, meta)
        self.saved_images.append(str(image))
        log.warning("%s: %d bytes of this side's diverging data saved to %s (read-only) before %s's copy",
                    self.engine.name, union.count(1) * self.engine.config.region_size, image, m.name)

