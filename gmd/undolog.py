"""A member's undo log: the old contents of every region a catch-up overwrote,
so that the member's last consistent image can be restored
(docs/DESIGN.md, "Consistent catch-up: the undo log").

While a member is being caught up (a mini-copy, a merge, the regions a
returning member missed), its disk is not an instant of the primary's disk:
copied regions are newer than the rest. Before a region is overwritten for
the first time in a catch-up, its current contents are appended here and made
durable; rolling the log back writes them over the disk again and leaves the
image the member held when the catch-up began. Once the catch-up is over (the
member is uptodate and a flush after that completed) the log is emptied.

This module owns the file and nothing else: no trio, no network. Its calls
block; the daemon runs them in worker threads, one at a time.

File layout (little-endian)::

    page 0, page 1   header slots (4096 bytes each); sequence n goes to slot n % 2
    8192 ...         records, appended

Header slot::

    0    8  magic          b"GMDUNDO\\0"
    8    2  version        1
    10   2  reserved       0
    12   4  header length  (the struct's size, for a reader of a newer minor layout)
    16   8  sequence       the slot with the higher valid sequence wins
    24   1  state          0 empty, 1 active (a catch-up is being preserved)
    25   7  reserved       0
    32   8  epoch          random per catch-up; records carry it
    40   8  volume size    bytes
    48   4  region size    bytes (records cover whole regions)
    52   4  reserved       0
    56   8  consistent_at  wall-clock time of the consistent image (float)
    64   8  started_at     wall-clock time the catch-up began (float)
    72  64  volume         the volume's name, NUL-padded
    136 32  identity       the volume identity (hex), NUL-padded
    168  8  checksum       xxh3_64 of the whole 4096-byte slot with these 8 bytes zeroed

Record::

    0    4  magic          b"GURC"
    4    4  length         bytes of data (whole regions, at most MAX_RECORD)
    8    8  epoch          the header's epoch when it was written
    16   8  sequence       1, 2, ... within the epoch
    24   8  offset         the data's byte offset in the volume (region-aligned)
    32   8  checksum       xxh3_64 of bytes 0..32 and the data
    40   …  data           the region's contents before the catch-up overwrote it

Crash safety rests on one rule: a region is overwritten only after the record
holding its old contents is durable (``preserve`` returns after an
``fdatasync``). So a record that is torn, or missing, at the tail (a crash
during an append) belongs to an overwrite that never happened, and reading
stops there. Every valid record of the epoch holds contents from before the
catch-up, so a rollback is idempotent: a crash during one leaves the header
active, and the next rollback writes the same bytes again. A header that
cannot be read is refused with the file's name, never taken as "empty".
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import xxhash
from bitarray import bitarray

from statemap.fileio import FileIO, StateMapIO, fsync_directory

from .errors import Refused

log = logging.getLogger(__name__)

PAGE = 4096
DATA_START = 2 * PAGE
MAGIC = b"GMDUNDO\0"
VERSION = 1
RECORD_MAGIC = b"GURC"
MAX_RECORD = 1 << 20  # bytes of data per record: a torn tail loses little, a batch holds little memory

STATE_EMPTY, STATE_ACTIVE = 0, 1

_HEADER = struct.Struct("<8sHHIQB7xQQII dd64s32s")
_SUM = struct.Struct("<Q")
_SUM_AT = _HEADER.size
_RECORD = struct.Struct("<4sIQQQ")
RECORD_OVERHEAD = _RECORD.size + _SUM.size


class UndoLogFull(OSError):
    """The log cannot hold the old contents of a write's regions: the write is
    refused (ENOSPC) rather than let it destroy the consistent image."""

    def __init__(self, path: str, needed: int, remaining: int):
        super().__init__(errno.ENOSPC, f"undo log {path} full: {needed} bytes needed to preserve the regions "
                                       f"this write overwrites, {remaining} left")


class Device(Protocol):
    """The member's backing device as the log needs it (blocking calls)."""

    def read_sync(self, offset: int, length: int) -> bytes: ...
    def write_sync(self, offset: int, data: bytes) -> None: ...
    def sync(self) -> None: ...


