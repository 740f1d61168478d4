"""A member's backing device (a regular file or a block device) with async I/O.

Blocking calls run in worker threads under a shared :class:`trio.CapacityLimiter`,
never on the event loop. Every request is checked against the volume's size
first: a request that does not fit is refused whole (EINVAL for a malformed one,
ENOSPC for one that runs past the end), never shortened.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import trio
import xxhash

from .errors import OutOfRange, Refused

INLINE_MAX = 64 * 1024  # bytes: reads and writes up to this size are tried on the event loop
INLINE_SLOW = 0.010  # seconds: an inline write that took longer was throttled by writeback (its pauses are 10-200 ms; preemption is shorter)
INLINE_PAUSE = 1.0  # seconds small writes (or uncached reads) go to threads after a slow one
INLINE_READ_SLOW = 0.001  # seconds: an uncached read that took longer came from a slow device (a disk seek)


def check_range(offset: int, length: int, size: int, *, writing: bool) -> None:
    """Refuse a request that does not lie wholly inside a volume of ``size`` bytes."""
    if offset < 0 or length < 0:
        raise OutOfRange(f"invalid request: offset {offset}, length {length}", errno.EINVAL)
    if offset + length > size:
        if writing:
            raise OutOfRange(
                f"write of {length} bytes at {offset} runs past the end of the volume ({size} bytes)",
                errno.ENOSPC,
            )
        raise OutOfRange(
            f"read of {length} bytes at {offset} runs past the end of the volume ({size} bytes)",
            errno.EINVAL,
        )


def device_size(path: Path) -> int:
    """Size in bytes of a regular file or block device."""
    st = os.stat(path)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
    raise Refused("device-not-file-or-block", path=path)


def create_sparse_file(path: Path, size: int) -> None:
    """Create a sparse backing file of ``size`` bytes; never touches an existing one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


