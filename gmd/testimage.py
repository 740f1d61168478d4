"""A test failover's image: a writable point-in-time image of a member's
disk, while replication into the member goes on (docs/DESIGN.md, "Test
failover").

The image is three layers, read top down, per 4 KiB block:

1. the **overlay**: blocks the image itself wrote, in a sparse file of the
   volume's size at the same offsets (``<statemap>.test-overlay``), with a
   bitmap in memory of which blocks it holds;
2. the **kept contents**: the contents a region had at the freeze, saved
   once before the member's first overwrite of it after the freeze (an
   :class:`~gmd.undolog.UndoLog` at ``<statemap>.test-kept``, filled by a
   :class:`~gmd.keeper.Keeper`, without ``fdatasync``: a crash ends the
   test);
3. the member's **device**, for every region the member has not overwritten
   since the freeze.

The member's own disk is never written here: it stays what it would be
without the test. ``space`` bounds the kept contents (records with their
headers) and the overlay together; a keep that does not fit ends the test
(the caller's job: replication must go on), an image write that does not fit
fails with ENOSPC.

Concurrency: the member's writes keep a region before they overwrite it, and
the kept log records a region's location before it sets its bit; so a read
of a region from the device that finds the region still not kept *after* the
read got the contents before any overwrite (an overwrite is issued only once
the bit is set). A read that finds it kept by then takes the kept contents.
Image writes run one at a time (the caller holds a lock) because a write
that covers part of a block reads the rest of it first.

Blocking calls only; the daemon runs them in worker threads.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from bitarray import bitarray

from .undolog import DATA_START, Device, UndoLog

log = logging.getLogger(__name__)

BLOCK = 4096  # the overlay's unit: what the image wrote is tracked per 4 KiB block
KEPT_SUFFIX = ".test-kept"
OVERLAY_SUFFIX = ".test-overlay"


def image_files(statemap: Path) -> tuple[Path, Path]:
    """Where a member's test image keeps its files: (kept contents, overlay), beside its state map."""
    statemap = Path(statemap)
    return statemap.with_name(statemap.name + KEPT_SUFFIX), statemap.with_name(statemap.name + OVERLAY_SUFFIX)


def remove_image_files(statemap: Path) -> list[Path]:
    """Remove the files of a test image (left by a daemon that stopped during
    a test, or by a test that ended); the ones that were there."""
    gone = []
    for path in image_files(statemap):
        try:
            path.unlink()
            gone.append(path)
        except FileNotFoundError:
            pass
    return gone


