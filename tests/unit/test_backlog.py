"""An async member's backlog (gmd/backlog.py): the writes it has not
acknowledged, kept in order in memory and a journal, and when it must give
up and leave the member to the bitmap."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gmd.backlog import Backlog, Journal


def data(i: int, n: int = 4096) -> bytes:
    return bytes([i % 251]) * n


def test_writes_wait_in_order_and_go_when_acknowledged():
    b = Backlog("far", memory_limit=3 * 4096)
    entries = [b.add(g, g * 4096, data(g), now=float(g), waiting=True) for g in (1, 2, 3)]
    assert [e.gseq for e in b.waiting] == [1, 2, 3] and b.memory_bytes == 3 * 4096
    for e in entries:
        assert b.next_waiting() is e
        b.sent(e)
    assert not b.has_waiting and not b.caught_up()  # sent, not yet acknowledged
    for e in reversed(entries):  # acknowledgements may come in any order
        b.acked(e)
    assert b.caught_up() and b.memory_bytes == 0 and not b.entries and b.acked_max == 3


def test_memory_full_without_a_journal_refuses_the_write():
    b = Backlog("far", memory_limit=4096)
    assert b.add(1, 0, data(1), 0.0, waiting=True) is not None
    assert b.add(2, 0, data(2), 0.0, waiting=True) is None
    assert b.valid  # the caller decides to drop it (and says why)


async def test_beyond_memory_the_journal_holds_the_data_in_order(tmp_path):
    journal = Journal(tmp_path / "v.journal.far", limit=8 * 4096)
    b = Backlog("far", memory_limit=2 * 4096, journal=journal)
    for g in range(1, 7):
        assert b.add(g, g * 4096, data(g), float(g), waiting=True) is not None
    assert b.memory_bytes == 2 * 4096 and b.journal_bytes == 4 * 4096
    got = []
    while (e := b.next_waiting()) is not None:
        got.append((e.gseq, await b.data_of(e)))
        b.sent(e)
    assert got == [(g, data(g)) for g in range(1, 7)]
    for e in list(b.entries.values()):
        b.acked(e)
    assert journal.end == 0 and (tmp_path / "v.journal.far").stat().st_size == 0  # emptied once no entry is in it


def test_a_full_journal_drops_the_backlog_and_says_why(tmp_path):
    b = Backlog("far", memory_limit=4096, journal=Journal(tmp_path / "j", limit=2 * 4096))
    for g in (1, 2, 3):
        assert b.add(g, 0, data(g), 0.0, waiting=True) is not None
    assert b.add(4, 0, data(4), 0.0, waiting=True) is None
    assert not b.valid and not b.entries and not b.waiting
    assert "journal" in b.dropped_reason and "full" in b.dropped_reason
    assert b.status(0.0)["state"] == "bitmap"


def test_a_journal_that_cannot_be_written_drops_the_backlog(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    b = Backlog("far", memory_limit=0, journal=Journal(blocker / "j", limit=1 << 20))
    assert b.add(1, 0, data(1), 0.0, waiting=True) is None
    assert not b.valid and b.dropped_reason.startswith("journal write failed")


def test_resume_replays_only_what_the_member_did_not_apply():
    b = Backlog("far", memory_limit=1 << 20)
    for g in range(1, 6):
        e = b.add(g, 0, data(g), 0.0, waiting=False)
    b.acked(b.entries[1])
    b.acked(b.entries[2])
    b.session_ended()  # 3, 4, 5 were on the wire when the link died
    assert [e.gseq for e in b.waiting] == [3, 4, 5]
    assert b.resume(4)  # it applied 3 and 4 in order; their acks were lost
    assert [e.gseq for e in b.waiting] == [5] and b.replays == 1


@pytest.mark.parametrize("point, why", [(None, "did not say"), (1, "less than it acknowledged")])
def test_resume_refused_drops_the_backlog(point, why):
    b = Backlog("far", memory_limit=1 << 20)
    for g in (1, 2, 3):
        b.add(g, 0, data(g), 0.0, waiting=False)
    b.acked(b.entries[2])
    b.session_ended()
    assert not b.resume(point)
    assert not b.valid and why in b.dropped_reason
    b.restart()
    assert b.valid and not b.entries


def test_an_empty_backlog_resumes_whatever_the_member_says():
    assert Backlog("far", memory_limit=1).resume(None)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3)), min_size=1, max_size=60))
def test_what_is_sent_is_always_in_order_and_accounting_balances(steps):
    """Random adds, sends, acks and session ends: every entry goes on the wire
    in increasing gseq order within a session, and the byte counts match."""
    b = Backlog("far", memory_limit=6 * 512)
    gseq = 0
    last_sent = 0
    for op, n in steps:
        if op == 0:
            for _ in range(n):
                gseq += 1
                b.add(gseq, 0, data(gseq, 512), 0.0, waiting=True)
        elif op == 1:
            for _ in range(n):
                e = b.next_waiting()
                if e is None:
                    break
                assert e.gseq > last_sent
                last_sent = e.gseq
                b.sent(e)
        elif op == 2:
            for e in [e for e in b.entries.values() if not e.waiting][:n]:
                b.acked(e)
        else:
            b.session_ended()
            last_sent = 0
        assert b.memory_bytes == sum(e.length for e in b.entries.values())
        assert [e.gseq for e in b.waiting] == sorted(e.gseq for e in b.waiting)
