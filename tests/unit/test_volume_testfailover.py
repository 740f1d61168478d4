"""The member's side of a test failover (gmd/volume.py with real files):
the freeze waits for writes issued before it and holds back those after,
every later write keeps first and lands all the same, running out of space
ends the test without failing the member's write, a catch-up refuses the
start, and a restart discards what a killed daemon left."""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing

from gmd import admin
from gmd.config import load_config
from gmd.errors import Refused
from gmd.testimage import image_files
from gmd.volume import LocalVolume
from statemap import DiskState
from tools.cluster_config import NodeSpec, write_cluster_config

REGION = 64 * 1024


async def open_member(tmp_path, **member):
    path = write_cluster_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2", member=member)], size="4MiB")
    cfg = load_config(path)
    for node in ("labor1", "labor2"):
        admin.init_volume(cfg, node, "appslv")
    vol = await LocalVolume.open(cfg.volume("appslv"), "labor2", trio.CapacityLimiter(4))
    vol.statemap.set_disk(DiskState.UPTODATE)
    return vol, cfg


async def test_the_freeze_takes_every_earlier_write_and_no_later_one(tmp_path):
    vol, _ = await open_member(tmp_path)
    ended = []
    try:
        await vol.apply(0, b"a" * REGION)
        slow = trio.Event()
        real_write = vol.device.write

        async def held_write(offset, data):
            if offset == REGION:
                await slow.wait()  # an earlier write still on its way to the disk
            await real_write(offset, data)

        vol.device.write = held_write
        async with trio.open_nursery() as n:
            n.start_soon(vol.apply, REGION, b"b" * REGION)
            await trio.testing.wait_all_tasks_blocked()
            image_box = []

            async def start():
                image_box.append(await vol.start_test(1 << 20, lambda img, why: ended.append(why)))
            n.start_soon(start)
            await trio.testing.wait_all_tasks_blocked()
            assert vol._freezing is not None and not image_box, "the freeze waits for the earlier write"
            slow.set()
        vol.device.write = real_write
        image = image_box[0]
        assert not vol.apply_now(0, b"x" * 512, 1), "a region not kept yet goes the slow way"
        await vol.apply(0, b"c" * REGION)  # after the freeze: kept first, then written
        assert await vol.read_test(image, 0, 2 * REGION) == b"a" * REGION + b"b" * REGION
        assert await vol.read(0, REGION) == b"c" * REGION
        await vol.begin_intent(0, REGION, mirror=True)  # as the receiver does: the extent is hot on disk
        vol.end_intent(0, REGION, 1, mirror=True)
        assert vol.apply_now(100, b"y" * 512, 2), "a kept region takes the fast path again"
        await vol.write_test(image, 10, b"z" * 10)
        assert (await vol.read_test(image, 0, 32))[8:22] == b"aa" + b"z" * 10 + b"aa"
        assert (await vol.read(0, 32))[:12] == b"c" * 12, "the image's writes never reach the member's disk"
        assert (await vol.read_test(image, 100, 4)) == b"aaaa", "nor the member's writes the image"
        with pytest.raises(Refused, match="runs already"):
            await vol.start_test(1 << 20, lambda img, why: None)
    finally:
        await vol.close()
    assert ended == ["the volume went down"]
    assert not any(p.exists() for p in image_files(vol.member.statemap))


async def test_running_out_of_space_ends_the_test_and_the_write_lands(tmp_path):
    vol, _ = await open_member(tmp_path)
    ended = []
    try:
        image = await vol.start_test(1 << 20, lambda img, why: ended.append(why))
        for i in range(20):  # 20 regions of 64 KiB cannot all be kept in 1 MiB
            await vol.apply(i * REGION, bytes([i + 1]) * REGION)
        assert vol.test is None and ended and ended[0].startswith("out of space")
        assert vol.test_ended == ended[0]
        for i in range(20):
            assert await vol.read(i * REGION, 4) == bytes([i + 1]) * 4, "every replicated write landed"
        with pytest.raises(OSError) as e:
            await vol.read_test(image, 0, 4)
        assert e.value.errno == errno.EIO
        await vol.discard_test(image)
        assert not any(p.exists() for p in image_files(vol.member.statemap))
    finally:
        await vol.close()


async def test_a_catch_up_refuses_the_start_with_the_reason(tmp_path):
    vol, _ = await open_member(tmp_path)
    try:
        vol.statemap.set_disk(DiskState.OUTDATED)
        await vol.begin_catch_up("test")
        with pytest.raises(Refused, match="out of write order"):
            await vol.start_test(1 << 20, lambda img, why: None)
        assert vol.test is None
    finally:
        await vol.close()


async def test_a_restart_discards_what_a_killed_daemon_left(tmp_path):
    vol, cfg = await open_member(tmp_path)
    await vol.start_test(1 << 20, lambda img, why: None)
    await vol.apply(0, b"q" * REGION)
    vol._close_files()  # the daemon dies: nothing is ended, the files stay
    assert all(p.exists() for p in image_files(vol.member.statemap))
    again = await LocalVolume.open(cfg.volume("appslv"), "labor2", trio.CapacityLimiter(4))
    try:
        assert not any(p.exists() for p in image_files(vol.member.statemap))
        assert "daemon stopped while the test ran" in again.test_ended
        assert await again.read(0, 4) == b"qqqq"
    finally:
        await again.close()
