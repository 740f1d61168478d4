"""tools.workload: writer threads stamping a real file, the ack journal,
retargeting, failures, and the verification of what they wrote.

The files live in /var/tmp, where the filesystem usually takes O_DIRECT
(tmpfs refuses it); where it does not, the tests run buffered with an fsync
after each write instead, and each test's ``direct`` parameter says which.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tools.stamps import BLOCK, parse, verify
from tools.workload import PROBE_WRITER, Workload, journal_run, load_in_flight, load_journal, probe

AREA = (8 * BLOCK, 64 * BLOCK)  # 64 blocks after 8 the workload must never touch
SIZE = AREA[0] + AREA[1] + 8 * BLOCK
TIMEOUT = 30.0  # seconds: a bound for a hung test, never a measurement


def _direct_io_works(directory: Path) -> bool:
    probe_file = directory / "odirect-probe"
    probe_file.write_bytes(bytes(BLOCK))
    try:
        fd = os.open(probe_file, os.O_RDWR | os.O_DIRECT)
    except OSError:
        return False
    try:
        with mmap.mmap(-1, BLOCK) as buf:
            os.pwrite(fd, buf, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe_file.unlink()


@pytest.fixture
def workdir():
    """A temp directory in /var/tmp, removed even when the test fails."""
    d = Path(tempfile.mkdtemp(prefix="gmd-workload-", dir="/var/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def direct(workdir) -> bool:
    """O_DIRECT where /var/tmp's filesystem takes it, else buffered + fsync."""
    return _direct_io_works(workdir)


