"""Handshakes over in-memory streams: both ends, every refusal named on both."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from transport.auth import auth_mac, new_nonce
from transport.codec import (
    LARGE_FRAME,
    PREAUTH_MAX_PAYLOAD,
    Auth,
    Connection,
    FrameType,
    Hello,
    Intro,
    Ping,
    Pong,
    Write,
    frame_bytes,
)
from transport.link import HandshakeGate, LinkClosed, LinkRefused, client_handshake, server_handshake


def hello(node, **kw):
    """The intro a member sends once authenticated (named for the old hello)."""
    args = dict(node=node, volume="appslv", size=1 << 30, region_size=65536, extent_size=4 << 20,
                session="s1", info={"role": "primary", "generation": {"current": "g1"}})
    args.update(kw)
    return Intro(**args)


async def handshake(client_hello, server_hello, *, client_secret="s", server_secret="s"):
    """Run both ends; returns (client result, server result): a link or the exception."""
    a, b = trio.testing.memory_stream_pair()
    results = {}

    async def run(name, fn):
        try:
            results[name] = await fn()
        except LinkRefused as e:
            results[name] = e

    async with trio.open_nursery() as n:
        n.start_soon(run, "client", lambda: client_handshake(a, client_hello, client_secret, lambda h: None,
                                                            label="client"))
        n.start_soon(run, "server", lambda: server_handshake(b, server_hello.node, server_secret,
                                                            lambda h: server_hello, label="server"))
    return results["client"], results["server"]


async def test_matching_peers_get_links_that_carry_frames():
    client, server = await handshake(hello("labor1"), hello("labor2"))
    assert client.remote.node == "labor2" and server.remote.node == "labor1"
    async with trio.open_nursery() as n:
        client.start(n)
        server.start(n)
        await client.send(Ping(7))
        assert await server.receive() == Ping(7)
        await server.send(Pong(7))
        assert await client.receive() == Pong(7)
        await client.aclose("done")
        await server.aclose("done")


async def test_wrong_secret_is_refused_on_both_ends(caplog):
    client, server = await handshake(hello("labor1"), hello("labor2"), server_secret="other")
    assert isinstance(client, LinkRefused) and isinstance(server, LinkRefused)
    assert "authentication" in str(server) and "authentication" in str(client)


async def raw_exchange(server_fn, frames: list[bytes]) -> tuple[object, list]:
    """Send raw ``frames`` to a server handshake, then read what it answers
    until it closes; returns (server result, events received)."""
    a, b = trio.testing.memory_stream_pair()
    out = {}

    async def server():
        try:
            out["server"] = await server_fn(b)
        except LinkRefused as e:
            out["server"] = e

    got = []
    async with trio.open_nursery() as n:
        n.start_soon(server)
        for f in frames:
            await a.send_all(f)
        while True:
            data = await a.receive_some(65536)
            if not data:
                break
            got.append(data)
    return out["server"], b"".join(got)


@pytest.mark.parametrize("kw,why", [
    (dict(protocol_min=4, protocol_max=5), "no common protocol version: peer speaks 4..5"),
    (dict(protocol_min=3, protocol_max=2), "protocol range 3..2 is empty"),
    (dict(nonce=b"short"), "nonce of 5 bytes"),
])
async def test_unusable_hello_is_refused_with_the_reason(kw, why):
    args = dict(node="labor1", nonce=new_nonce())
    args.update(kw)
    server, answer = await raw_exchange(
        lambda b: server_handshake(b, "labor2", "s", lambda h: hello("labor2"), label="s"),
        [Connection().send(Hello(**args))])
    assert isinstance(server, LinkRefused) and why in str(server)
    assert why.encode() in answer  # the peer was told why


async def test_nothing_is_judged_or_revealed_before_the_client_proves_the_secret():
    """A stranger that names a member node and sends a well-formed hello but a
    wrong proof never reaches the volume (reply_to is not called) and learns
    nothing about it: the server's answer holds no volume name or state."""
    asked = []

    def reply_to(intro):
        asked.append(intro)
        return hello("labor2")

    client = Connection()
    first = client.send(Hello(node="labor1", nonce=new_nonce()))
    # The stranger cannot wait for the server's hello to compute a real MAC;
    # any 32 bytes will do, and an intro right behind it, as an attacker would.
    frames = [first]
    frames.append(frame_bytes(FrameType.AUTH, b"\x01" * 32))
    frames.append(frame_bytes(FrameType.INTRO, b'{"node":"labor1","volume":"appslv","size":1073741824,'
                                               b'"region_size":65536,"extent_size":4194304,"path":0,'
                                               b'"session":"x","info":{"role":"primary"}}'))
    server, answer = await raw_exchange(
        lambda b: server_handshake(b, "labor2", "s", reply_to, label="s"), frames)
    assert isinstance(server, LinkRefused) and "authentication failed" in str(server)
    assert asked == []
    assert b"appslv" not in answer and b"primary" not in answer and b"generation" not in answer


