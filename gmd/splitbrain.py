"""Ending a split-brain without losing anything (issue 6).

Split-brain: two members both wrote since their last common generation (it
takes two primaries, e.g. both forced). gmd never resolves that silently: the
link stays down. The operator, on the side whose changes are to go, runs
``gmd resolve VOLUME --discard-local`` (``--dry-run`` first explains it):

* the plan: both generation histories, the common generation, the rule that
  applies, the direction, the bytes that move and the bytes discarded;
* before anything is overwritten, the discarded side saves its own data of
  every diverging region (the union of both sides' out-of-sync sets since the
  common generation) to a read-only sparse image beside its state map, with a
  JSON manifest of the regions; so nothing either side wrote is destroyed;
* then it connects as the copy target: a bitmap copy of the union when both
  bitmaps start at the common generation, else a full (hash-compared) copy.

The peer's marked regions come from its hello (``marked`` in the hello info,
as runs of regions, capped); the pure planning here is testable alone.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitarray import bitarray

from .config import SPLIT_BRAIN_POLICIES

MAX_RUNS = 4096  # runs of marked regions a hello carries; beyond that only the count


def runs_of(bits: bitarray) -> list[list[int]]:
    """Marked regions as [first, count] runs (None-free, in order)."""
    out: list[list[int]] = []
    for i in bits.search(1):
        if out and out[-1][0] + out[-1][1] == i:
            out[-1][1] += 1
        else:
            out.append([i, 1])
    return out


def marked_summary(bits: bitarray) -> dict[str, Any]:
    """What a hello says about the regions marked for the peer."""
    runs = runs_of(bits)
    return {"count": bits.count(1), "runs": runs if len(runs) <= MAX_RUNS else None}


def bits_from_runs(runs: list[list[int]], regions: int) -> bitarray:
    bits = bitarray(regions, endian="little")
    bits.setall(0)
    for first, count in runs:
        if not (isinstance(first, int) and isinstance(count, int) and 0 <= first and count > 0
                and first + count <= regions):
            raise ValueError(f"bad run [{first}, {count}] for {regions} regions")
        bits[first:first + count] = 1
    return bits


@dataclass
class Plan:
    """What ``gmd resolve`` would do, for the operator to read first."""

    volume: str
    local: str
    peer: str
    local_generation: dict[str, Any]
    peer_generation: dict[str, Any]
    common: str | None
    rule: str
    bitmap_copy: bool
    local_changed: int  # bytes the local side wrote since the common generation
    peer_changed: int | None  # bytes the peer wrote since then (None: not known exactly)
    move_bytes: int | None  # bytes that would move to this side
    discard_bytes: int | None  # bytes of this side's data that would be replaced (and saved first)
    size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "volume": self.volume, "discard": self.local, "keep": self.peer,
            "direction": f"{self.peer} -> {self.local}", "rule": self.rule,
            "local_generations": self.local_generation, "peer_generations": self.peer_generation,
            "common_generation": self.common,
            "copy": "bitmap" if self.bitmap_copy else "full (hash-compared)",
            "local_changed_bytes": self.local_changed, "peer_changed_bytes": self.peer_changed,
            "move_bytes": self.move_bytes, "discard_bytes": self.discard_bytes, "size": self.size,
        }


def plan(volume: str, local: str, peer: str, *, local_gens: dict[str, Any], peer_gens: dict[str, Any],
         local_bits: bitarray, peer_marked: dict[str, Any] | None, region_size: int, size: int,
         rule: str) -> tuple[Plan, bitarray | None]:
    """The plan for discarding ``local``'s changes in favour of ``peer``'s, and the
    union of diverging regions (None when the peer's set is not known exactly)."""
    ours = [local_gens["current"], *local_gens.get("history", [])]
    theirs = [peer_gens.get("current"), *peer_gens.get("history", [])]
    common = next((g for g in ours if g in theirs), None)
    our_bitmap_gen = local_gens.get("bitmap_for", {}).get(peer)
    their_bitmap_gen = peer_gens.get("bitmap_for", {}).get(local)
    bitmap_copy = bool(common) and our_bitmap_gen == their_bitmap_gen == common
    union = None
    peer_changed = None
    if peer_marked is not None and peer_marked.get("runs") is not None:
        peer_bits = bits_from_runs(peer_marked["runs"], len(local_bits))
        peer_changed = peer_bits.count(1) * region_size
        union = local_bits | peer_bits
    elif peer_marked is not None:
        peer_changed = int(peer_marked.get("count", 0)) * region_size
    if bitmap_copy:
        move = union.count(1) * region_size if union is not None else None
    else:
        move = size
    p = Plan(volume, local, peer, local_gens, peer_gens, common, rule, bitmap_copy,
             local_bits.count(1) * region_size, peer_changed, move, move, size)
    return p, union


def save_discarded(statemap_path: Path, peer: str, device, union: bitarray, region_size: int,
                   volume_size: int, meta: dict[str, Any]) -> Path:
    """Copy this side's data of every region in ``union`` to a read-only sparse
    image (volume-sized, holes elsewhere) beside the state map, with a JSON
    manifest; made durable before it returns. ``device`` has ``pread``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    image = statemap_path.with_name(f"{statemap_path.name}.discarded-{peer}-{stamp}.img")
    runs = runs_of(union)
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, volume_size)
        for first, count in runs:
            offset, length = first * region_size, count * region_size
            done = 0
            while done < length:
                n = min(4 << 20, length - done)
                os.pwrite(fd, device.pread(offset + done, n), offset + done)
                done += n
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(image, 0o444)
    manifest = image.with_name(image.name + ".json")
    manifest.write_text(json.dumps({
        **meta, "image": str(image), "region_size": region_size, "saved_at": time.time(),
        "regions": [[first * region_size, count * region_size] for first, count in runs],
        "bytes": union.count(1) * region_size,
    }, indent=1))
    os.chmod(manifest, 0o444)
    dfd = os.open(image.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return image


POLICIES = SPLIT_BRAIN_POLICIES


def policy_loser(policy: str, a: str, a_info: dict[str, Any], b: str, b_info: dict[str, Any]) -> tuple[str | None, str]:
    """Which of nodes ``a`` and ``b`` (in split-brain) discards its changes under
    ``policy``, from both hellos' info; (None, why) when the policy does not
    decide and the link stays down. Symmetric: both ends reach the same answer."""
    if policy == "disconnect":
        return None, "policy disconnect: the operator decides (gmd resolve)"
    role = {a: a_info.get("role"), b: b_info.get("role")}
    if policy == "discard-secondary":
        secondaries = [n for n in (a, b) if role[n] != "primary"]
        if len(secondaries) == 1:
            return secondaries[0], f"policy discard-secondary: {secondaries[0]} is secondary"
        return None, "policy discard-secondary: not exactly one side is secondary"
    if policy == "discard-younger-primary":
        since = {a: a_info.get("promoted_at"), b: b_info.get("promoted_at")}
        if not all(isinstance(v, (int, float)) for v in since.values()) or since[a] == since[b]:
            return None, "policy discard-younger-primary: promotion times unknown or equal"
        younger = a if since[a] > since[b] else b
        return younger, f"policy discard-younger-primary: {younger} became primary last"
    if policy == "discard-least-changes":
        def changed(info: dict[str, Any], peer: str) -> int | None:
            marked = (info.get("marked") or {}).get(peer)
            return marked.get("count") if isinstance(marked, dict) else None
        ca, cb = changed(a_info, b), changed(b_info, a)
        if ca is None or cb is None or ca == cb:
            return None, "policy discard-least-changes: both changed as much (or unknown)"
        fewer = a if ca < cb else b
        return fewer, f"policy discard-least-changes: {fewer} changed fewer regions ({min(ca, cb)} vs {max(ca, cb)})"
    raise ValueError(f"unknown split-brain policy {policy!r}")
