"""Coverage-guided fuzzing of the peer wire codec and the typed messages (atheris).

Not collected by pytest (the file name does not start with ``test_``), and
atheris is not a dependency of gmd: install it by hand, then run::

    pip install atheris
    python tests/fuzz/atheris_codec.py -atheris_runs=100000
    python tests/fuzz/atheris_codec.py -max_total_time=300 CORPUS_DIR   # keep what it learns

Each input drives one receiving :class:`~transport.codec.Connection` in one of
its four states. Half the inputs are fed as raw wire bytes (in chunks the input
chooses); the other half are cut into frames with valid headers and checksums,
so that the payload decoders see the fuzzer's bytes, not only the checksum
test. Every decoded hello is judged by ``link.hello_problem``, every intro's
info by ``messages.intro_problem``, every STATE by each typed message. The
only exception allowed out is :class:`~transport.codec.RemoteProtocolError`,
and after one the connection must be closed; anything else is a crash atheris
reports with the input that caused it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    from transport import messages
    from transport.codec import (
        CLOSED,
        NEED_DATA,
        Auth,
        Connection,
        ConnState,
        FrameType,
        Hello,
        Intro,
        RemoteProtocolError,
        State,
        frame_bytes,
    )
    from transport.link import hello_problem

FRAME_TYPES = [int(t) for t in FrameType] + [0, 5, 28, 255]
STATES = [ConnState.HELLO, ConnState.AUTH, ConnState.INTRO, ConnState.ESTABLISHED]


def _connection(state: ConnState) -> Connection:
    """A receiving connection driven to ``state`` by a real (unchecked-MAC) exchange."""
    conn, peer = Connection(64 * 1024), Connection(64 * 1024)
    if state is ConnState.HELLO:
        return conn
    conn.send(Hello("labor2", b"\x02" * 32))
    conn.receive_data(peer.send(Hello("labor1", b"\x01" * 32)))
    conn.next_event()
    if state is ConnState.AUTH:
        return conn
    conn.send(Auth(b"m" * 32))
    conn.receive_data(frame_bytes(FrameType.AUTH, b"n" * 32))
    conn.next_event()
    if state is ConnState.INTRO:
        return conn
    conn.send(Intro("labor2", "appslv", 1 << 30, 65536, 4 << 20))
    conn.receive_data(frame_bytes(FrameType.INTRO, b'{"node":"labor1","volume":"appslv","size":1073741824,'
                                                   b'"region_size":65536,"extent_size":4194304,"path":0,'
                                                   b'"session":"s","info":{}}'))
    conn.next_event()
    assert conn.state is ConnState.ESTABLISHED
    return conn


def _judge(ev) -> None:
    """What the link and the engine do first with each kind of event."""
    if isinstance(ev, Hello):
        hello_problem(ev)
    elif isinstance(ev, Intro):
        messages.intro_problem(ev.info, "intro")
    elif isinstance(ev, State):
        for kind in (messages.PeerState, messages.WitnessRequest, messages.WitnessReply):
            try:
                messages.decode(kind, ev.fields, "state")
            except RemoteProtocolError:
                pass


def _drain(conn: Connection) -> None:
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA or ev is CLOSED:
            return
        _judge(ev)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    conn = _connection(STATES[fdp.ConsumeIntInRange(0, 3)])
    framed = fdp.ConsumeBool()
    chunk = fdp.ConsumeIntInRange(1, 512)
    eof = fdp.ConsumeBool()
    if framed:
        wire = b""
        for _ in range(fdp.ConsumeIntInRange(1, 6)):
            ftype = FRAME_TYPES[fdp.ConsumeIntInRange(0, len(FRAME_TYPES) - 1)]
            payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2048))
            try:
                wire += frame_bytes(FrameType(ftype), payload)
            except ValueError:  # not a frame type: its header by hand, checksum and all
                wire += frame_bytes(FrameType.PING, payload)[:2] + bytes([ftype]) + frame_bytes(
                    FrameType.PING, payload)[3:]
    else:
        wire = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        for i in range(0, len(wire), chunk):
            conn.receive_data(wire[i:i + chunk])
            _drain(conn)
        if eof:
            conn.receive_data(b"")
            _drain(conn)
    except RemoteProtocolError:
        if conn.state is not ConnState.CLOSED or conn.next_event() is not CLOSED:
            raise AssertionError("a protocol error left the connection open") from None


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