async def test_a_client_checks_the_server_proof_before_it_says_anything_about_the_volume():
    """A fake server (wrong secret) gets the client's hello and AUTH, never its intro."""
    a, b = trio.testing.memory_stream_pair()
    seen = bytearray()

    async def fake_server():
        conn = Connection()
        while True:
            ev = conn.next_event()
            if isinstance(ev, Hello):
                break
            data = await b.receive_some(4096)
            seen.extend(data)
            conn.receive_data(data)
        theirs = conn.last_frame
        mine = conn.send(Hello(node="labor2", nonce=new_nonce()))
        await b.send_all(mine)
        await b.send_all(conn.send(Auth(auth_mac("wrong", "server", theirs, mine))))
        with trio.move_on_after(2):
            while True:
                data = await b.receive_some(4096)
                if not data:
                    break
                seen.extend(data)

    async def client():
        with pytest.raises(LinkRefused, match="failed authentication"):
            await client_handshake(a, hello("labor1"), "s", lambda h: None, label="c")

    async with trio.open_nursery() as n:
        n.start_soon(fake_server)
        n.start_soon(client)
    assert b"appslv" not in seen and b"generation" not in seen


async def test_a_pre_auth_frame_larger_than_a_hello_is_refused_before_it_is_buffered():
    header = bytearray(frame_bytes_header(FrameType.HELLO, 8 * 1024 * 1024))
    server, answer = await raw_exchange(
        lambda b: server_handshake(b, "labor2", "s", lambda h: hello("labor2"), label="s"),
        [bytes(header) + b"x" * 100_000])
    assert isinstance(server, LinkRefused)
    assert f"exceeds the bound {PREAUTH_MAX_PAYLOAD} before authentication" in str(server)


def frame_bytes_header(ftype, length):
    """A frame header claiming ``length`` payload bytes (checksum not checked
    before the length is)."""
    import struct
    return struct.pack("<2sBBIQ", b"GM", int(ftype), 0, length, 0)


def test_the_handshake_gate_turns_away_connections_beyond_its_limit():
    gate = HandshakeGate(2, "test listener")
    assert gate.try_enter() and gate.try_enter()
    assert not gate.try_enter() and gate.turned_away == 1
    gate.leave()
    assert gate.try_enter() and gate.pending == 2


async def test_server_refusal_reason_reaches_the_client():
    a, b = trio.testing.memory_stream_pair()
    out = {}

    async def client():
        try:
            await client_handshake(a, hello("labor1"), "s", lambda h: None, label="c")
        except LinkRefused as e:
            out["client"] = str(e)

    async def server():
        with pytest.raises(LinkRefused):
            await server_handshake(b, "labor2", "s", lambda h: "volume appslv is down on labor2", label="s")

    async with trio.open_nursery() as n:
        n.start_soon(client)
        n.start_soon(server)
    assert "volume appslv is down on labor2" in out["client"]


def test_a_repeated_refusal_is_logged_once_then_at_debug(caplog):
    import logging

    from transport import link

    link._last_refusal.clear()
    caplog.set_level(logging.DEBUG, logger="transport.link")
    for port in (40001, 40002, 40003):  # an acceptor's label changes with the peer's port
        link.log_refusal(f"labor2<-127.0.0.1:{port}", "refusing peer labor1: volume appslv is down")
    link.log_refusal("labor2<-127.0.0.1:40004", "refusing peer labor1: authentication failed")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "down" in warnings[0] and "authentication" in warnings[1]
    assert sum(1 for r in caplog.records if r.levelno == logging.DEBUG) == 2


async def test_sending_on_a_link_the_peer_just_closed_raises_link_closed_not_a_protocol_error():
    """A copy or reply racing the peer's ERROR frame must see LinkClosed (which
    every caller handles), never the codec's LocalProtocolError."""
    from transport.codec import Connection, ConnState
    from transport.link import LinkClosed, PeerLink

    conn = Connection()
    a, _b = trio.testing.memory_stream_pair()
    link = PeerLink(a, conn, None, label="test")
    conn.state = ConnState.CLOSED  # as after the peer's ERROR frame was received
    conn.closed_reason = "peer closed: volume going down"
    with pytest.raises(LinkClosed, match="volume going down"):
        link.send_nowait(Ping(1))
    assert link.closed


