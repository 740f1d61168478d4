"""transport.codec: the sans-IO wire codec, tested the way h11 tests its own.

Every test drives real :class:`Connection` objects with bytes: a full
HELLO/HELLO/AUTH/AUTH handshake with MACs from :mod:`transport.auth` over the
real transcripts, then events through ``send`` -> ``receive_data`` ->
``next_event``. Malformed input is crafted with :func:`frame_bytes` (which
skips the state checks) so each violation is seen by the receiving side, and
each must surface as :class:`RemoteProtocolError` with a message naming it.
Hypothesis checks that chunking never changes the events, that no input makes
the decoder raise anything else or buffer past its bound, and that a single
flipped byte is always caught.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transport.auth import auth_mac, new_nonce, verify_mac
from transport.codec import (
    CLOSED,
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    NEED_DATA,
    Auth,
    Bitmap,
    Connection,
    ConnState,
    Error,
    Flush,
    FlushAck,
    FrameType,
    HashReply,
    HashRequest,
    Hello,
    Intro,
    LocalProtocolError,
    Ping,
    Pong,
    ProtocolError,
    Read,
    ReadReply,
    RemoteProtocolError,
    State,
    Write,
    WriteAck,
    frame_bytes,
)
from transport.codec import PREAUTH_MAX_PAYLOAD, WRITE_COPY

SECRET = b"test-secret"
SMALL = 1024  # a max_payload small enough to hit its bound cheaply

# GMD_FUZZ_EXAMPLES=5000 for a deep search; CI keeps the default quick.
FUZZ = settings(max_examples=int(os.environ.get("GMD_FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ helpers


def make_hello(node: str = "labor1", **kw) -> Hello:
    base = dict(node=node, nonce=new_nonce())
    base.update(kw)
    return Hello(**base)


def make_intro(node: str = "labor1", **kw) -> Intro:
    base = dict(node=node, volume="appslv", size=64 << 20, region_size=4096, extent_size=4 << 20,
                path=0, session="s-1", info={"role": "primary", "gen": [1, 2]})
    base.update(kw)
    return Intro(**base)


def pump(receiver: Connection, data: bytes, chunks: list[int] | None = None, out: list | None = None) -> list:
    """Feed ``data`` in pieces of the given sizes (all at once if None; the last
    size repeats), draining events after each piece; returns the events (also
    appended to ``out`` as they come, so a caller sees them even if this raises).

    Checks the buffer bound each time the receiver asks for more data: it never
    holds more than one header plus ``max_payload`` bytes. CLOSED may only
    follow an ERROR event (EOF is not fed here).
    """
    events = [] if out is None else out
    pos = 0
    sizes = chunks or [len(data) or 1]
    i = 0
    while pos < len(data):
        n = sizes[min(i, len(sizes) - 1)]
        i += 1
        receiver.receive_data(data[pos:pos + n])
        pos += n
        while True:
            ev = receiver.next_event()
            if ev is NEED_DATA:
                assert len(receiver._buf) < HEADER_SIZE + receiver.max_payload
                break
            if ev is CLOSED:
                assert events and isinstance(events[-1], Error)
                break
            events.append(ev)
    return events


def handshake(client_intro: Intro | None = None, server_intro: Intro | None = None, *,
              max_payload: int = DEFAULT_MAX_PAYLOAD, chunks: list[int] | None = None,
              secret: bytes = SECRET, client_hello: Hello | None = None,
              server_hello: Hello | None = None) -> tuple[Connection, Connection]:
    """Two ESTABLISHED connections after HELLO, HELLO, AUTH, AUTH, INTRO, INTRO,
    each MAC over the exact hello bytes as sent and received, and each verified."""
    client_hello = client_hello or make_hello("labor1")
    server_hello = server_hello or make_hello("labor2")
    client_intro = client_intro or make_intro("labor1")
    server_intro = server_intro or make_intro("labor2")
    client, server = Connection(max_payload), Connection(max_payload)

    ch = client.send(client_hello)
    sh = server.send(server_hello)
    assert client.state is server.state is ConnState.HELLO  # one hello each way is not enough
    assert pump(server, ch, chunks) == [client_hello]
    assert (client.state, server.state) == (ConnState.HELLO, ConnState.AUTH)
    assert pump(client, sh, chunks) == [server_hello]
    assert client.state is server.state is ConnState.AUTH
    # Each side's transcript: its own hello as sent, the peer's as received.
    ch_at_server, sh_at_client = server.last_frame, client.last_frame
    assert (ch_at_server, sh_at_client) == (ch, sh)

    ca = client.send(Auth(auth_mac(secret, "client", ch, sh_at_client)))
    assert client.state is ConnState.AUTH
    (got_ca,) = pump(server, ca, chunks)
    assert server.last_frame == ca
    assert verify_mac(secret, "client", ch_at_server, sh, got_ca.mac)
    assert server.state is ConnState.AUTH  # its own AUTH is still to go
    sa = server.send(Auth(auth_mac(secret, "server", ch_at_server, sh)))
    assert server.state is ConnState.INTRO
    assert client.state is ConnState.AUTH
    (got_sa,) = pump(client, sa, chunks)
    assert verify_mac(secret, "server", ch, sh_at_client, got_sa.mac)
    assert client.state is server.state is ConnState.INTRO  # authenticated, nothing said yet
    assert pump(server, client.send(client_intro), chunks) == [client_intro]
    assert server.state is ConnState.INTRO and client.state is ConnState.INTRO
    assert pump(client, server.send(server_intro), chunks) == [server_intro]
    assert client.state is server.state is ConnState.ESTABLISHED
    return client, server


def transfer(sender: Connection, receiver: Connection, event, chunks: list[int] | None = None):
    """``event`` sent by one side and decoded by the other: exactly one event."""
    (got,) = pump(receiver, sender.send(event), chunks)
    assert receiver.next_event() is (CLOSED if isinstance(event, Error) else NEED_DATA)
    return got


def at_state(state: ConnState, max_payload: int = DEFAULT_MAX_PAYLOAD) -> Connection:
    """A connection driven to ``state`` by a real exchange; the peer's bytes are discarded."""
    if state is ConnState.ESTABLISHED:
        return handshake(max_payload=max_payload)[1]
    conn = Connection(max_payload)
    if state in (ConnState.AUTH, ConnState.INTRO):
        conn.send(make_hello("labor2"))
        conn.receive_data(Connection().send(make_hello("labor1")))
        assert isinstance(conn.next_event(), Hello)
    if state is ConnState.INTRO:
        conn.send(Auth(b"m" * 32))
        assert isinstance(raw(conn, FrameType.AUTH, b"n" * 32), Auth)
    assert conn.state is state
    return conn


def raw(conn: Connection, ftype: FrameType, payload: bytes):
    """Feed one checksummed frame, bypassing the sender's checks, and decode it."""
    conn.receive_data(frame_bytes(ftype, payload))
    return conn.next_event()