@dataclass(frozen=True)
class Header:
    """One header slot's contents."""

    seq: int
    state: int
    epoch: int
    volume_size: int
    region_size: int
    consistent_at: float
    started_at: float
    volume: str
    identity: str

    def encode(self) -> bytes:
        body = _HEADER.pack(MAGIC, VERSION, 0, _HEADER.size, self.seq, self.state, self.epoch, self.volume_size,
                            self.region_size, 0, self.consistent_at, self.started_at,
                            self.volume.encode()[:64], self.identity.encode()[:32])
        page = bytearray(PAGE)
        page[:len(body)] = body
        _SUM.pack_into(page, _SUM_AT, xxhash.xxh3_64_intdigest(bytes(page)))
        return bytes(page)

    @classmethod
    def decode(cls, page: bytes) -> Header:
        """The header in ``page``; ValueError saying why it is not one."""
        if len(page) < PAGE:
            raise ValueError("short")
        if page == bytes(PAGE):
            raise ValueError("all zeros")
        fields = _HEADER.unpack_from(page)
        magic, version = fields[0], fields[1]
        if magic != MAGIC:
            raise ValueError("bad magic")
        (want,) = _SUM.unpack_from(page, _SUM_AT)
        zeroed = bytearray(page[:PAGE])
        zeroed[_SUM_AT:_SUM_AT + _SUM.size] = bytes(_SUM.size)
        if xxhash.xxh3_64_intdigest(bytes(zeroed)) != want:
            raise ValueError("checksum mismatch")
        if version != VERSION:
            raise ValueError(f"format version {version} (this gmd reads {VERSION})")
        _, _, _, _, seq, state, epoch, vsize, rsize, _, cat, sat, volume, identity = fields
        if state not in (STATE_EMPTY, STATE_ACTIVE):
            raise ValueError(f"unknown state {state}")
        return cls(seq, state, epoch, vsize, rsize, cat, sat, volume.rstrip(b"\0").decode(errors="replace"),
                   identity.rstrip(b"\0").decode(errors="replace"))


@dataclass(frozen=True)
class Rollback:
    """What a rollback restored: bytes, regions (and their runs (first, end)),
    records, and when the restored image was current."""

    bytes: int
    regions: int
    records: int
    consistent_at: float
    runs: tuple[tuple[int, int], ...] = ()


def iso_utc(when: float | None) -> str | None:
    """A wall-clock time as ISO 8601 in UTC (``2026-12-01T10:00:00.123Z``); None for none."""
    if not when:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z"


def encode_record(epoch: int, seq: int, offset: int, data: bytes) -> bytes:
    """One record: header, checksum, data (see the module docstring)."""
    head = _RECORD.pack(RECORD_MAGIC, len(data), epoch, seq, offset)
    return head + _SUM.pack(xxhash.xxh3_64_intdigest(head + bytes(data))) + bytes(data)


