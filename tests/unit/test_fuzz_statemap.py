"""A real state map file with random damage: bytes flipped anywhere, pages
zeroed, overwritten with noise or moved, the file cut short. Opening it either
refuses with a :class:`StateMapError` naming the file, or recovers with every
damaged page named and read as all ones; a damaged page is never read as "in
sync", and no bit that was set is ever lost.

(test_statemap_pages.py and test_statemap.py hold the hand-picked cases: one
zeroed page, one torn write, one misplaced page, one bad slot. These explore
combinations of them.)"""

from __future__ import annotations

import json
import struct

import pytest
import xxhash
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from statemap.errors import StateMapCorrupt, StateMapError, StateMapVersionError
from statemap.format import (
    AREA_INTENT, AREA_OUT_OF_SYNC, CHECKSUM_OFFSET, HEADER, INTENT_SLOT, MAGIC, PAGE, SLOT_SIZE, decode_slot,
)
from statemap.statemap import StateMap

KiB = 1 << 10
# Three out-of-sync pages per member, one intent page; 1024 regions per extent.
GEOMETRY = dict(volume="appslv", size=80_000 * 512, region_size=512, extent_size=512 * KiB, member="labor1")
PEERS = ["labor2", "labor3"]
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A map's bytes with marks in every page of both members and two hot
    extents, both superblock slots valid and alike; and what it holds."""
    path = tmp_path_factory.mktemp("fuzz_statemap") / "appslv.sm"
    sm = StateMap.create(path, **GEOMETRY, peers=PEERS)
    sm.begin_use()
    for page_start in (0, 32512, 65024):
        sm.mark_regions_out_of_sync("labor2", range(page_start + 5, page_start + 9))
    sm.mark_regions_out_of_sync("labor3", range(40_000, 40_010))
    sm.intent_acquire(3 * 512 * KiB, 4096)
    sm.intent_acquire(70 * 512 * KiB, 4096)
    sm.commit()
    sm.set_disk(sm.sb.disk)  # a second superblock write: both slots hold this geometry and these peers
    sm.commit()
    expected = {"intent": sm.intent.copy(), **{m: sm.out_of_sync_regions(m).copy() for m in PEERS}}
    slots = {m: sm.sb.peers[m].slot for m in PEERS}
    layout = sm.layout
    sm.close()
    data = path.read_bytes()
    path.unlink()
    return _Template((data, expected, slots, layout))


class _Template(tuple):
    """The template map; shown by name, not by its 100 KiB of bytes, when an example fails."""

    def __repr__(self) -> str:
        return "<template state map>"


def _pages_of(layout, slots):
    """(file offset, bitmap key, page index, bits it covers) of every page that is read."""
    out = [(layout.page_offset(AREA_INTENT, INTENT_SLOT, i), "intent", i, layout.page_bits(AREA_INTENT, i))
           for i in range(layout.intent_pages)]
    for member, slot in slots.items():
        out += [(layout.page_offset(AREA_OUT_OF_SYNC, slot, i), member, i, layout.page_bits(AREA_OUT_OF_SYNC, i))
                for i in range(layout.oos_pages)]
    return out


def _damage(data: bytes, draw) -> bytes:
    """``data`` with one to four random kinds of damage."""
    buf = bytearray(data)
    npages = len(buf) // PAGE
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "flip", "zero", "noise", "move", "tear"]))
        page = draw(st.integers(0, npages - 1))
        at = page * PAGE
        if kind == "flip":
            off = draw(st.integers(0, len(buf) - 1))
            buf[off] ^= draw(st.integers(1, 255))
        elif kind == "zero":
            buf[at:at + PAGE] = bytes(PAGE)
        elif kind == "noise":
            buf[at:at + PAGE] = draw(st.binary(min_size=PAGE, max_size=PAGE))
        elif kind == "move":
            src = draw(st.integers(0, npages - 1)) * PAGE
            buf[at:at + PAGE] = data[src:src + PAGE]
        else:  # a torn write: some 512-byte sectors of the page from elsewhere
            src = draw(st.integers(0, npages - 1)) * PAGE
            for sector in draw(st.sets(st.integers(0, 7), min_size=1)):
                s = sector * 512
                buf[at + s:at + s + 512] = data[src + s:src + s + 512]
    if draw(st.integers(0, 9)) == 0:
        del buf[draw(st.integers(0, len(buf) - 1)):]
    return bytes(buf)


def _check_opened(sm, data, damaged, expected, slots, layout):
    """Every page that changed reads as all ones; the rest as they were; no set bit lost."""
    bits = {"intent": sm.intent, **{m: sm.out_of_sync_regions(m) for m in PEERS}}
    named = {(b.area, b.page) for b in sm.bad_pages}
    for offset, key, index, cover in _pages_of(layout, slots):
        area = "intent" if key == "intent" else f"oos:{key}"
        if damaged[offset:offset + PAGE] != data[offset:offset + PAGE]:
            assert bits[key][cover.start:cover.stop].all(), f"damaged {area} page {index} read as partly in sync"
            assert (area, index) in named, f"damaged {area} page {index} not named"
            assert any(f"page {index}" in w for w in sm.warnings)
        else:
            assert bits[key][cover.start:cover.stop] == expected[key][cover.start:cover.stop]
    for key, want in expected.items():
        assert (bits[key] | want) == bits[key], f"a bit of {key} was lost"


@FUZZ
@given(st.data())
def test_a_damaged_map_opened_read_only_is_refused_by_name_or_reads_damage_as_out_of_sync(tmp_path, template,
                                                                                         data):
    original, expected, slots, layout = template
    damaged = _damage(original, data.draw)
    path = tmp_path / "appslv.sm"
    path.write_bytes(damaged)
    try:
        sm = StateMap.open(path, readonly=True)
    except StateMapError as e:
        event("refused")
        assert str(path) in str(e)
        a, b = decode_slot(damaged[:SLOT_SIZE]), decode_slot(damaged[SLOT_SIZE:2 * SLOT_SIZE])
        # Refused only for a reason: no usable slot, or the file cut short.
        assert (a.superblock is None and b.superblock is None) or len(damaged) < len(original)
        return
    event(f"opened, {len(sm.bad_pages)} bad pages")
    try:
        assert len(damaged) == len(original)
        _check_opened(sm, original, damaged, expected, slots, layout)
        assert path.read_bytes() == damaged  # a read-only open reports, never writes
    finally:
        sm.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_damaged_map_opened_read_write_is_repaired_pessimistically_and_recovery_marks_every_member(
        tmp_path, template, data):
    original, expected, slots, layout = template
    damaged = _damage(original, data.draw)
    path = tmp_path / "appslv.sm"
    path.write_bytes(damaged)
    try:
        sm = StateMap.open(path)
    except StateMapError as e:
        assert str(path) in str(e)
        return
    try:
        _check_opened(sm, original, damaged, expected, slots, layout)
        hot = list(sm.intent.search(1))
        sm.begin_use()
        sm.recover()
        sm.commit()
        rpe = layout.regions_per_extent
        for member in PEERS:
            oos = sm.out_of_sync_regions(member)
            for extent in hot:
                assert oos[extent * rpe:min(layout.regions, (extent + 1) * rpe)].all()
    finally:
        sm.close()
    # Repaired: a second open finds nothing damaged, and nothing was lost.
    again = StateMap.open(path, readonly=True)
    try:
        assert again.bad_pages == []
        for member in PEERS:
            assert (again.out_of_sync_regions(member) | expected[member]) == again.out_of_sync_regions(member)
    finally:
        again.close()


def _slot(payload: bytes, *, version: int = 2, seq: int = 99) -> bytes:
    """A superblock slot with a valid checksum around ``payload``."""
    buf = bytearray(SLOT_SIZE)
    HEADER.pack_into(buf, 0, MAGIC, version, 0, len(payload), seq, 0)
    buf[HEADER.size:HEADER.size + len(payload)] = payload
    struct.pack_into("<Q", buf, CHECKSUM_OFFSET, xxhash.xxh64_intdigest(bytes(buf)))
    return bytes(buf)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(st.data())
def test_a_checksummed_slot_with_a_bad_payload_is_skipped_for_the_other_slot(tmp_path, template, data):
    """A slot whose checksum is right but whose JSON is not a superblock (a
    bug, or a crafted file): the map falls back to the other slot, warning."""
    original, expected, slots, layout = template
    length = HEADER.unpack_from(original)[3]
    good = json.loads(original[HEADER.size:HEADER.size + length])
    key = data.draw(st.sampled_from(sorted(good)))
    choice = data.draw(st.sampled_from(["value", "drop", "huge", "deep", "junk"]))
    if choice == "value":
        payload = json.dumps({**good, key: data.draw(json_values)}).encode()
    elif choice == "drop":
        payload = json.dumps({k: v for k, v in good.items() if k != key}).encode()
    elif choice == "huge":  # an integer no float can hold
        payload = json.dumps({**good, key: 10 ** 400}).encode()
    elif choice == "deep":
        payload = b"[" * data.draw(st.integers(500, 4000))
    else:
        payload = data.draw(st.binary(max_size=4000))
    path = tmp_path / "appslv.sm"
    which = data.draw(st.integers(0, 1))
    crafted = _slot(payload[:SLOT_SIZE - HEADER.size])
    assume(decode_slot(crafted).superblock is None)  # a valid superblock of another geometry is not damage
    buf = bytearray(original)
    buf[which * SLOT_SIZE:(which + 1) * SLOT_SIZE] = crafted
    path.write_bytes(bytes(buf))
    sm = StateMap.open(path, readonly=True)  # the other slot holds a superblock
    try:
        assert any(f"slot {'AB'[which]} ignored" in w for w in sm.warnings)
        _check_opened(sm, original, original, expected, slots, layout)
    finally:
        sm.close()


def test_two_checksummed_slots_with_bad_payloads_are_refused_naming_the_file(tmp_path, template):
    original, *_ = template
    path = tmp_path / "appslv.sm"
    path.write_bytes(_slot(b"[" * 4000) + _slot(b'{"size": 1' + b"0" * 400 + b"}") + original[2 * SLOT_SIZE:])
    with pytest.raises(StateMapCorrupt, match=f"^{path}: both superblock slots are unusable"):
        StateMap.open(path, readonly=True)


def test_a_slot_of_a_newer_format_is_refused_naming_the_file(tmp_path, template):
    original, *_ = template
    path = tmp_path / "appslv.sm"
    path.write_bytes(_slot(b"{}", version=9) + original[SLOT_SIZE:])
    with pytest.raises(StateMapVersionError, match=f"^{path}: state map format version 9 is newer"):
        StateMap.open(path, readonly=True)
