"""State map behaviour: round trips, torn superblocks, corruption, commit cost,
recovery of hot extents, lazy retirement, copy source/target, locking."""

import os
import struct

import pytest
import xxhash

from statemap.errors import GeometryMismatch, StateMapCorrupt, StateMapError, StateMapVersionError
from statemap.faultio import FaultIO
from statemap.fileio import FileIO
from statemap.format import (
    AREA_INTENT, CHECKSUM_OFFSET, INTENT_SLOT, NO_GENERATION, PAGE, SLOT_SIZE, Fence, encode_page, map_id,
)
from statemap.states import CopyKind, DiskState, Role
from statemap.statemap import StateMap, StateMapBusy, ensure_not_in_use

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
GEOMETRY = dict(volume="appslv", size=256 * MiB, region_size=64 * KiB, extent_size=4 * MiB, member="labor1")


@pytest.fixture
def smpath(tmp_path):
    return tmp_path / "appslv.sm"


def make(path, peers=("labor2", "labor3"), in_use=True, **kw):
    """A new map; ``in_use`` marks it as a running daemon would before writing."""
    args = dict(GEOMETRY, peers=list(peers))
    args.update(kw)
    sm = StateMap.create(path, **args)
    if in_use:
        sm.begin_use()
    return sm


def reopen(sm, path, **kw):
    sm.close()
    return StateMap.open(path, **kw)


class CountingIO(FileIO):
    """A real file that counts what the state map writes and syncs."""

    def __init__(self, path):
        super().__init__(path)
        self.bytes_written = 0
        self.fsyncs = 0

    def pwrite(self, offset, data, what):
        self.bytes_written += len(data)
        super().pwrite(offset, data, what)

    def fsync(self):
        self.fsyncs += 1
        super().fsync()


def test_new_map_round_trips_every_field(smpath):
    sm = make(smpath, in_use=False)
    assert sm.sb.clean and sm.sb.disk == DiskState.INCONSISTENT and sm.is_fresh
    with pytest.raises(StateMapError, match="begin_use"):
        sm.mark_out_of_sync("labor2", 0, 1)
    sm.begin_use()
    sm.set_role(Role.PRIMARY)
    sm.set_disk(DiskState.UPTODATE)
    sm.set_peer_disk("labor2", DiskState.OUTDATED)
    sm.set_peer_copy("labor3", Fence(CopyKind.FULL, 0))
    sm.advance_peer_fence("labor3", 10 * MiB)
    sm.set_local_copy(Fence(CopyKind.MERGE, 4 * MiB))
    sm.set_expected_votes(2)
    gen = sm.start_new_generation()
    sm.mark_out_of_sync("labor2", 5 * MiB + 17, 200 * KiB)
    sm.commit()
    sm = reopen(sm, smpath)
    sb = sm.sb
    assert (sb.role, sb.disk, sb.expected_votes) == (Role.PRIMARY, DiskState.UPTODATE, 2)
    assert sb.peers["labor2"].disk == DiskState.OUTDATED
    assert sb.peers["labor3"].copy == Fence(CopyKind.FULL, 10 * MiB)
    assert sb.local_copy == Fence(CopyKind.MERGE, 4 * MiB)
    assert sb.generations.current == gen and not sm.is_fresh
    # 5 MiB+17 .. +200 KiB touches regions 80..83
    assert list(sm.out_of_sync_regions("labor2").search(1)) == [80, 81, 82, 83]
    assert sm.out_of_sync_bytes("labor2") == 4 * 64 * KiB
    assert sm.out_of_sync_bytes("labor3") == 256 * MiB - 10 * MiB
    sm.close()


def test_superblock_slots_alternate_and_higher_sequence_wins(smpath):
    sm = make(smpath, in_use=False)
    written = []
    for disk in (DiskState.OUTDATED, DiskState.UPTODATE, DiskState.OUTDATED):
        sm.set_disk(disk)
        plan = sm.prepare_commit()
        written.append(plan.phases[2][0][0])  # offset of the superblock write
        plan.run(sm.io)
        sm.finish_commit(plan)
    assert written[0] != written[1] and written[0] == written[2]
    assert reopen(sm, smpath).sb.disk == DiskState.OUTDATED


