"""The member's applier: a primary's writes applied in link order, some on the
receiving task itself (``write_now``), the rest in tasks; acks for each."""

from __future__ import annotations

import errno

import trio

from transport.codec import WRITE_COPY, Flush, FlushAck, Write, WriteAck

from gmd.receiver import Applier


class FakePath:
    """Collects what the applier sends back (acks), in order."""

    def __init__(self):
        self.sent = []

    def send_nowait(self, ev):
        self.sent.append(ev)

    async def send(self, ev):
        self.sent.append(ev)


class Disk:
    """A member disk in memory: ``write_now`` takes writes with ``now`` set,
    the awaiting path takes any (after ``slow`` seconds)."""

    def __init__(self, size=1 << 20):
        self.data = bytearray(size)
        self.now = True
        self.slow = 0.0
        self.fail_at = None
        self.applied_now = []  # seqs applied on the receiving task
        self.applied_later = []

    def write_now(self, item):
        if self.fail_at == item.offset:
            raise OSError(errno.EIO, "disk failed")
        if not self.now:
            return False
        self.data[item.offset:item.offset + len(item.data)] = item.data
        self.applied_now.append(item.seq)
        return True

    async def write(self, item):
        await trio.sleep(self.slow)
        self.data[item.offset:item.offset + len(item.data)] = item.data
        self.applied_later.append(item.seq)

    async def flush(self, item):
        await trio.sleep(0)


async def _settle():
    for _ in range(50):
        await trio.sleep(0)


async def test_writes_that_need_not_wait_are_applied_and_acked_on_the_receiving_task():
    disk, path = Disk(), FakePath()
    async with trio.open_nursery() as n:
        a = Applier(n, disk.write, disk.flush, write_now=disk.write_now)
        for seq in range(1, 4):
            a.submit(Write(seq, seq * 4096, bytes([seq]) * 4096), path)
            # Applied before submit returned: no task ran in between.
            assert disk.applied_now[-1] == seq and path.sent[-1] == WriteAck(seq, 0)
        assert disk.applied_later == []


async def test_a_write_overlapping_one_in_flight_waits_for_it_and_lands_after_it():
    disk, path = Disk(), FakePath()
    async with trio.open_nursery() as n:
        a = Applier(n, disk.write, disk.flush, write_now=disk.write_now)
        disk.now, disk.slow = False, 0.05
        a.submit(Write(1, 0, b"a" * 8192), path)  # must wait (a commit, a big write): a task
        await _settle()
        disk.now = True
        a.submit(Write(2, 4096, b"b" * 4096), path)  # overlaps seq 1, still in flight
        a.submit(Write(3, 65536, b"c" * 4096), path)  # behind seq 2 in order: not ahead of it
        await trio.sleep(0.2)
    assert bytes(disk.data[:8192]) == b"a" * 4096 + b"b" * 4096
    assert disk.applied_later[0] == 1 and 2 in disk.applied_later
    assert sorted(ack.seq for ack in path.sent) == [1, 2, 3]


async def test_a_write_received_ahead_of_its_turn_waits_for_the_ones_before():
    disk, path = Disk(), FakePath()
    async with trio.open_nursery() as n:
        a = Applier(n, disk.write, disk.flush, write_now=disk.write_now)
        a.submit(Write(2, 0, b"2" * 4096), path)  # came by another path first
        await _settle()
        assert path.sent == [] and disk.applied_now == []
        a.submit(Write(1, 0, b"1" * 4096), path)
        await _settle()
    assert bytes(disk.data[:4096]) == b"2" * 4096  # the primary's order, not the arrival order
    assert [ack.seq for ack in path.sent] == [1, 2]


async def test_a_failed_write_on_the_receiving_task_is_acked_with_its_errno_and_the_rest_go_on():
    disk, path = Disk(), FakePath()
    disk.fail_at = 4096
    async with trio.open_nursery() as n:
        a = Applier(n, disk.write, disk.flush, write_now=disk.write_now)
        a.submit(Write(1, 4096, b"x" * 4096), path)
        a.submit(Write(2, 8192, b"y" * 4096), path)
        a.submit(Flush(3), path)
        await _settle()
    assert path.sent[:2] == [WriteAck(1, errno.EIO), WriteAck(2, 0)]
    assert path.sent[2] == FlushAck(3, 0)


async def test_after_close_nothing_more_is_applied_or_acked():
    disk, path = Disk(), FakePath()
    async with trio.open_nursery() as n:
        a = Applier(n, disk.write, disk.flush, write_now=disk.write_now)
        a.close()
        a.submit(Write(1, 0, b"x" * 4096), path)
        await _settle()
    assert path.sent == [] and disk.applied_now == []


async def test_a_member_whose_every_write_fails_logs_one_line_not_one_per_write(caplog, autojump_clock):
    """A full disk fails every write: the first failure is logged at once, the
    rest summed up at most every FAILURE_LOG_EVERY seconds."""
    import errno
    import logging

    import trio

    from gmd.receiver import FAILURE_LOG_EVERY, FailureLog

    caplog.set_level(logging.ERROR, logger="gmd.receiver")
    failures = FailureLog()
    full = OSError(errno.ENOSPC, "No space left on device")
    for seq in range(1, 1001):
        failures.failed(seq, seq * 4096, full)
    assert [r.getMessage() for r in caplog.records] == [
        "applying write seq 1 at 4096 failed: [Errno 28] No space left on device"]
    await trio.sleep(FAILURE_LOG_EVERY)
    failures.failed(1001, 0, full)
    assert len(caplog.records) == 2
    assert "1000 writes in the last 10 s (the last: seq 1001 at 0" in caplog.records[1].getMessage()


