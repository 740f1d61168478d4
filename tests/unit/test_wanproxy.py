"""The WAN emulator as its users see it: bytes through a real loopback proxy to
an echo server, with delay, jitter, bandwidth cap, loss and partitions."""

from __future__ import annotations

import json
import random
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from transport.wanproxy import (
    DEFAULT_BUFFER_LIMIT,
    MAX_CHUNK,
    WanProxy,
    WanSettings,
    apply_control_request,
    bucket_burst,
    main,
)

# --- helpers ---------------------------------------------------------------------


async def _accept_forever(listener: trio.SocketListener, handler, nursery: trio.Nursery) -> None:
    while True:
        stream = await listener.accept()
        nursery.start_soon(handler, stream)


async def serve_tcp_on_loopback(handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run ``handler(stream)`` for every connection to an ephemeral loopback
    port; report ``(host, port)``; close everything when cancelled."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_accept_forever, listener, handler, nursery)
            task_status.started(listener.socket.getsockname()[:2])
    finally:
        listener.socket.close()


async def echo(stream: trio.SocketStream) -> None:
    """Echo until EOF, then pass the EOF back and close."""
    try:
        async with stream:
            async for data in stream:
                await stream.send_all(data)
            await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def sink_that_never_reads(stream: trio.SocketStream) -> None:
    """Hold the connection open and read nothing (a stalled receiver)."""
    async with stream:
        await trio.sleep_forever()


@asynccontextmanager
async def proxied(settings: WanSettings | None = None, *, handler=echo, target=None, **kwargs):
    """An echo server (or ``handler``) behind a running WanProxy; yields the proxy."""
    async with trio.open_nursery() as nursery:
        if target is None:
            target = await nursery.start(serve_tcp_on_loopback, handler)
        proxy = WanProxy(target, settings=settings, **kwargs)
        await nursery.start(proxy.serve)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def client_of(proxy: WanProxy):
    stream = await trio.open_tcp_stream(*proxy.listen_address)
    async with stream:
        yield stream


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        assert chunk, f"stream ended after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


async def round_trip(stream: trio.SocketStream, payload: bytes = b"ping") -> float:
    start = trio.current_time()
    await stream.send_all(payload)
    assert await receive_exactly(stream, len(payload)) == payload
    return trio.current_time() - start


async def wait_until(predicate, timeout: float = 5.0) -> None:
    """Wait, with a deadline, until ``predicate()`` holds (state the proxy
    updates a few scheduler ticks after the peer notices)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


async def connection_is_dead(stream: trio.SocketStream, timeout: float = 5.0) -> bool:
    """True if the peer reset or closed ``stream`` (within ``timeout``)."""
    with trio.fail_after(timeout):
        try:
            while True:
                if await stream.receive_some(65536) == b"":
                    return True
        except trio.BrokenResourceError:
            return True


async def was_reset(stream: trio.SocketStream, timeout: float = 5.0) -> bool:
    """True if the peer reset ``stream`` (a TCP RST, not an orderly close)."""
    with trio.fail_after(timeout):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError as exc:
            return isinstance(exc.__cause__, ConnectionResetError)
        return False


async def nothing_arrives(stream: trio.SocketStream, seconds: float) -> bool:
    with trio.move_on_after(seconds):
        await stream.receive_some(65536)
        return False
    return True


# --- data integrity ----------------------------------------------------------------


@pytest.mark.parametrize("settings", [
    WanSettings(),
    WanSettings(delay=0.001, jitter=0.004, seed=7),
], ids=["plain", "jitter"])
async def test_bytes_pass_unchanged_and_in_order_both_ways(settings):
    rng = random.Random(1)
    sizes = [1, 2, 17, 1000, 4096, 65535, 65536, 65537, 200_000] + [rng.randint(1, 30_000) for _ in range(60)]
    payloads = [rng.randbytes(n) for n in sizes]
    expected = b"".join(payloads)
    async with proxied(settings) as proxy:
        async with client_of(proxy) as client:
            received = bytearray()

            async def sender():
                for payload in payloads:
                    await client.send_all(payload)
                await client.send_eof()

            async def receiver():
                async for chunk in client:
                    received.extend(chunk)

            with trio.fail_after(15):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sender)
                    nursery.start_soon(receiver)
        assert bytes(received) == expected
        await wait_until(lambda: proxy.statistics().connections_open == 0)
        stats = proxy.statistics()
    assert stats.bytes_to_target == stats.bytes_to_client == len(expected)
    assert stats.connections_total == 1 and stats.resets == 0 and stats.bytes_queued == 0


async def test_several_connections_stay_separate():
    async with proxied(WanSettings(jitter=0.002)) as proxy:
        async def one(n):
            async with client_of(proxy) as client:
                for i in range(20):
                    payload = f"conn{n}-msg{i}-".encode() * 50
                    await round_trip(client, payload)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for n in range(5):
                    nursery.start_soon(one, n)
        assert proxy.statistics().connections_total == 5


async def test_end_of_file_is_forwarded_after_the_data():
    async with proxied(WanSettings(delay=0.02)) as proxy:
        async with client_of(proxy) as client:
            await client.send_all(b"last words")
            await client.send_eof()
            with trio.fail_after(5):
                assert await receive_exactly(client, 10) == b"last words"
                assert await client.receive_some(100) == b""  # the echo server's EOF came back
        await wait_until(lambda: proxy.statistics().connections_open == 0)
        assert proxy.statistics().resets == 0


# --- delay, jitter, bandwidth ---------------------------------------------------------


async def test_round_trip_takes_at_least_twice_the_delay_and_update_applies():
    async with proxied(WanSettings(delay=0.1)) as proxy:
        async with client_of(proxy) as client:
            for _ in range(2):
                assert await round_trip(client) >= 2 * 0.1 * 0.999
            proxy.update(delay=0.25, jitter=0.01)
            assert proxy.settings.delay == 0.25
            assert await round_trip(client) >= 2 * 0.25 * 0.999


@pytest.fixture
def slow_autojump_clock():
    # Jump virtual time only after the loop has been idle for 20 ms of real
    # time, so loopback I/O in flight is always seen first.
    return trio.testing.MockClock(autojump_threshold=0.02)


async def test_delay_in_virtual_time(slow_autojump_clock):
    async with proxied(WanSettings(delay=30.0, jitter=5.0, seed=3)) as proxy:
        async with client_of(proxy) as client:
            for _ in range(3):
                assert await round_trip(client, b"x" * 1000) >= 60.0


async def test_bandwidth_cap_lower_bound():
    rate, size = 1_000_000, 600_000
    payload = random.Random(2).randbytes(size)
    async with proxied(WanSettings(bandwidth=rate)) as proxy:
        async with client_of(proxy) as client:
            start = trio.current_time()
            with trio.fail_after(15):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.send_all, payload)
                    assert await receive_exactly(client, size) == payload
            elapsed = trio.current_time() - start
    assert elapsed >= (size - bucket_burst(rate)) / rate


# --- loss and partitions --------------------------------------------------------------


async def test_drop_one_resets_the_connection():
    async with proxied(WanSettings(drop=1.0)) as proxy:
        async with client_of(proxy) as client:
            await client.send_all(b"doomed")
            assert await was_reset(client)
        stats = proxy.statistics()
        assert stats.resets == 1 and stats.bytes_to_target == 0
        await wait_until(lambda: proxy.statistics().connections_open == 0)


async def test_blackhole_holds_bytes_and_heal_delivers_them_in_order():
    async with proxied() as proxy:
        async with client_of(proxy) as client:
            assert await round_trip(client, b"before") >= 0
            forwarded = proxy.statistics().bytes_to_target

            proxy.partition()
            assert proxy.statistics().partitioned == "blackhole"
            held = b"".join(b"held-%04d|" % i for i in range(500))
            for i in range(0, len(held), 100):
                await client.send_all(held[i:i + 100])
            assert await nothing_arrives(client, 0.3)
            assert proxy.statistics().bytes_to_target == forwarded  # the target got nothing either

            proxy.heal()
            with trio.fail_after(5):
                assert await receive_exactly(client, len(held)) == held
            assert await round_trip(client, b"after") >= 0  # the same connection still works
        stats = proxy.statistics()
        assert stats.partitioned is None and stats.resets == 0 and stats.connections_total == 1


async def test_blackhole_holds_new_connections_until_heal():
    async with proxied() as proxy:
        proxy.partition("blackhole")
        async with client_of(proxy) as client:  # the listener still accepts
            await client.send_all(b"hello?")
            assert await nothing_arrives(client, 0.2)
            proxy.heal()
            with trio.fail_after(5):
                assert await receive_exactly(client, 6) == b"hello?"


async def test_reset_partition_aborts_connections_and_refuses_until_heal():
    async with proxied() as proxy:
        async with client_of(proxy) as first, client_of(proxy) as second:
            await round_trip(first)
            await round_trip(second)
            proxy.partition("reset")
            assert await was_reset(first)
            assert await was_reset(second)
        assert proxy.statistics().resets == 2

        async with client_of(proxy) as refused:
            assert await was_reset(refused)
        assert proxy.statistics().refused == 1

        proxy.heal()
        async with client_of(proxy) as client:
            assert await round_trip(client) >= 0
        assert proxy.statistics().partitioned is None


async def test_reset_all_counts_connections():
    async with proxied() as proxy:
        async with client_of(proxy) as a, client_of(proxy) as b:
            await round_trip(a)
            await round_trip(b)
            assert proxy.reset_all() == 2
            assert await was_reset(a) and await was_reset(b)
        await wait_until(lambda: proxy.statistics().connections_open == 0)
        assert proxy.reset_all() == 0


async def test_unreachable_target_closes_the_client():
    # A port that nobody listens on: bind, note it, close.
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    dead_port = sock.getsockname()[1]
    sock.close()
    async with proxied(target=("127.0.0.1", dead_port)) as proxy:
        async with client_of(proxy) as client:
            assert await connection_is_dead(client)
        assert proxy.statistics().connect_failures == 1


async def test_cancelled_proxy_leaves_clients_with_a_dead_connection():
    async with trio.open_nursery() as outer:
        target = await outer.start(serve_tcp_on_loopback, echo)
        proxy = WanProxy(target)
        proxy_scope = trio.CancelScope()

        async def run_proxy(task_status=trio.TASK_STATUS_IGNORED):
            with proxy_scope:
                await proxy.serve(task_status=task_status)

        await outer.start(run_proxy)
        async with client_of(proxy) as client:
            await round_trip(client)
            proxy_scope.cancel()
            assert await connection_is_dead(client)
        with pytest.raises(OSError):
            await trio.open_tcp_stream(*proxy.listen_address)  # the listener is closed
        outer.cancel_scope.cancel()


# --- memory bound ----------------------------------------------------------------------


async def test_stalled_receiver_does_not_grow_the_buffer_beyond_its_budget():
    limit = 256 << 10
    chunk = b"z" * MAX_CHUNK
    async with proxied(handler=sink_that_never_reads, buffer_limit=limit) as proxy:
        async with client_of(proxy) as client:
            sent = 0
            while True:  # send until TCP back-pressure stalls us for a while
                with trio.move_on_after(0.5) as stalled:
                    await client.send_all(chunk)
                if stalled.cancelled_caught:
                    break
                sent += len(chunk)
                assert sent < 1 << 30, "the proxy never pushed back"
            stats = proxy.statistics()
            assert stats.peak_bytes_queued <= limit
            assert limit - MAX_CHUNK < stats.bytes_queued <= limit  # the proxy's buffer is what filled
            assert stats.buffer_limit == limit
    assert DEFAULT_BUFFER_LIMIT == 16 << 20


# --- settings and control ------------------------------------------------------------


async def test_update_rejects_bad_values_and_changes_nothing():
    async with proxied(WanSettings(delay=0.01)) as proxy:
        for bad in ({"delay": -1}, {"jitter": float("nan")}, {"drop": 1.5}, {"drop": -0.1},
                    {"bandwidth": -5}, {"bandwidth": 1.5}, {"delay": "1"}, {"speed": 3},
                    {"delay": 0.5, "drop": 2}):
            with pytest.raises((ValueError, TypeError)):
                proxy.update(**bad)
        assert proxy.settings == WanSettings(delay=0.01)
        with pytest.raises(ValueError, match="partition mode"):
            proxy.partition("sideways")
        assert proxy.statistics().partitioned is None
    with pytest.raises(ValueError, match="drop"):
        WanProxy(("127.0.0.1", 1), settings=WanSettings(drop=7))
    with pytest.raises(RuntimeError, match="not listening"):
        WanProxy(("127.0.0.1", 1)).listen_address


async def test_control_requests():
    async with proxied() as proxy:
        reply = apply_control_request(proxy, {"op": "set", "delay": 0.02, "bandwidth": 1000})
        assert reply == {"ok": True, "settings": {"delay": 0.02, "jitter": 0.0, "bandwidth": 1000,
                                                  "drop": 0.0, "seed": None}}
        for bad, words in [({"op": "set", "delay": -1}, "delay"),
                           ({"op": "set", "drop": 3}, "drop"),
                           ({"op": "set", "colour": "red"}, "colour"),
                           ({"op": "explode"}, "explode"),
                           ({"delay": 1}, "op"),
                           (["op", "set"], "object"),
                           ({"op": "partition", "mode": "sideways"}, "sideways"),
                           ({"op": "heal", "now": True}, "now")]:
            reply = apply_control_request(proxy, bad)
            assert reply["ok"] is False and words in reply["error"], (bad, reply)
        assert proxy.settings.delay == 0.02
        assert apply_control_request(proxy, {"op": "partition", "mode": "blackhole"}) == \
            {"ok": True, "partitioned": "blackhole"}
        stats = apply_control_request(proxy, {"op": "stats"})
        assert stats["ok"] and stats["stats"]["partitioned"] == "blackhole"
        json.dumps(stats)  # JSON-ready
        assert apply_control_request(proxy, {"op": "heal"}) == {"ok": True, "partitioned": None}
        assert apply_control_request(proxy, {"op": "reset"}) == {"ok": True, "reset": 0}


def test_bad_command_line_exits_2(capsys):
    for argv, words in [(["--target", "nowhere"], "HOST:PORT"),
                        ([], "--target"),
                        (["--target", "127.0.0.1:99999"], "0..65535"),
                        (["--target", "127.0.0.1:1", "--drop", "2"], "drop"),
                        (["--target", "127.0.0.1:1", "--delay", "-1"], "delay")]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert words in capsys.readouterr().err