class UndoLog:
    """The undo log of one member (see the module docstring for the format).

    Open with :meth:`open` (a file) or :meth:`load` (any :class:`StateMapIO`,
    e.g. :class:`statemap.faultio.FaultIO` in crash tests). ``limit`` is the
    most the file may hold (``undo_log_size``), header pages included.
    ``durable`` (the default) makes :meth:`preserve` ``fdatasync`` the log
    before it returns; a keeper that a crash discards anyway (a test
    failover's, :mod:`gmd.testimage`) goes without, its records reaching the
    page cache before the overwrite is issued, which is all a reader of the
    same file needs. Not thread-safe for changes: one changing call at a time
    (the daemon keeps to that); :meth:`read_kept` may run beside them."""

    def __init__(self, io: StateMapIO, header: Header, *, limit: int, durable: bool = True):
        self.io = io
        self.path = io.name
        self.header = header
        self.limit = limit
        self.durable = durable
        self.region_size = header.region_size
        self.regions_total = header.volume_size // header.region_size
        self.preserved = bitarray(self.regions_total, endian="little")
        self.preserved.setall(0)
        self.records: list[tuple[int, int, int]] = []  # (file offset of the data, volume offset, length)
        self.located: dict[int, int] = {}  # preserved region -> file offset of its saved contents
        self.tail = DATA_START
        self.torn_tail: str | None = None  # why reading stopped before the end of the file (open only)

    # ----------------------------------------------------------- opening

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, volume: str, size: int, region_size: int, limit: int,
             identity: str | None = None, durable: bool = True) -> UndoLog:
        """Open (or create, empty) the undo log at ``path`` for this volume's
        geometry. :class:`~gmd.errors.Refused` naming the file when it cannot
        be opened, is damaged or belongs to another volume."""
        path = Path(path)
        created = False
        try:
            if not path.exists():
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                os.close(fd)
                created = True
            io = FileIO(path)
        except OSError as e:
            raise Refused("undo-log-unopenable", path=path, why=e.strerror or e) from None
        try:
            if created:
                fsync_directory(path.parent)
            return cls.load(io, volume=volume, size=size, region_size=region_size, limit=limit, identity=identity,
                            durable=durable)
        except BaseException:
            io.close()
            raise

    @classmethod
    def load(cls, io: StateMapIO, *, volume: str, size: int, region_size: int, limit: int,
             identity: str | None = None, durable: bool = True) -> UndoLog:
        """The log held by ``io``; an empty file is given an empty header."""
        if io.size() == 0:
            header = Header(1, STATE_EMPTY, 0, size, region_size, 0.0, 0.0, volume, identity or "")
            io.pwrite(PAGE, header.encode(), "header")
            io.fsync()
            return cls(io, header, limit=limit, durable=durable)
        reasons = []
        best: Header | None = None
        for slot in (0, 1):
            try:
                h = Header.decode(io.pread(slot * PAGE, PAGE))
            except ValueError as e:
                reasons.append(f"slot {slot}: {e}")
                continue
            if best is None or h.seq > best.seq:
                best = h
        newer = [r for r in reasons if "format version" in r]
        if best is None or newer:
            raise Refused("undo-log-damaged", path=io.name, why="; ".join(reasons))
        if (best.volume, best.volume_size, best.region_size) != (volume, size, region_size):
            raise Refused("undo-log-other-volume", path=io.name, theirs=f"{best.volume} ({best.volume_size} bytes, "
                          f"regions of {best.region_size})", ours=f"{volume} ({size} bytes, regions of {region_size})")
        if best.state == STATE_ACTIVE and identity and best.identity and best.identity != identity:
            raise Refused("undo-log-other-volume", path=io.name, theirs=f"identity {best.identity[:8]}…",
                          ours=f"identity {identity[:8]}…")
        undo = cls(io, best, limit=limit, durable=durable)
        if best.state == STATE_ACTIVE:
            undo._read_records()
        return undo

    def _read_records(self) -> None:
        """Rebuild the index from the records of the header's epoch, up to the
        first that is not whole (a torn tail: its overwrite never happened)."""
        end = self.io.size()
        pos, seq = DATA_START, 1
        rs = self.region_size
        while pos < end:
            head = self.io.pread(pos, RECORD_OVERHEAD)
            problem = None
            if len(head) < RECORD_OVERHEAD:
                problem = "a record header cut short"
            else:
                magic, length, epoch, rseq, offset = _RECORD.unpack_from(head)
                (want,) = _SUM.unpack_from(head, _RECORD.size)
                if magic != RECORD_MAGIC or epoch != self.header.epoch:
                    problem = "no record of this catch-up" if magic == RECORD_MAGIC else "no record"
                elif rseq != seq:
                    problem = f"record {rseq} where {seq} belongs"
                elif (not 0 < length <= MAX_RECORD or length % rs or offset % rs
                      or offset + length > self.header.volume_size):
                    problem = f"record {rseq} has an impossible range ({offset}, {length})"
                elif pos + RECORD_OVERHEAD + length > end:
                    problem = f"record {rseq} cut short"
                else:
                    data = self.io.pread(pos + RECORD_OVERHEAD, length)
                    if xxhash.xxh3_64_intdigest(head[:_RECORD.size] + data) != want:
                        problem = f"record {rseq} fails its checksum"
            if problem is not None:
                self.torn_tail = f"{problem} at byte {pos} (ignored: written, never made durable)"
                break
            self._index(pos + RECORD_OVERHEAD, offset, length)
            pos += RECORD_OVERHEAD + length
            seq += 1
        self.tail = pos

    def _index(self, data_at: int, offset: int, length: int) -> None:
        self.records.append((data_at, offset, length))
        rs = self.region_size
        self._located(offset // rs, (offset + length) // rs, data_at)

    def _located(self, first: int, end: int, data_at: int) -> None:
        """Regions [first, end) are saved, from ``data_at`` in the file on.
        The location is known before the bit is set: a reader that finds the
        bit finds where the contents are."""
        rs = self.region_size
        for i, region in enumerate(range(first, end)):
            self.located.setdefault(region, data_at + i * rs)
        self.preserved[first:end] = 1

    def close(self) -> None:
        self.io.close()

    # ----------------------------------------------------------- what it holds

    @property
    def active(self) -> bool:
        """A catch-up is being preserved: the log holds (or will hold) what it overwrites."""
        return self.header.state == STATE_ACTIVE

    @property
    def consistent_at(self) -> float:
        """When the image the log restores was current (active), or when the
        last catch-up ended (empty); 0.0 if never."""
        return self.header.consistent_at

    @property
    def used(self) -> int:
        """Bytes of the file in use (header pages and the records of this catch-up)."""
        return self.tail

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.tail)

    @property
    def regions(self) -> int:
        """Regions preserved in this catch-up."""
        return self.preserved.count(1) if self.active else 0

    def _merged(self, regions: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """Region runs (first, end), clipped to the volume, sorted, overlaps joined."""
        merged: list[tuple[int, int]] = []
        for first, end in sorted((max(a, 0), min(b, self.regions_total)) for a, b in regions):
            if first >= end:
                continue
            if merged and first <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((first, end))
        return merged

    def _runs(self, regions: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (first, end) runs of ``regions`` not preserved yet, split so
        that no run holds more than :data:`MAX_RECORD` bytes."""
        per = max(1, MAX_RECORD // self.region_size)
        out: list[tuple[int, int]] = []
        for first, end in self._merged(regions):
            r = first
            while r < end:
                if self.preserved[r]:
                    r += 1
                    continue
                start = r
                while r < end and not self.preserved[r] and r - start < per:
                    r += 1
                out.append((start, r))
        return out

    def holds(self, offset: int, length: int) -> bool:
        """Every region of [offset, offset+length) is saved already."""
        rs = self.region_size
        first, end = offset // rs, min(self.regions_total, (offset + length + rs - 1) // rs)
        return self.preserved[first:end].all()

    def read_kept(self, region: int) -> bytes | None:
        """The saved contents of ``region`` (the oldest, if saved twice), or
        None if it is not saved. Safe beside a running :meth:`preserve`: a
        region's location is recorded before its bit."""
        at = self.located.get(region) if self.preserved[region] else None
        if at is None:
            return None
        data = self.io.pread(at, self.region_size)
        if len(data) != self.region_size:
            raise OSError(errno.EIO, f"{self.path}: saved region {region} cut short at byte {at}")
        return data

    def region_runs(self, ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """The region runs (first, end) covering the byte ranges (offset, length)."""
        rs = self.region_size
        return [(offset // rs, (offset + length + rs - 1) // rs) for offset, length in ranges if length > 0]

    def needed(self, regions: Iterable[tuple[int, int]]) -> int:
        """Bytes the log needs, at most, to preserve the regions of the runs
        (first, end) it does not hold yet: their data, and a record header
        for each (fewer are written when regions are adjacent)."""
        missing = sum((end - first) - self.preserved[first:end].count(1) for first, end in self._merged(regions))
        return missing * (self.region_size + RECORD_OVERHEAD)

    def needed_at_most(self, nbytes: int) -> int:
        """An upper bound of what preserving ``nbytes`` of whole regions can
        take, knowing nothing of which regions they are."""
        return -(-nbytes // self.region_size) * (self.region_size + RECORD_OVERHEAD)

    # ----------------------------------------------------------- changing it

    def _write_header(self, **changes) -> None:
        header = replace(self.header, **changes, seq=self.header.seq + 1)
        self.io.pwrite((header.seq % 2) * PAGE, header.encode(), "header")
        self.io.fsync()
        self.header = header

    def begin(self, consistent_at: float, identity: str | None = None) -> None:
        """A catch-up starts: from now on the log holds the old contents of
        what it overwrites, and its image is the one current at
        ``consistent_at``. The header is durable when this returns."""
        if self.active:
            return
        self._reset()
        self._write_header(state=STATE_ACTIVE, epoch=secrets.randbits(64) or 1, consistent_at=consistent_at,
                           started_at=time.time(), identity=identity or "")

    def _reset(self) -> None:
        self.preserved.setall(0)
        self.records.clear()
        self.located.clear()
        self.tail = DATA_START
        self.torn_tail = None

    def preserve(self, device: Device, requests: list[list[tuple[int, int]]]) -> list[BaseException | None]:
        """Save the current contents of the regions each request (a list of
        byte ranges) is about to overwrite and that are not saved yet; one
        ``fdatasync`` for them all. Returns, per request, None (its regions
        are durable here: its write may go ahead) or the exception refusing
        it (:class:`UndoLogFull`, with nothing of it appended). A failing
        append or fsync raises for every request: none may overwrite."""
        if not self.active:
            raise RuntimeError(f"{self.path}: preserve while no catch-up is active")
        answers: list[BaseException | None] = []
        start_tail, start_records = self.tail, len(self.records)
        batch: list[tuple[int, int]] = []  # region runs appended by this batch (indexed after the fsync)
        where: list[int] = []  # the file offset of each run's data
        try:
            for ranges in requests:
                runs = list(self._minus(self._runs(self.region_runs(ranges)), batch))
                needed = sum((b - a) * self.region_size + RECORD_OVERHEAD for a, b in runs)
                if self.tail + needed > self.limit:
                    answers.append(UndoLogFull(self.path, needed, self.remaining))
                    continue
                for a, b in runs:
                    where.append(self._append(device, a, b))
                    batch.append((a, b))
                answers.append(None)
            if batch and self.durable:
                self.io.fsync()
        except BaseException:
            self.tail = start_tail  # what was appended is not durable: written over next time
            del self.records[start_records:]
            raise
        for (a, b), data_at in zip(batch, where):
            self._located(a, b, data_at)
        return answers

    @staticmethod
    def _minus(runs: list[tuple[int, int]], taken: list[tuple[int, int]]) -> Iterable[tuple[int, int]]:
        """``runs`` without the regions of ``taken`` (runs appended earlier in the same batch)."""
        for a, b in runs:
            cuts = sorted((x, y) for x, y in taken if x < b and a < y)
            pos = a
            for x, y in cuts:
                if x > pos:
                    yield pos, x
                pos = max(pos, y)
            if pos < b:
                yield pos, b

    def _append(self, device: Device, first: int, end: int) -> int:
        """Append one record of regions [first, end)'s current contents; the
        file offset of its data."""
        rs = self.region_size
        offset, length = first * rs, (end - first) * rs
        data = device.read_sync(offset, length)
        if len(data) != length:
            raise OSError(errno.EIO, f"short read of the backing device at {offset} ({len(data)} of {length})")
        record = encode_record(self.header.epoch, len(self.records) + 1, offset, data)
        self.io.pwrite(self.tail, record, "record")
        self.records.append((self.tail + RECORD_OVERHEAD, offset, length))
        self.tail += len(record)
        return self.tail - length

    def rollback(self, device: Device) -> Rollback:
        """Write every saved region back (newest record first, so the oldest
        contents of a region win), make the device durable, then mark the log
        empty. Safe to repeat after a crash at any point: the records hold the
        contents from before the catch-up, and the header stays active until
        the device is synced."""
        if not self.active:
            return Rollback(0, 0, 0, self.consistent_at)
        restored = 0
        for data_at, offset, length in reversed(self.records):
            data = self.io.pread(data_at, length)
            if len(data) != length:
                raise OSError(errno.EIO, f"undo log {self.path}: record at {data_at} cut short while rolling back")
            device.write_sync(offset, data)
            restored += length
        device.sync()
        runs = tuple(self._runs_of(self.preserved))
        report = Rollback(restored, self.preserved.count(1), len(self.records), self.consistent_at, runs)
        self._reset()
        self._write_header(state=STATE_EMPTY)
        return report

    @staticmethod
    def _runs_of(bits: bitarray) -> Iterable[tuple[int, int]]:
        pos, n = 0, len(bits)
        while pos < n:
            try:
                start = bits.index(1, pos)
            except ValueError:
                return
            try:
                end = bits.index(0, start)
            except ValueError:
                end = n
            yield start, end
            pos = end

    def discard(self, consistent_at: float | None = None) -> None:
        """The catch-up is over and its data durable: forget what was saved.
        ``consistent_at`` (default now) is when the disk was last known consistent."""
        self._reset()
        self._write_header(state=STATE_EMPTY, consistent_at=time.time() if consistent_at is None else consistent_at)

    def status(self) -> dict:
        """``undo_log`` in the status: path, size (the bound), used, regions, active."""
        return {"path": self.path, "size": self.limit, "used": self.used if self.active else 0,
                "regions": self.regions, "active": self.active}