def _damage_slot(path, slot, byte=100):
    with open(path, "r+b") as f:
        f.seek(slot * SLOT_SIZE + byte)
        b = f.read(1)
        f.seek(slot * SLOT_SIZE + byte)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("torn", ["newest", "older"])
def test_one_corrupt_slot_the_other_wins_with_a_warning(smpath, torn, caplog):
    sm = make(smpath)
    sm.set_disk(DiskState.OUTDATED)
    sm.commit()  # seq 3 -> slot B; slot A holds seq 2 (disk inconsistent)
    sm.close()
    _damage_slot(smpath, 1 if torn == "newest" else 0)
    sm = StateMap.open(smpath)
    expect = DiskState.INCONSISTENT if torn == "newest" else DiskState.OUTDATED
    assert sm.sb.disk == expect
    assert any("checksum mismatch" in w for w in sm.warnings)
    assert "checksum mismatch" in caplog.text
    sm.close()


def test_torn_superblock_write_keeps_the_previous_superblock(smpath):
    sm = make(smpath, in_use=False)
    sm.set_disk(DiskState.UPTODATE)
    plan = sm.prepare_commit()
    offset, data, _ = plan.phases[2][0]
    sm.close()
    with open(smpath, "r+b") as f:  # only the first sector of the new slot lands
        f.seek(offset)
        f.write(data[:512])
    sm = StateMap.open(smpath)
    assert sm.sb.disk == DiskState.INCONSISTENT
    assert sm.warnings
    sm.close()


def test_both_slots_corrupt_is_refused_never_treated_as_clean(smpath):
    make(smpath).close()
    _damage_slot(smpath, 0)
    _damage_slot(smpath, 1)
    with pytest.raises(StateMapCorrupt, match="both superblock slots are unusable"):
        StateMap.open(smpath)


def test_bad_magic_is_refused(smpath):
    make(smpath).close()
    with open(smpath, "r+b") as f:
        f.write(b"NOTAMAP!")
        f.seek(SLOT_SIZE)
        f.write(b"NOTAMAP!")
    with pytest.raises(StateMapCorrupt, match="bad magic"):
        StateMap.open(smpath)


def test_truncated_file_is_refused(smpath):
    make(smpath).close()
    os.truncate(smpath, 3 * PAGE)
    with pytest.raises(StateMapCorrupt, match="truncated"):
        StateMap.open(smpath)
    os.truncate(smpath, 100)
    with pytest.raises(StateMapCorrupt, match="truncated"):
        StateMap.open(smpath)


def test_future_format_version_is_refused_not_rolled_back(smpath):
    make(smpath).close()
    with open(smpath, "r+b") as f:
        slot = bytearray(f.read(SLOT_SIZE))
        struct.pack_into("<H", slot, 8, 9)
        struct.pack_into("<Q", slot, CHECKSUM_OFFSET, 0)
        struct.pack_into("<Q", slot, CHECKSUM_OFFSET, xxhash.xxh64_intdigest(bytes(slot)))
        f.seek(0)
        f.write(slot)
    with pytest.raises(StateMapVersionError, match="version 9 is newer"):
        StateMap.open(smpath)


def test_valid_checksum_with_invalid_payload_is_skipped(smpath):
    make(smpath).close()
    with open(smpath, "r+b") as f:
        slot = bytearray(f.read(SLOT_SIZE))
        i = slot.index(b'"disk":"inconsistent"')
        slot[i : i + 21] = b'"disk":"greatshape!!"'
        struct.pack_into("<Q", slot, CHECKSUM_OFFSET, 0)
        struct.pack_into("<Q", slot, CHECKSUM_OFFSET, xxhash.xxh64_intdigest(bytes(slot)))
        f.seek(0)
        f.write(slot)
    sm = StateMap.open(smpath)  # slot B (seq 1) is still good
    assert any("payload invalid" in w and "disk" in w for w in sm.warnings)
    sm.close()


@pytest.mark.parametrize(
    "field,value",
    [("volume", "other"), ("member", "labor9"), ("size", 512 * MiB), ("region_size", 128 * KiB), ("extent_size", 8 * MiB)],
)
def test_geometry_mismatch_names_the_field(smpath, field, value):
    sm = make(smpath)
    expected = {k: v for k, v in GEOMETRY.items()}
    expected[field] = value
    with pytest.raises(GeometryMismatch) as e:
        sm.check_geometry(**expected)
    assert e.value.field == field and field in str(e.value)
    sm.check_geometry(**GEOMETRY)
    sm.close()


