"""The state map of one member: in-memory bitmaps, crash-safe commits, recovery.

Invariants kept here (docs/DESIGN.md, "The state map on disk"):

* On-disk out-of-sync bits are exact for every extent that is not hot in the
  on-disk intent bitmap. A caller that sets an out-of-sync bit outside a durably
  hot extent must commit before it acknowledges the write the bit covers.
* An extent's intent bit is set on disk before data is written to it (the caller
  waits for :attr:`StateMap.durable_changes` to pass the value
  :meth:`StateMap.intent_acquire` returned), and cleared only in a commit whose
  earlier phase made the out-of-sync bits of that extent durable.
* ``clean`` is set only in the last phase of a commit, after every bitmap page is
  durable; a commit that clears it writes the superblock in its first phase, so
  no bitmap change of a session reaches the disk under a "clean" superblock.
  Marks and intents are refused until :meth:`StateMap.begin_use` cleared it, and
  recovery ORs whatever intent bits it finds even in a map marked clean.

Every bitmap page carries a checksummed header (:mod:`statemap.format`), so a
torn, zeroed or misplaced page is detected when the map is read and never
trusted: it reads as all ones (its regions out of sync, its extents hot), is
named in :attr:`StateMap.warnings` and the log, and is rewritten with that
content when the map is writable. A commit may therefore tear a page freely.

A commit is three phases, each ``pwrite`` of whole 4 KiB pages then ``fsync``,
skipped when empty: out-of-sync pages, intent pages, superblock (the superblock
goes first instead when the commit clears the clean flag). A crash anywhere
in it leaves a map that still satisfies the invariants (see tests/unit/
test_statemap_crash.py, which checks every crash image hypothesis can build).

Threading: all methods but :meth:`CommitPlan.run` are meant for one thread (the
daemon's event loop) and never block on I/O except the explicit ``commit`` and
the constructors; :meth:`CommitPlan.run` holds only bytes copies, so it may run
in a worker thread while the owner keeps marking bits. Only one plan may be in
flight at a time.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
import uuid as uuidlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bitarray import bitarray

from .errors import GeometryMismatch, StateMapCorrupt, StateMapError, StateMapFull, StateMapVersionError
from .fileio import FileIO, StateMapIO, write_new_file
from .format import (
    AREA_INTENT,
    AREA_OUT_OF_SYNC,
    BITS_PER_PAGE,
    DEFAULT_PEER_SLOTS,
    FORMAT_VERSION,
    HISTORY_LENGTH,
    INTENT_SLOT,
    LEGACY_VERSION,
    MAX_NAME,
    NO_GENERATION,
    PAGE,
    PAGE_BITS_BYTES,
    PAGE_BITS_OFFSET,
    SLOT_SIZE,
    Fence,
    Layout,
    PeerRecord,
    Superblock,
    check_page,
    decode_slot,
    encode_page,
    encode_slot,
    map_id,
    pick_slot,
)
from .states import CopyKind, DiskState, Role

log = logging.getLogger(__name__)

DEFAULT_HOT_LIMIT = 1024


class StateMapBusy(StateMapError):
    """Another process (normally the node daemon) holds the map open for writing."""


@dataclass
class _HotExtent:
    refs: int = 0  # writes in flight to this extent
    last_seq: int = 0  # sequence number of the newest write to it


@dataclass(frozen=True)
class BadPage:
    """A bitmap page that failed its check when the map was read."""

    area: str  # "intent" or "oos:<member>", as in the dirty-page keys
    slot: int | None  # the member slot of an out-of-sync page
    page: int  # index within its area
    problem: str


@dataclass(frozen=True)
class Recovery:
    """What :meth:`StateMap.recover` found and did."""

    needed: bool  # the map was not closed cleanly
    hot_extents: tuple[int, ...]  # extents that were hot on disk (mini-merge set)
    regions: int  # regions ORed into each member's out-of-sync bitmap
    bytes: int  # the same in bytes


@dataclass
class CommitPlan:
    """The writes one commit makes, as bytes, in phase order. Holds no reference to
    the live bitmaps, so :meth:`run` may execute in another thread."""

    phases: list[list[tuple[int, bytes, str]]]
    changes: int  # the owner's change counter this plan makes durable
    clean: bool  # the clean flag this plan leaves on disk
    dirty_versions: dict[tuple[str, int], int]  # (area, page) -> version captured
    sb_version: int | None
    seq: int | None

    @property
    def bytes(self) -> int:
        return sum(len(d) for phase in self.phases for _, d, _ in phase)

    def run(self, io: StateMapIO) -> None:
        """Write each phase and fsync it before the next one starts."""
        for phase in self.phases:
            if not phase:
                continue
            for offset, data, what in phase:
                io.pwrite(offset, data, what)
            io.fsync()


@dataclass
class _Dirty:
    pages: dict[tuple[str, int], int] = field(default_factory=dict)  # -> version


def _new_bits(n: int) -> bitarray:
    b = bitarray(n, endian="little")
    b.setall(0)
    return b


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_geometry_values(size: int, region_size: int, extent_size: int) -> None:
    """Raise ValueError unless the geometry is one a state map can describe."""
    if not _is_power_of_two(region_size) or region_size < 512:
        raise ValueError(f"region size {region_size} is not a power of two >= 512")
    if not _is_power_of_two(extent_size) or extent_size < region_size:
        raise ValueError(f"extent size {extent_size} is not a power of two >= region size")
    if size <= 0 or size % region_size:
        raise ValueError(f"volume size {size} is not a positive multiple of the region size")


class StateMap:
    """One member's state map, loaded in memory, written back by commits."""

    def __init__(self, io: StateMapIO, sb: Superblock, seq: int, *, version: int = FORMAT_VERSION,
                 hot_limit: int = DEFAULT_HOT_LIMIT):
        self.io = io
        self.sb = sb
        self.version = version  # LEGACY_VERSION: read as found, never written
        self.layout: Layout = sb.layout_of(version)
        self._bpp = self.layout.bits_per_page
        self._owner = map_id(sb.uuid)
        self.hot_limit = hot_limit
        self.warnings: list[str] = []
        self.bad_pages: list[BadPage] = []  # pages that failed their check at load
        self._seq = seq
        self.intent = _new_bits(self.layout.extents)
        self.oos: dict[str, bitarray] = {}
        self._hot: OrderedDict[int, _HotExtent] = OrderedDict()
        self._flushed_seq = 0
        self._dirty = _Dirty()
        self._sb_version: int | None = None  # change number of the newest unsaved sb edit
        self._clean_on_disk = sb.clean
        self.changes = 0  # bumped by every in-memory change
        self.durable_changes = 0  # the highest change number known on disk
        self._inflight = False

    # ------------------------------------------------------------------ creation

    @classmethod
    def new_superblock(
        cls,
        *,
        volume: str,
        size: int,
        region_size: int,
        extent_size: int,
        member: str,
        peers: Iterable[str],
        peer_slots: int = DEFAULT_PEER_SLOTS,
        volume_uuid: str | None = None,
        now: float | None = None,
    ) -> Superblock:
        """A superblock for a new map: disk inconsistent, clean, no generation."""
        check_geometry_values(size, region_size, extent_size)
        peers = list(peers)
        for name in [volume, member, *peers]:
            if not name or len(name.encode()) > MAX_NAME:
                raise ValueError(f"name {name!r} must be 1..{MAX_NAME} bytes")
        if member in peers:
            raise ValueError(f"member {member!r} cannot also be its own peer")
        if len(peers) > peer_slots:
            raise StateMapFull(f"{len(peers)} other members but only {peer_slots} slots")
        ts = time.time() if now is None else now
        sb = Superblock(
            volume=volume,
            uuid=volume_uuid or uuidlib.uuid4().hex,
            size=size,
            region_size=region_size,
            extent_size=extent_size,
            member=member,
            peer_slots=peer_slots,
            peers={name: PeerRecord(slot=i) for i, name in enumerate(peers)},
            created=ts,
            updated=ts,
        )
        encode_slot(sb, 1)  # fails now, not later, if it cannot fit its slot
        return sb

    @classmethod
    def create(cls, path: str | os.PathLike[str], **kw) -> StateMap:
        """Create (atomically replacing any file there) and open a new map at ``path``.

        Keyword arguments as for :meth:`new_superblock`. Every page is written
        (a hole or a zeroed page is damage, not "all in sync"), so later commits
        are plain overwrites.
        """
        sb = cls.new_superblock(**kw)
        write_new_file(Path(path), sb.layout.file_size, _image(sb, 0, None, {}))
        return cls.open(path)

    @classmethod
    def create_in(cls, io: StateMapIO, **kw) -> StateMap:
        """Create a new map inside an (empty) :class:`StateMapIO`; for tests."""
        sb = cls.new_superblock(**kw)
        for offset, data in _image(sb, 0, None, {}):
            io.pwrite(offset, data, "create")
        io.fsync()
        return cls.load(io)

    # ------------------------------------------------------------------- opening

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, readonly: bool = False, **kw) -> StateMap:
        """Open the map at ``path``. Read-write opens take an exclusive lock so an
        offline command cannot change a map a running daemon is using."""
        io = _open_file(path, readonly=readonly)
        assert io is not None
        try:
            if not readonly:
                _lock_exclusive(io, str(path))
            sm = cls.load(io, **kw)
        except BaseException:
            io.close()
            raise
        if sm.version != FORMAT_VERSION and not readonly:
            return cls._upgrade(sm, Path(path), **kw)
        return sm

    @classmethod
    def _upgrade(cls, old: StateMap, path: Path, **kw) -> StateMap:
        """Rewrite a version-1 map (open, locked, read) as version 2 beside it and
        rename it over: a crash leaves the old map or the new one, never a mix."""
        oos = {old.sb.peers[name].slot: bits for name, bits in old.oos.items()}
        try:
            write_new_file(path, old.sb.layout.file_size, _image(old.sb, old._seq, old.intent, oos))
        except OSError as e:
            old.close()
            raise StateMapError(
                f"{path}: cannot upgrade the state map to format {FORMAT_VERSION}: {e.strerror}; "
                "the version-1 map is unchanged"
            ) from None
        old.close()
        log.warning("%s: state map upgraded from format %d to %d", path, old.version, FORMAT_VERSION)
        return cls.open(path, **kw)

    @classmethod
    def load(cls, io: StateMapIO, **kw) -> StateMap:
        """Read and validate a map from ``io``; raises on anything unusable."""
        path = io.name
        size = io.size()
        if size < 2 * SLOT_SIZE:
            raise StateMapCorrupt(
                f"{path}: truncated: {size} bytes, too short to hold the two superblock slots "
                f"({2 * SLOT_SIZE} bytes)"
            )
        try:
            a = decode_slot(io.pread(0, SLOT_SIZE))
            b = decode_slot(io.pread(SLOT_SIZE, SLOT_SIZE))
        except StateMapVersionError as e:
            raise StateMapVersionError(f"{path}: {e}") from None
        sb, seq, version, warnings = pick_slot(a, b, path)
        try:
            check_geometry_values(sb.size, sb.region_size, sb.extent_size)
        except ValueError as e:
            raise StateMapCorrupt(f"{path}: superblock holds an impossible geometry: {e}") from None
        needed = sb.layout_of(version).file_size
        if size < needed:
            raise StateMapCorrupt(f"{path}: truncated: {size} bytes, but its geometry needs {needed}")
        sm = cls(io, sb, seq, version=version, **kw)
        for w in warnings:
            log.warning("%s", w)
        sm.warnings = warnings
        lay = sm.layout
        if version == LEGACY_VERSION:
            sm.intent = sm._read_legacy_bits(lay.intent_offset, lay.intent_bytes, lay.extents)
            for name, peer in sb.peers.items():
                sm.oos[name] = sm._read_legacy_bits(lay.oos_offset(peer.slot), lay.oos_bytes, lay.regions)
        else:
            sm.intent = sm._read_area(AREA_INTENT, INTENT_SLOT, None)
            for name, peer in sb.peers.items():
                sm.oos[name] = sm._read_area(AREA_OUT_OF_SYNC, peer.slot, name)
        writable = not getattr(io, "readonly", False)
        for bad in sm.bad_pages:
            w = sm._bad_page_warning(bad, rewritten=writable)
            log.warning("%s", w)
            sm.warnings.append(w)
        for extent in sm.intent.search(1):
            sm._hot[extent] = _HotExtent()
        if sm.bad_pages and writable:
            # Put the pessimistic content on disk now, so the damage is repaired
            # (and stays assumed-worst) whatever this process does next.
            for bad in sm.bad_pages:
                sm._touch(bad.area, bad.page)
            sm.commit()
        sm.durable_changes = sm.changes
        return sm

    def _read_area(self, area: int, slot: int, member: str | None) -> bitarray:
        """Read one version-2 bitmap area, checking every page; a page that fails
        reads as all ones (every extent hot, every region out of sync) and is
        listed in :attr:`bad_pages`."""
        lay = self.layout
        npages = lay.intent_pages if area == AREA_INTENT else lay.oos_pages
        nbits = lay.extents if area == AREA_INTENT else lay.regions
        offset = lay.page_offset(area, slot, 0)
        data = memoryview(self.io.pread(offset, npages * PAGE))
        if len(data) != npages * PAGE:
            raise StateMapCorrupt(f"{self.io.name}: short read of {len(data)} bytes at offset {offset}")
        key = "intent" if member is None else f"oos:{member}"
        payload = bytearray()
        for i in range(npages):
            page = data[i * PAGE : (i + 1) * PAGE]
            problem = check_page(page, area, slot, i, self._owner)
            if problem is None:
                payload += page[PAGE_BITS_OFFSET:]
            else:
                payload += b"\xff" * PAGE_BITS_BYTES
                self.bad_pages.append(BadPage(key, None if member is None else slot, i, problem))
        bits = bitarray(endian="little")
        bits.frombytes(bytes(payload))
        del bits[nbits:]
        return bits

    def _bad_page_warning(self, bad: BadPage, *, rewritten: bool) -> str:
        """One line naming the file, area, member slot and page, and what is assumed."""
        done = "; page rewritten so" if rewritten else ";"
        if bad.area == "intent":
            cover = self.layout.page_bits(AREA_INTENT, bad.page)
            return (
                f"{self.io.name}: intent bitmap page {bad.page} (extents {cover.start}..{cover.stop - 1}) "
                f"is damaged: {bad.problem}{done} every extent it covers counts as hot "
                "(recovery marks them out of sync for every member)"
            )
        member = bad.area.split(":", 1)[1]
        cover = self.layout.page_bits(AREA_OUT_OF_SYNC, bad.page)
        return (
            f"{self.io.name}: out-of-sync bitmap of member {member} (slot {bad.slot}) page {bad.page} "
            f"(regions {cover.start}..{cover.stop - 1}) is damaged: {bad.problem}{done} every region "
            f"it covers counts as out of sync for {member}"
        )

    def _read_legacy_bits(self, offset: int, length: int, nbits: int) -> bitarray:
        """Read a version-1 bitmap: raw pages, holes read as zeros."""
        bits = _new_bits(nbits)
        for start, n in self.io.data_extents(offset, length):
            data = self.io.pread(start, n)
            if len(data) != n:
                raise StateMapCorrupt(f"{self.io.name}: short read at offset {start}")
            first_bit = (start - offset) * 8
            if first_bit >= nbits:
                continue
            chunk = bitarray(endian="little")
            chunk.frombytes(data)
            last_bit = min(nbits, first_bit + len(chunk))
            bits[first_bit:last_bit] = chunk[: last_bit - first_bit]
        return bits

    def close(self) -> None:
        self.io.close()

    def check_geometry(self, *, volume: str, size: int, region_size: int, extent_size: int, member: str) -> None:
        """Raise :class:`GeometryMismatch` naming the first field that differs."""
        for fld, expected in (
            ("volume", volume),
            ("member", member),
            ("size", size),
            ("region_size", region_size),
            ("extent_size", extent_size),
        ):
            on_disk = getattr(self.sb, fld)
            if on_disk != expected:
                raise GeometryMismatch(self.io.name, fld, on_disk, expected)

    # ----------------------------------------------------------------- geometry

    @property
    def peers(self) -> list[str]:
        return list(self.sb.peers)

    def regions_of(self, offset: int, length: int) -> range:
        """Indexes of the regions that bytes [offset, offset+length) touch."""
        if length <= 0:
            return range(0)
        rs = self.layout.region_size
        return range(offset // rs, (offset + length - 1) // rs + 1)

    def extents_of(self, offset: int, length: int) -> range:
        if length <= 0:
            return range(0)
        es = self.layout.extent_size
        return range(offset // es, (offset + length - 1) // es + 1)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.sb.size:
            raise ValueError(f"range {offset}+{length} outside volume of {self.sb.size} bytes")

    # ---------------------------------------------------------- change tracking

    def _touch(self, area: str, page: int) -> None:
        self.changes += 1
        self._dirty.pages[(area, page)] = self.changes

    def _touch_sb(self) -> None:
        self.changes += 1
        self._sb_version = self.changes

    @property
    def has_unsaved_changes(self) -> bool:
        return bool(self._dirty.pages) or self._sb_version is not None

    # ----------------------------------------------------------- out-of-sync bits

    def _peer_bits(self, member: str) -> bitarray:
        try:
            return self.oos[member]
        except KeyError:
            raise StateMapError(
                f"{self.io.name}: {member!r} is not a member in this map (members: {', '.join(self.oos) or 'none'})"
            ) from None

    def _require_in_use(self) -> None:
        if self.sb.clean:
            raise StateMapError(
                f"{self.io.name}: state map is marked clean; begin_use() must precede writes"
            )

    def _set_bits(self, member: str, regions: range, value: bool) -> int:
        bits = self._peer_bits(member)
        if not regions:
            return 0
        area = f"oos:{member}"
        changed = 0
        # Walk page by page so each touched page is marked dirty once.
        start = regions.start
        while start < regions.stop:
            page = start // self._bpp
            stop = min(regions.stop, (page + 1) * self._bpp)
            n_set = bits.count(1, start, stop)
            delta = (stop - start - n_set) if value else n_set
            if delta:
                bits[start:stop] = value
                self._touch(area, page)
                changed += delta
            start = stop
        return changed

    def mark_out_of_sync(self, member: str, offset: int, length: int) -> int:
        """Note that ``member`` may lack bytes [offset, offset+length).

        Returns how many regions were newly marked; when non-zero and the
        regions' extents are not durably hot, commit before acknowledging.
        """
        self._check_range(offset, length)
        self._require_in_use()
        return self._set_bits(member, self.regions_of(offset, length), True)

    def mark_regions_out_of_sync(self, member: str, regions: range) -> int:
        self._require_in_use()
        return self._set_bits(member, regions, True)

    def clear_out_of_sync(self, member: str, regions: range) -> int:
        """Clear regions that ``member`` is known to hold now (acked and flushed)."""
        return self._set_bits(member, regions, False)

    def mark_all_out_of_sync(self, member: str) -> int:
        self._require_in_use()
        return self._set_bits(member, range(self.layout.regions), True)

    def out_of_sync_regions(self, member: str) -> bitarray:
        """A copy of ``member``'s out-of-sync bitmap (one bit per region)."""
        return self._peer_bits(member).copy()

    def out_of_sync_in(self, member: str, regions: range) -> list[int]:
        """The regions of ``regions`` marked for ``member`` (no copy of the bitmap)."""
        bits = self._peer_bits(member)
        if not regions:
            return []
        return [regions.start + i for i in bits[regions.start:regions.stop].search(1)]

    def out_of_sync_bytes(self, member: str) -> int:
        """Bytes ``member`` lacks by this map: its bitmap, plus everything above the
        fence of a pending full copy or merge."""
        bits = self._peer_bits(member)
        rs = self.layout.region_size
        copy = self.sb.peers[member].copy
        if copy is None:
            return bits.count(1) * rs
        fence_region = min(self.layout.regions, copy.fence // rs)
        return bits.count(1, 0, fence_region) * rs + (self.sb.size - fence_region * rs)

    # ------------------------------------------------------------------ intents

    def intent_acquire(self, offset: int, length: int) -> int:
        """Make the extents of a write hot before its data is issued.

        Returns the change number that must be durable (``durable_changes >=``)
        before the data may be written; ``0`` when every extent was already hot
        and nothing needs to wait. May retire idle extents to stay near
        :attr:`hot_limit` (a soft limit: extents with writes in flight or not yet
        flushed everywhere are never retired).
        """
        self._check_range(offset, length)
        self._require_in_use()
        need = 0
        for extent in self.extents_of(offset, length):
            hot = self._hot.get(extent)
            if hot is None:
                hot = self._hot[extent] = _HotExtent()
                self.intent[extent] = 1
                self._touch("intent", extent // self._bpp)
                need = self.changes
            else:
                self._hot.move_to_end(extent)
                if (("intent", extent // self._bpp) in self._dirty.pages) and self.intent[extent]:
                    # Set, or set again after a retirement, but not yet on disk.
                    need = max(need, self._dirty.pages[("intent", extent // self._bpp)])
            hot.refs += 1
        if len(self._hot) > self.hot_limit:
            self.retire_idle(len(self._hot) - self.hot_limit)
        return need

    def intent_acquire_if_ready(self, offset: int, length: int) -> bool:
        """:meth:`intent_acquire` for a write that need not wait: every extent
        it touches is hot with its intent bit on disk already. False, changing
        nothing, when one is not (the caller takes the path that commits)."""
        self._check_range(offset, length)
        self._require_in_use()
        extents = self.extents_of(offset, length)
        for extent in extents:
            if (extent not in self._hot or not self.intent[extent]
                    or ("intent", extent // self._bpp) in self._dirty.pages):
                return False
        for extent in extents:
            self._hot.move_to_end(extent)
            self._hot[extent].refs += 1
        return True

    def intent_prefetch(self, extents: range) -> int:
        """Make ``extents`` hot ahead of a sequential stream, holding no write, so
        they go to disk in the commit the stream is waiting for anyway. Returns
        the change number to wait for (0 if all were hot). Idle and most recently
        used: retired last. Costs at most their regions in a merge after a crash."""
        need = 0
        for extent in extents:
            if not 0 <= extent < self.layout.extents or extent in self._hot:
                continue
            self._require_in_use()
            self._hot[extent] = _HotExtent()
            self.intent[extent] = 1
            self._touch("intent", extent // self._bpp)
            need = self.changes
        return need

    def is_hot(self, extent: int) -> bool:
        return extent in self._hot

    def intent_release(self, offset: int, length: int, seq: int) -> None:
        """A write (sequence ``seq``) to these extents completed on every member."""
        for extent in self.extents_of(offset, length):
            hot = self._hot.get(extent)
            if hot is None or hot.refs <= 0:
                raise StateMapError(f"intent release of extent {extent} that holds no write")
            hot.refs -= 1
            hot.last_seq = max(hot.last_seq, seq)

    def note_flushed(self, seq: int) -> None:
        """Every write up to ``seq`` is durable on every member (a barrier completed)."""
        self._flushed_seq = max(self._flushed_seq, seq)

    def _retirable(self, hot: _HotExtent) -> bool:
        return hot.refs == 0 and hot.last_seq <= self._flushed_seq

    def retire_idle(self, limit: int | None = None) -> int:
        """Clear the intent bits of up to ``limit`` idle extents, least recently used
        first. Their out-of-sync bits go to disk in the same commit, earlier."""
        retired = 0
        for extent in list(self._hot):
            if limit is not None and retired >= limit:
                break
            if self._retirable(self._hot[extent]):
                del self._hot[extent]
                self.intent[extent] = 0
                self._touch("intent", extent // self._bpp)
                retired += 1
        return retired

    def hot_extents(self) -> list[int]:
        return list(self._hot)

    def durably_hot(self, offset: int, length: int) -> bool:
        """True if every extent of the range is hot in the on-disk intent bitmap, so
        out-of-sync marks inside it may be committed lazily."""
        for extent in self.extents_of(offset, length):
            if not self.intent[extent] or ("intent", extent // self._bpp) in self._dirty.pages:
                return False
        return True

    # ----------------------------------------------------------------- recovery

    def recover(self) -> Recovery:
        """After an unclean stop, OR every hot extent into every member's
        out-of-sync bitmap and clear the intent bitmap; commit afterwards.

        The result names the hot extents: the regions a mini-merge must make
        equal on all members. Idempotent: a crash during the commit that follows
        leaves the intent bits set, and running it again gives the same result.
        """
        hot = tuple(self.intent.search(1))
        if self.sb.clean and not hot:
            return Recovery(False, (), 0, 0)
        rpe = self.layout.regions_per_extent
        regions = 0
        for extent in hot:
            r = range(extent * rpe, min(self.layout.regions, (extent + 1) * rpe))
            regions += len(r)
            for member in self.oos:
                self._set_bits(member, r, True)
        for extent in hot:
            self.intent[extent] = 0
            self._touch("intent", extent // self._bpp)
        self._hot.clear()
        return Recovery(True, hot, regions, regions * self.layout.region_size)

    def fold_intents(self, *, source: str | None = None) -> tuple[int, ...]:
        """The writes behind the hot extents may now differ between members (the
        primary ``source`` they came from is gone, or a new one takes over):
        mark every region of every hot extent out of sync for every member but
        ``source`` (which wrote them, so lacks none of them), then retire the
        idle extents and restart the flushed sequence (a new primary's sequence
        is judged afresh). Extents with writes still in flight stay hot and
        retire once those end. Returns the extents folded; commit afterwards
        (the out-of-sync pages go to disk before the intent pages)."""
        hot = tuple(sorted(set(self.intent.search(1)) | set(self._hot)))
        rpe = self.layout.regions_per_extent
        for extent in hot:
            r = range(extent * rpe, min(self.layout.regions, (extent + 1) * rpe))
            for member in self.oos:
                if member != source:
                    self._set_bits(member, r, True)
        for extent in hot:
            h = self._hot.get(extent)
            if h is not None and h.refs > 0:
                h.last_seq = 0  # retire as soon as its writes end
                continue
            self._hot.pop(extent, None)
            if self.intent[extent]:
                self.intent[extent] = 0
                self._touch("intent", extent // self._bpp)
        self._flushed_seq = 0
        return hot

    def begin_use(self) -> None:
        """Mark the map in use (unclean); commit before the first data write."""
        if self.sb.clean:
            self.sb.clean = False
            self._touch_sb()

    def prepare_clean_close(self) -> None:
        """Retire every extent and set the clean flag; commit afterwards.

        The caller must have completed and flushed every write everywhere (and
        said so with :meth:`note_flushed`); an extent still holding writes is an
        error, because marking the map clean would hide it from recovery.
        """
        busy = [e for e, h in self._hot.items() if not self._retirable(h)]
        if busy:
            raise StateMapError(f"cannot close cleanly: extents {busy[:8]} still have unflushed writes")
        self.retire_idle()
        self.sb.clean = True
        self.sb.clean_stop = time.time()
        self._touch_sb()

    # ------------------------------------------------------- superblock fields

    def set_role(self, role: Role) -> None:
        if self.sb.role != role:
            self.sb.role = role
            self._touch_sb()

    def set_disk(self, disk: DiskState) -> None:
        if self.sb.disk != disk:
            self.sb.disk = disk
            self._touch_sb()

    def set_peer_disk(self, member: str, disk: DiskState) -> None:
        peer = self._peer(member)
        if peer.disk != disk:
            peer.disk = disk
            self._touch_sb()

    def set_peer_copy(self, member: str, copy: Fence | None) -> None:
        """Start (or end, with None) a full copy or full merge towards ``member``."""
        self._peer(member).copy = copy
        self._touch_sb()

    def advance_peer_fence(self, member: str, fence: int) -> None:
        copy = self._peer(member).copy
        if copy is None:
            raise StateMapError(f"no copy or merge is running towards {member!r}")
        if not 0 <= fence <= self.sb.size:
            raise ValueError(f"fence {fence} outside the volume")
        copy.fence = fence
        self._touch_sb()

    def set_local_copy(self, copy: Fence | None) -> None:
        """This member is (or stops being) the target of a copy, current below fence."""
        self.sb.local_copy = copy
        self._touch_sb()

    def set_forced_primary(self, forced: bool) -> None:
        """``gmd primary --force`` holds until the member is demoted."""
        if self.sb.forced_primary != forced:
            self.sb.forced_primary = forced
            self._touch_sb()

    def set_promoted_at(self, when: float) -> None:
        self.sb.promoted_at = when
        self._touch_sb()

    def set_expected_votes(self, votes: int | None) -> None:
        self.sb.expected_votes = votes
        self._touch_sb()

    def _peer(self, member: str) -> PeerRecord:
        try:
            return self.sb.peers[member]
        except KeyError:
            raise StateMapError(f"{member!r} is not a member in this map") from None

    def add_peer(self, member: str) -> None:
        """Give a newly configured member a slot; it needs a full copy."""
        if member in self.sb.peers or member == self.sb.member:
            raise StateMapError(f"{member!r} is already a member")
        used = {p.slot for p in self.sb.peers.values()}
        free = [s for s in range(self.sb.peer_slots) if s not in used]
        if not free:
            raise StateMapFull(f"no free member slot (all {self.sb.peer_slots} in use)")
        if len(member.encode()) > MAX_NAME:
            raise ValueError(f"member name {member!r} longer than {MAX_NAME} bytes")
        self.sb.peers[member] = PeerRecord(slot=free[0], copy=Fence(CopyKind.FULL, 0))
        # The slot may hold bits of a member removed earlier: start from zeros.
        self.oos[member] = _new_bits(self.layout.regions)
        for page in range(self.layout.oos_pages):
            self._touch(f"oos:{member}", page)
        self._touch_sb()
        try:
            encode_slot(self.sb, self._seq + 1)
        except StateMapFull:
            del self.sb.peers[member]
            del self.oos[member]
            raise

    # ------------------------------------------------------------- generations

    def start_new_generation(self, generation: str | None = None) -> str:
        """Begin a new data generation (``generation``, or a random id, e.g. one
        already registered with a witness); the old one goes to the history."""
        gens = self.sb.generations
        if gens.current != NO_GENERATION:
            gens.history = [gens.current, *gens.history][:HISTORY_LENGTH]
        gens.current = generation or secrets.token_hex(8)
        self._touch_sb()
        return gens.current

    def set_bitmap_generation(self, generation: str, member: str | None = None) -> None:
        """Record the generation a bitmap is relative to: ``member``'s, or the
        map-wide one when None."""
        if member is not None:
            self._peer(member).bitmap_gen = generation
        self.sb.generations.bitmap = generation
        self._touch_sb()

    def adopt_generation(self, generation: str) -> None:
        """Take a peer's current generation as ours (we hold the same data now)."""
        gens = self.sb.generations
        if gens.current == generation:
            return
        if gens.current != NO_GENERATION:
            gens.history = [gens.current, *gens.history][:HISTORY_LENGTH]
        gens.current = generation
        self._touch_sb()

    @property
    def identity(self) -> str | None:
        """The volume identity this member's data belongs to, or None if it has none
        yet (a fresh map, or a copy target waiting to receive a source's life)."""
        return self.sb.generations.identity

    def adopt_identity(self, identity: str) -> None:
        """Take the volume identity a member learned from its primary; durable at the
        next commit, like every superblock change. Refuses to replace a different
        identity: that member belongs to another volume's life (``gmd clean`` it)."""
        if not isinstance(identity, str) or not identity:
            raise ValueError(f"volume identity {identity!r} is not a non-empty string")
        gens = self.sb.generations
        if gens.identity == identity:
            return
        if gens.identity:
            raise StateMapError(
                f"{self.io.name}: state map belongs to volume identity {gens.identity}, "
                f"refusing to adopt another one ({identity}); 'gmd clean' this member to "
                "let it receive a full copy"
            )
        gens.identity = identity
        self._touch_sb()

    @property
    def is_fresh(self) -> bool:
        """True for a map whose member never held data of any generation."""
        g = self.sb.generations
        return g.current == NO_GENERATION and not g.history

    # ------------------------------------------------ copy source / copy target

    def make_copy_source(self, *, full_copy: bool = True) -> None:
        """``gmddirty``: this member's data is the truth; every other member gets
        a full copy from it. Starts a new generation, and the volume identity if
        the map has none yet (an existing one is kept: same volume, new generation).

        ``full_copy=False`` is the operator's word that the other members hold
        identical data already (all freshly zeroed, say): they need nothing, and a
        member that never held data adopts this generation when it connects."""
        for member in self.oos:
            self._set_bits(member, range(self.layout.regions), False)
            self.set_peer_copy(member, Fence(CopyKind.FULL, 0) if full_copy else None)
            self.set_peer_disk(member, DiskState.INCONSISTENT if full_copy else DiskState.UNKNOWN)
        self._clear_intents()
        self.set_local_copy(None)
        self.set_disk(DiskState.UPTODATE)
        if not self.sb.generations.identity:
            # The volume's life starts here; a later gmd dirty keeps it.
            self.sb.generations.identity = secrets.token_hex(16)
        self.start_new_generation()
        self.set_bitmap_generation(self.sb.generations.current)

    def make_copy_target(self) -> None:
        """``gmdclean``: this member's data is to be replaced by a full copy from
        an up-to-date member; it has nothing to send anyone. Its volume identity is
        cleared: it takes the source's with the copy (:meth:`adopt_identity`)."""
        for member in self.oos:
            self._set_bits(member, range(self.layout.regions), False)
            self.set_peer_copy(member, None)
            self.set_peer_disk(member, DiskState.UNKNOWN)
        self._clear_intents()
        gens = self.sb.generations
        if gens.current != NO_GENERATION:
            gens.history = [gens.current, *gens.history][:HISTORY_LENGTH]
        gens.current = NO_GENERATION
        gens.bitmap = NO_GENERATION
        gens.identity = None  # it will receive the source's life, and its identity
        self.set_local_copy(Fence(CopyKind.FULL, 0))
        self.set_disk(DiskState.INCONSISTENT)
        self._touch_sb()

    def _clear_intents(self) -> None:
        for extent in self.intent.search(1):
            self.intent[extent] = 0
            self._touch("intent", extent // self._bpp)
        self._hot.clear()

    def local_out_of_sync_bytes(self) -> int:
        """Bytes this member itself lacks, as far as its own map knows."""
        if self.sb.local_copy is not None:
            return self.sb.size - min(self.sb.size, self.sb.local_copy.fence)
        if self.sb.disk in (DiskState.INCONSISTENT, DiskState.FAILED):
            return self.sb.size
        return 0

    # ------------------------------------------------------------------ commits

    def prepare_commit(self) -> CommitPlan | None:
        """Snapshot every unsaved change into a plan, or None if nothing changed."""
        if self._inflight:
            raise StateMapError("a commit is already in flight")
        if not self.has_unsaved_changes:
            self.durable_changes = self.changes
            return None
        if self.version != FORMAT_VERSION:
            raise StateMapError(
                f"{self.io.name}: a format-{self.version} state map read as it is cannot be "
                "written; open it read-write with StateMap.open to upgrade it"
            )
        lay = self.layout
        oos_phase: list[tuple[int, bytes, str]] = []
        intent_phase: list[tuple[int, bytes, str]] = []
        for (area, page), _version in sorted(self._dirty.pages.items()):
            if area == "intent":
                data = _encode_area_page(self.intent, AREA_INTENT, INTENT_SLOT, page, self._owner)
                intent_phase.append((lay.page_offset(AREA_INTENT, INTENT_SLOT, page), data, "intent"))
            else:
                member = area.split(":", 1)[1]
                if member not in self.sb.peers:
                    continue  # the member was removed; its slot is not ours to write
                slot = self.sb.peers[member].slot
                data = _encode_area_page(self.oos[member], AREA_OUT_OF_SYNC, slot, page, self._owner)
                oos_phase.append((lay.page_offset(AREA_OUT_OF_SYNC, slot, page), data, area))
        sb_phase: list[tuple[int, bytes, str]] = []
        seq = None
        if self._sb_version is not None:
            seq = self._seq + 1
            self.sb.updated = time.time()
            slot = seq % 2
            sb_phase.append((slot * SLOT_SIZE, encode_slot(self.sb, seq), f"superblock:{'AB'[slot]}"))
        if self._clean_on_disk and not self.sb.clean:
            phases = [sb_phase, oos_phase, intent_phase]  # unclean before any bit moves
        else:
            phases = [oos_phase, intent_phase, sb_phase]  # clean only after every bit
        self._inflight = True
        return CommitPlan(
            phases=phases,
            clean=self.sb.clean,
            changes=self.changes,
            dirty_versions=dict(self._dirty.pages),
            sb_version=self._sb_version,
            seq=seq,
        )

    def finish_commit(self, plan: CommitPlan) -> None:
        """Record that ``plan`` ran to completion (every phase fsynced)."""
        for key, version in plan.dirty_versions.items():
            if self._dirty.pages.get(key) == version:
                del self._dirty.pages[key]
        if plan.sb_version is not None and self._sb_version == plan.sb_version:
            self._sb_version = None
        if plan.seq is not None:
            self._seq = plan.seq
            self._clean_on_disk = plan.clean
        self.durable_changes = max(self.durable_changes, plan.changes)
        self._inflight = False

    def abort_commit(self, plan: CommitPlan) -> None:
        """``plan`` failed part way; its changes stay unsaved and will be retried."""
        self._inflight = False

    def commit(self) -> int:
        """Prepare, run and finish a commit in this thread; returns bytes written."""
        plan = self.prepare_commit()
        if plan is None:
            return 0
        try:
            plan.run(self.io)
        except BaseException:
            self.abort_commit(plan)
            raise
        self.finish_commit(plan)
        return plan.bytes


def _encode_area_page(bits: bitarray, area: int, slot: int, page: int, owner: int) -> bytes:
    """Page ``page`` of a bitmap area, with its self-checking header."""
    lo = page * BITS_PER_PAGE
    return encode_page(area, slot, page, owner, bits[lo : lo + BITS_PER_PAGE].tobytes())


def _image(sb: Superblock, seq: int, intent: bitarray | None, oos: dict[int, bitarray]) -> list[tuple[int, bytes]]:
    """Every page of a version-2 map holding ``sb`` (sequences ``seq + 1`` and
    ``seq + 2`` in the two slots), ``intent`` and the out-of-sync bitmaps by
    member slot; areas not given are all zeros (nothing hot, all in sync)."""
    lay = sb.layout
    owner = map_id(sb.uuid)
    pieces = [
        (((seq + 1) % 2) * SLOT_SIZE, encode_slot(sb, seq + 1)),
        (((seq + 2) % 2) * SLOT_SIZE, encode_slot(sb, seq + 2)),
    ]

    def area_bytes(bits: bitarray | None, area: int, slot: int, npages: int) -> bytes:
        if bits is None:
            bits = _new_bits(0)
        return b"".join(_encode_area_page(bits, area, slot, i, owner) for i in range(npages))

    pieces.append((lay.intent_offset, area_bytes(intent, AREA_INTENT, INTENT_SLOT, lay.intent_pages)))
    for slot in range(sb.peer_slots):
        pieces.append((lay.oos_offset(slot), area_bytes(oos.get(slot), AREA_OUT_OF_SYNC, slot, lay.oos_pages)))
    return pieces


def ensure_not_in_use(path: str | os.PathLike[str]) -> None:
    """Raise :class:`StateMapBusy` if a process holds the map at ``path`` open for
    writing; a missing file is not in use. Reads nothing, so it works on a map
    too damaged to open."""
    io = _open_file(path, readonly=True, missing_ok=True)
    if io is None:
        return
    try:
        _lock_exclusive(io, str(path))
    finally:
        io.close()


def _open_file(path: str | os.PathLike[str], *, readonly: bool, missing_ok: bool = False) -> FileIO | None:
    """Open the map file, saying in one line what is wrong with the path if not
    (None for a missing file when ``missing_ok``)."""
    try:
        return FileIO(path, readonly=readonly)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise StateMapError(f"{path}: no such file: no state map here (create it with 'gmd init')") from None
    except IsADirectoryError:
        raise StateMapError(f"{path}: is a directory, not a state map file") from None
    except PermissionError:
        mode = "read" if readonly else "read and write"
        raise StateMapError(
            f"{path}: permission denied: this user may not {mode} the state map "
            "(run gmd as the user that owns it)"
        ) from None
    except OSError as e:
        raise StateMapError(f"{path}: cannot open state map: {e.strerror}") from None


def _lock_exclusive(io: StateMapIO, path: str) -> None:
    import fcntl

    fd = getattr(io, "_fd", None)
    if fd is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StateMapBusy(
            f"{path}: state map is in use by another process (a running gmd daemon?); "
            "stop the volume with 'gmd down' first"
        ) from None
