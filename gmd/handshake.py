"""The intro verdict of one volume: what we tell a peer about our data, and
whether a peer that proved the secret may open a session (docs/DESIGN.md,
"Generations, verdicts and split-brain").

Used by both ends of a path: the dialling one checks the answer, the accepting
one the hello. A refusal is a reason string; a split-brain the configured
policy resolves is accepted, with the losing side marked to discard.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from quorum.generations import GenerationView, Verdict, compare
from statemap import CopyKind, DiskState, Role
from transport.codec import Intro
from transport.messages import IntroInfo, decode, intro_problem

from . import splitbrain
from .replication import LinkState

if TYPE_CHECKING:
    from .config import VolumeConfig
    from .dispatch import FrameDispatch
    from .replication import MemberLink
    from .resolution import SplitBrainResolver
    from .volume import LocalVolume

log = logging.getLogger(__name__)


class HandshakeVolume(Protocol):
    """What the handshake needs of its volume (the engine provides it)."""

    config: VolumeConfig
    going_down: bool
    local: LocalVolume | None
    members: dict[str, MemberLink]
    @property
    def name(self) -> str: ...
    node: str
    def require_up(self) -> LocalVolume: ...
    frames: FrameDispatch
    resolver: SplitBrainResolver
    role: Role


class Handshake:
    """The verdicts on peers' intros for one volume; owns no state of its own."""

    def __init__(self, engine: HandshakeVolume):
        self.engine = engine

    def hello_info(self) -> dict[str, Any]:
        sm = self.engine.require_up().statemap
        return {
            "role": self.engine.role.value,
            "disk": sm.sb.disk.value,
            "generation": self.generation_info(),
            # What we wrote that each peer lacks: lets a peer in split-brain plan
            # a resolution (gmd resolve --dry-run) before any session exists.
            "marked": {name: splitbrain.marked_summary(sm.out_of_sync_regions(name)) for name in sm.sb.peers},
            "discard_local": self.engine.resolver.discarding,  # the peer we yield to in a split-brain resolution
            "promoted_at": sm.sb.promoted_at,
            "identity": sm.identity,  # which life of the volume our data belongs to
            # A copy target (gmd clean) waits for a full copy whatever the
            # primary's map says about it.
            "awaiting_full_copy": sm.sb.local_copy is not None and sm.sb.local_copy.kind == CopyKind.FULL,
            # How far our disk holds the last primary's writes in order: it
            # replays its backlog for us from there (gmd.backlog).
            "resume": self.engine.frames.resume_points(),
        }

    def generation_info(self) -> dict[str, Any]:
        g = self.engine.require_up().statemap.sb.generations
        peers = self.engine.local.statemap.sb.peers
        return {"current": g.current, "history": list(g.history),
                "bitmap_for": {name: p.bitmap_gen for name, p in peers.items()}}

    def make_intro(self, path: int, session: str, *, poke: bool = False) -> Intro:
        """What this member says about the volume to a peer that has proved the
        secret (never before: see transport.link)."""
        info = self.hello_info()
        if poke:
            info["poke"] = True
        decode(IntroInfo, info, "our own intro")  # a key we send must be one the peer knows
        return Intro(node=self.engine.node, volume=self.engine.name, size=self.engine.config.size,
                     region_size=self.engine.config.region_size, extent_size=self.engine.config.extent_size,
                     path=path, session=session, info=info)

    def check_peer_hello(self, hello: Intro) -> str | None:
        """A refusal reason for an authenticated peer's intro, or None (used by
        both ends). Only ever called after the peer proved the secret."""
        if self.engine.local is None or self.engine.going_down:
            return f"volume {self.engine.name} is down on {self.engine.node}"
        if hello.node not in self.engine.members:
            return f"node {hello.node} is not a member of volume {self.engine.name}"
        problem = intro_problem(hello.info, f"intro of {hello.node}")
        if problem:
            return problem  # a key we do not know, or a value of the wrong type: nothing of it is believed
        self.engine.members[hello.node].peer_hello_info = hello.info  # also when refused: resolve plans from it
        for field_name in ("size", "region_size", "extent_size"):
            ours, theirs = getattr(self.engine.config, field_name), getattr(hello, field_name)
            if ours != theirs:
                return (f"volume {self.engine.name} {field_name} mismatch: {self.engine.node} has {ours}, "
                        f"{hello.node} has {theirs}")
        info = hello.info
        ours, theirs = self.engine.local.statemap.identity, info.get("identity")
        if ours and isinstance(theirs, str) and theirs and theirs != ours:
            return (f"{hello.node} holds another life of volume {self.engine.name} (identity {theirs[:8]}…, ours "
                    f"{ours[:8]}…): it was created or rebuilt apart from ours, so nothing of it relates to "
                    f"our data; run 'gmd clean {self.engine.name}' on the member that is to receive a full copy")
        if info.get("role") == Role.PRIMARY and self.engine.role == Role.PRIMARY:
            return f"both {self.engine.node} and {hello.node} are primary for {self.engine.name} (split-brain risk)"
        verdict = self.verdict(hello)
        resolving = self.engine.resolver.discarding == hello.node or info.get("discard_local") == self.engine.node
        if verdict == Verdict.SPLIT_BRAIN and resolving:
            return None  # one side discards its changes (gmd resolve): it becomes the copy target
        if verdict == Verdict.SPLIT_BRAIN and self.engine.config.split_brain != "disconnect":
            loser, why = splitbrain.policy_loser(self.engine.config.split_brain, self.engine.node, self.hello_info(),
                                                 hello.node, info)
            loser_role = self.engine.role.value if loser == self.engine.node else info.get("role")
            if loser is not None and loser_role != Role.PRIMARY.value:
                if loser == self.engine.node:
                    self.engine.resolver.discarding = hello.node
                log.warning("%s: split-brain with %s resolved by %s: %s's changes are discarded (saved first)",
                            self.engine.name, hello.node, why, loser)
                return None
            if loser is not None:
                why += f", but {loser} is primary: demote it and it resolves"
        if verdict == Verdict.UNRELATED and ours and theirs == ours:
            return self._too_old(hello)
        if verdict in (Verdict.SPLIT_BRAIN, Verdict.UNRELATED):
            reason = (f"{verdict.value}: {self.engine.node} and {hello.node} hold diverging data of "
                      f"{self.engine.name}; "
                      "nothing is overwritten, the link stays down")
            if verdict == Verdict.SPLIT_BRAIN and self.engine.config.split_brain != "disconnect":
                reason += f" ({why})"
            m = self.engine.members[hello.node]
            if not m.connected:  # both ends show it, the accepting one too
                m.set_state(LinkState.STANDALONE, reason)
            return reason
        if self.engine.role == Role.PRIMARY and verdict in (Verdict.LOCAL_BEHIND, Verdict.LOCAL_NEEDS_FULL):
            return (f"{hello.node} holds newer data of {self.engine.name} than primary {self.engine.node}; "
                    "refusing to connect (split-brain risk)")
        return None

    def _too_old(self, hello: Intro) -> str:
        """Same volume identity, no generation in common: one side's map comes
        from a time further back than the history reaches (a restored backup).
        Nothing relates the two by bitmap; the older one needs a full copy, and
        is not up to date meanwhile."""
        sm = self.engine.local.statemap
        peer_primary = hello.info.get("role") == Role.PRIMARY.value
        if peer_primary and self.engine.role != Role.PRIMARY:
            old = self.engine.node
            if sm.sb.disk == DiskState.UPTODATE:
                sm.set_disk(DiskState.OUTDATED)
        elif self.engine.role == Role.PRIMARY:
            old = hello.node
            rec = sm.sb.peers.get(hello.node)
            if rec is not None and rec.disk == DiskState.UPTODATE:
                sm.set_peer_disk(hello.node, DiskState.OUTDATED)
            self.engine.members[hello.node].peer_disk = DiskState.OUTDATED
        else:
            old = None
        who = (f"{old}'s data" if old else f"the data of {self.engine.node} or {hello.node}")
        clean_on = old or "the member whose map was restored"
        reason = (f"{who} is too old to relate by history to the other's: both are volume {self.engine.name} "
                  f"(identity {sm.identity[:8]}…), but no generation is in common (a map restored from an "
                  f"old backup?). A full copy is needed: run 'gmd clean {self.engine.name}' on {clean_on}, then "
                  "'gmd up' it")
        m = self.engine.members[hello.node]
        if not m.connected:
            m.set_state(LinkState.STANDALONE, reason)
        return reason

    def verdict(self, hello: Intro) -> Verdict:
        g = hello.info.get("generation", {})
        peer = GenerationView(str(g.get("current", "")), tuple(g.get("history", ())),
                              dict(g.get("bitmap_for", {})))
        mine = self.generation_info()
        local = GenerationView(mine["current"], tuple(mine["history"]), mine["bitmap_for"])
        return compare(self.engine.node, local, hello.node, peer)

