"""A test failover's image (gmd/testimage.py), pure: random member writes
(each kept before it overwrites, as the member does) and random image
writes, in any mix. The image must read as the disk frozen at the start
overlaid with the image's own writes, the member's disk must be exactly
what it would be without the test, and the space bound must hold."""

from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gmd.testimage import BLOCK, TestImage, image_files, remove_image_files
from gmd.undolog import UndoLogFull

REGION = 16 * 1024
SIZE = 32 * REGION


class MemoryDevice:
    """The member's backing device, in memory (the blocking calls the image uses)."""

    def __init__(self, data: bytes):
        self.data = bytearray(data)

    def read_sync(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset:offset + length])

    def write_sync(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data

    def sync(self) -> None:
        pass


def pattern(seed: int, n: int) -> bytes:
    return bytes((seed * 131 + i * 7) % 251 for i in range(n))


ranges = st.tuples(st.integers(0, SIZE - 1), st.integers(1, 3 * REGION)).map(
    lambda t: (t[0], min(t[1], SIZE - t[0])))
ops = st.lists(st.tuples(st.sampled_from(["member", "image", "read"]), ranges, st.integers(0, 10_000)),
               min_size=1, max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, space_regions=st.integers(1, 40))
def test_the_image_is_the_frozen_disk_under_its_own_writes_and_the_member_is_untouched(tmp_path, ops,
                                                                                      space_regions):
    start = pattern(1, SIZE)
    device = MemoryDevice(start)
    without_test = bytearray(start)  # the member's disk had there been no test
    model = bytearray(start)  # the image: frozen disk, then the image's writes
    statemap = tmp_path / "appslv.sm"
    space = space_regions * REGION
    img = TestImage.create(statemap, volume="appslv", size=SIZE, region_size=REGION, space=space,
                           consistent_at=1.0, identity="ab" * 16)
    ended = False
    try:
        for kind, (offset, length), seed in ops:
            data = pattern(seed, length)
            if kind == "member":
                if not ended:
                    (answer,) = img.kept.preserve(device, [[(offset, length)]])
                    if answer is not None:
                        assert isinstance(answer, UndoLogFull)
                        ended = True  # the test ends; the member's write goes on regardless
                device.write_sync(offset, data)
                without_test[offset:offset + length] = data
            elif ended:
                continue
            elif kind == "image":
                first, last = offset // BLOCK, (offset + length - 1) // BLOCK
                adds = (last - first + 1 - img.written[first:last + 1].count(1)) * BLOCK
                before = img.overlay_bytes
                try:
                    img.write(device, offset, data)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    assert img.kept_bytes + before + adds > space
                    assert img.overlay_bytes == before
                    continue
                model[offset:offset + length] = data
            else:
                assert img.read(device, offset, length) == bytes(model[offset:offset + length])
            assert img.kept_bytes + img.overlay_bytes <= space
            assert bytes(device.data) == bytes(without_test)
        if not ended:
            assert img.read(device, 0, SIZE) == bytes(model)
    finally:
        img.remove()
    assert not any(p.exists() for p in image_files(statemap))


def test_a_partial_block_write_keeps_the_rest_of_the_block_and_reads_come_through_every_layer(tmp_path):
    device = MemoryDevice(pattern(3, SIZE))
    frozen = bytes(device.data)
    img = TestImage.create(tmp_path / "v.sm", volume="v", size=SIZE, region_size=REGION, space=8 * REGION,
                           consistent_at=1.0, identity=None)
    try:
        img.write(device, 100, b"x" * 10)  # inside block 0
        assert img.overlay_bytes == BLOCK
        assert img.kept.preserve(device, [[(0, REGION)]]) == [None]
        device.write_sync(0, bytes(REGION))  # the member overwrites region 0 after keeping it
        got = img.read(device, 0, 2 * REGION)
        want = bytearray(frozen[:2 * REGION])
        want[100:110] = b"x" * 10
        assert got == bytes(want)
        assert img.holds(0, REGION) and not img.holds(REGION, 1)
    finally:
        img.remove()


def test_a_new_image_starts_empty_whatever_an_earlier_test_left(tmp_path):
    statemap = tmp_path / "v.sm"
    for path in image_files(statemap):
        path.write_bytes(b"left by a daemon that died mid-test")
    device = MemoryDevice(pattern(5, SIZE))
    img = TestImage.create(statemap, volume="v", size=SIZE, region_size=REGION, space=REGION,
                           consistent_at=1.0, identity=None)
    try:
        assert img.kept_bytes == 0 and img.overlay_bytes == 0
        assert img.read(device, 0, SIZE) == bytes(device.data)
    finally:
        img.close()
    assert sorted(remove_image_files(statemap)) == sorted(image_files(statemap))


def test_an_image_write_outside_the_volume_is_refused(tmp_path):
    img = TestImage.create(tmp_path / "v.sm", volume="v", size=SIZE, region_size=REGION, space=REGION,
                           consistent_at=1.0, identity=None)
    try:
        with pytest.raises(OSError) as e:
            img.write(MemoryDevice(bytes(SIZE)), SIZE - 10, b"y" * 20)
        assert e.value.errno == errno.ENOSPC and img.overlay_bytes == 0
    finally:
        img.remove()