class TestImage:
    """The image of one test failover (see the module docstring).

    Create with :meth:`create`, which removes what an earlier test left and
    starts empty files; :meth:`close` and :meth:`remove` end it."""

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(self, kept: UndoLog, overlay_path: Path, overlay_fd: int, *, size: int, space: int):
        self.kept = kept
        self.overlay_path = overlay_path
        self._fd = overlay_fd
        self.size = size
        self.space = space
        self.region_size = kept.region_size
        self.written = bitarray(-(-size // BLOCK), endian="little")  # blocks the image wrote
        self.written.setall(0)
        self.overlay_bytes = 0
        self._limit()

    @classmethod
    def create(cls, statemap: Path, *, volume: str, size: int, region_size: int, space: int,
               consistent_at: float, identity: str | None) -> TestImage:
        """Start a test image of ``volume`` beside ``statemap``: kept contents
        empty and active, overlay empty and sparse; ``space`` bounds both."""
        kept_path, overlay_path = image_files(statemap)
        remove_image_files(statemap)
        kept = UndoLog.open(kept_path, volume=volume, size=size, region_size=region_size,
                            limit=DATA_START + space, identity=identity, durable=False)
        fd = -1
        try:
            kept.begin(consistent_at, identity)
            fd = os.open(overlay_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, size)
            return cls(kept, overlay_path, fd, size=size, space=space)
        except BaseException:
            kept.close()
            if fd >= 0:
                os.close(fd)
            remove_image_files(statemap)
            raise

    # ----------------------------------------------------------- what it holds

    @property
    def kept_bytes(self) -> int:
        """Bytes of kept contents (data and record headers)."""
        return self.kept.used - DATA_START

    @property
    def kept_regions(self) -> int:
        return self.kept.regions

    def holds(self, offset: int, length: int) -> bool:
        """Every region of the range is kept already: the member may overwrite it at once."""
        return self.kept.holds(offset, length)

    def _limit(self) -> None:
        # The kept log may grow into whatever the overlay leaves of the space.
        self.kept.limit = DATA_START + max(0, self.space - self.overlay_bytes)

    # ------------------------------------------------------------------- reads

    def read(self, device: Device, offset: int, length: int) -> bytes:
        """The image's bytes [offset, offset+length) (clipped to the volume)."""
        end = min(self.size, offset + length)
        out = bytearray()
        rs = self.region_size
        pos = offset
        while pos < end:
            stop = min(end, (pos // rs + 1) * rs)
            out += self._read_in_region(device, pos, stop)
            pos = stop
        return bytes(out)

    def _read_in_region(self, device: Device, start: int, stop: int) -> bytearray:
        """[start, stop), inside one region: the base (kept or device), then the overlay's blocks on top."""
        first, last = start // BLOCK, (stop - 1) // BLOCK
        if self.written[first:last + 1].all():
            base = bytearray(stop - start)
        else:
            base = bytearray(self._base(device, start, stop))
        if self.written[first:last + 1].any():
            for b in range(first, last + 1):
                if not self.written[b]:
                    continue
                lo, hi = max(start, b * BLOCK), min(stop, (b + 1) * BLOCK)
                data = os.pread(self._fd, hi - lo, lo)
                if len(data) != hi - lo:
                    raise OSError(errno.EIO, f"{self.overlay_path}: short read at {lo}")
                base[lo - start:hi - start] = data
        return base

    def _base(self, device: Device, start: int, stop: int) -> bytes:
        """The frozen disk's bytes [start, stop) inside one region."""
        rs = self.region_size
        region = start // rs
        at = region * rs
        kept = self.kept.read_kept(region)
        if kept is None:
            data = device.read_sync(start, stop - start)
            # Kept meanwhile? Then the member may have overwritten it after our read.
            kept = self.kept.read_kept(region)
            if kept is None:
                if len(data) != stop - start:
                    raise OSError(errno.EIO, f"short read of the member's device at {start}")
                return data
        return kept[start - at:stop - at]

    # ------------------------------------------------------------------ writes

    def write(self, device: Device, offset: int, data: bytes) -> None:
        """Write ``data`` into the image (the overlay); the member's disk is
        untouched. ENOSPC, with nothing written, if the space left cannot
        hold the blocks it adds. One write at a time (a partial block is
        read first)."""
        if not data:
            return
        if offset < 0 or offset + len(data) > self.size:
            raise OSError(errno.ENOSPC if offset >= 0 else errno.EINVAL,
                          f"image write [{offset}, {offset + len(data)}) outside the volume ({self.size} bytes)")
        first, last = offset // BLOCK, (offset + len(data) - 1) // BLOCK
        new = (last - first + 1 - self.written[first:last + 1].count(1)) * BLOCK
        if new and self.kept_bytes + self.overlay_bytes + new > self.space:
            raise OSError(errno.ENOSPC, f"test image space used up: {self.kept_bytes} bytes kept and "
                                        f"{self.overlay_bytes} written of {self.space}; this write adds {new}")
        lo, hi = first * BLOCK, min(self.size, (last + 1) * BLOCK)
        if offset == lo and offset + len(data) == hi:
            buf = data
        else:
            whole = bytearray(hi - lo)
            if offset != lo:
                whole[:BLOCK] = self.read(device, lo, BLOCK)
            if offset + len(data) != hi:
                tail = max(lo, hi - BLOCK)
                whole[tail - lo:] = self.read(device, tail, hi - tail)
            whole[offset - lo:offset - lo + len(data)] = data
            buf = bytes(whole)
        done = os.pwrite(self._fd, buf, lo)
        if done != len(buf):
            raise OSError(errno.EIO, f"{self.overlay_path}: short write at {lo}")
        # The bits follow the data: a reader that finds a bit finds its block written.
        self.written[first:last + 1] = 1
        self.overlay_bytes = self.written.count(1) * BLOCK
        self._limit()

    # ------------------------------------------------------------------- ending

    def close(self) -> None:
        """Close both files (the image can no longer be read or written)."""
        try:
            self.kept.close()
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def remove(self) -> None:
        """Close and remove both files: the image, and what it kept, are gone."""
        self.close()
        for path in (Path(self.kept.path), self.overlay_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