def test_one_tebibyte_map_commits_cost_what_changed_not_the_volume_size(smpath):
    sm = make(smpath, size=TiB, in_use=False)
    sm.close()
    # Every page is written at creation (a hole would read as "in sync"): for
    # 1 TiB in 64 KiB regions that is about 2 MiB per member slot.
    assert os.stat(smpath).st_blocks * 512 >= os.stat(smpath).st_size
    io = CountingIO(smpath)
    sm = StateMap.load(io)
    sm.begin_use()
    sm.commit()
    io.bytes_written = io.fsyncs = 0
    sm.mark_out_of_sync("labor2", 700 * GiB, 4096)
    assert sm.commit() == PAGE
    assert io.bytes_written == PAGE and io.fsyncs == 1
    io.bytes_written = 0
    need = sm.intent_acquire(900 * GiB, 1 * MiB)
    assert need and sm.durable_changes < need
    sm.commit()
    assert sm.durable_changes >= need
    assert io.bytes_written == PAGE
    sm.close()
    sm = StateMap.open(smpath)
    assert sm.out_of_sync_bytes("labor2") == 64 * KiB and not sm.warnings
    sm.close()


def test_bits_clear_and_survive_reopen(smpath):
    sm = make(smpath)
    sm.mark_out_of_sync("labor2", 0, 256 * MiB)
    sm.clear_out_of_sync("labor2", range(10, 4096))
    sm.commit()
    sm = reopen(sm, smpath)
    assert sm.out_of_sync_bytes("labor2") == 10 * 64 * KiB
    assert sm.out_of_sync_bytes("labor3") == 0
    sm.close()


def test_out_of_range_marks_are_refused(smpath):
    sm = make(smpath)
    with pytest.raises(ValueError, match="outside volume"):
        sm.mark_out_of_sync("labor2", 256 * MiB - 4096, 8192)
    with pytest.raises(ValueError, match="outside volume"):
        sm.intent_acquire(-1, 10)
    with pytest.raises(StateMapError, match="not a member"):
        sm.mark_out_of_sync("nobody", 0, 10)
    sm.close()


def test_recovery_ors_hot_extents_into_every_member(smpath):
    sm = make(smpath)
    sm.begin_use()
    sm.commit()
    sm.intent_acquire(3 * 4 * MiB + 5, 100)  # extent 3
    sm.intent_acquire(10 * 4 * MiB, 4 * MiB + 1)  # extents 10 and 11
    sm.mark_out_of_sync("labor3", 200 * MiB, 1)  # exact bit outside the hot set
    sm.commit()
    sm.close()  # simulated crash: no clean close
    sm = StateMap.open(smpath)
    assert not sm.sb.clean
    rec = sm.recover()
    assert rec.needed and rec.hot_extents == (3, 10, 11)
    assert rec.bytes == 3 * 4 * MiB
    sm.commit()
    sm = reopen(sm, smpath)
    for member in ("labor2", "labor3"):
        bits = sm.out_of_sync_regions(member)
        for extent in (3, 10, 11):
            assert bits.count(1, extent * 64, extent * 64 + 64) == 64
    assert sm.out_of_sync_bytes("labor2") == 3 * 4 * MiB
    assert sm.out_of_sync_bytes("labor3") == 3 * 4 * MiB + 64 * KiB
    assert sm.hot_extents() == [] and not sm.intent.any()
    sm.close()


def test_clean_close_needs_no_recovery(smpath):
    sm = make(smpath)
    sm.begin_use()
    sm.commit()
    sm.intent_acquire(0, 4096)
    sm.intent_release(0, 4096, seq=1)
    with pytest.raises(StateMapError, match="unflushed"):
        sm.prepare_clean_close()
    sm.note_flushed(1)
    sm.prepare_clean_close()
    sm.commit()
    sm = reopen(sm, smpath)
    assert sm.sb.clean and sm.sb.clean_stop
    assert sm.recover().needed is False
    sm.close()


