"""The verify pass: every region of a member compared with ours, online.

Owns :func:`verify_member` (``gmd verify``): the member's region hashes are
asked for a few chunks ahead of ours, so both disks read at once; a region that
differs is re-checked under its range lock after the member acknowledged a
flush, and only a difference that stays is marked out of sync (the member is
then outdated, and the copy passes of :mod:`gmd.copy` bring it back). What the
pass needs of the primary is the same :class:`gmd.copy.CopySource`.
"""

from __future__ import annotations

from typing import Any

import trio

from statemap import DiskState
from transport.link import LinkClosed

from .copy import CopyAborted, CopySource, aborts_unwrapped
from .copystate import CHUNK, CopyProgress, PassKind, RatePacer
from .replication import MemberLink


VERIFY_AHEAD = 2  # chunks whose member hashes a verify asks for ahead of its own hashing


async def verify_member(copier: CopySource, m: MemberLink, progress: CopyProgress | None = None) -> dict[str, Any]:
    """Compare every region of ``m`` with ours, online. A difference is re-checked
    under the region's range lock after the member acknowledged a flush (so no
    write to it is in flight anywhere); a real one is marked out of sync.

    The member hashes its chunks ahead of ours, so both disks read at once;
    ``progress`` (kind "verify") counts the bytes compared, and the pass keeps
    to the copy rate limit: it reads the whole volume on both sides."""
    size, rs = copier.config.size, copier.config.region_size
    local = copier.local
    progress = progress or CopyProgress(PassKind.VERIFY, size)
    pacer = RatePacer(lambda: copier.rate)
    chunks = [(offset, min(CHUNK, size - offset)) for offset in range(0, size, CHUNK)]
    answers: dict[int, tuple[int, ...] | BaseException] = {}
    arrived: dict[int, trio.Event] = {}
    real: list[int] = []

    async def ask(index: int) -> None:
        try:
            answers[index] = await m.region_hashes(*chunks[index], rs)
        except (LinkClosed, OSError) as e:
            answers[index] = e
        arrived[index].set()

    with aborts_unwrapped():
        async with trio.open_nursery() as nursery:
            for index, (offset, length) in enumerate(chunks):
                for ahead in range(index, min(index + 1 + VERIFY_AHEAD, len(chunks))):
                    if ahead not in arrived:
                        arrived[ahead] = trio.Event()
                        nursery.start_soon(ask, ahead)
                await pacer.pace(length)
                ours = await local.region_hashes(offset, length, rs)
                await arrived[index].wait()
                theirs = answers.pop(index)
                if isinstance(theirs, BaseException):
                    raise CopyAborted(f"hashing on {m.name}: {theirs}")
                for i in range(len(theirs)):
                    if ours[i] != theirs[i] and await _differs_when_quiet(copier, m, offset + i * rs, rs):
                        real.append(offset // rs + i)
                progress.done_bytes += length
                progress.compared_bytes += length
                progress.regions_compared += len(ours)
                progress.regions_differing = len(real)
    sm = copier.statemap
    for r in real:
        sm.mark_regions_out_of_sync(m.name, range(r, r + 1))
    if real:
        sm.set_peer_disk(m.name, DiskState.OUTDATED)
        m.peer_disk = DiskState.OUTDATED
        await copier.tell_member(m, {"your_disk": DiskState.OUTDATED.value})
    await copier.local.writer.sync_all()
    return {"compared_bytes": size, "differing_regions": len(real),
            "first_offsets": [r * rs for r in real[:10]]}


async def _differs_when_quiet(copier: CopySource, m: MemberLink, offset: int, length: int) -> bool:
    """Re-check one region under its range lock, after the member acknowledged a
    flush: no write to it is in flight anywhere, so a difference now is real."""
    rs = copier.config.region_size
    token = await copier.lock_range(offset, offset + length)
    try:
        sh = m.ship_flush(copier.completed_sequence)
        if sh is None:
            raise CopyAborted(f"{m.name} went away during verify")
        await sh.done.wait()
        try:
            (again,) = await m.region_hashes(offset, length, rs)
        except (LinkClosed, OSError) as e:
            raise CopyAborted(f"hashing on {m.name}: {e}") from None
        (now,) = await copier.local.region_hashes(offset, length, rs)
    finally:
        copier.unlock_range(token)
    return again != now
