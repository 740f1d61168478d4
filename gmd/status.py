"""The status snapshot of one volume (``gmd status --json``): a pure function
from the state of the volume engine and its parts to the JSON dict, with the
stable snake_case keys the CLI and the tests read. Nothing here changes state.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

import trio

from statemap import DiskState, Role

from .errors import Refused
from .replication import LinkState
from .undolog import iso_utc

if TYPE_CHECKING:
    from .config import VolumeConfig
    from .copyengine import CopyEngine
    from .quorum_keeper import QuorumKeeper
    from .replication import MemberLink
    from .resolution import SplitBrainResolver
    from .roles import Roles
    from .groups import GroupHold
    from .rpo import RpoWatch
    from .sessions import Sessions
    from .takeover import ServiceCommands, Takeover
    from .testfailover import TestFailover
    from .volume import LocalVolume
    from .writepath import WritePath


class StatusVolume(Protocol):
    """What the status snapshot needs of its volume (the engine provides it)."""

    config: VolumeConfig
    copier: CopyEngine
    local: LocalVolume | None
    members: dict[str, MemberLink]
    @property
    def name(self) -> str: ...
    node: str
    quorum: QuorumKeeper
    rpo: RpoWatch
    group_hold: GroupHold | None
    resolver: SplitBrainResolver
    role: Role
    roles: Roles
    service: ServiceCommands
    sessions: Sessions
    takeover: Takeover
    testfailover: TestFailover
    writepath: WritePath


def volume_status(engine: StatusVolume) -> dict[str, Any]:
    """``gmd status VOLUME --json`` of a volume that is up, from its parts' state."""
    cfg = engine.config
    if engine.local is None:
        raise Refused("volume-down", volume=engine.name, node=engine.node)
    sm = engine.local.statemap
    now = trio.current_time()
    members: dict[str, Any] = {
        engine.node: {
            "disk": sm.sb.disk.value, "link": LinkState.LOCAL.value,
            "mode": cfg.members[engine.node].mode,
            "out_of_sync_bytes": sm.local_out_of_sync_bytes(), "copy": None,
            "pending_copy": _fence_json(sm.sb.local_copy),
            # consistent, consistent_at, catching_up, undo_log: see LocalVolume.consistency_status
            "consistency": engine.local.consistency_status(),
        }
    }
    wall = time.time()
    primary = engine.role == Role.PRIMARY
    for name, m in engine.members.items():
        rec = sm.sb.peers.get(name)
        lag_bytes, lag_s = m.lag(now) if m.is_async else (0, 0.0)
        disk = m.peer_disk if m.connected else DiskState.UNKNOWN
        if m.connected and engine.role == Role.PRIMARY and rec is not None:
            disk = rec.disk
        elif not m.connected and rec is not None and rec.disk in (DiskState.OUTDATED, DiskState.INCONSISTENT):
            # Out of sight, but our own map proves it is behind; never claim
            # uptodate for a member we cannot see.
            disk = rec.disk
        members[name] = {
            "disk": (disk or DiskState.UNKNOWN).value,
            "link": m.state.value,
            "mode": m.mode,
            "out_of_sync_bytes": sm.out_of_sync_bytes(name) if rec else cfg.size,
            "lag_bytes": lag_bytes,
            "lag_seconds": round(lag_s, 3),
            "copy": engine.copier.running[name].to_json() if name in engine.copier.running else None,
            "verify": engine.copier.verifying[name].to_json() if name in engine.copier.verifying else None,
            "last_verify": engine.copier.verify_reports.get(name),
            "pending_copy": _fence_json(rec.copy if rec else None),
            "behind": m.behind,
            # shipping / behind (async queue overflowed) / catching-up (a copy runs): see Replication
            "replication": m.replication.value if m.connected and engine.role == Role.PRIMARY else None,
            "reason": m.reason,
            "peer_role": m.peer_role.value if m.connected and m.peer_role else None,
            "paths": len([p for p in m.session.paths if not p.closed]) if m.session else 0,
            # which of the member's paths (by index, as configured) carry its link now
            "open_paths": sorted({p.remote.path for p in m.session.paths if not p.closed}) if m.session else [],
            "rpo": engine.rpo.status(m),  # on the primary: what it would lose (gmd.rpo)
            # async, on the primary: its unacknowledged writes kept in order (gmd.backlog)
            "backlog": m.backlog.status(now) if m.backlog is not None and engine.role == Role.PRIMARY else None,
            # The primary's view of the member's disk: an instant of ours (in
            # write order, or out of it with an undo log keeping one)?
            **_member_consistency(m, now, wall, cfg.members[name].undo_log is not None if primary else None),
            # how data is shipped to it: compression, bytes before and on the wire, the limit in force
            "wire": m.wire_status(),
            # what the member said of a test failover running there (gmd.testfailover)
            "test_failover": m.test_failover if m.connected else None,
        }
    return {
        "volume": cfg.name, "node": engine.node, "daemon": True, "role": engine.role.value,
        "mode": cfg.members[engine.node].mode, "size": cfg.size, "region_size": cfg.region_size,
        "device": engine.roles.device_path,
        "loop": engine.roles.loop_device,
        "quorum": engine.quorum.status(),
        "members": members,
        "state_map": {
            "path": str(cfg.members[engine.node].statemap), "clean": sm.sb.clean,
            "recovery_needed": False, "hot_extents": len(sm.hot_extents()),
            "generation": sm.sb.generations.current, "updated": sm.sb.updated,
            "identity": sm.identity,
            "warnings": list(sm.warnings),
        },
        "copy_rate": engine.copier.rate,
        "rpo_alert": engine.rpo.alert.to_json(),
        # A consistency group (gmd.groups): its name, and on a far member how
        # far each of the group's volumes received the primary's marks.
        "group": None if cfg.group is None else {
            "name": cfg.group, "hold": engine.group_hold.status() if engine.group_hold is not None else None},
        "split_brain": {"resolving_towards": engine.resolver.discarding,
                        "saved_images": list(engine.resolver.saved_images)},
        "lost_primary": engine.sessions.lost_primary,
        "copies": [p.history_json(member, now, time.time()) for member, p in engine.copier.history],
        "takeover": {**engine.takeover.status(), "commands": dict(engine.service.last)},
        # a test failover's image of this member's disk (active, times, space; the last one's end)
        "test_failover": engine.testfailover.status(),
        "io": {"writes": engine.writepath.writes, "bytes_written": engine.writepath.bytes_written,
               "sequence": engine.writepath.gseq, "in_flight": engine.writepath.in_flight},
    }



def _member_consistency(m: MemberLink, now: float, wall: float, undo_configured: bool | None) -> dict[str, Any]:
    if undo_configured is None:  # not primary: no view of its own
        return {"consistent": None, "consistent_at": None, "catch_up_refused": None}
    consistent, at = m.consistency(now, wall, undo_configured)
    return {"consistent": consistent, "consistent_at": iso_utc(at), "catch_up_refused": m.catch_up_refused}


def _fence_json(fence) -> dict[str, Any] | None:
    return None if fence is None else {"kind": fence.kind.value, "fence": fence.fence}
