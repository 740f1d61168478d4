"""Disk access for state maps, with its durability promises written down.

Ordering promise (the whole crash-safety design rests on it): data passed to
:meth:`FileIO.pwrite` may reach the disk in any order and may be torn at sector
boundaries, until :meth:`FileIO.fsync` returns; after that every write issued
before the call is durable. Nothing else is assumed: no write is atomic, and
writes between two fsyncs may land in any subset.

Whole-file replacement (creating a map, ``gmd init --force``) goes through
:func:`write_new_file`: temp file, fsync, rename over the target, fsync the
directory, so a crash leaves either the old file or the new one, never a mix.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol


class StateMapIO(Protocol):
    """What the state map needs from a file. Offsets and lengths in bytes."""

    name: str

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes, what: str) -> None:
        """Write ``data`` at ``offset``; ``what`` names the record (for crash tests)."""

    def fsync(self) -> None: ...

    def size(self) -> int: ...

    def data_extents(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """(offset, length) pieces of the range that may hold non-zero data.

        A sparse file's holes read as zeros, so skipping them keeps the cost of
        opening a map proportional to what was ever written, not to the volume.
        """
        ...

    def close(self) -> None: ...


class FileIO:
    """A real state map file, opened read-write (or read-only for offline status)."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False):
        self.name = str(path)
        self.readonly = readonly
        # O_NONBLOCK: opening a FIFO put where a map belongs must fail below, not
        # hang; it changes nothing for a regular file.
        fd = os.open(self.name, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            mode = os.fstat(fd).st_mode
            # A directory opens read-only; its st_size would pass for a tiny map.
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), self.name)
            if not stat.S_ISREG(mode):
                raise OSError(errno.EINVAL, "not a regular file", self.name)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def pread(self, offset: int, length: int) -> bytes:
        out = bytearray()
        while len(out) < length:
            chunk = os.pread(self._fd, length - len(out), offset + len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def pwrite(self, offset: int, data: bytes, what: str) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n

    def fsync(self) -> None:
        # fdatasync is enough: a map never changes size after creation, and block
        # allocation for a filled hole is still made durable by fdatasync.
        # Skipping the inode's timestamps spares an ext4 journal commit per call,
        # which matters when the backing device has much dirty data.
        os.fdatasync(self._fd)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def data_extents(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        end = offset + length
        pos = offset
        while pos < end:
            try:
                start = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains; EINVAL: no SEEK_DATA support
                if pos == offset and not _seek_data_supported(self._fd):
                    yield (offset, length)
                return
            if start >= end:
                return
            stop = min(os.lseek(self._fd, start, os.SEEK_HOLE), end)
            yield (start, stop - start)
            pos = stop

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _seek_data_supported(fd: int) -> bool:
    try:
        os.lseek(fd, 0, os.SEEK_HOLE)
        return True
    except OSError:
        return False


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Make a directory entry change (create, rename) in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, size: int, pieces: list[tuple[int, bytes]], *, mode: int = 0o600,
                   allocate: int = 0) -> None:
    """Atomically create or replace ``path``: a sparse file of ``size`` bytes with
    ``pieces`` (offset, data) written into it, and its first ``allocate`` bytes
    allocated (so later overwrites there need no block allocation).

    Temp file in the same directory, fsync, rename over ``path``, fsync the
    directory. On any error the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.ftruncate(fd, size)
            if allocate:
                try:
                    os.posix_fallocate(fd, 0, allocate)
                except OSError:
                    pass  # a file system without fallocate: holes are only slower
            for offset, data in pieces:
                os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