def raw_bytes(conn: Connection, data: bytes):
    """Feed bytes and decode the next event."""
    conn.receive_data(data)
    return conn.next_event()


def wire_of(event) -> bytes:
    """The frame bytes of a data or error event, as an established side sends them."""
    return handshake()[0].send(event)


def hello_obj(**changes) -> dict:
    """The JSON object of a valid hello as the encoder writes it, with changes
    (a value of ``...`` deletes the key)."""
    obj = json.loads(Connection().send(make_hello())[HEADER_SIZE:])
    return _changed(obj, changes)


def intro_obj(**changes) -> dict:
    """Like :func:`hello_obj`, for an intro."""
    return _changed(json.loads(at_state(ConnState.INTRO).send(make_intro())[HEADER_SIZE:]), changes)


def _changed(obj: dict, changes: dict) -> dict:
    for k, v in changes.items():
        if v is ...:
            del obj[k]
        else:
            obj[k] = v
    return obj


MIB = bytes(range(256)) * 4096
assert len(MIB) == 1 << 20

# ---------------------------------------------------------------- strategies

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
small_bytes = st.binary(max_size=300)
json_scalar = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
json_object = st.dictionaries(st.text(max_size=8), json_value, max_size=5)


@st.composite
def bitmaps(draw):
    nbits = draw(st.integers(0, 300))
    data = draw(st.binary(min_size=(nbits + 7) // 8, max_size=(nbits + 7) // 8))
    return Bitmap(draw(u64), nbits, data, draw(st.booleans()))


data_events = st.one_of(
    # WRITE_ZSTD is not among the flags: such a Write carries a zstd frame (test_wire_compression.py).
    st.builds(Write, u64, u64, small_bytes, st.sampled_from([0, WRITE_COPY]), u64),
    st.builds(WriteAck, u64, i32),
    st.builds(Flush, u64, u64),
    st.builds(FlushAck, u64, i32),
    st.builds(Read, u64, u64, u32),
    st.builds(ReadReply, u64, i32, small_bytes),
    st.builds(HashRequest, u64, u64, u32, st.integers(1, 2**32 - 1)),
    st.builds(HashReply, u64, i32, st.lists(u64, max_size=40).map(tuple)),
    bitmaps(),
    st.builds(State, json_object),
    st.builds(Ping, u64),
    st.builds(Pong, u64),
)

naturals = st.integers(0, 2**80)
hellos = st.builds(
    Hello, node=st.text(min_size=1, max_size=20), nonce=st.binary(max_size=64),
    protocol_min=naturals, protocol_max=naturals,
)
intros = st.builds(
    Intro, node=st.text(max_size=20), volume=st.text(max_size=20), size=naturals, region_size=naturals,
    extent_size=naturals, path=naturals, session=st.text(max_size=20), info=json_object,
)

# ---------------------------------------------------------- 1. round trips

EXAMPLES = [
    pytest.param(Write(1, 0, b""), id="write-empty"),
    pytest.param(Write(2, 1 << 40, MIB, flags=WRITE_COPY), id="write-1MiB"),
    pytest.param(WriteAck(3, 0), id="write-ack-ok"),
    pytest.param(WriteAck(4, 5), id="write-ack-EIO"),
    pytest.param(WriteAck(5, -28), id="write-ack-negative-errno"),
    pytest.param(Flush(6), id="flush"),
    pytest.param(Flush(7, in_sync=2**64 - 1), id="flush-in-sync"),
    pytest.param(Flush(9, in_sync=3, group_point=2**64 - 1), id="flush-group-mark"),
    pytest.param(Write(8, 4096, b"w", gseq=12345), id="write-gseq"),
    pytest.param(FlushAck(6, 0), id="flush-ack"),
    pytest.param(FlushAck(7, 122), id="flush-ack-EDQUOT"),
    pytest.param(Read(8, 4096 * 77, 65536), id="read"),
    pytest.param(ReadReply(8, 0, b"\x00\xff" * 100), id="read-reply"),
    pytest.param(ReadReply(9, 5), id="read-reply-error-empty"),
    pytest.param(HashRequest(10, 0, 1 << 20, 4096), id="hash-request"),
    pytest.param(HashReply(10, 0, ()), id="hash-reply-none"),
    pytest.param(HashReply(11, 0, tuple(range(0, 2**64, 2**54)) + (2**64 - 1, 0, 1)), id="hash-reply-many"),
    pytest.param(Bitmap(0, 8, b"\xa5", last=False), id="bitmap-8"),
    pytest.param(Bitmap(1 << 33, 13, b"\xff\x1f", last=True), id="bitmap-13-last"),
    pytest.param(Bitmap(7, 0, b"", last=True), id="bitmap-empty-last"),
    pytest.param(State({"role": "secondary", "disk": "uptodate", "gen": [3, 2, 1], "nested": {"x": None}}),
                 id="state"),
    pytest.param(State({}), id="state-empty"),
    pytest.param(Ping(0), id="ping"),
    pytest.param(Pong(2**64 - 1), id="pong-max"),
]


@pytest.mark.parametrize("event", EXAMPLES)
def test_data_event_round_trips_both_ways(event):
    client, server = handshake()
    assert transfer(client, server, event) == event
    assert transfer(server, client, event) == event
    assert client.state is server.state is ConnState.ESTABLISHED


def test_handshake_events_round_trip():
    ci = make_intro("labor1", path=1, session="abc", info={"role": "primary", "disk": "uptodate",
                                                            "gens": [5, 4], "weird": {"ü": [None, 1.5]}})
    si = make_intro("labor2", path=1, session="abc", info={})
    # asserts each hello, each verified MAC and each intro arrives intact
    handshake(ci, si, client_hello=make_hello("labor1", protocol_min=2, protocol_max=7))


def test_last_frame_holds_the_raw_handshake_frames_only():
    conn = Connection()
    assert conn.last_frame == b""
    conn.send(make_hello("me"))
    peer_hello = Connection().send(make_hello("peer"))
    conn.receive_data(peer_hello[:10])
    assert conn.next_event() is NEED_DATA and conn.last_frame == b""
    conn.receive_data(peer_hello[10:])
    assert isinstance(conn.next_event(), Hello) and conn.last_frame == peer_hello
    conn.send(Auth(b"a" * 32))
    auth = frame_bytes(FrameType.AUTH, b"b" * 32)
    assert raw_bytes(conn, auth) == Auth(b"b" * 32) and conn.last_frame == auth
    assert conn.state is ConnState.INTRO
    conn.send(make_intro("me"))
    assert raw_bytes(conn, at_state(ConnState.INTRO).send(make_intro("peer"))) == make_intro("peer")
    assert conn.last_frame == auth  # the intro is not part of the auth transcript
    assert conn.state is ConnState.ESTABLISHED
    assert raw(conn, FrameType.PING, struct.pack("<Q", 1)) == Ping(1)
    assert conn.last_frame == auth  # data frames leave the transcript alone


@pytest.mark.parametrize("chunks", [[1], [3, 1, 7], [15, 17]], ids=["bytewise", "odd", "header-split"])
def test_handshake_survives_any_chunking(chunks):
    client, server = handshake(chunks=chunks)
    assert transfer(client, server, Ping(1), chunks) == Ping(1)


@pytest.mark.parametrize("state", [ConnState.HELLO, ConnState.AUTH, ConnState.ESTABLISHED])
def test_error_round_trips_and_closes_both_sides(state):
    if state is ConnState.ESTABLISHED:
        sender, receiver = handshake()
    else:
        sender, receiver = Connection(), Connection()
        if state is ConnState.AUTH:
            receiver.receive_data(sender.send(make_hello("a")))
            sender.receive_data(receiver.send(make_hello("b")))
            assert isinstance(receiver.next_event(), Hello) and isinstance(sender.next_event(), Hello)
    assert sender.state is receiver.state is state
    assert transfer(sender, receiver, Error("disk failed: EIO")) == Error("disk failed: EIO")
    assert sender.state is receiver.state is ConnState.CLOSED
    assert sender.closed_reason == "we closed: disk failed: EIO"
    assert receiver.closed_reason == "peer closed: disk failed: EIO"


def test_error_reason_is_capped_at_1000_characters():
    client, server = handshake()
    assert transfer(client, server, Error("x" * 5000)) == Error("x" * 1000)


@QUICK
@given(data_events)
def test_any_data_event_round_trips(event):
    client, server = handshake()
    assert transfer(client, server, event) == event
    assert transfer(server, client, event) == event


@QUICK
@given(hellos, hellos)
def test_any_hello_round_trips_and_reencodes_to_its_transcript(ch, sh):
    client, server = Connection(), Connection()
    wire_c, wire_s = client.send(ch), server.send(sh)
    (got_c,) = pump(server, wire_c)
    (got_s,) = pump(client, wire_s)
    assert (got_c, got_s) == (ch, sh)
    assert client.state is server.state is ConnState.AUTH
    # The MAC is over the exact bytes: the receiver keeps them, and since the
    # encoding is canonical, re-encoding what arrived reproduces them too.
    assert (server.last_frame, client.last_frame) == (wire_c, wire_s)
    assert Connection().send(got_c) == wire_c
    assert Connection().send(got_s) == wire_s


@QUICK
@given(intros, intros)
def test_any_intro_round_trips(ci, si):
    client, server = at_state(ConnState.INTRO), at_state(ConnState.INTRO)
    assert transfer(client, server, ci) == ci
    assert transfer(server, client, si) == si
    assert client.state is server.state is ConnState.ESTABLISHED


@QUICK
@given(st.binary(min_size=16, max_size=64))
def test_any_auth_round_trips(mac):
    client, server = at_state(ConnState.AUTH), at_state(ConnState.AUTH)
    assert transfer(client, server, Auth(mac)) == Auth(mac)


@QUICK
@given(st.text(max_size=1000))
def test_any_error_round_trips(reason):
    client, server = handshake()
    assert transfer(client, server, Error(reason)) == Error(reason)
    assert server.next_event() is CLOSED


# ------------------------------------------------------------ 2. chunking


def _stream(events) -> tuple[bytes, list[int]]:
    """The frames of ``events`` from an established client, and where each ends."""
    client, _ = handshake()
    ends, wire = [], b""
    for e in events:
        wire += client.send(e)
        ends.append(len(wire))
    return wire, ends


SAMPLE = [Write(1, 4096, b"abc" * 50), WriteAck(1, 0), Bitmap(0, 9, b"\x01\x01", True), State({"a": [1]}),
          HashReply(2, 0, (2**64 - 1, 0)), ReadReply(3, 0, b""), Flush(2), Ping(9), Error("bye")]


def test_bytewise_feeding_yields_each_event_exactly_at_its_last_byte():
    wire, ends = _stream(SAMPLE)
    server = handshake()[1]
    seen = []  # (byte position, event)
    for i in range(len(wire)):
        server.receive_data(wire[i:i + 1])
        while (ev := server.next_event()) not in (NEED_DATA, CLOSED):
            seen.append((i + 1, ev))
    assert seen == list(zip(ends, SAMPLE))
    assert server.state is ConnState.CLOSED


@FUZZ
@given(st.lists(data_events, min_size=1, max_size=6), st.data())
def test_chunking_never_changes_the_events(events, data):
    wire, _ = _stream(events)
    whole = pump(handshake()[1], wire)
    bytewise = pump(handshake()[1], wire, [1])
    sizes = data.draw(st.lists(st.integers(1, 64), min_size=1, max_size=40), label="chunk sizes")
    chunked = pump(handshake()[1], wire, sizes)
    assert whole == bytewise == chunked == events


# ------------------------------------------------------------ 3. fuzzing


def drain_after_eof(conn: Connection, out: list) -> None:
    """After EOF: events until CLOSED; NEED_DATA is impossible once EOF is in."""
    conn.receive_data(b"")
    while True:
        ev = conn.next_event()
        assert ev is not NEED_DATA, "NEED_DATA after end of stream"
        if ev is CLOSED:
            return
        out.append(ev)


def _drain_or_refuse(conn: Connection, data: bytes, sizes: list[int], eof: bool = True) -> list:
    """Feed garbage; only RemoteProtocolError may come out. Returns events decoded."""
    events: list = []
    try:
        pump(conn, data, sizes, out=events)
        if eof:
            drain_after_eof(conn, events)
    except RemoteProtocolError:
        assert conn.state is ConnState.CLOSED and conn.next_event() is CLOSED
    return events


@FUZZ
@given(st.binary(max_size=4000), st.lists(st.integers(1, 300), min_size=1, max_size=10))
def test_arbitrary_bytes_after_handshake_only_raise_remote_protocol_error(data, sizes):
    conn = at_state(ConnState.ESTABLISHED, SMALL)
    _drain_or_refuse(conn, data, sizes)


@FUZZ
@given(st.binary(max_size=4000), st.lists(st.integers(1, 300), min_size=1, max_size=10))
def test_arbitrary_bytes_before_handshake_only_raise_remote_protocol_error(data, sizes):
    _drain_or_refuse(Connection(SMALL), data, sizes)


# Frames with valid headers and checksums but arbitrary payloads, so that the
# payload decoders (not just the header checks) see the garbage.
frame_payloads = st.one_of(
    st.binary(max_size=120),
    json_value.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda k, v: json.dumps(hello_obj(**{k: v})).encode(),
              st.sampled_from(sorted(hello_obj())), json_value),
    st.builds(lambda k: json.dumps(hello_obj(**{k: ...})).encode(), st.sampled_from(sorted(hello_obj()))),
    st.builds(lambda k, v: json.dumps(intro_obj(**{k: v})).encode(),
              st.sampled_from(sorted(intro_obj())), json_value),
    st.builds(lambda k: json.dumps(intro_obj(**{k: ...})).encode(), st.sampled_from(sorted(intro_obj()))),
)
garbage_frames = st.lists(st.tuples(st.sampled_from(list(FrameType)), frame_payloads), max_size=8)


@FUZZ
@given(garbage_frames, st.lists(st.integers(1, 50), min_size=1, max_size=5),
       st.sampled_from([ConnState.HELLO, ConnState.AUTH, ConnState.INTRO, ConnState.ESTABLISHED]))
def test_checksummed_garbage_frames_only_raise_remote_protocol_error(frames, sizes, state):
    conn = at_state(state, SMALL)
    wire = b"".join(frame_bytes(t, p) for t, p in frames)
    events = _drain_or_refuse(conn, wire, sizes)
    # One frame, one event, in order, up to the first refusal; whatever fixed-
    # layout frame is accepted is canonical: it re-encodes to its own bytes.
    assert len(events) <= len(frames)
    for (ftype, payload), ev in zip(frames, events):
        if not isinstance(ev, (Hello, Auth, Intro, Error, State)):
            assert wire_of(ev) == frame_bytes(ftype, payload)


@FUZZ
@given(st.lists(data_events, min_size=1, max_size=5), st.data())
def test_one_flipped_byte_is_always_caught_and_nothing_after_it_is_delivered(events, data):
    wire, ends = _stream(events)
    pos = data.draw(st.integers(0, len(wire) - 1), label="flip position")
    mask = data.draw(st.integers(1, 255), label="xor mask")
    bad = bytearray(wire)
    bad[pos] ^= mask
    sizes = data.draw(st.lists(st.integers(1, 64), min_size=1, max_size=10), label="chunk sizes")
    conn = handshake()[1]
    delivered: list = []
    with pytest.raises(RemoteProtocolError):
        pump(conn, bytes(bad), sizes, out=delivered)
        drain_after_eof(conn, delivered)
    intact = sum(1 for end in ends if end <= pos)  # frames wholly before the flip
    assert delivered == events[:intact]
    assert conn.next_event() is CLOSED


@pytest.mark.parametrize("state", [ConnState.HELLO, ConnState.ESTABLISHED])
def test_oversized_length_is_refused_from_the_header_alone(state):
    conn = at_state(state, SMALL)
    header = struct.pack("<2sBBIQ", b"GM", FrameType.WRITE, 0, 2**31, 0)
    conn.receive_data(header[:15])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(header[15:])
    with pytest.raises(RemoteProtocolError, match=r"WRITE frame length 2147483648 exceeds the bound 1024"):
        conn.next_event()
    assert len(conn._buf) == HEADER_SIZE  # nothing of the payload was waited for


def test_length_bound_is_inclusive():
    conn = at_state(ConnState.ESTABLISHED, SMALL)
    at_bound = frame_bytes(FrameType.WRITE, struct.pack("<QQIQ", 1, 0, 0, 0) + b"x" * (SMALL - 28))
    assert raw_bytes(conn, at_bound) == Write(1, 0, b"x" * (SMALL - 28))
    over = frame_bytes(FrameType.WRITE, struct.pack("<QQIQ", 1, 0, 0, 0) + b"x" * (SMALL - 27))
    conn.receive_data(over[:HEADER_SIZE])
    with pytest.raises(RemoteProtocolError, match="exceeds the bound 1024"):
        conn.next_event()


# -------------------------------------------------- 4. frame-level violations


def _ping_frame() -> bytes:
    return frame_bytes(FrameType.PING, struct.pack("<Q", 42))


def _with(frame: bytes, pos: int, value: int) -> bytes:
    b = bytearray(frame)
    b[pos] = value
    return bytes(b)


@pytest.mark.parametrize("frame, message", [
    pytest.param(b"XM" + _ping_frame()[2:], r"bad frame magic b'XM'", id="bad-magic"),
    pytest.param(_with(_ping_frame(), 2, 99), r"unknown frame type 99", id="unknown-type"),
    pytest.param(_with(_ping_frame(), 2, 0), r"unknown frame type 0", id="type-zero"),
    pytest.param(_with(_ping_frame(), 2, 5), r"unknown frame type 5", id="type-in-gap"),
    pytest.param(_with(_ping_frame(), 3, 1), r"frame flags 0x1 not defined in protocol version 3", id="flags"),
    pytest.param(_with(_ping_frame(), 3, 0x80), r"frame flags 0x80 not defined", id="flags-high"),
    pytest.param(_with(_ping_frame(), HEADER_SIZE, 43), r"PING frame checksum mismatch", id="payload-byte"),
    pytest.param(_with(_ping_frame(), 2, FrameType.PONG), r"PONG frame checksum mismatch", id="type-byte"),
    pytest.param(_with(_ping_frame(), 8, _ping_frame()[8] ^ 1), r"PING frame checksum mismatch",
                 id="checksum-byte"),
    pytest.param(_with(_ping_frame(), 4, 7) + b"\x00" * 100, r"PING frame checksum mismatch", id="length-byte"),
])
def test_frame_violation_is_named(frame, message):
    conn = at_state(ConnState.ESTABLISHED)
    conn.receive_data(frame)
    with pytest.raises(RemoteProtocolError, match=message):
        conn.next_event()
    assert conn.state is ConnState.CLOSED and conn.next_event() is CLOSED


def test_oversized_length_is_named():
    conn = at_state(ConnState.ESTABLISHED, SMALL)
    conn.receive_data(struct.pack("<2sBBIQ", b"GM", FrameType.READ_REPLY, 0, SMALL + 1, 0))
    with pytest.raises(RemoteProtocolError, match=r"READ_REPLY frame length 1025 exceeds the bound 1024"):
        conn.next_event()


@pytest.mark.parametrize("cut", [1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 7])
def test_eof_in_the_middle_of_a_frame(cut):
    conn = at_state(ConnState.ESTABLISHED)
    conn.receive_data(_ping_frame()[:cut])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="connection closed in the middle of a frame"):
        conn.next_event()