def volume(path: Path) -> Path:
    """A zero-filled stand-in for a volume file."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


@pytest.fixture
def workloads():
    """Makes workloads and stops every one at teardown, checking that no
    writer thread outlives its workload."""
    made: list[Workload] = []

    def make(path, **kw) -> Workload:
        kw.setdefault("area", AREA)
        kw.setdefault("seed", 1234)
        wl = Workload(path, **kw)
        made.append(wl)
        return wl

    try:
        yield make
    finally:
        for wl in made:
            assert wl.stop(timeout=TIMEOUT) == []
        assert not [t for t in threading.enumerate() if t.name.startswith("workload-writer-")]


def file_reader(path: Path):
    data = path.read_bytes()
    return lambda off: data[off:off + BLOCK]


def test_writers_are_acknowledged_and_the_file_verifies(workdir, direct, workloads):
    vol = volume(workdir / "appslv")
    wl = workloads(vol, journal=workdir / "journal", direct=direct)
    wl.start()
    assert wl.wait_acked(500, TIMEOUT)
    assert wl.stop(timeout=TIMEOUT) == []
    acks = wl.acks()
    assert len(acks) >= 500 and [a.index for a in acks] == list(range(1, len(acks) + 1))
    # Every write issued was acknowledged: each writer's seqs run 1, 2, ...
    for w in range(4):
        seqs = [a.seq for a in acks if a.writer == w]
        assert seqs == list(range(1, len(seqs) + 1))
    # Each writer stays in its own blocks of the area.
    for a in acks:
        block = (a.offset - AREA[0]) // BLOCK
        assert 0 <= block < AREA[1] // BLOCK and block % 4 == a.writer
    v = verify(acks, file_reader(vol), wl.run, in_flight=wl.in_flight)
    assert v.ok == v.blocks_checked > 0 and v.passed(rpo_zero=True), v.as_dict()
    assert wl.in_flight == {} and not wl.errors
    data = vol.read_bytes()
    assert data[:AREA[0]] == bytes(AREA[0]) and data[AREA[0] + AREA[1]:] == bytes(SIZE - AREA[0] - AREA[1])


def test_the_journal_reads_back_as_the_acks(workdir, direct, workloads):
    vol = volume(workdir / "appslv")
    journal = workdir / "journal"
    wl = workloads(vol, journal=journal, direct=direct)
    wl.start()
    assert wl.wait_acked(300, TIMEOUT)
    wl.stop(timeout=TIMEOUT)
    assert load_journal(journal) == wl.acks()
    assert journal_run(journal) == wl.run
    # A process killed mid-append leaves a torn last line: it is ignored.
    with open(journal, "a") as f:
        f.write(f"a {len(wl.acks()) + 1} 2 9")
    assert load_journal(journal) == wl.acks()


def test_first_ack_after(workdir, direct, workloads):
    wl = workloads(volume(workdir / "appslv"), journal=workdir / "journal", direct=direct)
    wl.start()
    assert wl.wait_acked(50, TIMEOUT)
    wl.stop(timeout=TIMEOUT)
    times = [a.acked_at for a in wl.acks()]
    t = times[20]
    assert wl.first_ack_after(t) == min(x for x in times if x > t)
    assert wl.first_ack_after(times[-1]) is None
    assert wl.first_ack_after(times[0] - 1) == times[0]


def test_pause_quiets_and_retarget_moves_to_a_copy(workdir, direct, workloads):
    first = volume(workdir / "labor1-appslv")
    second = workdir / "labor2-appslv"
    wl = workloads(first, journal=workdir / "journal", direct=direct)
    wl.start()
    assert wl.wait_acked(200, TIMEOUT)
    assert wl.pause(timeout=TIMEOUT) == []  # no write in the kernel any more
    mark = wl.acked()
    assert not wl.wait_acked(1, 0.2, since=mark)  # paused: nothing more is acknowledged
    v = verify(wl.acks(), file_reader(first), wl.run, in_flight=wl.in_flight)
    assert v.passed(rpo_zero=True), v.as_dict()
    # The "new primary" starts as an exact copy, as after a sync replication.
    shutil.copyfile(first, second)
    wl.retarget(second)
    wl.resume()
    assert wl.wait_acked(300, TIMEOUT, since=mark)
    wl.stop(timeout=TIMEOUT)
    v = verify(wl.acks(), file_reader(second), wl.run, in_flight=wl.in_flight)
    assert v.ok == v.blocks_checked and v.passed(rpo_zero=True), v.as_dict()
    # The old primary did not see the writes made after the move.
    old = verify(wl.acks(), file_reader(first), wl.run)
    assert old.stale > 0 and old.prefix_index == mark and old.is_prefix


def test_a_failing_target_leaves_writes_in_flight_until_retarget(workdir, workloads):
    # Buffered: /dev/full refuses O_DIRECT at open; its writes fail ENOSPC,
    # as a dead primary's fail ENOTCONN or EIO.
    good = volume(workdir / "appslv")
    journal = workdir / "journal"
    wl = workloads(good, journal=journal, direct=False)
    wl.start()
    assert wl.wait_acked(100, TIMEOUT)
    wl.retarget("/dev/full")
    assert wl.wait_waiting(TIMEOUT)
    mark = wl.acked()
    # Waiting writers issue nothing: no acks, no further errors.
    assert not wl.wait_acked(1, 0.2, since=mark)
    assert wl.errors == Counter(ENOSPC=4) and wl.waiting() == [0, 1, 2, 3]
    failed = {(w, s): off for off, ws in wl.in_flight.items() for w, s in ws}
    assert sorted(w for w, _ in failed) == [0, 1, 2, 3]
    assert wl.pending() == []

    wl.retarget(good)
    assert wl.wait_acked(100, TIMEOUT, since=mark)
    wl.stop(timeout=TIMEOUT)
    assert wl.waiting() == []
    acks = wl.acks()
    for (w, s) in failed:
        # A sequence number is never reused: the writer goes on after it.
        later = [a.seq for a in acks[mark:] if a.writer == w]
        assert later and min(later) == s + 1
        assert s not in [a.seq for a in acks if a.writer == w]
    assert load_in_flight(journal) == wl.in_flight
    v = verify(acks, file_reader(good), wl.run, in_flight=load_in_flight(journal))
    assert v.passed(rpo_zero=True), v.as_dict()


def test_a_target_that_cannot_be_opened_makes_writers_wait(workdir, direct, workloads):
    good = volume(workdir / "appslv")
    wl = workloads(good, journal=workdir / "journal", direct=direct)
    wl.start()
    assert wl.wait_acked(20, TIMEOUT)
    wl.retarget(workdir / "vanished")
    assert wl.wait_waiting(TIMEOUT)
    assert wl.errors == Counter({"open:ENOENT": 4}) and wl.in_flight == {}
    mark = wl.acked()
    wl.retarget(good)
    assert wl.wait_acked(20, TIMEOUT, since=mark)


def test_probe_writes_one_stamp_and_reports_failures(workdir, direct):
    vol = volume(workdir / "appslv")
    offset = AREA[0] + AREA[1]  # just after the area
    before = time.time()
    done = probe(vol, offset, run=b"probe001", seq=7, direct=direct)
    assert before <= done <= time.time()  # wall clock, like Ack.acked_at
    st = parse(vol.read_bytes()[offset:offset + BLOCK], b"probe001", offset)
    assert st is not None and (st.writer, st.seq) == (PROBE_WRITER, 7)
    assert before * 1e9 <= st.when_ns <= done * 1e9
    with pytest.raises(OSError) as e:
        probe("/dev/full", offset, direct=False)
    assert e.value.errno == 28  # ENOSPC


def test_an_area_that_is_not_whole_blocks_is_refused(workdir):
    with pytest.raises(ValueError, match="whole"):
        Workload(workdir / "x", area=(100, 8 * BLOCK), journal=workdir / "j")
    with pytest.raises(ValueError, match="cannot give"):
        Workload(workdir / "x", area=(0, 2 * BLOCK), writers=4, journal=workdir / "j")


def test_pause_and_stop_report_a_write_blocked_in_the_kernel(workdir, direct, workloads, monkeypatch):
    """As a write into a suspended FUSE daemon's mount: it does not return
    until the daemon does. Simulated by holding writer 2's pwrite on a gate."""
    vol = volume(workdir / "appslv")
    journal = workdir / "journal"
    gate, held = threading.Event(), threading.Event()
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        if threading.current_thread().name == "workload-writer-2" and not gate.is_set():
            held.set()
            gate.wait(TIMEOUT)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    wl = workloads(vol, journal=journal, direct=direct)
    wl.start()
    try:
        assert held.wait(TIMEOUT)
        (blocked,) = wl.pause(timeout=0.2)
        assert blocked.writer == 2 and blocked.seq == 1
        assert wl.in_flight == {blocked.offset: [(2, 1)]}  # issued, not acknowledged
        assert wl.stop(timeout=0.2) == [blocked]
    finally:
        gate.set()
    # Once the kernel returns, the write is acknowledged and journaled.
    assert wl.stop(timeout=TIMEOUT) == []
    assert (2, 1) in [(a.writer, a.seq) for a in wl.acks()]
    assert load_journal(journal) == wl.acks()