class BackingDevice:
    """Open backing storage of one member; ``size`` is the volume's size."""

    def __init__(self, path: Path, size: int, limiter: trio.CapacityLimiter, *, volume: str = "?"):
        self.path = Path(path)
        self.size = size
        self._limiter = limiter
        self._threads_until = 0.0  # monotonic time until which small writes go to threads too
        self.inline_pauses = 0  # times an inline write blocked (writeback throttling)
        self._uncached_threads_until = 0.0  # monotonic time until which uncached reads go to threads
        self.slow_reads = 0  # times an uncached read on the event loop was slow (the device is)
        actual = device_size(self.path)
        if actual < size:
            raise Refused("device-too-small", path=self.path, actual=actual, volume=volume, size=size)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise Refused("device-cannot-open", path=self.path, why=e.strerror) from None

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """Read [offset, offset+length).

        Up to :data:`INLINE_MAX` bytes on the event loop, where that costs
        less than a hand-off to a worker thread: what the page cache holds
        (``RWF_NOWAIT`` never waits for the disk), and the rest from the disk
        itself while it answers fast. An uncached read that took over
        :data:`INLINE_READ_SLOW` (a seek on a slow disk) sends the uncached
        reads of the next :data:`INLINE_PAUSE` seconds to threads, so a slow
        device never holds the loop for long. Everything else is
        read in a worker thread (larger reads too: a 1 MiB copy on the loop
        measured slower than in a thread, which overlaps the loop's work)."""
        check_range(offset, length, self.size, writing=False)
        if length > INLINE_MAX:
            # A thread, and a buffer os.pread allocates without zeroing it
            # first (zeroing 1 MiB was 9% of a sequential read's CPU).
            data = await trio.to_thread.run_sync(_pread_full, self._fd, length, offset, limiter=self._limiter)
        else:
            buf = bytearray(length)
            got = _pread_cached(self._fd, buf, offset)
            if got < length:
                started = time.monotonic()
                if started >= self._uncached_threads_until:
                    got = _pread_into(self._fd, buf, got, offset)
                    took = time.monotonic() - started
                    if took > INLINE_READ_SLOW:
                        self._uncached_threads_until = started + took + INLINE_PAUSE
                        self.slow_reads += 1
            if got < length:
                # What the cache held is kept: the thread reads only the rest.
                got = await trio.to_thread.run_sync(_pread_into, self._fd, buf, got, offset, limiter=self._limiter)
            else:
                await trio.lowlevel.checkpoint()
            data = buf if got == length else buf[:got]
        if len(data) != length:
            # A file shrunk behind our back: never hand out short data silently.
            raise Refused("device-short-read", path=self.path, got=len(data), length=length, offset=offset)
        return data

    async def read_hashed(self, offset: int, length: int, block: int, *,
                          keep_data: bool = True) -> tuple[list[int], BlockData]:
        """xxh3_64 of each ``block`` of [offset, offset+length), and (with
        ``keep_data``) the data that was read, to take blocks from.

        Holes (sparse or preallocated, never written) are found with
        SEEK_DATA/SEEK_HOLE and hashed as zeros without being read: a new
        member's backing file is mostly hole, and reading it only makes the
        kernel zero-fill page after page. Where the file system cannot tell
        (a block device, say) everything is read."""
        (answer,) = await self.read_hashed_ranges([(offset, length)], block, keep_data=keep_data)
        return answer

    def check_hash_request(self, offset: int, length: int, block: int) -> None:
        """Refuse hashing a range outside the volume, or with a block size below one byte."""
        if block <= 0:
            raise OutOfRange(f"invalid hash block size {block}", errno.EINVAL)
        check_range(offset, length, self.size, writing=False)

    async def read_hashed_ranges(self, ranges: list[tuple[int, int]], block: int, *,
                                 keep_data: bool = True) -> list[tuple[list[int], BlockData]]:
        """:meth:`read_hashed` of each (offset, length) in ``ranges``, in one
        trip to a worker thread: a mini-copy's scattered small regions would
        otherwise pay a thread hand-off (and a wait for the GIL) each."""
        for offset, length in ranges:
            self.check_hash_request(offset, length, block)
        return await trio.to_thread.run_sync(
            _read_hashed_ranges, self._fd, ranges, block, keep_data, self.path, limiter=self._limiter)

    async def will_need(self, ranges: list[tuple[int, int]]) -> None:
        """Start reading ``ranges`` (offset, length) into the page cache, all at
        once, without waiting for the data (POSIX_FADV_WILLNEED): scattered
        regions that are read one after another then come from one deep queue
        of disk reads instead of one read at a time."""
        for offset, length in ranges:
            check_range(offset, length, self.size, writing=False)
        await trio.to_thread.run_sync(_will_need, self._fd, ranges, limiter=self._limiter)

    async def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (to the page cache: :meth:`flush` makes it durable).

        A small write is done on the event loop: a buffered write of a few KiB
        costs microseconds, a hand-off to a worker thread and back costs ten
        times that, and that hand-off was most of the CPU a 4 KiB write cost
        (docs/BENCHMARKS.md). A buffered write can still block when the kernel
        throttles a writer with too many dirty pages; one that took longer than
        :data:`INLINE_SLOW` sends the writes of the next :data:`INLINE_PAUSE`
        seconds to threads, so the loop is never held by writeback for long."""
        if self.write_now(offset, data):
            await trio.lowlevel.checkpoint()
            return
        await trio.to_thread.run_sync(_pwrite_full, self._fd, data, offset, limiter=self._limiter)

    def can_write_now(self, length: int, now: float | None = None) -> bool:
        """Whether a write of ``length`` bytes would be done on the event loop
        at monotonic time ``now`` (default: the present)."""
        return length <= INLINE_MAX and (time.monotonic() if now is None else now) >= self._threads_until

    def write_now(self, offset: int, data: bytes) -> bool:
        """Write ``data`` at ``offset`` on the calling task if it is small and
        writes are not being throttled (see :meth:`write`); False, having done
        nothing, if it must go to a thread."""
        check_range(offset, len(data), self.size, writing=True)
        started = time.monotonic()
        if not self.can_write_now(len(data), started):
            return False
        _pwrite_full(self._fd, data, offset)
        took = time.monotonic() - started
        if took > INLINE_SLOW:
            self._threads_until = started + took + INLINE_PAUSE
            self.inline_pauses += 1
        return True

    async def flush(self) -> None:
        """Make every completed write durable (fdatasync)."""
        await trio.to_thread.run_sync(os.fdatasync, self._fd, limiter=self._limiter)

    # Blocking calls, for a caller already in a worker thread (the undo log's
    # preserve and rollback, gmd.undolog.Device).

    def read_sync(self, offset: int, length: int) -> bytes:
        """The bytes at [offset, offset+length), waiting for the disk."""
        check_range(offset, length, self.size, writing=False)
        data = _pread_full(self._fd, length, offset)
        if len(data) != length:
            raise Refused("device-short-read", path=self.path, got=len(data), length=length, offset=offset)
        return data

    def write_sync(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (to the page cache; :meth:`sync` makes it durable)."""
        check_range(offset, len(data), self.size, writing=True)
        _pwrite_full(self._fd, data, offset)

    def sync(self) -> None:
        """fdatasync, blocking."""
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _pread_cached(fd: int, buf: bytearray, offset: int) -> int:
    """Read into ``buf`` from ``offset`` what the page cache holds of it, in
    order, without waiting for the disk (``RWF_NOWAIT``); returns the bytes
    read (0 when the first page is not cached, or RWF_NOWAIT is not supported
    here). The buffer is handed out as it is: FUSE and the link take any
    buffer, so the data is not copied again into bytes."""
    try:
        return os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except (BlockingIOError, OSError):  # not cached, or RWF_NOWAIT not supported here
        return 0


