"""On-disk format of a state map file (version 2; version 1 is still read).

All offsets and sizes are in bytes; all integers little-endian. The file is made of
4 KiB pages, every one written when the map is created (no holes).

Layout::

    page 0            superblock slot A
    page 1            superblock slot B
    pages 2..         intent bitmap, one bit per extent (bit set = extent hot)
    then, per slot    out-of-sync bitmap for one other member, one bit per region
                      (bit set = that member may differ from this one there)

A superblock slot is one page::

    offset  size  field
    0       8     magic  b"GMDSMAP\0"
    8       2     format version (2; 1 for maps written before bitmap pages had headers)
    10      2     reserved, zero
    12      4     payload length in bytes
    16      8     sequence number (the valid slot with the higher one wins)
    24      8     xxh64 of the whole 4096-byte slot with these 8 bytes zeroed
    32      ...   payload: UTF-8 JSON object (sorted keys), then zero padding

Slots are written alternately (sequence ``n`` goes to slot ``n % 2``), so a torn
superblock write leaves the previous superblock intact in the other slot. The JSON
payload is described by :class:`Superblock`; unknown keys are preserved on rewrite
so that a newer minor writer's fields survive an older one.

A bitmap page (version 2) checks itself the way a slot does::

    offset  size  field
    0       8     magic  b"GMDPAGE\0"
    8       1     area: 1 intent, 2 out-of-sync
    9       1     reserved, zero
    10      2     member slot of an out-of-sync page (0xFFFF for intent)
    12      4     page index within its area
    16      8     map id: xxh64 of the superblock's uuid (a page of another map fails)
    24      8     xxh64 of the whole 4096-byte page with these 8 bytes zeroed
    32      4064  bits: BITS_PER_PAGE of them

Bit ``i`` of an area is bit ``i % 8`` (least significant first) of byte
``(i % BITS_PER_PAGE) // 8`` of the bits of page ``i // BITS_PER_PAGE``. A page
that fails its check (zeroed, torn, misplaced, of another map) is never trusted:
the reader assumes the worst for what it covers (see :mod:`statemap.statemap`).

Version 1 had no page header: a page held ``PAGE * 8`` bits and pages never
written were sparse holes reading as zeros. :class:`Layout` of ``version=1``
still describes it, so such a map can be read and upgraded.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import xxhash

from .errors import StateMapCorrupt, StateMapVersionError
from .states import CopyKind, DiskState, Role

PAGE = 4096
SECTOR = 512
MAGIC = b"GMDSMAP\0"
FORMAT_VERSION = 2
LEGACY_VERSION = 1  # still read (read-only), upgraded when opened read-write
SLOT_SIZE = PAGE
HEADER = struct.Struct("<8sHHIQQ")  # magic, version, reserved, length, seq, checksum
CHECKSUM_OFFSET = 24
DEFAULT_PEER_SLOTS = 7  # 8 members in all: HAGEO allows 3 copies, OpenVMS 6
MAX_NAME = 64
HISTORY_LENGTH = 4
NO_GENERATION = "0" * 16  # the generation of a map that never held data


PAGE_MAGIC = b"GMDPAGE\0"
PAGE_HEADER = struct.Struct("<8sBBHIQQ")  # magic, area, reserved, slot, index, map id, checksum
PAGE_CHECKSUM_OFFSET = 24
PAGE_BITS_OFFSET = PAGE_HEADER.size
PAGE_BITS_BYTES = PAGE - PAGE_HEADER.size
BITS_PER_PAGE = PAGE_BITS_BYTES * 8  # 32512 in version 2
LEGACY_BITS_PER_PAGE = PAGE * 8  # version 1: the whole page held bits
AREA_INTENT = 1
AREA_OUT_OF_SYNC = 2
INTENT_SLOT = 0xFFFF  # the slot field of an intent page
AREA_NAMES = {AREA_INTENT: "intent", AREA_OUT_OF_SYNC: "out-of-sync"}


def pages_for_bits(nbits: int, bits_per_page: int = BITS_PER_PAGE) -> int:
    """Number of whole pages a bitmap of ``nbits`` bits occupies."""
    return max(1, (nbits + bits_per_page - 1) // bits_per_page)


def map_id(uuid: str) -> int:
    """The 64-bit id a bitmap page carries to say which map it belongs to."""
    return xxhash.xxh64_intdigest(uuid.encode())


def encode_page(area: int, slot: int, index: int, owner: int, bits: bytes) -> bytes:
    """One checksummed version-2 bitmap page holding ``bits`` (at most
    :data:`PAGE_BITS_BYTES`; zero padded) for page ``index`` of an area."""
    if len(bits) > PAGE_BITS_BYTES:
        raise ValueError(f"{len(bits)} bytes of bits do not fit one page ({PAGE_BITS_BYTES})")
    buf = bytearray(PAGE)
    PAGE_HEADER.pack_into(buf, 0, PAGE_MAGIC, area, 0, slot, index, owner, 0)
    buf[PAGE_BITS_OFFSET : PAGE_BITS_OFFSET + len(bits)] = bits
    struct.pack_into("<Q", buf, PAGE_CHECKSUM_OFFSET, xxhash.xxh64_intdigest(bytes(buf)))
    return bytes(buf)


def check_page(data: bytes, area: int, slot: int, index: int, owner: int) -> str | None:
    """Why ``data`` is not a good page ``index`` of that area of map ``owner``, or None."""
    if len(data) != PAGE:
        return f"short page ({len(data)} bytes)"
    if not any(data):
        return "page is all zeros (never written, or zeroed)"
    magic, p_area, _reserved, p_slot, p_index, p_owner, checksum = PAGE_HEADER.unpack_from(data, 0)
    if magic != PAGE_MAGIC:
        return f"bad magic {magic!r}"
    zeroed = bytearray(data)
    struct.pack_into("<Q", zeroed, PAGE_CHECKSUM_OFFSET, 0)
    if xxhash.xxh64_intdigest(bytes(zeroed)) != checksum:
        return "checksum mismatch (torn or damaged write)"
    if p_owner != owner:
        return "page belongs to another state map (map id differs)"
    if (p_area, p_slot, p_index) != (area, slot, index):
        where = AREA_NAMES.get(p_area, f"area {p_area}")
        return f"misplaced page: it says {where} slot {p_slot} page {p_index}"
    return None


@dataclass(frozen=True)
class Layout:
    """Where each area of a state map lives, derived from the volume's geometry and
    the format version (which fixes how many bits a page holds). All offset
    arithmetic lives here."""

    size: int
    region_size: int
    extent_size: int
    peer_slots: int
    version: int = FORMAT_VERSION

    @property
    def bits_per_page(self) -> int:
        return LEGACY_BITS_PER_PAGE if self.version == LEGACY_VERSION else BITS_PER_PAGE

    @property
    def regions(self) -> int:
        return (self.size + self.region_size - 1) // self.region_size

    @property
    def extents(self) -> int:
        return (self.size + self.extent_size - 1) // self.extent_size

    @property
    def regions_per_extent(self) -> int:
        return self.extent_size // self.region_size

    @property
    def intent_offset(self) -> int:
        return 2 * SLOT_SIZE

    @property
    def intent_pages(self) -> int:
        return pages_for_bits(self.extents, self.bits_per_page)

    @property
    def intent_bytes(self) -> int:
        return self.intent_pages * PAGE

    @property
    def oos_pages(self) -> int:
        return pages_for_bits(self.regions, self.bits_per_page)

    @property
    def oos_bytes(self) -> int:
        return self.oos_pages * PAGE

    def oos_offset(self, slot: int) -> int:
        """File offset of the out-of-sync bitmap in member slot ``slot``."""
        if not 0 <= slot < self.peer_slots:
            raise ValueError(f"member slot {slot} out of range 0..{self.peer_slots - 1}")
        return self.intent_offset + self.intent_bytes + slot * self.oos_bytes

    def page_offset(self, area: int, slot: int, index: int) -> int:
        """File offset of page ``index`` of the intent area, or of the out-of-sync
        area of member ``slot``."""
        base = self.intent_offset if area == AREA_INTENT else self.oos_offset(slot)
        return base + index * PAGE

    def page_bits(self, area: int, index: int) -> range:
        """The bit numbers (extents, or regions) page ``index`` of an area covers."""
        nbits = self.extents if area == AREA_INTENT else self.regions
        bpp = self.bits_per_page
        return range(index * bpp, min(nbits, (index + 1) * bpp))

    @property
    def file_size(self) -> int:
        return self.intent_offset + self.intent_bytes + self.peer_slots * self.oos_bytes


@dataclass
class Fence:
    """A copy or merge that advances through the volume; below ``fence`` it is done."""

    kind: CopyKind
    fence: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "fence": self.fence}

    @classmethod
    def from_json(cls, raw: Any, where: str) -> Fence | None:
        if raw is None:
            return None
        _expect(isinstance(raw, dict), where, "an object or null")
        kind = _enum(CopyKind, raw.get("kind"), f"{where}.kind")
        fence = raw.get("fence")
        _expect(_is_uint(fence), f"{where}.fence", "a non-negative integer")
        return cls(kind, fence)


@dataclass
class PeerRecord:
    """What this member's map knows about one other member."""

    slot: int
    disk: DiskState = DiskState.UNKNOWN  # last state seen, kept for offline status
    copy: Fence | None = None  # a full copy or full merge this side must send it
    bitmap_gen: str = NO_GENERATION  # generation at which its bitmap started tracking

    def to_json(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "disk": self.disk.value,
            "copy": self.copy.to_json() if self.copy else None,
            "bitmap_gen": self.bitmap_gen,
        }


