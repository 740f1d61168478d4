"""Bringing a member back: full copy behind a fence, mini-copy from its bitmap.

One engine, two region sets (shared/DESIGN.md, "Copy, mini-copy, merge"):

* **full copy**: regions from the member's persisted fence to the end of the
  volume; the fence advances (and is committed) only after the member has
  acknowledged a flush covering everything below it, so a restart resumes;
* **mini-copy**: the regions set in the member's out-of-sync bitmap; a bit is
  cleared only after the member acknowledged a flush covering its data.

For each chunk the member's region hashes (xxh3) are compared with ours and only
differing regions move (a target seeded from a backup copies fast). A region is
read and queued to the member under the engine's range lock, so the copy can
never reorder with an application write to it: whichever takes the lock first
is applied first on the member, in link order. The copy stops, leaving its
bits and fence for the next attempt, as soon as the member is lost or falls
behind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
import xxhash

from statemap import DiskState
from transport.link import LinkClosed

if TYPE_CHECKING:
    from .engine import VolumeEngine
    from .replication import MemberLink

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024  # bytes compared per hash request
FLUSH_EVERY = 32 * 1024 * 1024  # bytes copied between durable progress points


class CopyAborted(Exception):
    """The member went away or fell behind; progress so far is kept."""


@dataclass
class CopyProgress:
    kind: str  # "full" or "mini"
    total_bytes: int
    done_bytes: int = 0
    sent_bytes: int = 0  # bytes that differed and were shipped
    started: float = field(default_factory=trio.current_time)

    def to_json(self) -> dict[str, Any]:
        elapsed = max(1e-6, trio.current_time() - self.started)
        rate = self.done_bytes / elapsed
        left = self.total_bytes - self.done_bytes
        return {"kind": self.kind, "done_bytes": self.done_bytes, "total_bytes": self.total_bytes,
                "sent_bytes": self.sent_bytes, "rate_bytes_per_s": int(rate),
                "eta_s": round(left / rate, 1) if rate > 0 and left > 0 else (0.0 if left <= 0 else None)}


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted indexes as (first, end) pairs."""
    out: list[tuple[int, int]] = []
    for i in indexes:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