def _pread_into(fd: int, buf: bytearray, got: int, offset: int) -> int:
    """Fill ``buf[got:]`` from the file at ``offset + got``, waiting for the
    disk; returns how much of ``buf`` is filled (short only at end of file)."""
    with memoryview(buf) as view:
        while got < len(buf):
            n = os.preadv(fd, [view[got:]], offset + got)
            if n <= 0:
                break
            got += n
    return got


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    parts = []
    got = 0
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


_ZERO_HASHES: dict[int, int] = {}


def zero_hash(length: int) -> int:
    """xxh3_64 of ``length`` zero bytes (what a hole reads as)."""
    h = _ZERO_HASHES.get(length)
    if h is None:
        h = _ZERO_HASHES[length] = xxhash.xxh3_64_intdigest(bytes(length))
    return h


def data_runs(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The byte ranges of [start, end) that may hold data, by SEEK_DATA and
    SEEK_HOLE; all of it where the file system cannot tell. A range reported
    as hole reads as zeros (the kernel errs towards data, never the other way)."""
    runs: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but hole from pos to the end of the file
                break
            return [(start, end)]  # not supported here: read everything
        if data >= end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        runs.append((data, min(hole, end)))
        pos = hole
    return runs


class BlockData:
    """Blocks of one range as read by :meth:`BackingDevice.read_hashed`: the
    pieces that were read, each with the index of its first block; blocks in
    none of them lie in a hole and read as zeros."""

    def __init__(self, offset: int, length: int, block: int):
        self.offset, self.length, self.block = offset, length, block
        self.pieces: list[tuple[int, bytes]] = []

    def blocks(self, first: int, end: int) -> bytes | memoryview:
        """The bytes of blocks [first, end): a view when one piece holds them
        all (no copy), else joined with zeros for the holes."""
        bs = self.block
        start, stop = first * bs, min(self.length, end * bs)
        out: list[bytes | memoryview] = []
        pos = start
        for p_first, data in self.pieces:
            p_start, p_stop = p_first * bs, p_first * bs + len(data)
            if p_stop <= pos or p_start >= stop:
                continue
            if p_start > pos:
                out.append(bytes(p_start - pos))
                pos = p_start
            take_to = min(stop, p_stop)
            out.append(memoryview(data)[pos - p_start:take_to - p_start])
            pos = take_to
        if pos < stop:
            out.append(bytes(stop - pos))
        return out[0] if len(out) == 1 else b"".join(out)


def _read_hashed_ranges(fd: int, ranges: list[tuple[int, int]], block: int, keep_data: bool,
                        path: Path) -> list[tuple[list[int], BlockData]]:
    if len(ranges) > 1:
        _will_need(fd, ranges)  # scattered ranges: one deep queue of disk reads, not one at a time
    return [_read_hashed(fd, offset, length, block, keep_data, path) for offset, length in ranges]


def _read_hashed(fd: int, offset: int, length: int, block: int, keep_data: bool,
                 path: Path) -> tuple[list[int], BlockData]:
    end = offset + length
    nblocks = (length + block - 1) // block
    hashes: list[int | None] = [None] * nblocks
    got = BlockData(offset, length, block)
    for run_start, run_end in data_runs(fd, offset, end):
        # Read whole blocks around the data run, in one pread.
        first = (run_start - offset) // block
        last = min(nblocks, (run_end - offset + block - 1) // block)
        if hashes[first] is not None:  # shared with the previous run's last block
            first += 1
        if first >= last:
            continue
        roff = offset + first * block
        rlen = min(end, offset + last * block) - roff
        data = _pread_full(fd, rlen, roff)
        if len(data) != rlen:
            raise Refused("device-short-read", path=path, got=len(data), length=rlen, offset=roff)
        with memoryview(data) as view:
            for i in range(first, last):
                hashes[i] = xxhash.xxh3_64_intdigest(view[(i - first) * block:(i - first + 1) * block])
        if keep_data:
            got.pieces.append((first, data))
    for i, h in enumerate(hashes):
        if h is None:
            hashes[i] = zero_hash(min(block, length - i * block))
    return hashes, got  # type: ignore[return-value]


def _will_need(fd: int, ranges: list[tuple[int, int]]) -> None:
    for offset, length in ranges:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


def _pwrite_full(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