def test_hot_set_amortizes_and_retires_lazily(smpath):
    sm = make(smpath)
    sm.hot_limit = 4
    sm.begin_use()
    sm.commit()
    es = 4 * MiB
    # A write to a hot extent costs no metadata write.
    assert sm.intent_acquire(0, 4096)
    sm.commit()
    assert sm.intent_acquire(8192, 4096) == 0
    sm.intent_release(0, 4096, 1)
    sm.intent_release(8192, 4096, 2)
    for e in range(1, 4):
        sm.intent_acquire(e * es, 10)
        sm.intent_release(e * es, 10, 2 + e)
    assert sm.hot_extents() == [0, 1, 2, 3]
    # Not flushed yet: over the limit, nothing may retire.
    sm.intent_acquire(4 * es, 10)
    assert len(sm.hot_extents()) == 5
    sm.note_flushed(5)
    sm.intent_acquire(5 * es, 10)  # now the least recently used idle ones go
    assert sm.hot_extents() == [2, 3, 4, 5]
    sm.commit()
    sm = reopen(sm, smpath)
    assert sorted(sm.hot_extents()) == sorted([e for e in range(6) if sm.intent[e]])
    assert not sm.intent[0]
    sm.close()


def test_reacquired_extent_waits_for_its_bit_again(smpath):
    sm = make(smpath)
    sm.intent_acquire(0, 10)
    sm.intent_release(0, 10, 1)
    sm.commit()
    sm.note_flushed(1)
    sm.retire_idle()
    need = sm.intent_acquire(0, 10)
    assert need and need > sm.durable_changes
    sm.commit()
    sm = reopen(sm, smpath)
    assert sm.intent[0]
    sm.close()


def test_a_write_takes_its_intent_without_waiting_only_where_it_is_on_disk(smpath):
    sm = make(smpath)
    es = 4 * MiB
    assert not sm.intent_acquire_if_ready(0, 4096)  # cold extent: it needs a commit
    assert sm.hot_extents() == []  # and nothing was changed
    sm.intent_acquire(0, 4096)
    assert not sm.intent_acquire_if_ready(8192, 4096)  # hot, but its bit not yet on disk
    sm.commit()
    assert sm.intent_acquire_if_ready(8192, 4096)
    assert not sm.intent_acquire_if_ready(es - 10, 20)  # spills into cold extent 1: nothing taken
    sm.intent_release(0, 4096, 1)
    sm.intent_release(8192, 4096, 2)
    sm.note_flushed(1)
    sm.retire_idle()
    assert sm.hot_extents() == [0]  # the write taken without waiting holds its extent like any other
    sm.note_flushed(2)
    sm.retire_idle()
    assert not sm.intent_acquire_if_ready(0, 4096)  # retired: its bit is cleared, not yet on disk
    sm.close()


def test_commit_plan_can_run_while_owner_keeps_marking(smpath):
    sm = make(smpath)
    sm.mark_out_of_sync("labor2", 0, 1)
    plan = sm.prepare_commit()
    sm.mark_out_of_sync("labor2", 64 * KiB, 1)  # same page, after the snapshot
    plan.run(sm.io)
    sm.finish_commit(plan)
    assert sm.has_unsaved_changes  # the later bit is still to be written
    sm.commit()
    sm = reopen(sm, smpath)
    assert list(sm.out_of_sync_regions("labor2").search(1)) == [0, 1]
    sm.close()


def test_failed_commit_is_retried(smpath):
    sm = make(smpath)
    sm.commit()
    sm.mark_out_of_sync("labor2", 0, 1)

    class Boom(Exception):
        pass

    real = sm.io.pwrite

    def failing(*a):
        raise Boom()

    sm.io.pwrite = failing
    with pytest.raises(Boom):
        sm.commit()
    sm.io.pwrite = real
    assert sm.commit() == PAGE
    sm = reopen(sm, smpath)
    assert sm.out_of_sync_bytes("labor2") == 64 * KiB
    sm.close()


def test_copy_source_and_target(smpath, tmp_path):
    src = make(smpath)
    src.mark_out_of_sync("labor2", 0, 10 * MiB)
    src.make_copy_source()
    src.commit()
    src = reopen(src, smpath)
    assert src.sb.disk == DiskState.UPTODATE and not src.is_fresh
    assert src.sb.generations.current != NO_GENERATION
    for peer in ("labor2", "labor3"):
        assert src.sb.peers[peer].copy == Fence(CopyKind.FULL, 0)
        assert src.out_of_sync_bytes(peer) == 256 * MiB
    old = src.sb.generations.current
    src.make_copy_target()
    src.commit()
    src = reopen(src, smpath)
    assert src.sb.disk == DiskState.INCONSISTENT
    assert src.sb.generations.current == NO_GENERATION and src.sb.generations.history[0] == old
    assert src.local_out_of_sync_bytes() == 256 * MiB
    assert all(src.out_of_sync_bytes(p) == 0 for p in ("labor2", "labor3"))
    src.close()


