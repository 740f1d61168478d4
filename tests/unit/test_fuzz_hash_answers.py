"""A member whose hash answers lie: the wrong number of hashes, an error
status, a read reply where a hash reply belongs, an answer under another
request's id. The primary's side (MemberLink.region_hashes, and the copy's
look-ahead over it) takes an answer only when it is a hash reply to that very
request with one hash per block; anything else is an OSError (or, in a copy
pass, CopyAborted) naming the member, so a copy never clears a region on the
strength of it.

(test_hash_answerer.py covers the member's side: how requests are answered.)"""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gmd.copy import CopyAborted, _HashPrefetch
from gmd.copystate import CopyProgress, PassKind
from gmd.replication import LinkState, MemberLink, Session
from transport.codec import HashReply, HashRequest, Read, ReadReply
from transport.link import LinkClosed

FUZZ = settings(max_examples=200, deadline=None)
RS = 64 * 1024


class _Path:
    """A path that records what is sent on it."""

    closed = False

    def __init__(self):
        self.sent: list = []

    def send_nowait(self, event) -> None:
        self.sent.append(event)


def _member() -> tuple[MemberLink, _Path]:
    m = MemberLink("labor2", "sync", queue_limit=1 << 20, volume="appslv")
    m.session = Session("s1", m.name)
    path = _Path()
    m.session.paths.append(path)
    m.set_state(LinkState.CONNECTED)
    return m, path


answers = st.one_of(
    # count (None: one per block), status
    st.tuples(st.just("hashes"), st.none() | st.integers(0, 40), st.just(0) | st.integers(-200, 200)),
    st.tuples(st.just("read reply"), st.binary(max_size=64), st.integers(-5, 5)),
    st.tuples(st.just("other id"), st.integers(1, 1000)),
)


@FUZZ
@given(st.integers(0, 1 << 20).map(lambda n: n * 512), st.integers(1, 32).map(lambda n: n * RS - 1),
       st.sampled_from([RS, 4096]), st.lists(answers, min_size=1, max_size=3))
def test_a_hash_answer_is_taken_only_when_it_answers_that_request_block_for_block(offset, length, block, replies):
    want = (length + block - 1) // block

    async def main():
        m, path = _member()
        out: dict = {}

        async def ask():
            try:
                out["hashes"] = await m.region_hashes(offset, length, block)
            except OSError as e:
                out["error"] = e
            except LinkClosed as e:
                out["closed"] = e

        async with trio.open_nursery() as n:
            n.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()
            (req,) = path.sent
            assert isinstance(req, HashRequest) and (req.offset, req.length, req.block) == (offset, length, block)
            expect = None  # what region_hashes must do with the first reply that has this id
            for reply in replies:
                if reply[0] == "other id":
                    m.on_read_reply(HashReply(req.request + reply[1], 0, (7,) * want))  # dropped
                    continue
                if reply[0] == "hashes":
                    count, status = want if reply[1] is None else reply[1], reply[2]
                    m.on_read_reply(HashReply(req.request, status, tuple(range(count))))
                    expect = ("ok", count) if status == 0 and count == want else ("error", status or errno.EIO)
                else:
                    m.on_read_reply(ReadReply(req.request, reply[2], reply[1]))
                    expect = ("error", errno.EIO)
                break
            await trio.testing.wait_all_tasks_blocked()
            if expect is None:
                assert out == {}  # still waiting: an answer for another request is no answer
                m.end_session("test over")
                await trio.testing.wait_all_tasks_blocked()
                assert "closed" in out  # the session's end, not a made-up answer
                return out, None
        return out, expect

    out, expect = trio.run(main)
    if expect is None:
        event("only answers for other requests")
        return
    event(expect[0])
    if expect[0] == "ok":
        assert out == {"hashes": tuple(range(want))}
    else:
        assert "hashes" not in out and out["error"].errno == expect[1] and "labor2" in str(out["error"])


async def test_a_read_answered_with_hashes_is_an_error_not_a_crash():
    m, path = _member()
    out: dict = {}

    async def read():
        try:
            out["data"] = await m.read(0, 4096)
        except OSError as e:
            out["error"] = e

    async with trio.open_nursery() as n:
        n.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        (req,) = path.sent
        assert isinstance(req, Read)
        m.on_read_reply(HashReply(req.request, 0, (1,)))
    assert out["error"].errno == errno.EIO and "answered a read with a HashReply" in str(out["error"])


# ------------------------------------------- the copy's look-ahead over the answers


class _LyingMember:
    """Answers each hash request with ``count(blocks)`` hashes, or raises."""

    name = "labor2"

    def __init__(self, answer):
        self.answer = answer

    async def region_hashes(self, offset, length, block):
        await trio.lowlevel.checkpoint()
        return self.answer(offset, length, block)


@FUZZ
@given(st.lists(st.integers(1, 16).map(lambda n: n * RS), min_size=1, max_size=6), st.integers(-3, 3),
       st.data())
def test_the_copy_takes_no_answer_with_a_hash_too_many_or_too_few(lengths, skew, data):
    """A member link that let a miscounted answer through (a bug, or a member
    that lies) still cannot make the copy compare fewer blocks than it ships."""
    work, ends = [], [0]
    for length in lengths:
        work.append((ends[-1], length))
        ends.append(ends[-1] + length)
    lying = data.draw(st.sampled_from(range(len(work))))

    def answer(offset, length, block):
        n = length // block
        return tuple(range(max(0, n + skew))) if offset == work[lying][0] else tuple(range(n))

    async def main():
        hashes = _HashPrefetch(_LyingMember(answer), work, ends, RS, CopyProgress(PassKind.MINI, ends[-1]))
        got = {}
        async with trio.open_nursery() as n:
            hashes.nursery = n
            for i in range(len(work)):
                try:
                    got[i] = await hashes.get(i)
                except CopyAborted as e:
                    got[i] = e
        return got

    got = trio.run(main)
    for i, (offset, length) in enumerate(work):
        if i == lying and skew:
            assert isinstance(got[i], CopyAborted) and "labor2" in str(got[i]) and str(offset) in str(got[i])
        else:
            assert got[i] == tuple(range(length // RS))


async def test_a_failed_hash_answer_aborts_the_copy_naming_the_member():
    class _Failing(_LyingMember):
        async def region_hashes(self, offset, length, block):
            raise OSError(errno.EIO, "labor2 returned 3 hashes for 1 blocks")

    hashes = _HashPrefetch(_Failing(None), [(0, RS)], [0, RS], RS, CopyProgress(PassKind.FULL, RS))
    async with trio.open_nursery() as n:
        hashes.nursery = n
        with pytest.raises(CopyAborted, match="hashing on labor2: .*3 hashes for 1 blocks"):
            await hashes.get(0)