def test_data_after_eof():
    conn = at_state(ConnState.ESTABLISHED)
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="data after end of stream"):
        conn.receive_data(_ping_frame())
    conn.receive_data(b"")  # a repeated EOF is not data
    assert conn.next_event() is CLOSED


W = struct.Struct("<QQIQ")


@pytest.mark.parametrize("ftype, payload, message", [
    (FrameType.WRITE, W.pack(1, 2, 3, 4)[:27], r"write frame of 27 bytes is shorter than its 28-byte header"),
    (FrameType.WRITE, b"", r"write frame of 0 bytes is shorter than its 28-byte header"),
    (FrameType.WRITE_ACK, b"\0" * 11, r"write ack frame is 11 bytes, expected 12"),
    (FrameType.WRITE_ACK, b"\0" * 13, r"write ack frame is 13 bytes, expected 12"),
    (FrameType.FLUSH, b"\0" * 9, r"flush frame is 9 bytes, expected 16"),
    (FrameType.FLUSH, b"\0" * 8, r"flush frame is 8 bytes, expected 16"),
    (FrameType.FLUSH_ACK, b"\0" * 8, r"flush ack frame is 8 bytes, expected 12"),
    (FrameType.READ, b"\0" * 21, r"read frame is 21 bytes, expected 20"),
    (FrameType.READ_REPLY, b"\0" * 11, r"read reply frame of 11 bytes is shorter than its 12-byte header"),
    (FrameType.HASH, b"\0" * 23, r"hash frame is 23 bytes, expected 24"),
    (FrameType.HASH, struct.pack("<QQII", 1, 0, 4096, 0), r"hash request with block size 0"),
    (FrameType.HASH_REPLY, b"\0" * 5, r"hash reply frame of 5 bytes is shorter than its 12-byte header"),
    (FrameType.HASH_REPLY, b"\0" * 12 + b"\1" * 7, r"hash reply length is not a whole number of hashes"),
    (FrameType.HASH_REPLY, b"\0" * 12 + b"\1" * 17, r"hash reply length is not a whole number of hashes"),
    (FrameType.BITMAP, b"\0" * 12, r"bitmap frame of 12 bytes is shorter than its 13-byte header"),
    (FrameType.BITMAP, struct.pack("<QIB", 0, 9, 0) + b"\1", r"bitmap frame carries 1 bytes for 9 bits"),
    (FrameType.BITMAP, struct.pack("<QIB", 0, 8, 1) + b"\1\1", r"bitmap frame carries 2 bytes for 8 bits"),
    (FrameType.BITMAP, struct.pack("<QIB", 0, 0, 1) + b"\1", r"bitmap frame carries 1 bytes for 0 bits"),
    (FrameType.BITMAP, struct.pack("<QIB", 0, 8, 2) + b"\1", r"bitmap frame 'last' flag is 2, not 0 or 1"),
    (FrameType.PING, b"\0" * 7, r"ping frame is 7 bytes, expected 8"),
    (FrameType.PONG, b"", r"pong frame is 0 bytes, expected 8"),
    (FrameType.STATE, b"[1, 2]", r"state frame is not a JSON object"),
    (FrameType.STATE, b"\"role\"", r"state frame is not a JSON object"),
    (FrameType.STATE, b"{role: 1}", r"state frame is not valid JSON"),
    (FrameType.STATE, b"\xff{}", r"state frame is not valid JSON"),
    (FrameType.STATE, b"", r"state frame is not valid JSON"),
    (FrameType.ERROR, b"oops", r"error frame is not valid JSON"),
    (FrameType.ERROR, b"[]", r"error frame is not a JSON object"),
], ids=lambda v: v.name if isinstance(v, FrameType) else "")
def test_malformed_payload_is_named(ftype, payload, message):
    conn = at_state(ConnState.ESTABLISHED)
    with pytest.raises(RemoteProtocolError, match=message):
        raw(conn, ftype, payload)