def test_one_workload_writes_across_several_devices_in_one_order(workdir, direct, workloads):
    from tools.workload import device_of
    vols = [volume(workdir / f"v{i}") for i in range(3)]
    wl = workloads(vols, journal=workdir / "journal", direct=direct)
    wl.start()
    assert wl.wait_acked(600, TIMEOUT)
    assert wl.stop(timeout=TIMEOUT) == []
    acks = wl.acks()
    assert {device_of(a.offset)[0] for a in acks} == {0, 1, 2}  # every device written
    assert all(a.issued_after is not None and a.issued_after < a.index for a in acks)
    datas = [v.read_bytes() for v in vols]

    def read(off):
        d, at = device_of(off)
        return datas[d][at:at + BLOCK]
    v = verify(acks, read, wl.run, in_flight=wl.in_flight)
    assert v.ok == v.blocks_checked and v.passed(rpo_zero=True), v.as_dict()
    # One device missing an early write that later writes on the others
    # came after: the devices together are no prefix.
    last = {}
    for b in acks:
        last[b.offset] = b  # each offset's last write
    a = min(last.values(), key=lambda b: b.index)  # the earliest write nothing overwrote
    assert any(b.issued_after >= a.index for b in acks), "no write was issued after it: too short a run"
    d, at = device_of(a.offset)
    hole = bytearray(datas[d])
    hole[at:at + BLOCK] = bytes(BLOCK)
    datas[d] = bytes(hole)
    assert not verify(acks, read, wl.run, in_flight=wl.in_flight).is_prefix
