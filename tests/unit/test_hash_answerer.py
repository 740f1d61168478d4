"""The receiver's hash answers: small requests gathered into batches, each
answered on its own path, a bad one refused without failing the rest."""

import errno

import trio

from gmd.errors import OutOfRange
from gmd.receiver import HashAnswerer
from transport.codec import HashReply, HashRequest

KiB64 = 64 * 1024
SIZE = 1024 * KiB64


class _Path:
    """Collects what the answerer sends on a path."""

    def __init__(self):
        self.sent: list[HashReply] = []

    async def send(self, event) -> None:
        self.sent.append(event)


def _fake_hash(offset: int, length: int, block: int) -> list[int]:
    return [offset + i * block for i in range((length + block - 1) // block)]


def _check(offset: int, length: int, block: int) -> None:
    if offset + length > SIZE:
        raise OutOfRange(f"read of {length} bytes at {offset} runs past the end", errno.EINVAL)


async def test_a_burst_of_small_requests_is_read_in_one_go_and_each_answered():
    calls: list[list[tuple[int, int]]] = []

    async def hashes(ranges, block):
        calls.append(list(ranges))
        return [_fake_hash(o, n, block) for o, n in ranges]

    path = _Path()
    async with trio.open_nursery() as n:
        answerer = HashAnswerer(n, hashes, _check)
        for i in range(20):
            answerer.submit(HashRequest(i + 1, i * 3 * KiB64, KiB64, KiB64), path)
    assert len(calls) == 1 and len(calls[0]) == 20
    assert {r.request: r.hashes for r in path.sent} == {i + 1: (i * 3 * KiB64,) for i in range(20)}
    assert all(r.status == 0 for r in path.sent)


async def test_a_bad_request_is_refused_and_the_others_answered():
    async def hashes(ranges, block):
        return [_fake_hash(o, n, block) for o, n in ranges]

    path = _Path()
    async with trio.open_nursery() as n:
        answerer = HashAnswerer(n, hashes, _check)
        answerer.submit(HashRequest(1, 0, KiB64, KiB64), path)
        answerer.submit(HashRequest(2, SIZE, KiB64, KiB64), path)  # past the end
        answerer.submit(HashRequest(3, KiB64, KiB64, KiB64), path)
    replies = {r.request: r for r in path.sent}
    assert replies[2].status == errno.EINVAL
    assert replies[1].status == replies[3].status == 0
    assert replies[3].hashes == (KiB64,)


async def test_a_failed_read_fails_only_its_batch_with_the_errno():
    async def hashes(ranges, block):
        raise OSError(errno.EIO, "disk gone")

    path = _Path()
    async with trio.open_nursery() as n:
        answerer = HashAnswerer(n, hashes, _check)
        for i in range(3):
            answerer.submit(HashRequest(i + 1, i * KiB64, KiB64, KiB64), path)
    assert sorted(r.request for r in path.sent) == [1, 2, 3]
    assert all(r.status == errno.EIO for r in path.sent)


async def test_large_requests_are_answered_on_their_own_and_concurrently():
    running, most = 0, 0

    async def hashes(ranges, block):
        nonlocal running, most
        running += 1
        most = max(most, running)
        await trio.sleep(0.01)
        running -= 1
        return [_fake_hash(o, n, block) for o, n in ranges]

    path = _Path()
    big = HashAnswerer.BATCH_REQUEST * 2
    async with trio.open_nursery() as n:
        answerer = HashAnswerer(n, hashes, _check)
        for i in range(3):
            answerer.submit(HashRequest(i + 1, i * big, big, KiB64), path)
    assert most == 3
    assert sorted(r.request for r in path.sent) == [1, 2, 3]


async def test_mixed_block_sizes_are_each_hashed_with_their_own_block():
    blocks: list[int] = []

    async def hashes(ranges, block):
        blocks.append(block)
        return [_fake_hash(o, n, block) for o, n in ranges]

    path = _Path()
    async with trio.open_nursery() as n:
        answerer = HashAnswerer(n, hashes, _check)
        answerer.submit(HashRequest(1, 0, KiB64, KiB64), path)
        answerer.submit(HashRequest(2, 0, KiB64, 4096), path)
    replies = {r.request: r for r in path.sent}
    assert len(replies[1].hashes) == 1 and len(replies[2].hashes) == 16
    assert sorted(blocks) == [4096, KiB64]
