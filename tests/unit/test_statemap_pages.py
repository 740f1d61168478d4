"""Self-checking bitmap pages (format 2): a damaged page is detected, assumed the
worst, reported and repaired; a version-1 map is read as it is or upgraded."""

import logging
import os

import pytest

from statemap.errors import StateMapError
from statemap.format import (
    AREA_INTENT, AREA_OUT_OF_SYNC, BITS_PER_PAGE, FORMAT_VERSION, INTENT_SLOT, LEGACY_VERSION, PAGE,
    PAGE_HEADER, SECTOR, SLOT_SIZE, check_page, encode_page, encode_slot, map_id,
)
from statemap.statemap import StateMap, StateMapBusy

KiB, MiB = 1 << 10, 1 << 20
# 80,000 regions of 512 bytes: three out-of-sync pages per member, so a page that
# is not the first one is tested too; 1024 regions per extent.
GEOMETRY = dict(volume="appslv", size=80_000 * 512, region_size=512, extent_size=512 * KiB, member="labor1")
PEERS = ["labor2", "labor3"]


@pytest.fixture
def smpath(tmp_path):
    return tmp_path / "appslv.sm"


def make(path, **kw):
    args = dict(GEOMETRY, peers=PEERS)
    args.update(kw)
    sm = StateMap.create(path, **args)
    sm.begin_use()
    sm.commit()
    return sm


