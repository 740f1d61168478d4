"""The member's side of a consistent catch-up (gmd/volume.py with a real
undo log and backing file): the log goes active, every write saves first,
a write the log cannot hold is refused and changes nothing, the catch-up
question is answered (and a lying one refused), a flush after "uptodate"
empties the log, and a rollback restores the image from before."""

from __future__ import annotations

import errno
import functools
import random

import pytest
import trio
import trio.testing

from gmd import admin
from gmd.config import load_config
from gmd.volume import LocalVolume
from statemap import DiskState
from tools.cluster_config import NodeSpec, write_cluster_config

MiB = 1 << 20
REGION = 64 * 1024


async def open_member(tmp_path, undo_size="4MiB"):
    path = write_cluster_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2", member={
        "undo_log": "data/labor2/appslv.undo", "undo_log_size": undo_size})], size="16MiB")
    cfg = load_config(path)
    for node in ("labor1", "labor2"):
        admin.init_volume(cfg, node, "appslv")
    vol = await LocalVolume.open(cfg.volume("appslv"), "labor2", trio.CapacityLimiter(4))
    vol.statemap.set_disk(DiskState.OUTDATED)  # a consistent member that is behind
    return vol, cfg.member("appslv", "labor2").device


def image(device) -> bytes:
    with open(device, "rb") as f:
        return f.read()


async def test_a_catch_up_saves_before_every_write_and_rolls_back_to_the_image_before(tmp_path):
    vol, device = await open_member(tmp_path)
    rng = random.Random(1)
    try:
        await vol.apply(0, rng.randbytes(2 * REGION))  # in order: part of the image
        assert vol.consistent and not vol.catching_up and vol.in_order_at
        before = image(device)
        await vol.begin_catch_up("test")
        assert vol.preserving and vol.consistent and vol.catching_up
        async with trio.open_nursery() as n:  # copy data and application writes, concurrently
            for i in range(8):
                n.start_soon(functools.partial(vol.apply, i * REGION, rng.randbytes(REGION), copy=True))
                n.start_soon(vol.apply, 20 * REGION + i * 512, rng.randbytes(512))
        assert image(device) != before
        assert vol.undo.regions == 9
        assert not vol.apply_now(30 * REGION, b"x" * 512, 1), "the fast path must not skip the undo log"
        report = await vol.roll_back()
        assert report.regions == 9 and report.bytes == 9 * REGION
        assert image(device) == before
        assert not vol.preserving and not vol.catching_up and vol.consistent
    finally:
        await vol.close()


async def test_a_write_the_log_cannot_hold_is_refused_and_changes_nothing(tmp_path):
    vol, device = await open_member(tmp_path, undo_size="1MiB")  # about 15 regions
    try:
        await vol.begin_catch_up("test")
        await vol.apply(0, bytes([1]) * 8 * REGION, copy=True)
        before = image(device)
        with pytest.raises(OSError) as e:
            await vol.apply(8 * REGION, bytes([2]) * 10 * REGION, copy=True)
        assert e.value.errno == errno.ENOSPC and "appslv.undo" in str(e.value)
        assert image(device) == before
        await vol.apply(0, bytes([3]) * REGION)  # saved already: no room needed
        assert vol.consistency_status()["consistent"]
    finally:
        await vol.close()


async def test_the_catch_up_question_is_answered_and_a_lying_one_refused(tmp_path):
    vol, _ = await open_member(tmp_path, undo_size="2MiB")
    try:
        small = vol.catch_up_answer({"id": 1, "bytes": 8 * REGION, "runs": [(0, 8)]})
        assert small["ok"] and small["preserving"] and small["needed"] >= 8 * REGION
        big = vol.catch_up_answer({"id": 2, "bytes": 4 * MiB, "runs": [(0, 64)]})
        assert not big["ok"] and "appslv.undo" in big["reason"] and "needs 4.0 MiB" in big["reason"]
        assert not vol.catch_up_answer({"id": 3, "bytes": 4 * MiB})["ok"]  # no runs: the worst case
        beyond = vol.catch_up_answer({"id": 4, "bytes": REGION, "runs": [(250, 10)]})  # 256 regions
        assert not beyond["ok"] and "beyond the volume" in beyond["reason"]
        assert not vol.catch_up_answer({"id": 5, "bytes": 1 << 40})["ok"]
        vol.statemap.set_disk(DiskState.INCONSISTENT)  # a full copy's target keeps nothing
        full = vol.catch_up_answer({"id": 6, "bytes": 16 * MiB})
        assert full["ok"] and not full.get("preserving") and "no consistent image" in full["reason"]
    finally:
        await vol.close()


async def test_told_uptodate_the_next_flush_ends_the_catch_up(tmp_path):
    vol, _ = await open_member(tmp_path)
    try:
        await vol.begin_catch_up("test")
        await vol.apply(0, b"c" * REGION, copy=True)
        vol.told_uptodate()
        assert vol.preserving  # not before the flush
        await vol.flush()
        st = vol.consistency_status()
        assert not vol.preserving and not st["catching_up"] and st["consistent"]
        assert st["undo_log"] == {"path": str(vol.undo.path), "size": 4 * MiB, "used": 0, "regions": 0,
                                  "active": False}
        assert st["consistent_at"].endswith("Z")
        await vol.apply(REGION, b"d" * REGION)  # in order again: nothing saved
        assert vol.undo.regions == 0
    finally:
        await vol.close()


async def test_an_active_log_survives_a_restart_of_the_member(tmp_path):
    vol, device = await open_member(tmp_path)
    before = image(device)
    await vol.begin_catch_up("test")
    await vol.apply(3 * REGION, b"n" * REGION, copy=True)
    cfg, node = vol.config, vol.member.node
    await vol.close()
    again = await LocalVolume.open(cfg, node, trio.CapacityLimiter(4))
    try:
        assert again.preserving and again.catching_up and again.consistent
        assert (await again.roll_back()).regions == 1
        assert image(device) == before
    finally:
        await again.close()


async def test_the_image_kept_is_a_prefix_of_the_order_writes_were_admitted_in(tmp_path):
    """W1 is admitted (issued by the receiver) before the catch-up begins and
    W2 after, but W2's task reaches the disk first: W1 still belongs to the
    image and W2 does not. A write admitted before a rollback and arriving
    after it is dropped: it came from the lost primary."""
    vol, device = await open_member(tmp_path)
    try:
        before = bytearray(image(device))
        first = vol.admit()
        async with trio.open_nursery() as n:
            n.start_soon(vol.begin_catch_up, "test")
            await trio.testing.wait_all_tasks_blocked()
            assert vol._starting is not None, "the start waits for the write admitted before it"
            second = vol.admit()
            assert first.plain and not second.plain
            n.start_soon(functools.partial(vol.apply, REGION, b"2" * 512, ticket=second))
            await trio.testing.wait_all_tasks_blocked()
            await vol.apply(REGION + 4096, b"1" * 512, ticket=first)
        before[REGION + 4096:REGION + 4096 + 512] = b"1" * 512
        late = vol.admit(copy=True)
        await vol.roll_back()
        assert image(device) == bytes(before)
        with pytest.raises(OSError) as e:
            await vol.apply(0, b"3" * REGION, copy=True, ticket=late)
        assert e.value.errno == errno.EIO and "lost primary" in str(e.value)
        assert image(device) == bytes(before)
    finally:
        await vol.close()