@pytest.mark.parametrize("size", [0, 15, 65, 200])
def test_auth_of_wrong_size_is_refused(size):
    conn = at_state(ConnState.AUTH)
    with pytest.raises(RemoteProtocolError, match=rf"auth frame of {size} bytes"):
        raw(conn, FrameType.AUTH, b"m" * size)


HELLO_INTS = ["protocol_min", "protocol_max"]
HELLO_STRS = ["node", "nonce"]
INTRO_INTS = ["size", "region_size", "extent_size", "path"]
INTRO_STRS = ["node", "volume", "session"]


@pytest.mark.parametrize("payload, message", [
    pytest.param(b"hello", r"hello frame is not valid JSON", id="not-json"),
    pytest.param(b"\xc3\x28{}", r"hello frame is not valid JSON", id="not-utf8"),
    pytest.param(b"", r"hello frame is not valid JSON", id="empty"),
    pytest.param(b'["node"]', r"hello frame is not a JSON object", id="list"),
    pytest.param(b"null", r"hello frame is not a JSON object", id="null"),
    *[pytest.param(json.dumps(hello_obj(**{k: ...})).encode(),
                   rf"hello field '{k}' is missing or has the wrong type", id=f"missing-{k}")
      for k in HELLO_INTS + HELLO_STRS],
    *[pytest.param(json.dumps(hello_obj(**{k: bad})).encode(),
                   rf"hello field '{k}' is missing or has the wrong type", id=f"{k}-{type(bad).__name__}")
      for k in HELLO_INTS for bad in ("4096", 4096.0, True, None, [1])],
    *[pytest.param(json.dumps(hello_obj(**{k: bad})).encode(),
                   rf"hello field '{k}' is missing or has the wrong type", id=f"{k}-{type(bad).__name__}")
      for k in HELLO_STRS for bad in (5, None, ["x"], {"x": 1}, False)],
    *[pytest.param(json.dumps(hello_obj(**{k: -1})).encode(), r"hello has a negative number", id=f"negative-{k}")
      for k in HELLO_INTS],
    pytest.param(json.dumps(hello_obj(nonce="zz" * 32)).encode(), r"hello field 'nonce' is not hex", id="nonce-zz"),
    pytest.param(json.dumps(hello_obj(nonce="abc")).encode(), r"hello field 'nonce' is not hex", id="nonce-odd"),
    pytest.param(json.dumps(hello_obj(node="")).encode(), r"hello field 'node' must be 1..255", id="node-empty"),
    pytest.param(json.dumps(hello_obj(node="n" * 256)).encode(), r"hello field 'node' must be 1..255",
                 id="node-long"),
])
def test_malformed_hello_is_named(payload, message):
    conn = Connection()
    with pytest.raises(RemoteProtocolError, match=message):
        raw(conn, FrameType.HELLO, payload)
    assert FrameType.HELLO not in conn.received