def test_add_peer_gets_a_free_slot_and_a_full_copy(smpath):
    sm = make(smpath, peers=["labor2"])
    sm.add_peer("labor3")
    sm.commit()
    sm = reopen(sm, smpath)
    assert sm.sb.peers["labor3"].copy == Fence(CopyKind.FULL, 0)
    assert sm.sb.peers["labor3"].slot != sm.sb.peers["labor2"].slot
    with pytest.raises(StateMapError, match="already a member"):
        sm.add_peer("labor2")
    sm.close()


def test_a_second_writer_is_refused_but_readers_are_not(smpath):
    sm = make(smpath, in_use=False)
    with pytest.raises(StateMapBusy, match="in use"):
        StateMap.open(smpath)
    ro = StateMap.open(smpath, readonly=True)
    assert ro.sb.volume == "appslv"
    ro.close()
    sm.close()


def test_missing_map_says_how_to_create_one(tmp_path):
    with pytest.raises(StateMapError, match="gmd init"):
        StateMap.open(tmp_path / "nope.sm")


def test_faultio_creation_matches_file_creation():
    io = FaultIO()
    sm = StateMap.create_in(io, peers=["labor2"], **GEOMETRY)
    assert io.size() == sm.layout.file_size
    again = StateMap.load(FaultIO(image=io.durable_image()))
    assert again.sb.uuid == sm.sb.uuid


def test_clearing_the_clean_flag_reaches_disk_before_any_bit(smpath):
    """Found by the crash machine: a session's first intent must not land under a
    superblock that still says clean."""
    sm = make(smpath, in_use=False)
    sm.begin_use()
    sm.intent_acquire(0, 4096)
    plan = sm.prepare_commit()
    assert [p[0][2] for p in plan.phases if p] == ["superblock:B", "intent"]
    sm.abort_commit(plan)
    sm.commit()
    sm.intent_release(0, 4096, 1)
    sm.note_flushed(1)
    sm.prepare_clean_close()
    plan = sm.prepare_commit()
    assert [p[0][2].split(":")[0] for p in plan.phases if p] == ["intent", "superblock"]
    sm.abort_commit(plan)
    sm.close()


def test_recovery_ors_intent_bits_even_under_a_clean_flag(smpath):
    sm = make(smpath, in_use=False)
    sm.close()
    with open(smpath, "r+b") as f:  # a hot extent 5 under a clean superblock
        f.seek(2 * PAGE)
        f.write(encode_page(AREA_INTENT, INTENT_SLOT, 0, map_id(sm.sb.uuid), bytes([0b100000])))
    sm = StateMap.open(smpath)
    assert sm.sb.clean
    rec = sm.recover()
    assert rec.needed and rec.hot_extents == (5,)
    assert sm.out_of_sync_bytes("labor2") == 4 * MiB
    sm.close()


# ------------------------------------------------------------ volume identity


def test_copy_source_creates_the_volume_identity_once_and_keeps_it(smpath):
    sm = make(smpath)
    assert sm.identity is None  # a fresh map belongs to no volume life yet
    sm.make_copy_source()
    sm.commit()
    sm = reopen(sm, smpath)
    ident = sm.identity
    assert isinstance(ident, str) and len(ident) == 32 and int(ident, 16) >= 0
    first_gen = sm.sb.generations.current
    sm.make_copy_source()  # gmd dirty again: new generation, same volume
    sm.commit()
    sm = reopen(sm, smpath)
    assert sm.identity == ident and sm.sb.generations.current != first_gen
    sm.close()
    other = make(smpath.with_name("other.sm"))
    other.make_copy_source()
    assert other.identity not in (None, ident)  # another volume's life, another identity
    other.close()


