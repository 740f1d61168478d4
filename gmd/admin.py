"""Operations on a node's members that need no daemon: init, dirty, clean, status.

Each function works on this node's member of one volume, reads the configuration
only through :class:`gmd.config.Config`, and returns plain data for the CLI to
print. A map that a running daemon holds is never changed from here (the map's
lock refuses it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quorum import expected_votes, votes_needed
from statemap import DiskState, StateMap, ensure_not_in_use

from .config import Config, ConfigError, Member, VolumeConfig
from .configvalues import QUORUM_LOSS_NOTES
from .disk import create_sparse_file, device_size
from .errors import Refused

log = logging.getLogger(__name__)


def _member(config: Config, volume: str, node: str) -> tuple[VolumeConfig, Member]:
    try:
        vol = config.volume(volume)
        return vol, config.member(volume, node)
    except ConfigError as e:
        raise Refused("config", message=e.message) from None


def _open_checked(vol: VolumeConfig, member: Member, node: str, *, readonly: bool = False) -> StateMap:
    sm = StateMap.open(member.statemap, readonly=readonly)
    try:
        sm.check_geometry(
            volume=vol.name, size=vol.size, region_size=vol.region_size,
            extent_size=vol.extent_size, member=node,
        )
    except BaseException:
        sm.close()
        raise
    return sm


# ---------------------------------------------------------------------- init


@dataclass
class InitResult:
    """What ``gmd init`` did on one node: the map and device it made or kept."""

    volume: str
    node: str
    statemap: Path
    device: Path
    created_device: bool
    replaced_map: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "volume": self.volume, "node": self.node, "statemap": str(self.statemap),
            "device": str(self.device), "created_device": self.created_device,
            "replaced_map": self.replaced_map,
        }


def init_volume(config: Config, node: str, volume: str, *, force: bool = False) -> InitResult:
    """Create this node's state map for ``volume`` (and a sparse backing file of the
    volume's size if there is none). Refuses to replace a map without ``force``."""
    vol, member = _member(config, volume, node)
    smpath, device = Path(member.statemap), Path(member.device)
    exists = smpath.exists()
    if exists and not force:
        raise Refused("map-exists", path=smpath)
    if exists:
        ensure_not_in_use(smpath)
    created_device = False
    if device.exists():
        actual = device_size(device)
        if actual < vol.size:
            raise Refused("device-too-small", path=device, actual=actual, volume=vol.name, size=vol.size)
    else:
        create_sparse_file(device, vol.size)
        created_device = True
    smpath.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    peers = [name for name in vol.members if name != node]
    sm = StateMap.create(
        smpath, volume=vol.name, size=vol.size, region_size=vol.region_size,
        extent_size=vol.extent_size, member=node, peers=peers,
    )
    sm.close()
    log.info("%s: created state map %s for member %s", vol.name, smpath, node)
    return InitResult(vol.name, node, smpath, device, created_device, exists)


# ------------------------------------------------------------- dirty / clean


@dataclass
class MarkResult:
    """What ``gmd dirty``/``gmd clean`` did (or, with ``dry_run``, would do) to one member's disk state."""

    volume: str
    node: str
    action: str  # "source" or "target"
    dry_run: bool
    disk_before: str
    disk_after: str
    peers_needing_copy: list[str]

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def mark_dirty(config: Config, node: str, volume: str, *, force: bool = False, dry_run: bool = False,
               skip_initial_copy: bool = False) -> MarkResult:
    """``gmddirty``: make this member the copy source; every other member will get a
    full copy from it (none with ``skip_initial_copy``: the operator asserts the
    members are identical already). Without ``force``, only a fresh or
    up-to-date copy may."""
    vol, member = _member(config, volume, node)
    sm = _open_checked(vol, member, node, readonly=dry_run)
    try:
        before = sm.sb.disk
        if not (sm.is_fresh or before == DiskState.UPTODATE) and not force:
            raise Refused("dirty-would-overwrite", volume=vol.name, node=node, disk=before.value)
        peers = [] if skip_initial_copy else sm.peers
        if not dry_run:
            sm.make_copy_source(full_copy=not skip_initial_copy)
            sm.commit()
        return MarkResult(vol.name, node, "source", dry_run, before.value, DiskState.UPTODATE.value, peers)
    finally:
        sm.close()