@pytest.mark.parametrize("payload, message", [
    pytest.param(b"intro", r"intro frame is not valid JSON", id="not-json"),
    pytest.param(b"[]", r"intro frame is not a JSON object", id="list"),
    *[pytest.param(json.dumps(intro_obj(**{k: ...})).encode(),
                   rf"intro field '{k}' is missing or has the wrong type", id=f"missing-{k}")
      for k in INTRO_INTS + INTRO_STRS],
    *[pytest.param(json.dumps(intro_obj(**{k: bad})).encode(),
                   rf"intro field '{k}' is missing or has the wrong type", id=f"{k}-{type(bad).__name__}")
      for k in INTRO_INTS for bad in ("4096", 4096.0, True, None, [1])],
    *[pytest.param(json.dumps(intro_obj(**{k: -1})).encode(), r"intro has a negative number", id=f"negative-{k}")
      for k in INTRO_INTS],
    pytest.param(json.dumps(intro_obj(info=[1])).encode(), r"intro field 'info' is not an object", id="info-list"),
    pytest.param(json.dumps(intro_obj(info="x")).encode(), r"intro field 'info' is not an object", id="info-str"),
])
def test_malformed_intro_is_named(payload, message):
    conn = at_state(ConnState.INTRO)
    with pytest.raises(RemoteProtocolError, match=message):
        raw(conn, FrameType.INTRO, payload)
    assert FrameType.INTRO not in conn.received