def test_copy_target_clears_the_identity_and_adopts_its_sources(smpath):
    sm = make(smpath)
    sm.make_copy_source()
    sm.commit()
    source_identity = sm.identity
    sm.make_copy_target()
    sm.commit()
    sm = reopen(sm, smpath)
    assert sm.identity is None
    sm.adopt_identity("0123456789abcdef0123456789abcdef")
    sm.adopt_identity("0123456789abcdef0123456789abcdef")  # the same again: nothing to do
    sm.commit()
    sm = reopen(sm, smpath)
    assert sm.identity == "0123456789abcdef0123456789abcdef" != source_identity
    with pytest.raises(StateMapError, match="refusing to adopt another"):
        sm.adopt_identity("f" * 32)
    with pytest.raises(ValueError):
        sm.adopt_identity("")
    assert sm.identity == "0123456789abcdef0123456789abcdef"
    sm.close()


def test_a_generations_record_without_identity_decodes_as_none():
    from statemap.format import Superblock

    sb = StateMap.new_superblock(peers=["labor2"], **GEOMETRY)
    raw = sb.to_json()
    del raw["generations"]["identity"]  # as written before identities existed
    assert Superblock.from_json(raw).generations.identity is None
    raw["generations"]["identity"] = "abc"
    assert Superblock.from_json(raw).generations.identity == "abc"


def test_offline_status_shows_the_identity(cluster_config):
    from gmd import admin

    _path, config = cluster_config
    admin.init_volume(config, "labor1", "appslv")
    assert admin.offline_status(config, "labor1", "appslv")["state_map"]["identity"] is None
    admin.mark_dirty(config, "labor1", "appslv")
    ident = admin.offline_status(config, "labor1", "appslv")["state_map"]["identity"]
    assert ident and len(ident) == 32


# ------------------------------------------------------- what the path is


@pytest.mark.parametrize("readonly", [True, False])
def test_a_directory_where_the_map_belongs_is_named_as_such(tmp_path, readonly):
    (tmp_path / "appslv.sm").mkdir()
    with pytest.raises(StateMapError) as e:
        StateMap.open(tmp_path / "appslv.sm", readonly=readonly)
    assert str(e.value) == f"{tmp_path / 'appslv.sm'}: is a directory, not a state map file"
    with pytest.raises(StateMapError, match="is a directory"):
        ensure_not_in_use(tmp_path / "appslv.sm")


def test_a_missing_map_says_no_such_file(tmp_path):
    with pytest.raises(StateMapError, match=r"nope\.sm: no such file"):
        StateMap.open(tmp_path / "nope.sm", readonly=True)
    ensure_not_in_use(tmp_path / "nope.sm")  # nothing there, so nothing in use


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_map_says_permission_denied(smpath):
    make(smpath).close()
    os.chmod(smpath, 0o200)
    try:
        with pytest.raises(StateMapError, match=r"appslv\.sm: permission denied: this user may not read the"):
            StateMap.open(smpath, readonly=True)
        os.chmod(smpath, 0o400)
        with pytest.raises(StateMapError, match="may not read and write"):
            StateMap.open(smpath)
    finally:
        os.chmod(smpath, 0o600)


def test_permission_denied_is_said_in_one_line(smpath, monkeypatch):
    """The same mapping without needing a non-root user: what the open raises."""
    import statemap.statemap as smmod

    def refuse(path, readonly=False):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(smmod, "FileIO", refuse)
    with pytest.raises(StateMapError, match=r"appslv\.sm: permission denied: this user may not read and write"):
        StateMap.open(smpath)


def test_a_fifo_where_the_map_belongs_is_refused_not_waited_on(tmp_path):
    import threading

    os.mkfifo(tmp_path / "appslv.sm")
    got = []

    def try_open():
        try:
            StateMap.open(tmp_path / "appslv.sm", readonly=True)
        except StateMapError as e:
            got.append(str(e))

    t = threading.Thread(target=try_open, daemon=True)  # a blocked open must not hang the run
    t.start()
    t.join(10)
    assert not t.is_alive(), "opening a FIFO as a state map blocked"
    assert got and "not a regular file" in got[0]


def test_offline_status_on_a_directory_says_so(cluster_config, tmp_path):
    from gmd import admin

    _path, config = cluster_config
    (tmp_path / "data/labor1/appslv.sm").mkdir(parents=True)
    with pytest.raises(StateMapError, match="appslv.sm: is a directory"):
        admin.offline_status(config, "labor1", "appslv")