async def tcp_links():
    """A client and a server link over real loopback TCP (large frames are
    received into buffers of their own only on sockets)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    results = {}
    async with trio.open_nursery() as n:
        async def serve():
            stream = await listeners[0].accept()
            results["server"] = await server_handshake(stream, "labor2", "s", lambda h: hello("labor2"),
                                                       label="server")

        n.start_soon(serve)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        results["client"] = await client_handshake(stream, hello("labor1"), "s", lambda h: None, label="client")
    await listeners[0].aclose()
    return results["client"], results["server"]


def raw_write_frame(seq, offset, data):
    from transport.codec import _WRITE, FrameType, frame_bytes

    return frame_bytes(FrameType.WRITE, _WRITE.pack(seq, offset, 0, 0) + data)


async def test_large_and_small_writes_arrive_intact_over_tcp():
    import random

    rng = random.Random(5)
    client, server = await tcp_links()
    sizes = [1 << 20, 512, LARGE_FRAME, 65536, LARGE_FRAME - 1, 8 << 20, 4096, LARGE_FRAME + 7]
    sent = [Write(i + 1, i * 4096, rng.randbytes(n)) for i, n in enumerate(sizes)]
    async with trio.open_nursery() as n:
        client.start(n)
        server.start(n)
        for w in sent:
            await client.send(w)
        got = [await server.receive() for _ in sent]
        assert [(g.seq, g.offset, bytes(g.data)) for g in got] == [(w.seq, w.offset, w.data) for w in sent]
        await client.aclose("done")
        await server.aclose("done")


async def test_a_receive_cancelled_in_the_middle_of_a_large_frame_loses_nothing():
    client, server = await tcp_links()
    data = bytes(range(256)) * (LARGE_FRAME // 256)
    frame = raw_write_frame(1, 0, data) + raw_write_frame(2, 8192, b"tail")

    async def drip():  # the frame arrives in pieces, slower than the receiver gives up
        for i in range(0, len(frame), 256 << 10):
            await client.stream.send_all(frame[i:i + (256 << 10)])
            await trio.sleep(0.01)

    events = []
    cancelled = 0
    async with trio.open_nursery() as n:
        n.start_soon(drip)
        while len(events) < 2:
            with trio.move_on_after(0.003) as scope:
                events.append(await server.receive())
            cancelled += scope.cancelled_caught
    assert cancelled > 0
    assert [(e.seq, e.offset, bytes(e.data)) for e in events] == [(1, 0, data), (2, 8192, b"tail")]
    await client.aclose("done", tell_peer=False)
    await server.aclose("done", tell_peer=False)


async def test_end_of_stream_in_the_middle_of_a_large_frame_is_a_protocol_error():
    client, server = await tcp_links()
    frame = raw_write_frame(1, 0, bytes(LARGE_FRAME))

    async def half_then_close():
        await client.stream.send_all(frame[:len(frame) // 2])
        await client.stream.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(half_then_close)
        with pytest.raises(LinkClosed, match="middle of a frame"):
            await server.receive()
    await server.aclose("done", tell_peer=False)


async def test_frames_sent_at_once_and_by_the_sender_task_keep_their_order_and_no_handle_leaks():
    # A frame goes out at once when nothing is queued before it, else through
    # the sender task: a burst the peer does not read yet fills the socket
    # buffer (partial sends, EAGAIN), and everything must still arrive in order.
    import os
    import random

    rng = random.Random(11)
    fds_before = len(os.listdir("/proc/self/fd"))
    client, server = await tcp_links()
    sent = [Write(i + 1, i * 4096, rng.randbytes(rng.choice([512, 4096, 65536, 1 << 20])))
            for i in range(200)]
    async with trio.open_nursery() as n:
        client.start(n)
        server.start(n)
        for w in sent:
            client.send_nowait(w)  # callers bound their own queues; nothing waits here
        got = [await server.receive() for _ in sent]
        assert [(g.seq, g.offset, bytes(g.data)) for g in got] == [(w.seq, w.offset, w.data) for w in sent]
        for i in range(50):  # one at a time: each goes out at once
            await client.send(Ping(i))
            assert await server.receive() == Ping(i)
        await client.aclose("done")
        await server.aclose("done")
    assert len(os.listdir("/proc/self/fd")) == fds_before  # the duplicate handles closed with their links


async def test_every_sender_waiting_at_the_high_water_mark_goes_on_once_the_queue_drains():
    # Several tasks send while much is queued (a flood of copy data, and
    # writes each telling the member its disk is outdated): all must go on
    # when the sender task drains the queue, not only the last one to wait.
    from transport.link import SEND_HIGH_WATER

    client, server = await tcp_links()
    # Two bursts of 8 MiB writes: the sender task takes the first and blocks
    # on the socket (the peer does not read yet); the second stays queued,
    # above the high-water mark.
    n_burst = SEND_HIGH_WATER // (8 << 20) + 2
    bulk = [Write(i + 1, 0, bytes(8 << 20)) for i in range(2 * n_burst)]
    done = []

    async def small_sender(i):
        await client.send(Ping(i))
        done.append(i)

    async with trio.open_nursery() as n:
        client.start(n)
        server.start(n)
        for w in bulk[:n_burst]:
            client.send_nowait(w)
        await trio.sleep(0.05)
        for w in bulk[n_burst:]:
            client.send_nowait(w)
        for i in range(3):
            n.start_soon(small_sender, i)
        await trio.sleep(0.05)
        assert done == []  # all three wait at the high-water mark
        got = []
        with trio.fail_after(10):
            while len(got) < len(bulk) + 3:
                got.append(await server.receive())
            while len(done) < 3:
                await trio.sleep(0.01)
        assert sorted(done) == [0, 1, 2]
        assert [g.seq for g in got[:len(bulk)]] == [w.seq for w in bulk]
        assert sorted(p.token for p in got[len(bulk):]) == [0, 1, 2]
        await client.aclose("done")
        await server.aclose("done")


# ------------------------------------------------------ shaping: pacer, compressor


async def test_a_12_byte_write_puts_12_bytes_of_data_and_its_44_bytes_of_headers_on_the_wire():
    from transport.pacing import Pacer

    client, server = await tcp_links()
    pacer = Pacer()
    async with trio.open_nursery() as n:
        client.start(n, pacer=pacer)
        server.start(n)
        client.send_nowait(Write(1, 4096, b"twelve bytes"))
        got = await server.receive()
        assert bytes(got.data) == b"twelve bytes"
        assert pacer.wire_bytes == 12 + 16 + 28 == client.bytes_sent
        await client.aclose("done")
        await server.aclose("done")


async def test_compressed_writes_small_and_large_arrive_as_sent_and_in_order():
    import os

    from transport.compression import Compressor
    from transport.pacing import Pacer

    client, server = await tcp_links()
    text = b"counter 000123 value=42 status=ok\n" * 32000  # ~1 MiB that compresses well
    sent = []
    for i, data in enumerate([text[:4096], os.urandom(4096), text, b"tiny", text[:300_000], os.urandom(200_000),
                              text[:65536], bytes(8 << 20)]):
        sent.append(Write(i + 1, i * 4096, data, gseq=i + 10))
    compressor = Compressor(enabled=True, level=3)
    pacer = Pacer()
    async with trio.open_nursery() as n:
        client.start(n, pacer=pacer, compressor=compressor)
        server.start(n)
        for w in sent:
            client.send_nowait(w)
        got = [await server.receive() for _ in sent]
        assert [(g.seq, g.offset, bytes(g.data), g.flags, g.gseq) for g in got] == \
            [(w.seq, w.offset, w.data, 0, w.gseq) for w in sent]
        # Compressed: the text pieces and the zeros (inline and in a thread);
        # tried and sent raw: the random ones; "tiny" is not tried.
        assert compressor.compressed_writes == 5
        assert compressor.incompressible_writes == 2
        data_bytes = sum(len(w.data) for w in sent)
        assert pacer.wire_bytes == client.bytes_sent < 0.05 * data_bytes + 2 * 210_000
        await client.aclose("done")
        await server.aclose("done")


async def test_paths_sharing_a_pacer_keep_to_its_limit_together():
    from transport.pacing import BandwidthSchedule, Pacer, burst_of

    rate = 2_000_000
    pacer = Pacer(BandwidthSchedule(rate))
    links = [await tcp_links() for _ in range(2)]
    total = 3_000_000
    start = trio.current_time()
    async with trio.open_nursery() as n:
        for client, server in links:
            client.start(n, pacer=pacer)
            server.start(n)
        for i in range(total // 50_000):  # alternately on each path, as the round robin does
            links[i % 2][0].send_nowait(Write(i + 1, 0, bytes(50_000 - 44)))
        for i in range(total // 50_000):
            await links[i % 2][1].receive()
        elapsed = trio.current_time() - start
        for client, server in links:
            await client.aclose("done")
            await server.aclose("done")
    # The bucket starts full (one burst); the rest flows at the rate.
    expected = (total - burst_of(rate)) / rate
    assert expected * 0.9 <= elapsed <= expected * 1.2, elapsed
    assert pacer.wire_bytes >= total
