"""The codec's state table and length bound, fuzzed: well-formed frames of any
type in any order, and headers claiming any length.

(test_codec.py fuzzes bytes, checksummed garbage and flipped bytes after the
handshake; test_fuzz_handshake.py damages the handshake itself. Here the frames
are valid, only their order or their claimed length is wrong.)"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from transport.codec import (
    ALLOWED,
    CLOSED,
    HEADER_SIZE,
    NEED_DATA,
    PREAUTH_MAX_PAYLOAD,
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
    Ping,
    Pong,
    Read,
    ReadReply,
    RemoteProtocolError,
    State,
    Write,
    WriteAck,
    _encode,
    frame_bytes,
)

FUZZ = settings(max_examples=200, deadline=None)
SMALL = 64 * 1024

EVENTS = [
    Hello("labor1", b"\x01" * 32), Auth(b"m" * 32), Intro("labor1", "appslv", 1 << 30, 65536, 4 << 20),
    Write(1, 0, b"x" * 10), WriteAck(1), Flush(1), FlushAck(1), Read(1, 0, 4096), ReadReply(1, 0, b"y"),
    HashRequest(1, 0, 65536, 65536), HashReply(1, 0, (5,)), Bitmap(0, 8, b"\x01"), State({"role": "primary"}),
    Ping(1), Pong(1), Error("bye"),
]
_HANDSHAKE = {FrameType.HELLO: "hello", FrameType.AUTH: "auth", FrameType.INTRO: "intro"}


def _at(state: ConnState) -> Connection:
    """A receiving connection in ``state`` whose own side of the handshake is sent."""
    conn = Connection(SMALL)
    if state is ConnState.HELLO:
        return conn
    conn.send(Hello("labor2", b"\x02" * 32))
    conn.receive_data(frame_bytes(*_encode(Hello("labor1", b"\x01" * 32))))
    assert isinstance(conn.next_event(), Hello)
    if state is ConnState.AUTH:
        return conn
    conn.send(Auth(b"n" * 32))
    conn.receive_data(frame_bytes(*_encode(Auth(b"m" * 32))))
    assert isinstance(conn.next_event(), Auth)
    if state is ConnState.INTRO:
        return conn
    conn.send(Intro("labor2", "appslv", 1 << 30, 65536, 4 << 20))
    conn.receive_data(frame_bytes(*_encode(Intro("labor1", "appslv", 1 << 30, 65536, 4 << 20))))
    assert isinstance(conn.next_event(), Intro)
    assert conn.state is ConnState.ESTABLISHED
    return conn


def _model(state: ConnState, ftypes: list[FrameType]) -> int:
    """How many of the frames the state table lets through, in order. The
    receiving side has sent its own handshake frames of the states before
    ``state`` (see :func:`_at`), not that of ``state`` itself, so receiving
    the peer's frame of a state does not leave it."""
    sent = {ConnState.HELLO: set(), ConnState.AUTH: {FrameType.HELLO},
            ConnState.INTRO: {FrameType.HELLO, FrameType.AUTH}}.get(state, set(_HANDSHAKE))
    received = set(sent)  # and the peer's, up to the same state
    for n, ftype in enumerate(ftypes):
        if ftype not in ALLOWED[state]:
            return n
        if ftype in _HANDSHAKE and ftype in received:
            return n
        received.add(ftype)
        if ftype is FrameType.ERROR:
            return n + 1  # delivered, then closed
        if ftype in _HANDSHAKE and ftype in sent:
            state = {FrameType.HELLO: ConnState.AUTH, FrameType.AUTH: ConnState.INTRO,
                     FrameType.INTRO: ConnState.ESTABLISHED}[ftype]
    return len(ftypes)


@FUZZ
@given(st.sampled_from([ConnState.HELLO, ConnState.AUTH, ConnState.INTRO, ConnState.ESTABLISHED]),
       st.lists(st.sampled_from(EVENTS), min_size=1, max_size=8))
def test_well_formed_frames_out_of_order_are_refused_where_the_state_table_says(state, events):
    conn = _at(state)
    frames = [_encode(ev) for ev in events]
    expect = _model(state, [ftype for ftype, _ in frames])
    delivered = []
    refused = None
    try:
        for ftype, payload in frames:
            conn.receive_data(frame_bytes(ftype, payload))
            ev = conn.next_event()
            if ev is CLOSED:
                break
            assert ev is not NEED_DATA
            delivered.append(ev)
    except RemoteProtocolError as e:
        refused = str(e)
    assert len(delivered) == expect
    if expect < len(frames) and not (delivered and isinstance(delivered[-1], Error)):
        bad = frames[expect][0]
        assert refused is not None and bad.name in refused, refused
    assert conn.next_event() is CLOSED or expect == len(frames)


@FUZZ
@given(st.sampled_from([ConnState.HELLO, ConnState.AUTH, ConnState.INTRO, ConnState.ESTABLISHED]),
       st.sampled_from(list(FrameType)), st.integers(1, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_any_claimed_length_beyond_the_bound_is_refused_from_the_header_alone(state, ftype, length, checksum):
    conn = _at(state)
    bound = conn.frame_bound
    assert bound == (SMALL if state in (ConnState.INTRO, ConnState.ESTABLISHED) else PREAUTH_MAX_PAYLOAD)
    conn.receive_data(struct.pack("<2sBBIQ", b"GM", ftype, 0, length, checksum))
    if length <= bound:
        assert conn.next_event() is NEED_DATA  # waits for a payload it may hold
        return
    try:
        conn.next_event()
    except RemoteProtocolError as e:
        assert f"{ftype.name} frame length {length} exceeds the bound {bound}" in str(e)
    else:
        raise AssertionError("an oversize length was waited on")
    assert len(conn._buf) == HEADER_SIZE and conn.next_event() is CLOSED
