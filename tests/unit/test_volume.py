"""The local volume: bounded async I/O, intent before data, durable out-of-sync
marks, clean close, and recovery after a stop without close."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest
import trio

from gmd import admin
from gmd.config import load_config
from gmd.errors import OutOfRange, Refused
from gmd.volume import LocalVolume
from statemap import StateMap, StateMapBusy
from tools.cluster_config import NodeSpec, write_cluster_config as write_config_file

from ..conftest import write_cluster_config

MiB = 1 << 20


def open_map(cfg, node="labor1"):
    return StateMap.open(cfg.member("appslv", node).statemap, readonly=True)


@pytest.fixture
def limiter():
    return trio.CapacityLimiter(4)


def init(tmp_path, mode="mwc", size="64MiB"):
    cfg = load_config(write_cluster_config(tmp_path, mode=mode, size=size))
    admin.init_volume(cfg, "labor1", "appslv")
    admin.mark_dirty(cfg, "labor1", "appslv")
    return cfg


async def test_write_read_flush_close_round_trip(tmp_path, limiter):
    cfg = init(tmp_path)
    vol = await LocalVolume.open(cfg.volume("appslv"), "labor1", limiter)
    data = os.urandom(3 * 4096)
    await vol.write(5 * MiB + 512, data)
    await vol.flush()
    assert await vol.read(5 * MiB + 512, len(data)) == data
    await vol.close()
    with open(cfg.member("appslv", "labor1").device, "rb") as f:
        f.seek(5 * MiB + 512)
        assert f.read(len(data)) == data
    sm = open_map(cfg)
    assert sm.sb.clean and not sm.intent.any()
    sm.close()


@pytest.mark.parametrize(
    "offset,length,err",
    [(64 * MiB, 1, errno.ENOSPC), (64 * MiB - 4096, 8192, errno.ENOSPC), (-1, 10, errno.EINVAL)],
)
async def test_out_of_range_writes_are_refused_whole(tmp_path, limiter, offset, length, err):
    cfg = init(tmp_path)
    vol = await LocalVolume.open(cfg.volume("appslv"), "labor1", limiter)
    device = cfg.member("appslv", "labor1").device
    before = os.stat(device)
    with pytest.raises(OutOfRange) as e:
        await vol.write(offset, b"x" * length)
    assert e.value.errno == err
    with pytest.raises(OutOfRange):
        await vol.read(64 * MiB - 10, 11)
    await vol.close()
    after = os.stat(device)
    assert after.st_size == before.st_size == 64 * MiB
    assert after.st_blocks == before.st_blocks  # nothing of the refused write landed


async def test_mwc_intent_is_on_disk_before_data_and_recovered_after_a_crash(tmp_path, limiter):
    cfg = init(tmp_path, mode="mwc")
    vol = await LocalVolume.open(cfg.volume("appslv"), "labor1", limiter)
    await vol.write(9 * 4 * MiB + 8192, b"a" * 4096)  # extent 9, not a sequential stream
    # Without close (the process "dies" here), the map on disk shows the extent hot.
    sm = open_map(cfg)
    assert not sm.sb.clean and sm.intent[9]
    sm.close()
    vol._close_files()
    vol2 = await LocalVolume.open(cfg.volume("appslv"), "labor1", limiter)
    assert vol2.recovery.needed and vol2.recovery.hot_extents == (9,)
    await vol2.close()
    sm = open_map(cfg)
    # labor2 already needed a full copy (fence at 0), so the map counts all of it;
    # the merged extent is in its bitmap as well:
    assert sm.out_of_sync_regions("labor2").count(1) == 64
    sm.close()


async def test_sync_mode_logs_no_intent(tmp_path, limiter):
    cfg = init(tmp_path, mode="sync")
    vol = await LocalVolume.open(cfg.volume("appslv"), "labor1", limiter)
    await vol.write(0, b"s" * 4096)
    sm = open_map(cfg)
    assert not sm.intent.any() and not sm.sb.clean
    sm.close()
    await vol.close()


async def test_out_of_sync_mark_outside_hot_extents_is_durable_on_return(tmp_path, limiter):
    cfg = init(tmp_path, mode="sync")
    vol = await LocalVolume.open(cfg.volume("appslv"), "labor1", limiter)
    await vol.mark_out_of_sync("labor2", 10 * MiB, 1)
    sm = open_map(cfg)
    assert sm.out_of_sync_regions("labor2")[10 * MiB // (64 * 1024)]
    sm.close()
    await vol.close()


async def test_concurrent_writes_share_commits(tmp_path, limiter):
    cfg = init(tmp_path, mode="mwc")
    vol = await LocalVolume.open(cfg.volume("appslv"), "labor1", limiter)
    commits_before = vol.writer.commits
    async with trio.open_nursery() as n:
        for i in range(16):
            n.start_soon(vol.write, i * 4 * MiB, bytes([i]) * 4096)  # 16 new extents
    assert vol.writer.commits - commits_before < 16  # group commit
    sm = open_map(cfg)
    assert sm.intent.count(1) == 16
    sm.close()
    await vol.close()
    for i in range(16):
        with open(cfg.member("appslv", "labor1").device, "rb") as f:
            f.seek(i * 4 * MiB)
            assert f.read(4096) == bytes([i]) * 4096


async def test_map_in_use_cannot_be_changed_offline(tmp_path, limiter):
    cfg = init(tmp_path)
    vol = await LocalVolume.open(cfg.volume("appslv"), "labor1", limiter)
    with pytest.raises(StateMapBusy):
        admin.mark_clean(cfg, "labor1", "appslv", force=True)
    await vol.close()


async def test_device_smaller_than_volume_is_refused(tmp_path, limiter):
    cfg = init(tmp_path)
    os.truncate(cfg.member("appslv", "labor1").device, 32 * MiB)
    with pytest.raises(Refused, match="needs 67108864"):
        await LocalVolume.open(cfg.volume("appslv"), "labor1", limiter)


@pytest.fixture
def loop_device(tmp_path):
    """A real loop block device over a 64 MiB file, detached afterwards."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("loop devices need root and losetup")
    img = tmp_path / "loop.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    try:
        dev = subprocess.run(["losetup", "--find", "--show", str(img)], check=True,
                             capture_output=True, text=True).stdout.strip()
    except subprocess.CalledProcessError as e:
        pytest.skip(f"losetup could not attach a loop device here: {e.stderr.strip()}")
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


