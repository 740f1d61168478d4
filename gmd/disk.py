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
from pathlib import Path

import trio

from .errors import DeviceError, OutOfRange, Refused


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
        actual = device_size(self.path)
        if actual < size:
            raise Refused("device-too-small", path=self.path, actual=actual, volume=volume, size=size)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise DeviceError(f"{self.path}: cannot open backing device: {e.strerror}") from None

    async def read(self, offset: int, length: int) -> bytes:
        check_range(offset, length, self.size, writing=False)
        data = await trio.to_thread.run_sync(_pread_full, self._fd, length, offset, limiter=self._limiter)
        if len(data) != length:
            # A file shrunk behind our back: never hand out short data silently.
            raise DeviceError(f"{self.path}: short read ({len(data)} of {length} bytes at {offset})")
        return data

    async def write(self, offset: int, data: bytes) -> None:
        check_range(offset, len(data), self.size, writing=True)
        await trio.to_thread.run_sync(_pwrite_full, self._fd, data, offset, limiter=self._limiter)

    async def flush(self) -> None:
        """Make every completed write durable (fdatasync)."""
        await trio.to_thread.run_sync(os.fdatasync, self._fd, limiter=self._limiter)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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


def _pwrite_full(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
