"""tools.stamps: stamped blocks and the verification of acknowledged writes,
on an in-memory "device" (a dict of offset -> block)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from tools.stamps import BLOCK, Ack, CorruptStamp, Stamp, parse, stamp, verify

RUN = b"run-0001"
OTHER_RUN = b"run-0002"
ZERO = bytes(BLOCK)


def history(writes: int, writers: int = 4, blocks: int = 16, start: float = 1000.0):
    """A deterministic workload history: ``writes`` acks round-robin over
    ``writers``, each writer cycling over its own blocks (block % writers ==
    writer), one ack per second from ``start``."""
    seq = [0] * writers
    acks = []
    for i in range(writes):
        w = i % writers
        seq[w] += 1
        own = [b for b in range(blocks) if b % writers == w]
        offset = own[(seq[w] * 7) % len(own)] * BLOCK
        acks.append(Ack(i + 1, w, seq[w], offset, start + i))
    return acks


def replay(acks, run=RUN) -> dict[int, bytes]:
    """The device image that applying ``acks`` in order leaves."""
    dev: dict[int, bytes] = {}
    for a in acks:
        dev[a.offset] = stamp(run, a.writer, a.seq, a.offset, int(a.acked_at * 1e9))
    return dev


def reader(dev):
    return lambda off: dev.get(off, ZERO)


# --- the block format ---

def test_round_trip():
    block = stamp(RUN, 3, 42, 8192, 123456789)
    assert len(block) == BLOCK
    assert parse(block, RUN, 8192) == Stamp(RUN, 3, 42, 8192, 123456789)


def test_blocks_differ_by_writer_and_seq():
    assert stamp(RUN, 1, 1, 0, 5)[48:] != stamp(RUN, 1, 2, 0, 5)[48:]
    assert stamp(RUN, 1, 1, 0, 5)[48:] != stamp(RUN, 2, 1, 0, 5)[48:]


@pytest.mark.parametrize("bit", [0, 8 * 30, 8 * 100 + 3, 8 * BLOCK - 1])
def test_a_flipped_bit_is_corrupt_or_foreign(bit):
    block = bytearray(stamp(RUN, 1, 7, 4096, 1))
    block[bit // 8] ^= 1 << (bit % 8)
    if bit < 16 * 8:
        # The magic or the run tag no longer match: not a stamp of this run.
        assert parse(bytes(block), RUN, 4096) is None
    else:
        with pytest.raises(CorruptStamp, match="checksum"):
            parse(bytes(block), RUN, 4096)


def test_another_runs_block_and_zeros_are_no_stamp():
    assert parse(stamp(OTHER_RUN, 1, 7, 4096, 1), RUN, 4096) is None
    assert parse(ZERO, RUN, 4096) is None


def test_a_misdirected_block_is_corrupt():
    with pytest.raises(CorruptStamp, match="misdirected") as e:
        parse(stamp(RUN, 1, 7, 4096, 1), RUN, 8192)
    assert e.value.offset == 8192


# --- verify: every acknowledged write present ---

def test_all_present_passes():
    acks = history(200)
    v = verify(acks, reader(replay(acks)), RUN)
    assert v.blocks_checked == 16 and v.ok == 16 and v.acked_writes == 200
    assert (v.stale, v.corrupt, v.newer, v.lost_writes) == (0, 0, 0, 0)
    assert v.prefix_index == 200 and v.is_prefix
    assert v.passed(rpo_zero=True) and v.passed(rpo_zero=False)
    assert v.as_dict()["lost_bytes"] == 0


def test_one_lost_acked_write_is_stale():
    acks = history(200)
    dev = replay(acks[:-1])  # the last acknowledged write never reached the image
    v = verify(acks, reader(dev), RUN, fault_at=acks[-1].acked_at + 2.5)
    assert v.stale == 1 and v.ok == 15
    assert not v.passed(rpo_zero=True)
    assert v.lost_writes == 1 and v.lost_bytes == BLOCK and v.prefix_index == 199
    assert v.lost_age == pytest.approx(2.5)
    # For an asynchronous copy losing the tail is allowed.
    assert v.is_prefix and v.passed(rpo_zero=False)
    (p,) = v.examples
    assert (p.offset, p.outcome, p.expected_writer, p.expected_seq) == (
        acks[-1].offset, "stale", acks[-1].writer, acks[-1].seq)


def test_an_offset_without_any_stamp_is_stale():
    acks = history(40)
    dev = replay(acks)
    del dev[acks[0].offset]
    v = verify(acks, reader(dev), RUN)
    assert v.stale == 1 and not v.passed(rpo_zero=True)
    assert v.examples[0].found == "no stamp of this run"


def test_an_inflight_newer_write_is_allowed():
    acks = history(100)
    last = acks[-1]
    dev = replay(acks)
    # The writer's next write was issued, landed, and was never acknowledged.
    dev[last.offset] = stamp(RUN, last.writer, last.seq + 1, last.offset, 0)
    v = verify(acks, reader(dev), RUN, in_flight={last.offset: [(last.writer, last.seq + 1)]})
    assert v.newer == 1 and v.newer_unrecorded == 0 and v.stale == 0
    assert v.examples == []
    assert v.passed(rpo_zero=True) and v.passed(rpo_zero=False)


def test_an_unrecorded_newer_write_is_counted_and_shown():
    acks = history(100)
    last = acks[-1]
    dev = replay(acks)
    dev[last.offset] = stamp(RUN, last.writer, last.seq + 1, last.offset, 0)
    v = verify(acks, reader(dev), RUN)
    assert v.newer == 1 and v.newer_unrecorded == 1
    assert v.examples[0].outcome == "newer"
    assert v.passed(rpo_zero=True)


def test_corrupt_and_misdirected_blocks_fail_both_ways():
    acks = history(100)
    dev = replay(acks)
    a, b = acks[-1], acks[-2]
    torn = bytearray(dev[a.offset])
    torn[-1] ^= 0x80  # the checksum no longer matches
    dev[a.offset] = bytes(torn)
    dev[b.offset] = stamp(RUN, b.writer, b.seq, b.offset + BLOCK, 0)  # written for the next block
    v = verify(acks, reader(dev), RUN)
    assert v.corrupt == 2
    assert not v.passed(rpo_zero=True) and not v.passed(rpo_zero=False)
    assert {p.outcome for p in v.examples} == {"corrupt"}


def test_a_block_of_another_writer_is_corrupt():
    acks = history(8)
    dev = replay(acks)
    a = acks[-1]
    dev[a.offset] = stamp(RUN, a.writer + 1, 1, a.offset, 0)
    v = verify(acks, reader(dev), RUN)
    assert v.corrupt == 1 and "does not own" in v.examples[0].found


def test_an_earlier_runs_image_counts_for_nothing():
    acks = history(40)
    v = verify(acks, reader(replay(acks, run=OTHER_RUN)), RUN)
    assert v.stale == v.blocks_checked and v.lost_writes == 40 and v.prefix_index == 0


def test_acks_that_break_the_workload_rules_are_refused():
    with pytest.raises(ValueError, match="written by writers 0 and 1"):
        verify([Ack(1, 0, 1, 0, 0.0), Ack(2, 1, 1, 0, 0.0)], reader({}), RUN)
    with pytest.raises(ValueError, match="sequence order"):
        verify([Ack(1, 0, 2, 0, 0.0), Ack(2, 0, 1, BLOCK, 0.0)], reader({}), RUN)


# --- verify: prefixes, for asynchronous copies ---

def test_a_prefix_image():
    acks = history(300)
    k = 217
    v = verify(acks, reader(replay(acks[:k])), RUN, fault_at=acks[-1].acked_at + 1.0)
    assert v.is_prefix and v.prefix_index == k
    # Every ack after k is missing (its offset holds an earlier write), even
    # where several of them hit the same offset: acks count, not offsets.
    assert v.lost_writes == len(acks) - k
    assert v.lost_age == pytest.approx(acks[-1].acked_at + 1.0 - acks[k].acked_at)
    assert v.passed(rpo_zero=False) and not v.passed(rpo_zero=True)


def test_a_non_prefix_image():
    # 400 blocks: no offset is written twice, so a dropped write stays missing.
    acks = history(300, blocks=400)
    early = acks[10]
    dev = replay(acks[:10] + acks[11:])
    # An early acknowledged write is missing although everything after it
    # is present: the copy did not keep write order.
    v = verify(acks, reader(dev), RUN)
    assert v.prefix_index == early.index - 1 and v.lost_writes == 1
    assert not v.is_prefix and not v.passed(rpo_zero=False)


@settings(max_examples=60, deadline=None)
@given(writes=hs.integers(1, 200), writers=hs.integers(1, 6), data=hs.data())
def test_any_prefix_is_a_prefix(writes, writers, data):
    acks = history(writes, writers=writers, blocks=4 * writers)
    k = data.draw(hs.integers(0, writes), label="k")
    fault_at = acks[-1].acked_at + 3.0
    v = verify(acks, reader(replay(acks[:k])), RUN, fault_at=fault_at)
    assert v.is_prefix and v.corrupt == 0
    # Acks after k are absent from the image: the first missing one is k+1
    # and every later one is missing too.
    assert v.prefix_index == k
    assert v.lost_writes == writes - k
    assert v.lost_age == (pytest.approx(fault_at - acks[k].acked_at) if k < writes else 0.0)


@settings(max_examples=60, deadline=None)
@given(writes=hs.integers(2, 200), data=hs.data())
def test_a_hole_beyond_the_slack_is_no_prefix(writes, data):
    writers = 4
    # 1024 blocks: no offset is written twice, so the hole stays a hole.
    acks = history(writes, writers=writers, blocks=1024)
    hole = data.draw(hs.integers(0, writes - 1), label="hole")
    v = verify(acks, reader(replay(acks[:hole] + acks[hole + 1:])), RUN)
    assert v.prefix_index == hole and v.lost_writes == 1 and v.stale == 1
    # Writes acknowledged up to ``writers`` places after the hole may have
    # been in flight together with it; any later one proves a reordering.
    assert v.is_prefix == (writes <= hole + writers)


def test_verify_is_fast_enough_for_a_64_mib_area():
    """16384 blocks and 100k acks verify in well under a few seconds (a
    generous bound: the point is no quadratic step)."""
    import time

    writers, blocks = 4, 16384
    acks = []
    seq = [0] * writers
    for i in range(100_000):
        w = i % writers
        seq[w] += 1
        b = (i * 2654435761) % (blocks // writers) * writers + w
        acks.append(Ack(i + 1, w, seq[w], b * BLOCK, float(i)))
    dev = replay(acks)
    t = time.perf_counter()
    v = verify(acks, reader(dev), RUN)
    assert time.perf_counter() - t < 3.0
    assert v.ok == v.blocks_checked and v.passed(rpo_zero=True)


# --- the causal prefix (acks that record when their write was issued) ---

def _delayed_history():
    """Writer 0's write A is issued first but completes last (it waited for
    a thread); writers 1..3 go on meanwhile. In issue order: A, then the
    others; each ack records how many acks there were when it was issued."""
    a = Ack(6, 0, 1, 0, 6.0, issued_after=0)  # issued before anything was acknowledged
    others = [Ack(i, 1 + (i - 1) % 3, 1 + (i - 1) // 3, (1 + (i - 1) % 3) * BLOCK + (i - 1) // 3 * 4 * BLOCK,
                  float(i), issued_after=max(0, i - 3)) for i in range(1, 6)]
    return a, others


def test_a_write_that_completed_late_may_be_on_a_copy_without_what_completed_after_it():
    a, others = _delayed_history()
    # The copy holds A (the primary's first write) and the first two others:
    # a prefix of the primary's order, though A was acknowledged last.
    image = replay([a, *others[:2]])
    v = verify([a, *others], reader(image), RUN)
    assert v.slack == 0 and v.is_prefix and v.passed(rpo_zero=False)
    # Ranked by acknowledgement (old journals: no issued_after), the same
    # image looks out of order: A is ack 6, acks 3..5 are missing.
    old = [x._replace(issued_after=None) for x in (a, *others)]
    assert not verify(old, reader(image), RUN, slack=1).is_prefix


def test_a_write_issued_after_an_acknowledgement_the_copy_lacks_is_out_of_order():
    a, others = _delayed_history()
    # others[4] was issued after ack 2 (others[1]); holding it without others[1] breaks the order.
    image = replay([a, others[0], others[4]])
    v = verify([a, *others], reader(image), RUN)
    assert not v.is_prefix and not v.passed(rpo_zero=False)