def poke(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def peek(path, offset, length=PAGE):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def oos_page_offset(sm, member, page):
    return sm.layout.page_offset(AREA_OUT_OF_SYNC, sm.sb.peers[member].slot, page)


def test_bits_per_page_leave_room_for_the_header():
    assert PAGE_HEADER.size == 32 and BITS_PER_PAGE == (PAGE - 32) * 8


def test_every_page_is_written_and_checks_at_creation(smpath):
    sm = make(smpath)
    lay, owner = sm.layout, map_id(sm.sb.uuid)
    assert lay.oos_pages == 3 and os.path.getsize(smpath) == lay.file_size
    for i in range(lay.intent_pages):
        assert check_page(peek(smpath, lay.page_offset(AREA_INTENT, INTENT_SLOT, i)),
                          AREA_INTENT, INTENT_SLOT, i, owner) is None
    for slot in range(sm.sb.peer_slots):  # unused slots too: no holes anywhere
        for i in range(lay.oos_pages):
            assert check_page(peek(smpath, lay.page_offset(AREA_OUT_OF_SYNC, slot, i)),
                              AREA_OUT_OF_SYNC, slot, i, owner) is None
    sm.close()


def test_bits_across_page_boundaries_survive_reopen(smpath):
    sm = make(smpath)
    sm.mark_regions_out_of_sync("labor2", range(BITS_PER_PAGE - 2, BITS_PER_PAGE + 3))
    sm.mark_regions_out_of_sync("labor3", range(79_999, 80_000))
    sm.commit()
    sm.close()
    sm = StateMap.open(smpath)
    assert list(sm.out_of_sync_regions("labor2").search(1)) == list(range(BITS_PER_PAGE - 2, BITS_PER_PAGE + 3))
    assert list(sm.out_of_sync_regions("labor3").search(1)) == [79_999]
    assert not sm.warnings and not sm.bad_pages
    sm.close()


def test_zeroed_out_of_sync_page_means_all_its_regions_out_of_sync(smpath, caplog):
    sm = make(smpath)
    sm.mark_regions_out_of_sync("labor2", range(BITS_PER_PAGE + 5, BITS_PER_PAGE + 6))
    sm.commit()
    offset = oos_page_offset(sm, "labor2", 1)
    sm.close()
    poke(smpath, offset, bytes(PAGE))  # what hid the difference in issue 12

    ro = StateMap.open(smpath, readonly=True)
    page1 = set(range(BITS_PER_PAGE, 2 * BITS_PER_PAGE))
    assert set(ro.out_of_sync_regions("labor2").search(1)) == page1
    assert ro.out_of_sync_bytes("labor3") == 0  # the other member's pages are fine
    (w,) = ro.warnings
    assert w.startswith(f"{smpath}: out-of-sync bitmap of member labor2 (slot 0) page 1 ")
    assert "all zeros" in w and "counts as out of sync for labor2" in w and "\n" not in w
    assert w in caplog.text
    ro.close()
    assert peek(smpath, offset) == bytes(PAGE)  # read-only: nothing written

    sm = StateMap.open(smpath)  # read-write: the assumed-worst content is written
    assert "page rewritten" in sm.warnings[0]
    sm.close()
    sm = StateMap.open(smpath)
    assert not sm.warnings
    assert set(sm.out_of_sync_regions("labor2").search(1)) == page1
    sm.close()


def test_damaged_intent_page_makes_its_extents_hot_for_every_member(smpath):
    sm = make(smpath)
    sm.prepare_clean_close()
    sm.commit()
    sm.close()
    poke(smpath, 2 * SLOT_SIZE + 100, b"\x01")  # one flipped byte in the bits
    sm = StateMap.open(smpath)
    assert sm.sb.clean
    (w,) = sm.warnings
    assert "intent bitmap page 0 (extents 0..78)" in w and "checksum mismatch" in w
    rec = sm.recover()
    assert rec.needed and rec.hot_extents == tuple(range(79))
    assert sm.out_of_sync_bytes("labor2") == sm.out_of_sync_bytes("labor3") == GEOMETRY["size"]
    sm.commit()
    sm.close()


def test_misplaced_and_foreign_pages_are_not_trusted(smpath, tmp_path):
    sm = make(smpath)
    page_of_labor3 = peek(smpath, oos_page_offset(sm, "labor3", 0))
    poke(smpath, oos_page_offset(sm, "labor2", 0), page_of_labor3)  # right map, wrong slot
    other = make(tmp_path / "other.sm")  # same geometry, another map
    foreign = peek(tmp_path / "other.sm", oos_page_offset(other, "labor3", 2))
    other.close()
    poke(smpath, oos_page_offset(sm, "labor3", 2), foreign)
    sm.close()
    sm = StateMap.open(smpath, readonly=True)
    problems = {(b.area, b.page): b.problem for b in sm.bad_pages}
    assert problems[("oos:labor2", 0)] == "misplaced page: it says out-of-sync slot 1 page 0"
    assert problems[("oos:labor3", 2)] == "page belongs to another state map (map id differs)"
    assert sm.out_of_sync_bytes("labor2") == BITS_PER_PAGE * 512
    assert sm.out_of_sync_bytes("labor3") == (80_000 - 2 * BITS_PER_PAGE) * 512
    sm.close()


def test_a_torn_page_write_is_detected_and_assumed_worst(smpath):
    sm = make(smpath)
    sm.mark_regions_out_of_sync("labor2", range(0, 10))
    sm.commit()
    sm.clear_out_of_sync("labor2", range(0, 10))
    sm.mark_regions_out_of_sync("labor2", range(5000, 5001))  # a later sector of the page
    plan = sm.prepare_commit()
    (offset, data, what), = plan.phases[0]
    assert what == "oos:labor2"
    sm.abort_commit(plan)
    sm.close()
    poke(smpath, offset, data[:SECTOR])  # power lost after the first sector landed
    sm = StateMap.open(smpath)
    assert sm.bad_pages[0].problem == "checksum mismatch (torn or damaged write)"
    assert set(sm.out_of_sync_regions("labor2").search(1)) == set(range(BITS_PER_PAGE))
    sm.close()


# ------------------------------------------------------------ version 1


def write_version_1_map(path, *, oos: dict[int, list[int]], hot: list[int], clean: bool):
    """A map exactly as format version 1 laid it out: raw bitmap pages, holes."""
    sb = StateMap.new_superblock(peers=PEERS, **GEOMETRY)
    sb.clean = clean
    lay = sb.layout_of(LEGACY_VERSION)
    with open(path, "w+b") as f:
        f.truncate(lay.file_size)
        f.write(encode_slot(sb, 2, version=LEGACY_VERSION))
        f.write(encode_slot(sb, 1, version=LEGACY_VERSION))
        for base, bits in [(lay.intent_offset, hot)] + [(lay.oos_offset(s), b) for s, b in oos.items()]:
            for bit in bits:
                f.seek(base + bit // 8)
                byte = f.read(1)
                f.seek(base + bit // 8)
                f.write(bytes([byte[0] | 1 << (bit % 8)]))
    return sb


def test_version_1_map_read_only_is_read_as_it_is(smpath):
    write_version_1_map(smpath, oos={0: [3, 40_000]}, hot=[7], clean=False)
    before = smpath.read_bytes()
    sm = StateMap.open(smpath, readonly=True)
    assert sm.version == LEGACY_VERSION and not sm.warnings
    assert list(sm.out_of_sync_regions("labor2").search(1)) == [3, 40_000]
    assert sm.out_of_sync_bytes("labor3") == 0 and sm.hot_extents() == [7]
    sm.close()
    assert smpath.read_bytes() == before


def test_version_1_map_is_upgraded_when_opened_read_write(smpath, caplog):
    caplog.set_level(logging.WARNING)
    sb = write_version_1_map(smpath, oos={0: [3, 40_000], 1: [79_999]}, hot=[7], clean=False)
    sm = StateMap.open(smpath)
    assert sm.version == FORMAT_VERSION and sm.sb.uuid == sb.uuid
    assert "upgraded from format 1 to 2" in caplog.text
    with pytest.raises(StateMapBusy):  # the lock is held on the new file
        StateMap.open(smpath)
    sm.close()
    assert os.path.getsize(smpath) == sb.layout.file_size
    assert sorted(os.listdir(smpath.parent)) == ["appslv.sm"]  # no temp file left behind
    sm = StateMap.open(smpath)
    assert sm.version == FORMAT_VERSION and not sm.warnings
    assert list(sm.out_of_sync_regions("labor2").search(1)) == [3, 40_000]
    assert list(sm.out_of_sync_regions("labor3").search(1)) == [79_999]
    assert not sm.sb.clean and sm.recover().hot_extents == (7,)  # the crash is still recovered
    sm.commit()
    sm.close()


def test_a_failed_upgrade_leaves_the_version_1_map(smpath, monkeypatch):
    write_version_1_map(smpath, oos={0: [3]}, hot=[], clean=True)
    before = smpath.read_bytes()

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", no_rename)  # dies just before the switch
    with pytest.raises(StateMapError, match="cannot upgrade .* format 2: No space left on device; the version-1"):
        StateMap.open(smpath)
    monkeypatch.undo()
    assert smpath.read_bytes() == before
    assert sorted(os.listdir(smpath.parent)) == ["appslv.sm"]
    sm = StateMap.open(smpath)  # and the next open upgrades it
    assert sm.version == FORMAT_VERSION and list(sm.out_of_sync_regions("labor2").search(1)) == [3]
    sm.close()


def test_a_version_1_map_read_as_it_is_is_never_written(smpath):
    from statemap.fileio import FileIO

    write_version_1_map(smpath, oos={}, hot=[], clean=True)
    sm = StateMap.load(FileIO(smpath))
    sm.begin_use()
    with pytest.raises(StateMapError, match="format-1 state map read as it is cannot be written"):
        sm.commit()
    sm.close()


def test_encode_page_refuses_too_many_bits():
    with pytest.raises(ValueError):
        encode_page(AREA_INTENT, INTENT_SLOT, 0, 1, bytes(PAGE))


# ------------------------------------------------------------ offline status


def test_offline_status_lists_a_damaged_page(cluster_config, tmp_path):
    from gmd import admin

    _path, config = cluster_config
    admin.init_volume(config, "labor1", "appslv")
    admin.mark_dirty(config, "labor1", "appslv", skip_initial_copy=True)
    smpath = tmp_path / "data/labor1/appslv.sm"
    sm = StateMap.open(smpath, readonly=True)
    offset = oos_page_offset(sm, "labor2", 0)
    sm.close()
    assert admin.offline_status(config, "labor1", "appslv")["members"]["labor2"]["out_of_sync_bytes"] == 0
    poke(smpath, offset, bytes(PAGE))
    st = admin.offline_status(config, "labor1", "appslv")
    (w,) = st["state_map"]["warnings"]
    assert "out-of-sync bitmap of member labor2 (slot 0) page 0" in w
    assert st["members"]["labor2"]["out_of_sync_bytes"] == 64 * MiB  # one page covers the whole volume