def test_intro_without_info_means_empty_info():
    conn = at_state(ConnState.INTRO)
    got = raw(conn, FrameType.INTRO, json.dumps(intro_obj(info=...)).encode())
    assert isinstance(got, Intro) and got.info == {}


@pytest.mark.parametrize("where", ["hello", "auth", "auth-sent", "auth-received"])
def test_intro_is_refused_before_authentication_both_ways(where):
    conn = PRE_AUTH[where]()
    state = conn.state
    with pytest.raises(LocalProtocolError, match=rf"INTRO frame sent in state {state.value}"):
        conn.send(make_intro())
    with pytest.raises(RemoteProtocolError, match=rf"INTRO frame received in state {state.value}"):
        raw(conn, FrameType.INTRO, json.dumps(intro_obj()).encode())


@pytest.mark.parametrize("state", [ConnState.HELLO, ConnState.AUTH])
def test_a_frame_before_authentication_is_bounded_to_a_few_kib(state):
    """A stranger cannot make us buffer a data-sized frame: the length in the
    header is refused before any of the payload is kept."""
    conn = at_state(state)
    assert conn.frame_bound == PREAUTH_MAX_PAYLOAD < conn.max_payload
    header = struct.pack("<2sBBIQ", b"GM", int(FrameType.HELLO), 0, 8 * 1024 * 1024, 0)
    conn.receive_data(header)
    with pytest.raises(RemoteProtocolError, match=rf"exceeds the bound {PREAUTH_MAX_PAYLOAD} before authentication"):
        conn.next_event()
    assert conn.state is ConnState.CLOSED
    # Nor is a large write header taken as a zero-copy frame before authentication.
    conn = at_state(state)
    conn.receive_data(struct.pack("<2sBBIQ", b"GM", int(FrameType.WRITE), 0, 8 * 1024 * 1024, 0))
    assert conn.frame_remainder() is None


def test_after_authentication_the_full_bound_applies_again():
    conn = at_state(ConnState.INTRO)
    assert conn.frame_bound == DEFAULT_MAX_PAYLOAD
    big = make_intro("labor1", info={"pad": "z" * 100_000})
    assert raw_bytes(conn, at_state(ConnState.INTRO).send(big)) == big


# ---------------------------------------------------------- 5. state table


DATA_EXAMPLES = [Write(1, 0, b"x"), WriteAck(1), Flush(1), FlushAck(1), Read(1, 0, 1), ReadReply(1, 0),
                 HashRequest(1, 0, 1, 1), HashReply(1, 0), Bitmap(0, 1, b"\1"), State({}), Ping(1), Pong(1)]
assert {type(e) for e in DATA_EXAMPLES} == {type(p.values[0]) for p in EXAMPLES}


def _half_authenticated() -> Connection:
    """AUTH sent but the peer's AUTH not yet received."""
    conn = at_state(ConnState.AUTH)
    conn.send(Auth(b"m" * 32))
    return conn


def _peer_authenticated() -> Connection:
    """The peer's AUTH received but ours not yet sent."""
    conn = at_state(ConnState.AUTH)
    assert isinstance(raw(conn, FrameType.AUTH, b"m" * 32), Auth)
    return conn


PRE_AUTH = {
    "hello": lambda: at_state(ConnState.HELLO),
    "hello-sent": lambda: _sent(at_state(ConnState.HELLO), make_hello()),
    "auth": lambda: at_state(ConnState.AUTH),
    "auth-sent": _half_authenticated,
    "auth-received": _peer_authenticated,
    # Authenticated, but no intro yet: the volume is not settled, so no data.
    "intro": lambda: at_state(ConnState.INTRO),
    "intro-sent": lambda: _sent(at_state(ConnState.INTRO), make_intro()),
}


def _sent(conn, event):
    conn.send(event)
    return conn


@pytest.mark.parametrize("where", PRE_AUTH)
@pytest.mark.parametrize("event", DATA_EXAMPLES, ids=lambda e: type(e).__name__)
def test_data_frames_are_not_sent_before_the_handshake(where, event):
    conn = PRE_AUTH[where]()
    state, sent = conn.state, set(conn.sent)
    with pytest.raises(LocalProtocolError, match=rf"frame sent in state {state.value}"):
        conn.send(event)
    assert conn.state is state and conn.sent == sent  # a refusal changes nothing


@pytest.mark.parametrize("where", PRE_AUTH)
@pytest.mark.parametrize("event", DATA_EXAMPLES, ids=lambda e: type(e).__name__)
def test_data_frames_are_not_accepted_before_the_handshake(where, event):
    conn = PRE_AUTH[where]()
    state = conn.state
    frame = wire_of(event)
    with pytest.raises(RemoteProtocolError, match=rf"frame received in state {state.value}"):
        raw_bytes(conn, frame)
    assert conn.state is ConnState.CLOSED
    assert conn.closed_reason == f"protocol error: {FrameType(frame[2]).name} frame received in state {state.value}"


def test_second_hello_is_refused_both_ways():
    conn = Connection()
    conn.send(make_hello())
    with pytest.raises(LocalProtocolError, match="second HELLO frame sent"):
        conn.send(make_hello())
    peer_hello = Connection().send(make_hello("b"))
    other = Connection()
    other.receive_data(peer_hello)
    assert isinstance(other.next_event(), Hello)
    with pytest.raises(RemoteProtocolError, match="second HELLO frame received"):
        raw_bytes(other, peer_hello)
    # Once both hellos are through, a hello is out of place altogether.
    for conn in (at_state(ConnState.AUTH), at_state(ConnState.ESTABLISHED)):
        with pytest.raises(LocalProtocolError, match=rf"HELLO frame sent in state {conn.state.value}"):
            conn.send(make_hello())
        with pytest.raises(RemoteProtocolError, match=rf"HELLO frame received in state {conn.state.value}"):
            raw_bytes(conn, peer_hello)


def test_second_auth_is_refused_both_ways():
    conn = _half_authenticated()
    with pytest.raises(LocalProtocolError, match="second AUTH frame sent"):
        conn.send(Auth(b"n" * 32))
    conn = _peer_authenticated()
    with pytest.raises(RemoteProtocolError, match="second AUTH frame received"):
        raw(conn, FrameType.AUTH, b"n" * 32)
    conn = at_state(ConnState.ESTABLISHED)
    with pytest.raises(LocalProtocolError, match="AUTH frame sent in state established"):
        conn.send(Auth(b"n" * 32))
    with pytest.raises(RemoteProtocolError, match="AUTH frame received in state established"):
        raw(conn, FrameType.AUTH, b"n" * 32)