@dataclass
class Generations:
    """Generation identifiers (DRBD's UUIDs): who wrote what since when.

    ``current`` changes when a new generation starts (the first write after the
    primary lost touch with a member); ``bitmap`` is the generation the out-of-sync
    bitmaps are relative to; ``history`` holds the previous ``current`` values,
    newest first. ``identity`` names the volume's life: created once, when a member
    first becomes a copy source, and carried by every member that holds that life's
    data (None while this member has none, e.g. a fresh or ``gmd clean`` disk).
    Records written before it existed decode with None.
    """

    current: str = NO_GENERATION
    bitmap: str = NO_GENERATION
    history: list[str] = field(default_factory=list)
    identity: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"current": self.current, "bitmap": self.bitmap, "history": list(self.history),
                "identity": self.identity}


@dataclass
class Superblock:
    """The JSON payload of a superblock slot (everything but the bitmaps)."""

    volume: str
    uuid: str
    size: int
    region_size: int
    extent_size: int
    member: str
    peer_slots: int
    role: Role = Role.SECONDARY
    disk: DiskState = DiskState.INCONSISTENT
    clean: bool = True
    generations: Generations = field(default_factory=Generations)
    peers: dict[str, PeerRecord] = field(default_factory=dict)
    local_copy: Fence | None = None  # this member is a copy/merge target below fence
    expected_votes: int | None = None  # operator's quorum override
    forced_primary: bool = False  # promoted with --force: writes without quorum until demoted
    promoted_at: float | None = None  # wall time of the last promotion (split-brain policy)
    created: float = 0.0
    updated: float = 0.0
    clean_stop: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, preserved

    @property
    def layout(self) -> Layout:
        return self.layout_of(FORMAT_VERSION)

    def layout_of(self, version: int) -> Layout:
        """The layout of a map of this geometry written in format ``version``."""
        return Layout(self.size, self.region_size, self.extent_size, self.peer_slots, version)

    def to_json(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update(
            volume=self.volume,
            uuid=self.uuid,
            size=self.size,
            region_size=self.region_size,
            extent_size=self.extent_size,
            member=self.member,
            peer_slots=self.peer_slots,
            role=self.role.value,
            disk=self.disk.value,
            clean=self.clean,
            generations=self.generations.to_json(),
            peers={name: p.to_json() for name, p in self.peers.items()},
            local_copy=self.local_copy.to_json() if self.local_copy else None,
            expected_votes=self.expected_votes,
            forced_primary=self.forced_primary,
            promoted_at=self.promoted_at,
            created=self.created,
            updated=self.updated,
            clean_stop=self.clean_stop,
        )
        return out

    @classmethod
    def from_json(cls, raw: Any) -> Superblock:
        _expect(isinstance(raw, dict), "payload", "a JSON object")
        known = {
            "volume", "uuid", "size", "region_size", "extent_size", "member",
            "peer_slots", "role", "disk", "clean", "generations", "peers",
            "local_copy", "expected_votes", "forced_primary", "promoted_at", "created", "updated", "clean_stop",
        }
        for key in ("volume", "uuid", "member"):
            _expect(isinstance(raw.get(key), str) and raw[key], key, "a non-empty string")
        for key in ("size", "region_size", "extent_size", "peer_slots"):
            _expect(_is_uint(raw.get(key)) and raw[key] > 0, key, "a positive integer")
        _expect(isinstance(raw.get("clean"), bool), "clean", "true or false")
        gens = raw.get("generations")
        _expect(isinstance(gens, dict), "generations", "an object")
        _expect(isinstance(gens.get("current"), str), "generations.current", "a string")
        _expect(isinstance(gens.get("bitmap"), str), "generations.bitmap", "a string")
        hist = gens.get("history")
        _expect(
            isinstance(hist, list) and all(isinstance(h, str) for h in hist),
            "generations.history",
            "a list of strings",
        )
        identity = gens.get("identity")  # absent in maps written before it existed
        _expect(identity is None or isinstance(identity, str), "generations.identity", "null or a string")
        peers_raw = raw.get("peers")
        _expect(isinstance(peers_raw, dict), "peers", "an object")
        peers: dict[str, PeerRecord] = {}
        for name, p in peers_raw.items():
            where = f"peers.{name}"
            _expect(isinstance(p, dict), where, "an object")
            slot = p.get("slot")
            _expect(_is_uint(slot) and slot < raw["peer_slots"], f"{where}.slot", "a slot number")
            bitmap_gen = p.get("bitmap_gen", NO_GENERATION)
            _expect(isinstance(bitmap_gen, str), f"{where}.bitmap_gen", "a string")
            peers[name] = PeerRecord(
                slot=slot,
                disk=_enum(DiskState, p.get("disk"), f"{where}.disk"),
                copy=Fence.from_json(p.get("copy"), f"{where}.copy"),
                bitmap_gen=bitmap_gen,
            )
        ev = raw.get("expected_votes")
        _expect(ev is None or (_is_uint(ev) and ev > 0), "expected_votes", "null or a positive integer")
        forced = raw.get("forced_primary", False)  # absent in maps written before it existed
        _expect(isinstance(forced, bool), "forced_primary", "true or false")
        promoted = raw.get("promoted_at")
        _expect(promoted is None or (_is_number(promoted) and not isinstance(promoted, bool)),
                "promoted_at", "null or a number")
        for key in ("created", "updated"):
            _expect(_is_number(raw.get(key)), key, "a number")
        cs = raw.get("clean_stop")
        _expect(cs is None or _is_number(cs), "clean_stop", "null or a number")
        sb = cls(
            volume=raw["volume"],
            uuid=raw["uuid"],
            size=raw["size"],
            region_size=raw["region_size"],
            extent_size=raw["extent_size"],
            member=raw["member"],
            peer_slots=raw["peer_slots"],
            role=_enum(Role, raw.get("role"), "role"),
            disk=_enum(DiskState, raw.get("disk"), "disk"),
            clean=raw["clean"],
            generations=Generations(gens["current"], gens["bitmap"], list(hist), identity or None),
            peers=peers,
            local_copy=Fence.from_json(raw.get("local_copy"), "local_copy"),
            expected_votes=ev,
            forced_primary=forced,
            promoted_at=None if promoted is None else float(promoted),
            created=float(raw["created"]),
            updated=float(raw["updated"]),
            clean_stop=None if cs is None else float(cs),
            extra={k: v for k, v in raw.items() if k not in known},
        )
        slots = [p.slot for p in peers.values()]
        _expect(len(slots) == len(set(slots)), "peers", "distinct slots")
        return sb


class _PayloadError(Exception):
    pass


def _expect(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise _PayloadError(f"field {key!r} is not {what}")


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_number(v: Any) -> bool:
    """A JSON number a float can hold (an integer of 400 digits is not one)."""
    if not isinstance(v, (int, float)):
        return False
    try:
        float(v)
    except OverflowError:
        return False
    return True


def _enum(enum_type: Any, value: Any, key: str) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(e.value for e in enum_type)
        raise _PayloadError(f"field {key!r} is {value!r}, not one of: {choices}") from None


def encode_slot(sb: Superblock, seq: int, version: int = FORMAT_VERSION) -> bytes:
    """Serialize ``sb`` with sequence number ``seq`` into one checksummed slot
    (``version`` other than the current one only for tests of old maps)."""
    payload = json.dumps(sb.to_json(), sort_keys=True, separators=(",", ":")).encode()
    if HEADER.size + len(payload) > SLOT_SIZE:
        from .errors import StateMapFull

        raise StateMapFull(
            f"superblock of {len(payload)} bytes does not fit its {SLOT_SIZE}-byte slot "
            "(too many members or names too long)"
        )
    buf = bytearray(SLOT_SIZE)
    HEADER.pack_into(buf, 0, MAGIC, version, 0, len(payload), seq, 0)
    buf[HEADER.size : HEADER.size + len(payload)] = payload
    struct.pack_into("<Q", buf, CHECKSUM_OFFSET, xxhash.xxh64_intdigest(bytes(buf)))
    return bytes(buf)


@dataclass(frozen=True)
class SlotReading:
    """The result of reading one slot: a superblock and its sequence, or why not."""

    superblock: Superblock | None
    seq: int
    problem: str | None
    version: int = FORMAT_VERSION


def decode_slot(data: bytes) -> SlotReading:
    """Check and parse one slot. Never raises for damage; a newer version raises.

    A slot with a valid checksum but a format version above ours raises
    :class:`StateMapVersionError`, because silently using the other (older) slot
    would roll the map back.
    """
    if len(data) < SLOT_SIZE:
        return SlotReading(None, 0, f"slot is {len(data)} bytes, expected {SLOT_SIZE}")
    if data == bytes(SLOT_SIZE):
        return SlotReading(None, 0, "slot is empty (all zeros)")
    magic, version, _reserved, length, seq, checksum = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        return SlotReading(None, 0, f"bad magic {magic!r}")
    zeroed = bytearray(data[:SLOT_SIZE])
    struct.pack_into("<Q", zeroed, CHECKSUM_OFFSET, 0)
    if xxhash.xxh64_intdigest(bytes(zeroed)) != checksum:
        return SlotReading(None, seq, "checksum mismatch (torn or damaged write)")
    if version > FORMAT_VERSION:
        raise StateMapVersionError(
            f"state map format version {version} is newer than this gmd supports "
            f"({FORMAT_VERSION}); upgrade gmd to use it"
        )
    if version < 1:
        return SlotReading(None, seq, f"invalid format version {version}")
    if HEADER.size + length > SLOT_SIZE:
        return SlotReading(None, seq, f"payload length {length} exceeds the slot")
    try:
        raw = json.loads(bytes(data[HEADER.size : HEADER.size + length]).decode())
        sb = Superblock.from_json(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return SlotReading(None, seq, f"payload is not JSON: {e}")
    except RecursionError:
        return SlotReading(None, seq, "payload is not JSON: nested too deeply")
    except _PayloadError as e:
        return SlotReading(None, seq, f"payload invalid: {e}")
    return SlotReading(sb, seq, None, version)


def pick_slot(a: SlotReading, b: SlotReading, path: str) -> tuple[Superblock, int, int, list[str]]:
    """Choose the valid slot with the higher sequence: (superblock, sequence, format
    version, warnings saying what was skipped).

    Raises :class:`StateMapCorrupt` when neither slot is valid.
    """
    valid = [(r, name) for r, name in ((a, "A"), (b, "B")) if r.superblock is not None]
    if not valid:
        raise StateMapCorrupt(
            f"{path}: both superblock slots are unusable (A: {a.problem}; B: {b.problem}); "
            "refusing to treat an unreadable state map as clean. Recreate it with "
            "'gmd init --force' and let a full copy bring this member back."
        )
    best, name = max(valid, key=lambda rn: rn[0].seq)
    warnings = []
    for r, other in ((a, "A"), (b, "B")):
        if r.superblock is None and r.problem != "slot is empty (all zeros)":
            warnings.append(f"{path}: superblock slot {other} ignored: {r.problem}; using slot {name}")
    assert best.superblock is not None
    return best.superblock, best.seq, best.version, warnings
