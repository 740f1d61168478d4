"""An ``async`` member whose queue overflowed is caught up while its link stays up.

The member (a real daemon) sits behind a :class:`transport.wanproxy.WanProxy`
with a small queue (``async_queue = "256KiB"``): a writer on the primary
outruns the slowed link, the member falls behind to bitmap tracking, and then,
with the link never broken and no operator step, a mini-copy brings it level
and it goes back to shipping writes from the queue.
"""

from __future__ import annotations

import random

import trio

from .harness import MiB, backing, file_hash, wait_for
from .test_replication import async_member_over_proxy, random_writes

REGION = 64 * 1024
QUEUE = 256 * 1024


class ReplicationWatch:
    """Records every ``replication`` state the primary's status shows for a
    member, and whether its ``behind`` flag was ever set, while it runs."""

    def __init__(self, eng, member: str):
        self.eng, self.member = eng, member
        self.states: list[str | None] = []
        self.behind_seen = False

    async def run(self) -> None:
        while True:
            st = self.eng.status()["members"][self.member]
            state = st.get("replication")
            if not self.states or self.states[-1] != state:
                self.states.append(state)
            self.behind_seen = self.behind_seen or st["behind"]
            await trio.sleep(0.01)


def _caught_up(eng, member: str) -> bool:
    st = eng.status()["members"][member]
    return (st["disk"] == "uptodate" and st["out_of_sync_bytes"] == 0 and st.get("replication") == "shipping"
            and not st["behind"] and st["copy"] is None)


async def test_async_member_that_fell_behind_is_mini_copied_and_ships_again_while_connected(tmp_path):
    async with async_member_over_proxy(tmp_path) as (eng, proxy):
        m = eng.members["labor2"]
        session = m.session.id
        watch = ReplicationWatch(eng, "labor2")
        rng = random.Random(21)
        async with trio.open_nursery() as wn:
            wn.start_soon(watch.run)
            assert eng.status()["members"]["labor2"]["replication"] == "shipping"
            proxy.update(delay=0.3)  # acks trail far behind the writer
            for i in range(256):  # a sequential writer: 16 MiB into a 256 KiB queue
                await eng.write(i * REGION, rng.randbytes(REGION))
            assert m.behind, "the queue should have overflowed"
            assert eng.statemap.out_of_sync_bytes("labor2") > 0
            # More writes while it is being caught up (the link still slow),
            # over regions the copy is working on.
            for i in range(0, 256, 3):
                await eng.write(i * REGION + 512, rng.randbytes(4096))
            proxy.update(delay=0.0)  # the link recovers; nobody touches the member
            await wait_for(lambda: _caught_up(eng, "labor2"), timeout=60, what="labor2 caught up while connected")
            # Back to shipping from the queue: new writes (at a pace the queue
            # holds) go to the member, none is marked.
            shipped = m.bytes_shipped
            for i in range(16):
                await eng.write(i * REGION, rng.randbytes(REGION))
                assert not m.behind
                await wait_for(lambda: m.queued_bytes == 0, what="write acked")
            assert m.bytes_shipped - shipped == 16 * REGION
            assert eng.statemap.out_of_sync_bytes("labor2") == 0
            wn.cancel_scope.cancel()
        assert m.session is not None and m.session.id == session, "the link was never to break"
        assert proxy.statistics().resets == 0
        assert watch.behind_seen
        assert "catching-up" in watch.states, watch.states
        assert watch.states[0] == "shipping" and watch.states[-1] == "shipping", watch.states
        await eng.flush()
        await wait_for(lambda: m.queued_bytes == 0 and m.flushed_gseq >= eng.writepath.completed_gseq, what="flushed")
        assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))
        assert eng.status()["members"]["labor2"]["disk"] == "uptodate"


async def test_writes_racing_with_the_catch_up_copy_are_never_lost(tmp_path):
    """Concurrent random writes while the member is behind and being copied:
    each either reaches it after the copied data or keeps its bit for another
    pass, so once the writes stop the disks are identical."""
    async with async_member_over_proxy(tmp_path) as (eng, proxy):
        m = eng.members["labor2"]
        proxy.update(delay=0.02, bandwidth=8 * MiB)  # slower than the writers: it falls behind
        stop = trio.Event()

        def passes():
            return len([p for name, p in eng.copier.history if name == "labor2"])

        async def stopper():
            await wait_for(lambda: m.behind, what="labor2 behind")
            # Several passes while the writes go on: each copies regions the
            # writers keep writing to.
            await wait_for(lambda: passes() >= 4, timeout=60, what="catch-up passes during the writes")
            stop.set()

        async with trio.open_nursery() as n:
            n.start_soon(stopper)
            await random_writes(eng, 1_000_000, seed=17, size=4 * MiB, workers=4, stop=stop)
        proxy.update(delay=0.0, bandwidth=0)
        await wait_for(lambda: _caught_up(eng, "labor2"), timeout=90, what="labor2 caught up")
        await eng.flush()
        await wait_for(lambda: m.queued_bytes == 0 and m.flushed_gseq >= eng.writepath.completed_gseq, what="flushed")
        assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))