@pytest.mark.parametrize("where", ["hello", "hello-sent"])
def test_auth_before_hello_is_refused_both_ways(where):
    conn = PRE_AUTH[where]()
    with pytest.raises(LocalProtocolError, match="AUTH frame sent in state hello"):
        conn.send(Auth(b"m" * 32))
    assert conn.state is ConnState.HELLO and FrameType.AUTH not in conn.sent
    with pytest.raises(RemoteProtocolError, match="AUTH frame received in state hello"):
        raw(conn, FrameType.AUTH, b"m" * 32)
    assert conn.state is ConnState.CLOSED and FrameType.AUTH not in conn.received


@pytest.mark.parametrize("where", ["hello", "auth", "established"])
def test_after_error_sent_the_connection_is_closed(where):
    conn = at_state(ConnState(where))
    frame = conn.send(Error("shutting down"))
    assert frame[2] == FrameType.ERROR
    assert conn.state is ConnState.CLOSED
    assert conn.closed_reason == "we closed: shutting down"
    conn.receive_data(_ping_frame())  # whatever the peer still sends is not decoded
    assert conn.next_event() is CLOSED
    assert conn.next_event() is CLOSED
    for event in (Ping(1), Error("again"), make_hello()):
        with pytest.raises(LocalProtocolError, match="in state closed"):
            conn.send(event)


@pytest.mark.parametrize("where", ["hello", "auth", "established"])
def test_after_error_received_the_connection_is_closed(where):
    conn = at_state(ConnState(where))
    conn.receive_data(frame_bytes(FrameType.ERROR, b'{"reason":"quorum lost"}') + _ping_frame())
    assert conn.next_event() == Error("quorum lost")
    assert conn.state is ConnState.CLOSED
    assert conn.closed_reason == "peer closed: quorum lost"
    assert conn.next_event() is CLOSED  # the ping buffered behind it is never delivered
    assert conn.next_event() is CLOSED
    with pytest.raises(LocalProtocolError, match="in state closed"):
        conn.send(Error("me too"))


def test_error_without_reason():
    conn = at_state(ConnState.HELLO)
    assert raw(conn, FrameType.ERROR, b"{}") == Error("no reason given")
    assert conn.state is ConnState.CLOSED


@pytest.mark.parametrize("where", ["hello", "auth", "established"])
def test_clean_eof_between_frames_closes(where):
    conn = at_state(ConnState(where), SMALL)
    if conn.state is ConnState.ESTABLISHED:
        conn.receive_data(_ping_frame())
    assert conn.next_event() in (Ping(42), NEED_DATA)
    assert conn.next_event() is NEED_DATA
    assert conn.state is not ConnState.CLOSED
    conn.receive_data(b"")
    assert conn.next_event() is CLOSED
    assert conn.state is ConnState.CLOSED
    assert conn.closed_reason == "peer closed the connection"
    assert conn.next_event() is CLOSED


def test_frames_before_eof_are_still_delivered():
    conn = at_state(ConnState.ESTABLISHED)
    conn.receive_data(_ping_frame() + frame_bytes(FrameType.PONG, struct.pack("<Q", 7)))
    conn.receive_data(b"")
    assert [conn.next_event(), conn.next_event(), conn.next_event()] == [Ping(42), Pong(7), CLOSED]


def test_error_classes():
    assert issubclass(LocalProtocolError, ProtocolError) and issubclass(RemoteProtocolError, ProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)


def test_send_refuses_what_is_not_an_event():
    with pytest.raises(LocalProtocolError, match="not a protocol event"):
        at_state(ConnState.ESTABLISHED).send("ping")  # type: ignore[arg-type]


# ---------------------------------------------------------- 6. send bound


def test_send_refuses_a_payload_above_max_payload():
    client, server = handshake(max_payload=SMALL)
    at_bound = Write(1, 0, b"x" * (SMALL - 28))
    assert transfer(client, server, at_bound) == at_bound
    with pytest.raises(LocalProtocolError, match=r"WRITE payload of 1025 bytes exceeds 1024"):
        client.send(Write(2, 0, b"x" * (SMALL - 27)))
    with pytest.raises(LocalProtocolError, match=r"HASH_REPLY payload of 1036 bytes exceeds 1024"):
        client.send(HashReply(3, 0, (1,) * 128))
    with pytest.raises(LocalProtocolError, match=r"STATE payload of \d+ bytes exceeds 1024"):
        client.send(State({"blob": "y" * SMALL}))
    # The refusals left the connection as it was.
    assert client.state is ConnState.ESTABLISHED
    assert transfer(client, server, Ping(5)) == Ping(5)


def test_send_bound_applies_to_the_intro_too():
    conn = at_state(ConnState.INTRO, SMALL)
    with pytest.raises(LocalProtocolError, match=r"INTRO payload of \d+ bytes exceeds 1024"):
        conn.send(make_intro(info={"pad": "z" * SMALL}))
    assert FrameType.INTRO not in conn.sent and conn.state is ConnState.INTRO


def test_default_bound_carries_an_8_mib_write():
    client, server = handshake()
    big = Write(1, 0, MIB * 8)
    assert transfer(client, server, big) == big


# ------------------------------------- regressions: bugs found in review


@pytest.mark.parametrize("ftype, state, opener", [
    (FrameType.HELLO, ConnState.HELLO, b"["),  # pre-auth: what fits the few-KiB bound
    (FrameType.ERROR, ConnState.HELLO, b"["),
    (FrameType.INTRO, ConnState.INTRO, b"["),
    (FrameType.INTRO, ConnState.INTRO, b'{"a":'),
    (FrameType.STATE, ConnState.ESTABLISHED, b"["),
    (FrameType.STATE, ConnState.ESTABLISHED, b'{"a":'),
], ids=["hello-pre-auth", "error-pre-auth", "intro-arrays", "intro-objects", "state-arrays", "state-objects"])
def test_deeply_nested_json_is_a_remote_protocol_error(ftype, state, opener):
    # json.loads raises RecursionError here, which once escaped the codec.
    conn = at_state(state)
    count = PREAUTH_MAX_PAYLOAD if state in (ConnState.HELLO, ConnState.AUTH) else 100_000
    with pytest.raises(RemoteProtocolError, match=rf"{ftype.name.lower()} frame nests JSON too deeply"):
        raw(conn, ftype, opener * count)
    assert conn.state is ConnState.CLOSED


BAD_FRAMES = [
    pytest.param(frame_bytes(FrameType.HASH, struct.pack("<QQII", 1, 0, 4096, 0)),
                 "hash request with block size 0", id="payload-decoder"),
    pytest.param(frame_bytes(FrameType.AUTH, b"m" * 32), "AUTH frame received in state established",
                 id="state-check"),
    pytest.param(b"XX" + bytes(14), "bad frame magic", id="header"),
    pytest.param(_with(_ping_frame(), HEADER_SIZE, 0), "PING frame checksum mismatch", id="checksum"),
]


