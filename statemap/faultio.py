"""A fault-injecting, in-memory state map file for crash tests.

It keeps two images: what is *durable* (survived the last fsync) and what the
process sees (durable plus the writes issued since). :meth:`FaultIO.crash_image`
builds what a disk could hold after a power loss or ``kill -9`` at this instant:
the durable image plus any chosen subset of the pending writes, each of which may
be torn at sector boundaries. That is exactly the ordering promise documented in
:mod:`statemap.fileio`, so a test that survives every image survives real crashes
as far as that promise holds.

Named crash points: ``crash_at=("intent", 2)`` makes the second pwrite whose
``what`` starts with ``"intent"`` raise :class:`SimulatedCrash` before it lands,
so a test can stop a commit between any two of its writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .format import SECTOR


class SimulatedCrash(Exception):
    """Raised by :class:`FaultIO` at a named crash point; the process 'died' here."""


@dataclass(frozen=True)
class PendingWrite:
    offset: int
    data: bytes
    what: str


class FaultIO:
    """In-memory implementation of :class:`statemap.fileio.StateMapIO`."""

    def __init__(self, size: int = 0, *, name: str = "<faultio>", image: bytes | None = None):
        self.name = name
        self.readonly = False
        self._visible = bytearray(image if image is not None else bytes(size))
        self._durable = bytes(self._visible)
        self.pending: list[PendingWrite] = []
        self.crash_at: tuple[str, int] | None = None
        self._seen: dict[str, int] = {}
        self.bytes_written = 0
        self.writes = 0
        self.fsyncs = 0
        self.log: list[str] = []  # "write:<what>" / "fsync", in issue order

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self._visible[offset : offset + length])

    def pwrite(self, offset: int, data: bytes, what: str) -> None:
        if self.crash_at is not None and what.startswith(self.crash_at[0]):
            n = self._seen.get(self.crash_at[0], 0) + 1
            self._seen[self.crash_at[0]] = n
            if n == self.crash_at[1]:
                raise SimulatedCrash(f"crash point {self.crash_at[0]}#{n}")
        end = offset + len(data)
        if end > len(self._visible):
            self._visible.extend(bytes(end - len(self._visible)))
        self._visible[offset:end] = data
        self.pending.append(PendingWrite(offset, bytes(data), what))
        self.bytes_written += len(data)
        self.writes += 1
        self.log.append(f"write:{what}")

    def fsync(self) -> None:
        self._durable = bytes(self._visible)
        self.pending.clear()
        self.fsyncs += 1
        self.log.append("fsync")

    def size(self) -> int:
        return len(self._visible)

    def data_extents(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        yield (offset, length)

    def close(self) -> None:
        pass

    def durable_image(self) -> bytes:
        return self._durable

    def crash_image(self, landed: Iterable[int] = (), torn: dict[int, int] | None = None) -> bytes:
        """The disk after a crash now.

        ``landed``: indexes into :attr:`pending` of writes that reached the disk;
        ``torn``: for some of those, how many leading sectors of the write landed
        (the rest of that write did not).
        """
        torn = torn or {}
        img = bytearray(self._durable)
        for i in sorted(set(landed)):
            w = self.pending[i]
            data = w.data
            if i in torn:
                data = data[: torn[i] * SECTOR]
            end = w.offset + len(data)
            if end > len(img):
                img.extend(bytes(end - len(img)))
            img[w.offset : end] = data
        return bytes(img)