async def copy_member(engine: VolumeEngine, m: MemberLink) -> None:
    """Bring member ``m`` up to date from this primary; returns when it is, or
    raises :class:`CopyAborted` with progress kept."""
    sm = engine.statemap
    size, rs = engine.config.size, engine.config.region_size
    rec = sm.sb.peers[m.name]
    if rec.copy is not None:
        start = rec.copy.fence - rec.copy.fence % rs
        progress = CopyProgress(rec.copy.kind.value, size - start)  # "full" copy or "merge"
        engine.copies[m.name] = progress
        engine.copy_history.append((m.name, progress))
        during = DiskState.COPYING if rec.copy.kind.value == "full" else DiskState.MERGING
        await engine.tell_member(m, {"your_disk": during.value})
        await _copy_ranges(engine, m, progress, [(off, min(CHUNK, size - off)) for off in range(start, size, CHUNK)],
                           full=True)
    # Regions written while it was away (also below a full copy's fence).
    regions = list(sm.out_of_sync_regions(m.name).search(1))
    if regions:
        progress = CopyProgress("mini", len(regions) * rs)  # mini-copy, or the mini-merge after a crash
        engine.copies[m.name] = progress
        engine.copy_history.append((m.name, progress))
        work = []
        for first, end in _runs(regions):
            for r in range(first, end, CHUNK // rs):
                work.append((r * rs, min(end, r + CHUNK // rs) * rs - r * rs))
        await _copy_ranges(engine, m, progress, work, full=False)
    if sm.out_of_sync_regions(m.name).any():
        raise CopyAborted("regions were marked again while copying; another pass follows")
    await engine.member_caught_up(m)


async def _copy_ranges(engine: VolumeEngine, m: MemberLink, progress: CopyProgress,
                       work: list[tuple[int, int]], *, full: bool) -> None:
    done_since_flush: list[tuple[int, int]] = []
    bytes_since_flush = 0
    for offset, length in work:
        await _copy_chunk(engine, m, progress, offset, length)
        done_since_flush.append((offset, length))
        bytes_since_flush += length
        progress.done_bytes += length
        if bytes_since_flush >= FLUSH_EVERY:
            await _record(engine, m, done_since_flush, full=full)
            done_since_flush, bytes_since_flush = [], 0
    await _record(engine, m, done_since_flush, full=full)
    log.info("%s: %s pass to %s done: %d bytes compared, %d bytes sent", engine.name, progress.kind,
             m.name, progress.done_bytes, progress.sent_bytes)


async def _copy_chunk(engine: VolumeEngine, m: MemberLink, progress: CopyProgress, offset: int, length: int) -> None:
    rs = engine.config.region_size
    local = engine.local
    try:
        theirs = await m.region_hashes(offset, length, rs)
    except (LinkClosed, OSError) as e:
        raise CopyAborted(f"hashing on {m.name}: {e}") from None
    data = await local.read(offset, length)
    ours = [xxhash.xxh3_64_intdigest(data[i:i + rs]) for i in range(0, length, rs)]
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    shipments = []
    for first, end in _runs(differ):
        roff, rlen = offset + first * rs, (end - first) * rs
        token = await engine.lock_range(roff, roff + rlen)
        try:
            # Under the range lock: no application write to these regions is in
            # flight, and any later one is queued after this copy.
            fresh = await local.read(roff, rlen)
            sh = m.ship_write(engine.completed_sequence, roff, fresh, lambda sh: None)
        finally:
            engine.unlock_range(token)
        if sh is None:
            raise CopyAborted(f"{m.name} cannot take writes (away or behind)")
        shipments.append(sh)
        progress.sent_bytes += rlen
        engine.copy_bytes_sent += rlen
        rate = engine.copy_rate
        if rate:  # keep the copy at or below its rate: the application's writes come first
            await trio.sleep_until(progress.started + progress.sent_bytes / rate)
        else:
            await trio.lowlevel.checkpoint()  # let waiting application writes take the lock
    for sh in shipments:
        await sh.done.wait()
        if not sh.ok:
            raise CopyAborted(f"{m.name} did not acknowledge a copied region")


async def _record(engine: VolumeEngine, m: MemberLink, done: list[tuple[int, int]], *, full: bool) -> None:
    """Make the copied data durable on the member, then record the progress."""
    if not done:
        return
    sh = m.ship_flush(engine.completed_sequence)
    if sh is None:
        raise CopyAborted(f"{m.name} went away")
    await sh.done.wait()
    if not sh.ok:
        raise CopyAborted(f"{m.name} did not acknowledge a flush")
    if m.behind or not m.connected:
        # An application write may have been marked instead of shipped since a
        # region was copied: its bit must stay.
        raise CopyAborted(f"{m.name} fell behind during the copy")
    sm = engine.statemap
    rs = engine.config.region_size
    if full:
        end = max(off + length for off, length in done)
        sm.advance_peer_fence(m.name, end)
    else:
        for off, length in done:
            sm.clear_out_of_sync(m.name, range(off // rs, (off + length) // rs))
    await engine.local.writer.sync_all()


async def verify_member(engine: VolumeEngine, m: MemberLink) -> dict[str, Any]:
    """Compare every region of ``m`` with ours, online. A difference is re-checked
    under the region's range lock after the member acknowledged a flush (so no
    write to it is in flight anywhere); a real one is marked out of sync."""
    size, rs = engine.config.size, engine.config.region_size
    local = engine.local
    real: list[int] = []
    for offset in range(0, size, CHUNK):
        length = min(CHUNK, size - offset)
        try:
            theirs = await m.region_hashes(offset, length, rs)
        except (LinkClosed, OSError) as e:
            raise CopyAborted(f"hashing on {m.name}: {e}") from None
        data = await local.read(offset, length)
        for i in range(len(theirs)):
            if xxhash.xxh3_64_intdigest(data[i * rs:(i + 1) * rs]) == theirs[i]:
                continue
            roff = offset + i * rs
            token = await engine.lock_range(roff, roff + rs)
            try:
                sh = m.ship_flush(engine.completed_sequence)
                if sh is None:
                    raise CopyAborted(f"{m.name} went away during verify")
                await sh.done.wait()
                (again,) = await m.region_hashes(roff, rs, rs)
                ours = xxhash.xxh3_64_intdigest(await local.read(roff, rs))
            finally:
                engine.unlock_range(token)
            if again != ours:
                real.append(roff // rs)
    sm = engine.statemap
    for r in real:
        sm.mark_regions_out_of_sync(m.name, range(r, r + 1))
    if real:
        sm.set_peer_disk(m.name, DiskState.OUTDATED)
        m.peer_disk = DiskState.OUTDATED.value
        await engine.tell_member(m, {"your_disk": DiskState.OUTDATED.value})
    await engine.local.writer.sync_all()
    return {"compared_bytes": size, "differing_regions": len(real),
            "first_offsets": [r * rs for r in real[:10]]}