async def test_block_device_backing(tmp_path, limiter, loop_device):
    # labor1's member on the loop device (fixed ports: nothing listens here)
    specs = [NodeSpec("labor1", address=[17800], member={"device": loop_device}), NodeSpec("labor2", address=[17801])]
    cfg = load_config(write_config_file(tmp_path, specs))
    r = admin.init_volume(cfg, "labor1", "appslv")
    assert not r.created_device
    admin.mark_dirty(cfg, "labor1", "appslv")
    vol = await LocalVolume.open(cfg.volume("appslv"), "labor1", limiter)
    data = os.urandom(65536)
    await vol.write(1 * MiB, data)
    await vol.flush()
    with pytest.raises(OutOfRange):
        await vol.write(64 * MiB - 512, b"x" * 1024)
    await vol.close()
    with open(loop_device, "rb") as f:
        f.seek(1 * MiB)
        assert f.read(65536) == data


async def test_sequential_stream_commits_intent_once_per_few_extents(tmp_path, limiter):
    cfg = init(tmp_path, mode="mwc")
    vol = await LocalVolume.open(cfg.volume("appslv"), "labor1", limiter)
    before = vol.writer.commits
    for i in range(16):  # 16 MiB in 1 MiB writes: 4 extents
        await vol.write(i * MiB, b"s" * MiB)
    assert vol.writer.commits - before == 1  # extents 1..3 came along with extent 0
    sm = open_map(cfg)
    assert [e for e in range(8) if sm.intent[e]] == [0, 1, 2, 3]
    sm.close()
    # A random write far away opens its own extent and prefetches nothing.
    await vol.write(40 * MiB + 4096, b"r" * 4096)
    assert vol.writer.commits - before == 2
    assert sorted(vol.statemap.hot_extents()) == [0, 1, 2, 3, 10]
    await vol.close()
