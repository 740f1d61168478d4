"""The undo log of a consistent catch-up (gmd/undolog.py): each region saved
once, refusals when full, rollback to the image before the catch-up, and
crash safety: any crash image of the log file (torn, partly landed appends
and header writes) still rolls back to that image, and so does a crash
during a rollback."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gmd.errors import Refused
from gmd.undolog import DATA_START, PAGE, RECORD_OVERHEAD, UndoLog, UndoLogFull
from statemap.faultio import FaultIO, SimulatedCrash

RS = 4096
REGIONS = 64
SIZE = RS * REGIONS
GEOMETRY = dict(volume="appslv", size=SIZE, region_size=RS)


class MemDevice:
    """A backing device in memory; ``writes`` counts overwrites."""

    def __init__(self, data: bytes):
        self.data = bytearray(data)
        self.syncs = 0

    def read_sync(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset:offset + length])

    def write_sync(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data

    def sync(self) -> None:
        self.syncs += 1


def new_log(limit: int = 1 << 20, io: FaultIO | None = None) -> tuple[UndoLog, FaultIO]:
    io = io or FaultIO(name="test.undo")
    return UndoLog.load(io, limit=limit, **GEOMETRY), io


def reopen(image: bytes, limit: int = 1 << 20) -> UndoLog:
    return UndoLog.load(FaultIO(name="test.undo", image=image), limit=limit, **GEOMETRY)


def write(undo: UndoLog, dev: MemDevice, offset: int, data: bytes) -> None:
    """What the member does: preserve, then overwrite."""
    (answer,) = undo.preserve(dev, [[(offset, len(data))]])
    if answer is not None:
        raise answer
    dev.write_sync(offset, data)


def test_a_new_file_gets_an_empty_header_and_reopens_empty():
    undo, io = new_log()
    assert not undo.active and undo.used == DATA_START and undo.regions == 0
    again = reopen(io.durable_image())
    assert not again.active and again.consistent_at == 0.0


def test_each_region_is_saved_once_per_catch_up_with_one_fsync_per_batch():
    rng = random.Random(1)
    before = rng.randbytes(SIZE)
    dev = MemDevice(before)
    undo, io = new_log()
    undo.begin(consistent_at=1234.5)
    syncs = io.fsyncs
    write(undo, dev, 0, b"x" * 100)  # region 0, partly
    assert io.fsyncs == syncs + 1
    write(undo, dev, 200, b"y" * 100)  # region 0 again: nothing more to save, no fsync
    assert io.fsyncs == syncs + 1 and len(undo.records) == 1
    # Two requests in one batch, overlapping in region 3: saved once, one fsync.
    answers = undo.preserve(dev, [[(2 * RS, 2 * RS)], [(3 * RS + 10, RS)]])
    assert answers == [None, None] and io.fsyncs == syncs + 2
    assert undo.regions == 4  # 0, 2, 3, 4
    assert undo.used == DATA_START + 3 * RECORD_OVERHEAD + 4 * RS  # regions 2-3 in one record, 4 in another
    assert undo.needed([(0, 5)]) == 1 * (RS + RECORD_OVERHEAD)  # only region 1 is missing
    report = undo.rollback(dev)
    assert bytes(dev.data) == before
    assert (report.regions, report.bytes, report.consistent_at) == (4, 4 * RS, 1234.5)
    assert not undo.active and undo.regions == 0
    assert undo.rollback(dev).bytes == 0  # nothing left to do


def test_a_write_the_log_cannot_hold_is_refused_with_nothing_appended():
    dev = MemDevice(bytes(SIZE))
    limit = DATA_START + 2 * (RS + RECORD_OVERHEAD)
    undo, io = new_log(limit=limit)
    undo.begin(consistent_at=1.0)
    write(undo, dev, 0, b"a" * RS)
    used = undo.used
    answers = undo.preserve(dev, [[(RS, 2 * RS)], [(RS, RS)]])  # 2 regions do not fit; 1 does
    assert isinstance(answers[0], UndoLogFull) and answers[0].errno == 28 and "test.undo" in str(answers[0])
    assert answers[1] is None and undo.used == used + RS + RECORD_OVERHEAD
    assert isinstance(undo.preserve(dev, [[(5 * RS, 1)]])[0], UndoLogFull)


def test_an_active_log_reloads_its_index_after_a_restart():
    rng = random.Random(2)
    before = rng.randbytes(SIZE)
    dev = MemDevice(before)
    undo, io = new_log()
    undo.begin(consistent_at=77.0, identity="ab" * 16)
    for offset in (0, 5 * RS, 9 * RS + 7, 40 * RS):
        write(undo, dev, offset, rng.randbytes(3 * RS))
    again = reopen(io.durable_image())
    assert again.active and again.torn_tail is None
    assert (again.regions, again.used, again.consistent_at) == (undo.regions, undo.used, 77.0)
    # Writing on after the restart appends after what was read back.
    write(again, dev, 50 * RS, rng.randbytes(RS))
    again.rollback(dev)
    assert bytes(dev.data) == before


def test_a_torn_tail_is_ignored_its_overwrite_never_happened():
    rng = random.Random(3)
    before = rng.randbytes(SIZE)
    dev = MemDevice(before)
    undo, io = new_log()
    undo.begin(consistent_at=5.0)
    write(undo, dev, 0, rng.randbytes(RS))
    io.crash_at = ("record", 2)  # the process dies appending the batch's second record
    with pytest.raises(SimulatedCrash):
        undo.preserve(dev, [[(10 * RS, RS)], [(20 * RS, RS)]])
    for torn in (0, 1, 7):  # the first record of the batch landed torn (or not at all)
        landed = [0] if torn else []
        image = io.crash_image(landed, {0: torn} if torn and torn < 7 else None)
        again = reopen(image)
        assert again.active and again.regions in (1, 2)
        copy = MemDevice(bytes(dev.data))
        again.rollback(copy)
        assert bytes(copy.data) == before


def test_one_torn_header_slot_falls_back_to_the_other():
    undo, io = new_log()
    undo.begin(consistent_at=9.0)
    image = bytearray(io.durable_image())
    newest = undo.header.seq % 2
    image[newest * PAGE + 100] ^= 0xFF  # the newest slot is damaged: the older (empty) one is used
    again = reopen(bytes(image))
    assert not again.active


def test_a_damaged_header_is_refused_naming_the_file_and_changes_nothing():
    undo, io = new_log()
    image = bytearray(io.durable_image())
    image[0:2 * PAGE] = random.Random(4).randbytes(2 * PAGE)
    fio = FaultIO(name="/var/lib/gmd/appslv.undo", image=bytes(image))
    with pytest.raises(Refused) as e:
        UndoLog.load(fio, limit=1 << 20, **GEOMETRY)
    assert e.value.rule == "undo-log-damaged" and "/var/lib/gmd/appslv.undo" in str(e.value)
    assert "slot 0" in str(e.value) and "slot 1" in str(e.value)
    assert fio.writes == 0


def test_a_log_of_another_volume_is_refused():
    undo, io = new_log()
    with pytest.raises(Refused) as e:
        UndoLog.load(FaultIO(name="x.undo", image=io.durable_image()), limit=1 << 20, volume="other",
                     size=SIZE, region_size=RS)
    assert e.value.rule == "undo-log-other-volume" and "appslv" in str(e.value)
    undo.begin(consistent_at=1.0, identity="aa" * 16)
    with pytest.raises(Refused):
        UndoLog.load(FaultIO(name="x.undo", image=io.durable_image()), limit=1 << 20, identity="bb" * 16,
                     **GEOMETRY)


def test_records_of_an_earlier_catch_up_are_never_taken_for_this_one():
    rng = random.Random(5)
    dev = MemDevice(rng.randbytes(SIZE))
    undo, io = new_log()
    undo.begin(consistent_at=1.0)
    write(undo, dev, 0, rng.randbytes(8 * RS))
    undo.discard()
    assert not undo.active and undo.consistent_at > 1.0
    before = bytes(dev.data)
    undo.begin(consistent_at=2.0)
    again = reopen(io.durable_image())
    assert again.active and again.regions == 0  # the old records are still in the file, of another epoch
    write(again, dev, 30 * RS, rng.randbytes(RS))
    again.rollback(dev)
    assert bytes(dev.data) == before


def test_the_real_file_is_created_and_reopened(tmp_path):
    path = tmp_path / "appslv.undo"
    dev = MemDevice(bytes(SIZE))
    undo = UndoLog.open(path, limit=1 << 20, **GEOMETRY)
    undo.begin(consistent_at=3.0)
    write(undo, dev, RS, b"z" * RS)
    undo.close()
    again = UndoLog.open(path, limit=1 << 20, **GEOMETRY)
    assert again.active and again.regions == 1 and again.status()["used"] == DATA_START + RS + RECORD_OVERHEAD
    again.close()
    with pytest.raises(Refused) as e:
        UndoLog.open(tmp_path / "no" / "such" / "dir.undo", limit=1 << 20, **GEOMETRY)
    assert e.value.rule == "undo-log-unopenable"


writes = st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 3 * RS)), min_size=1, max_size=12)


class CrashingFsync(FaultIO):
    """A log file whose next fsync is armed to crash (the batch's appends stay pending)."""

    armed = False

    def fsync(self) -> None:
        if self.armed:
            raise SimulatedCrash("crash before the batch's fsync")
        super().fsync()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(writes=writes, crash_after=st.integers(0, 12), seed=st.integers(0, 2**32), landed=st.randoms(),
       rollback_crash=st.integers(0, 6))
def test_any_crash_rolls_back_to_the_image_before_the_catch_up(writes, crash_after, seed, landed, rollback_crash):
    """Random overwrites, each preserved first; a crash after any number of
    them, with the last batch's appends (several records, over the records
    of an earlier catch-up still in the file) landed in any subset, torn or
    whole; then a rollback that itself may crash after a few device writes
    and is run again: the device ends as it was before the catch-up."""
    rng = random.Random(seed)
    io = CrashingFsync(name="test.undo")
    undo, _ = new_log(limit=1 << 22, io=io)
    # An earlier catch-up left records all over the file (the tail is not the file's end).
    scratch = MemDevice(rng.randbytes(SIZE))
    undo.begin(consistent_at=1.0)
    write(undo, scratch, 0, rng.randbytes(SIZE))
    undo.discard()
    before = rng.randbytes(SIZE)
    dev = MemDevice(before)
    undo.begin(consistent_at=42.0)
    for i, (offset, length) in enumerate(writes):
        length = min(length, SIZE - offset)
        if i == crash_after:
            # The crash: a batch of three writes' records appended, not yet durable; no overwrite happened.
            io.armed = True
            batch = [[(offset, length)], [((offset + 7 * RS) % SIZE, RS)], [((offset + 20 * RS) % SIZE, 2 * RS)]]
            saved = undo.regions
            try:
                undo.preserve(dev, batch)
            except SimulatedCrash:
                pass
            else:  # every region of the batch was saved already: nothing to append, no fsync to crash in
                assert undo.regions == saved
            break
        write(undo, dev, offset, rng.randbytes(length))
    chosen = [i for i in range(len(io.pending)) if landed.random() < 0.6]
    torn = {i: landed.randrange(1, 8) for i in chosen if landed.random() < 0.5}
    image = io.crash_image(chosen, torn)
    again = reopen(image, limit=1 << 22)
    assert again.active

    class CrashingDevice(MemDevice):
        left = rollback_crash

        def write_sync(self, offset, data):
            if self.left == 0:
                raise SimulatedCrash("rollback interrupted")
            self.left -= 1
            super().write_sync(offset, data)

    crashing = CrashingDevice(bytes(dev.data))
    try:
        again.rollback(crashing)
    except SimulatedCrash:
        # Crashed while writing back: the header is still active; do it again.
        again = reopen(image, limit=1 << 22)
        assert again.active
        final = MemDevice(bytes(crashing.data))
        again.rollback(final)
        assert bytes(final.data) == before
    else:
        assert bytes(crashing.data) == before