async def test_the_resume_point_is_the_last_write_applied_in_order_once_closed():
    disk, path = Disk(), FakePath()
    async with trio.open_nursery() as n:
        a = Applier(n, disk.write, disk.flush, write_now=disk.write_now)
        for seq, gseq in ((1, 10), (2, 11)):
            a.submit(Write(seq, seq * 4096, b"x" * 16, gseq=gseq), path)
        a.submit(Flush(3), path)
        a.submit(Write(4, 0, b"c" * 16, flags=WRITE_COPY, gseq=99), path)  # copy data: no place in the order
        a.submit(Write(6, 8192, b"y" * 16, gseq=13), path)  # 5 never arrives: 6 is not in order
        await _settle()
        assert a.resume_point() is None  # still open: it may go on
        a.close()
        await _settle()
        assert a.resume_point() == 11


async def test_a_failed_write_leaves_no_resume_point():
    disk, path = Disk(), FakePath()
    disk.fail_at = 4096
    async with trio.open_nursery() as n:
        a = Applier(n, disk.write, disk.flush, write_now=disk.write_now)
        a.submit(Write(1, 0, b"x" * 16, gseq=1), path)
        a.submit(Write(2, 4096, b"x" * 16, gseq=2), path)
        a.submit(Write(3, 8192, b"x" * 16, gseq=3), path)
        await _settle()
        a.close()
        await _settle()
        assert a.resume_point() is None


async def test_a_group_hold_applies_only_up_to_a_mark_every_volume_received():
    from gmd.groups import GroupHold, HoldView
    hold = GroupHold("db", ["v1", "v2"])
    d1, d2, p1, p2 = Disk(), Disk(), FakePath(), FakePath()
    async with trio.open_nursery() as n:
        a1 = Applier(n, d1.write, d1.flush, write_now=d1.write_now, hold=HoldView(hold, "v1", "labor1"))
        a2 = Applier(n, d2.write, d2.flush, write_now=d2.write_now, hold=HoldView(hold, "v2", "labor1"))
        a1.submit(Write(1, 0, b"a" * 16, gseq=1), p1)
        a1.submit(Flush(2, group_point=100), p1)
        a1.submit(Write(3, 4096, b"b" * 16, gseq=3), p1)
        await _settle()
        assert d1.applied_later == [] and p1.sent == []  # v2 has not received mark 100: nothing yet
        a2.submit(Write(1, 0, b"c" * 16, gseq=2), p2)
        a2.submit(Flush(2, group_point=100), p2)
        await _settle()
        # Both received mark 100: what came before it is applied, in both.
        assert d1.applied_later == [1] and d2.applied_later == [1]
        assert WriteAck(1, 0) in p1.sent and FlushAck(2, 0) in p1.sent and WriteAck(3, 0) not in p1.sent
        a1.submit(Flush(4, group_point=200), p1)
        a2.submit(Write(3, 8192, b"d" * 16, gseq=4), p2)
        await _settle()
        assert d1.applied_later == [1] and d2.applied_later == [1]  # v2 has no mark 200 yet
        # The primary is lost now: each applies what came before mark 100 and drops the rest.
        a1.close()
        a2.close()
        await _settle()
        assert d1.applied_later == [1] and d2.applied_later == [1]
        assert d1.data[4096:4112] == bytes(16) and d2.data[8192:8208] == bytes(16)


async def test_a_hold_released_just_before_the_end_is_still_applied():
    from gmd.groups import GroupHold, HoldView
    hold = GroupHold("db", ["v1"])
    d1, p1 = Disk(), FakePath()
    d1.slow = 0.01
    async with trio.open_nursery() as n:
        a1 = Applier(n, d1.write, d1.flush, hold=HoldView(hold, "v1", "labor1"))
        for seq in range(1, 5):
            a1.submit(Write(seq, seq * 4096, b"x" * 16, gseq=seq), p1)
        a1.submit(Flush(5, group_point=7), p1)
        a1.close()  # released (it alone makes the group) before the session ended
        await trio.sleep(0.2)
        assert sorted(d1.applied_later) == [1, 2, 3, 4]


async def test_copy_data_is_never_held_back_by_a_group_that_gets_no_marks():
    from gmd.groups import GroupHold, HoldView
    hold = GroupHold("db", ["v1", "v2"])  # v2 never says a word: v1 holds its writes
    d1, p1 = Disk(), FakePath()
    async with trio.open_nursery() as n:
        a1 = Applier(n, d1.write, d1.flush, hold=HoldView(hold, "v1", "labor1"))
        a1.submit(Write(1, 0, b"a" * 16, gseq=1), p1)
        a1.submit(Flush(2, group_point=100), p1)
        a1.submit(Write(3, 4096, b"b" * 16, gseq=2), p1)
        await _settle()
        assert d1.applied_later == []
        # v1 fell behind: its catch-up copy arrives; it and what waited before it are applied.
        a1.submit(Write(4, 8192, b"c" * 16, flags=WRITE_COPY, gseq=2), p1)
        await _settle()
        assert sorted(d1.applied_later) == [1, 3, 4]
        a1.close()