@pytest.mark.parametrize("bad, message", BAD_FRAMES)
def test_nothing_is_delivered_after_a_protocol_error(bad, message):
    # The bad frame used to be consumed with the state left ESTABLISHED, so the
    # next next_event() decoded and delivered the frame behind it.
    conn = at_state(ConnState.ESTABLISHED)
    conn.receive_data(bad + _ping_frame())
    with pytest.raises(RemoteProtocolError, match=message):
        conn.next_event()
    assert conn.state is ConnState.CLOSED
    assert conn.closed_reason.startswith("protocol error: ") and message in conn.closed_reason
    assert conn.next_event() is CLOSED
    held = len(conn._buf)
    conn.receive_data(_ping_frame() * 100)  # dropped unbuffered once closed
    assert len(conn._buf) == held
    assert conn.next_event() is CLOSED


def test_bytes_after_close_are_dropped_not_buffered():
    conn = at_state(ConnState.ESTABLISHED)
    raw(conn, FrameType.ERROR, b'{"reason":"bye"}')
    conn.receive_data(b"x" * 100_000)
    conn.receive_data(b"")
    assert len(conn._buf) == 0 and conn.next_event() is CLOSED


@pytest.mark.parametrize("where, event, message", [
    ("established", Bitmap(0, 8, b""), "Bitmap: 0 bytes for 8 bits"),
    ("established", Bitmap(0, 1, b"\0\0"), "Bitmap: 2 bytes for 1 bits"),
    ("established", HashRequest(1, 0, 4096, 0), "HashRequest: block size must be positive"),
    ("auth", Auth(b""), r"Auth: MAC of 0 bytes \(16..64 allowed\)"),
    ("auth", Auth(b"m" * 65), r"Auth: MAC of 65 bytes"),
    ("intro", make_intro(size=-1), "Intro: size is negative"),
    ("hello", make_hello(protocol_max=-2), "Hello: protocol_max is negative"),
    ("established", Write(-1, 0, b""), r"Write: seq -1 outside 0..2\*\*64-1"),
    ("established", Write(1, 2**64, b""), r"Write: offset 18446744073709551616 outside"),
    ("established", Write(1, 0, b"", flags=2**32), "Write: flags 4294967296 outside the defined bits"),
    ("established", Ping(2**64), "Ping: token"),
    ("established", WriteAck(1, 2**31), "cannot encode WriteAck"),
    ("established", HashReply(1, 0, (2**64,)), "cannot encode HashReply"),
    ("established", Read(1, 0, -1), "cannot encode Read"),
], ids=["bitmap-short", "bitmap-long", "hash-block-0", "auth-empty", "auth-65", "hello-negative",
        "hello-negative-protocol", "write-seq-negative", "write-offset-overflow", "write-flags-overflow",
        "ping-overflow", "ack-status-overflow", "hash-overflow", "read-negative-length"])
def test_send_refuses_what_the_peer_would_refuse(where, event, message):
    # These used to be encoded (the peer then blamed us with a RemoteProtocolError)
    # or to raise struct.error.
    conn = at_state(ConnState(where))
    state, sent = conn.state, set(conn.sent)
    with pytest.raises(LocalProtocolError, match=message):
        conn.send(event)
    assert conn.state is state and conn.sent == sent


wide = st.integers(-(2**66), 2**66) | u64
wild_events = st.one_of(
    st.builds(Write, wide, wide, small_bytes, wide, wide),
    st.builds(WriteAck, wide, wide),
    st.builds(FlushAck, wide, wide),
    st.builds(Read, wide, wide, wide),
    st.builds(ReadReply, wide, wide, small_bytes),
    st.builds(HashRequest, wide, wide, wide, wide),
    st.builds(HashReply, wide, wide, st.lists(wide, max_size=4).map(tuple)),
    st.builds(Bitmap, wide, st.integers(-8, 100) | wide, st.binary(max_size=16), st.booleans()),
    st.builds(Ping, wide),
    st.builds(Auth, st.binary(max_size=80)),
    st.builds(make_hello, protocol_min=wide, protocol_max=wide),
    st.builds(make_intro, size=wide, region_size=wide, path=wide),
)


@FUZZ
@given(wild_events)
def test_whatever_send_accepts_the_peer_decodes_to_the_same_event(event):
    state = {Hello: ConnState.HELLO, Auth: ConnState.AUTH, Intro: ConnState.INTRO}.get(
        type(event), ConnState.ESTABLISHED)
    try:
        frame = at_state(state).send(event)
    except LocalProtocolError:
        return
    assert raw_bytes(at_state(state), frame) == event


def test_bitmap_bad_last_flag_is_named():
    # Once refused with "bitmap frame carries 1 bytes for 8 bits", true of a valid frame.
    conn = at_state(ConnState.ESTABLISHED)
    with pytest.raises(RemoteProtocolError, match=r"bitmap frame 'last' flag is 2, not 0 or 1"):
        raw(conn, FrameType.BITMAP, struct.pack("<QIB", 0, 8, 2) + b"\1")


@pytest.mark.parametrize("where, event, message", [
    ("intro", make_intro(path=True), "Intro: path is not an integer"),
    ("intro", make_intro(size=4096.0), "Intro: size is not an integer"),
    ("intro", make_intro(size="4096"), "Intro: size is not an integer"),
    ("hello", make_hello(node=5), "Hello: node is not a string"),
    ("intro", make_intro(session=None), "Intro: session is not a string"),
    ("hello", make_hello(nonce="ab" * 32), "Hello: nonce is not bytes"),
    ("intro", make_intro(info=[("role", "primary")]), "Intro: info is not a dict"),
    ("intro", make_intro(info={"blob": b"raw"}), "cannot encode Intro"),
    ("established", State([1, 2]), "State: fields is not a dict"),
    ("established", Error(5), "Error: reason is not a string"),
], ids=["intro-bool-path", "intro-float-size", "intro-str-size", "hello-int-node", "intro-none-session",
        "hello-str-nonce", "intro-list-info", "intro-bytes-in-info", "state-list", "error-int-reason"])
def test_send_refuses_json_the_peer_would_refuse(where, event, message):
    # These used to be encoded (and refused by the peer), or to raise TypeError /
    # AttributeError out of send().
    with pytest.raises(LocalProtocolError, match=message):
        at_state(ConnState(where)).send(event)


any_json_ish = json_value | st.binary(max_size=4) | st.tuples(st.integers())
wild_json_events = st.one_of(
    st.builds(make_hello, node=st.text(max_size=5) | any_json_ish, nonce=st.binary(max_size=8) | any_json_ish),
    st.builds(make_intro, node=st.text(max_size=5) | any_json_ish, size=naturals | any_json_ish,
              info=json_object | any_json_ish),
    st.builds(State, json_object | any_json_ish),
    st.builds(Error, st.text(max_size=1000) | any_json_ish),
)


@FUZZ
@given(wild_json_events)
def test_whatever_json_send_accepts_the_peer_decodes_to_the_same_event(event):
    state = {Hello: ConnState.HELLO, Intro: ConnState.INTRO}.get(type(event), ConnState.ESTABLISHED)
    try:
        frame = at_state(state).send(event)
    except LocalProtocolError:
        return
    assert raw_bytes(at_state(state), frame) == event
