"""Hashing a backing device's blocks without reading its holes (gmd.disk)."""

from __future__ import annotations

import os

import pytest
import trio
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gmd.disk import BackingDevice, zero_hash
from gmd.errors import OutOfRange

KiB = 1024
BLOCK = 4 * KiB
SIZE = 256 * KiB


def plain_hashes(path, offset, length, block):
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    return [xxhash.xxh3_64_intdigest(data[i:i + block]) for i in range(0, length, block)], data


def sparse_file(path, size, writes):
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes:
            f.seek(offset)
            f.write(data)


async def open_device(path, size):
    return BackingDevice(path, size, trio.CapacityLimiter(2))


def count_thread_calls(monkeypatch) -> list[str]:
    """The names of the functions gmd.disk hands to worker threads from now on, in order."""
    import gmd.disk

    names: list[str] = []
    real = trio.to_thread.run_sync

    async def counting(fn, *args, **kwargs):
        names.append(fn.__name__)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(gmd.disk.trio.to_thread, "run_sync", counting)
    return names


writes = st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 20 * KiB), st.integers(0, 255)), max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=writes, offset=st.integers(0, SIZE // BLOCK - 1), blocks=st.integers(1, SIZE // BLOCK),
       tail=st.integers(0, BLOCK - 1))
def test_hashes_and_data_match_a_plain_read(tmp_path, layout, offset, blocks, tail):
    """Whatever mix of data and holes (and a short last block), the hashes and
    every run of blocks equal what a plain read gives."""
    path = tmp_path / "dev.img"
    path.unlink(missing_ok=True)
    sparse_file(path, SIZE, [(o, bytes([b | 1]) * min(n, SIZE - o)) for o, n, b in layout])
    start = offset * BLOCK
    length = min(SIZE - start, blocks * BLOCK - tail) or BLOCK

    async def main():
        dev = await open_device(path, SIZE)
        try:
            return await dev.read_hashed(start, length, BLOCK)
        finally:
            dev.close()

    hashes, data = trio.run(main)
    want, raw = plain_hashes(path, start, length, BLOCK)
    assert hashes == want
    n = len(want)
    for first, end in [(0, n), (0, 1), (n - 1, n), (n // 3, max(n // 3 + 1, 2 * n // 3))]:
        assert bytes(data.blocks(first, end)) == raw[first * BLOCK:end * BLOCK]


async def test_a_sparse_device_is_hashed_without_reading(tmp_path):
    path = tmp_path / "dev.img"
    sparse_file(path, 64 << 20, [(5 << 20, b"x" * 100)])
    dev = await open_device(path, 64 << 20)
    try:
        hashes, data = await dev.read_hashed(0, 64 << 20, 64 * KiB)
        # Only the one block holding data was read.
        assert [len(piece) for _, piece in data.pieces] == [64 * KiB]
        assert hashes.count(zero_hash(64 * KiB)) == len(hashes) - 1
        only_hashes, nothing = await dev.read_hashed(0, 64 << 20, 64 * KiB, keep_data=False)
        assert only_hashes == hashes and nothing.pieces == []
    finally:
        dev.close()


async def test_preallocated_space_reads_as_zeros(tmp_path):
    path = tmp_path / "dev.img"
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, SIZE)
    dev = await open_device(path, SIZE)
    try:
        hashes, data = await dev.read_hashed(0, SIZE, BLOCK)
        assert hashes == plain_hashes(path, 0, SIZE, BLOCK)[0]
        assert bytes(data.blocks(0, SIZE // BLOCK)) == bytes(SIZE)
    finally:
        dev.close()


@pytest.mark.parametrize("offset,length,block", [(SIZE - BLOCK, 2 * BLOCK, BLOCK), (-1, BLOCK, BLOCK), (0, BLOCK, 0)])
async def test_bad_hash_requests_are_refused(tmp_path, offset, length, block):
    path = tmp_path / "dev.img"
    sparse_file(path, SIZE, [])
    dev = await open_device(path, SIZE)
    try:
        with pytest.raises(OutOfRange):
            await dev.read_hashed(offset, length, block)
    finally:
        dev.close()


async def test_read_ahead_hints_are_checked_like_reads(tmp_path):
    path = tmp_path / "dev.img"
    sparse_file(path, SIZE, [(0, b"x" * BLOCK)])
    dev = await open_device(path, SIZE)
    try:
        await dev.will_need([(0, BLOCK), (SIZE - BLOCK, BLOCK)])
        with pytest.raises(OutOfRange):
            await dev.will_need([(0, BLOCK), (SIZE - BLOCK, 2 * BLOCK)])
    finally:
        dev.close()


# ------------------------------------------- small I/O on the event loop (gmd.disk.INLINE_MAX)

@given(ops=st.lists(st.tuples(st.integers(0, SIZE // BLOCK - 1), st.sampled_from([512, BLOCK, 64 * KiB, 96 * KiB]),
                              st.integers(0, 255)), min_size=1, max_size=8))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_writes_small_and_large_read_back_what_was_written(tmp_path, ops):
    # Small requests go through the event loop (page cache), large ones through
    # threads: either way the bytes read back equal a plain model of the file.
    path = tmp_path / f"dev-{len(ops)}-{ops[0][0]}"
    sparse_file(path, SIZE, [])
    model = bytearray(SIZE)

    async def run():
        dev = await open_device(path, SIZE)
        try:
            for block, length, fill in ops:
                offset = min(block * BLOCK, SIZE - length)
                await dev.write(offset, bytes([fill]) * length)
                model[offset:offset + length] = bytes([fill]) * length
            for offset, length in [(0, SIZE), (0, BLOCK), (SIZE - 64 * KiB, 64 * KiB), (5, 4000)]:
                if length <= 64 * KiB:
                    assert await dev.read(offset, length) == bytes(model[offset:offset + length])
            assert await dev.read(0, SIZE) == bytes(model)
        finally:
            dev.close()
        assert path.read_bytes() == bytes(model)

    trio.run(run)
    path.unlink()


async def test_a_write_that_blocked_sends_small_writes_to_threads_for_a_while(tmp_path, monkeypatch):
    # A buffered write the kernel throttled (writeback) must not keep holding
    # the event loop: after one took longer than INLINE_SLOW, small writes go
    # to worker threads for INLINE_PAUSE seconds.
    import gmd.disk

    path = tmp_path / "dev"
    sparse_file(path, SIZE, [])
    dev = await open_device(path, SIZE)
    try:
        await dev.write(0, b"a" * BLOCK)
        assert dev.inline_pauses == 0
        monkeypatch.setattr(gmd.disk, "INLINE_SLOW", -1.0)  # every inline write now counts as throttled
        await dev.write(BLOCK, b"b" * BLOCK)
        assert dev.inline_pauses == 1
        threads_before = count_thread_calls(monkeypatch)
        await dev.write(2 * BLOCK, b"c" * BLOCK)
        assert threads_before == ["_pwrite_full"] and dev.inline_pauses == 1
        assert await dev.read(0, 3 * BLOCK) == b"a" * BLOCK + b"b" * BLOCK + b"c" * BLOCK
    finally:
        dev.close()


async def test_a_slow_uncached_read_sends_uncached_reads_to_threads_for_a_while(tmp_path, monkeypatch):
    # Small reads the page cache does not hold are done on the event loop only while
    # the device answers fast: after one took longer than INLINE_READ_SLOW (a
    # seek on a slow disk), they go to worker threads for INLINE_PAUSE seconds;
    # reads the cache holds stay on the loop meanwhile.
    import gmd.disk

    path = tmp_path / "dev"
    sparse_file(path, SIZE, [(0, b"x" * SIZE)])
    dev = await open_device(path, SIZE)
    threads = count_thread_calls(monkeypatch)
    monkeypatch.setattr(gmd.disk, "_pread_cached", lambda fd, buf, offset: 0)  # nothing is cached
    try:
        assert await dev.read(0, BLOCK) == b"x" * BLOCK
        assert threads == [] and dev.slow_reads == 0  # fast device: read on the loop
        monkeypatch.setattr(gmd.disk, "INLINE_READ_SLOW", -1.0)  # every uncached read now counts as slow
        assert await dev.read(BLOCK, BLOCK) == b"x" * BLOCK
        assert threads == [] and dev.slow_reads == 1  # that one was done here; the next go to threads
        assert await dev.read(2 * BLOCK, BLOCK) == b"x" * BLOCK
        assert threads == ["_pread_into"] and dev.slow_reads == 1
        assert await dev.read(0, 2 * 64 * KiB) == b"x" * (2 * 64 * KiB)  # large: a thread anyway
        assert threads == ["_pread_into", "_pread_full"]
    finally:
        dev.close()


async def test_a_read_the_cache_holds_in_part_reads_only_the_rest_from_the_disk(tmp_path, monkeypatch):
    # RWF_NOWAIT returns what the cache holds from the start of the range; the
    # worker thread reads the rest into the same buffer, after it.
    import gmd.disk

    path = tmp_path / "dev"
    content = bytes(range(256)) * (SIZE // 256)
    sparse_file(path, SIZE, [(0, content)])
    dev = await open_device(path, SIZE)
    asked = []
    real_into = gmd.disk._pread_into

    def half_cached(fd, buf, offset):
        half = len(buf) // 2
        buf[:half] = content[offset:offset + half]
        return half

    def into(fd, buf, got, offset):
        asked.append((got, len(buf)))
        return real_into(fd, buf, got, offset)

    monkeypatch.setattr(gmd.disk, "_pread_cached", half_cached)
    monkeypatch.setattr(gmd.disk, "_pread_into", into)
    try:
        assert await dev.read(4096, 64 * KiB) == content[4096:4096 + 64 * KiB]
        assert asked == [(32 * KiB, 64 * KiB)]
    finally:
        dev.close()