def mark_clean(config: Config, node: str, volume: str, *, force: bool = False, dry_run: bool = False) -> MarkResult:
    """``gmdclean``: make this member the copy target; its data will be replaced by
    a full copy. Without ``force``, only a fresh or already inconsistent copy may."""
    vol, member = _member(config, volume, node)
    sm = _open_checked(vol, member, node, readonly=dry_run)
    try:
        before = sm.sb.disk
        if not (sm.is_fresh or before in (DiskState.INCONSISTENT, DiskState.FAILED)) and not force:
            raise Refused("clean-would-discard", volume=vol.name, node=node, disk=before.value)
        if not dry_run:
            sm.make_copy_target()
            sm.commit()
        return MarkResult(vol.name, node, "target", dry_run, before.value, DiskState.INCONSISTENT.value, [])
    finally:
        sm.close()


# -------------------------------------------------------------------- status


def offline_status(config: Config, node: str, volume: str) -> dict[str, Any]:
    """``gmd status VOLUME --json`` answered from the state map, daemon not running.

    The shape is the stable one of docs/DESIGN.md; links are ``unknown`` and
    nothing is running, so ``copy`` is null and ``pending_copy`` says what a
    restarted daemon would resume.
    """
    vol, member = _member(config, volume, node)
    sm = _open_checked(vol, member, node, readonly=True)
    try:
        sb = sm.sb
        members: dict[str, Any] = {
            node: {
                "disk": sb.disk.value,
                "link": "local",
                "mode": member.mode,
                "out_of_sync_bytes": sm.local_out_of_sync_bytes(),
                "copy": None,
                "pending_copy": _fence_json(sb.local_copy),
            }
        }
        for name, m in vol.members.items():
            if name == node:
                continue
            rec = sb.peers.get(name)
            members[name] = {
                "disk": rec.disk.value if rec else DiskState.UNKNOWN.value,
                "link": "unknown",
                "mode": m.mode,
                "out_of_sync_bytes": sm.out_of_sync_bytes(name) if rec else vol.size,
                "lag_bytes": None,
                "lag_seconds": None,
                "copy": None,
                "pending_copy": _fence_json(rec.copy if rec else None),
            }
        all_votes = [m.votes for m in vol.members.values()] + [w.votes for w in config.witnesses.values()]
        expected = expected_votes(all_votes, sb.expected_votes)
        return {
            "volume": vol.name,
            "node": node,
            "daemon": False,
            "role": sb.role.value,
            "mode": member.mode,
            "size": vol.size,
            "region_size": vol.region_size,
            "device": None,
            "quorum": {
                "votes": None, "needed": votes_needed(expected), "expected": expected, "ok": None,
                "expected_override": sb.expected_votes,
                "policy": vol.on_quorum_loss, "policy_note": QUORUM_LOSS_NOTES[vol.on_quorum_loss],
            },
            "members": members,
            "state_map": {
                "path": str(member.statemap),
                "clean": sb.clean,
                "recovery_needed": (not sb.clean) or bool(sm.intent.any()),
                "hot_extents": sm.intent.count(1),
                "generation": sb.generations.current,
                "identity": sb.generations.identity,
                "updated": sb.updated,
                "warnings": list(sm.warnings),
            },
        }
    finally:
        sm.close()


def _fence_json(fence) -> dict[str, Any] | None:
    return None if fence is None else {"kind": fence.kind.value, "fence": fence.fence}


def statemap_exists(config: Config, node: str, volume: str) -> bool:
    _vol, member = _member(config, volume, node)
    return os.path.exists(member.statemap)
