"""Compressed writes on the wire (transport.codec's WRITE flags and
transport.compression): what the receiver accepts, what it refuses and why,
and the sender's policy of what is worth compressing."""

from __future__ import annotations

import os
import re
import struct

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from transport import compression
from transport.codec import (
    _WRITE,
    WRITE_COPY,
    WRITE_ZSTD,
    ConnState,
    FrameType,
    LocalProtocolError,
    RemoteProtocolError,
    Write,
    frame_bytes,
)
from transport.compression import BACKOFF_AFTER, BACKOFF_FIRST, BACKOFF_MAX, MIN_TRY, Compressor, worth_sending

from .test_codec import QUICK, SMALL, at_state, handshake, raw, transfer

TEXT = b"counter 000123 value=42 status=ok\n" * 400  # 13.6 KB that compresses well


def zstd_write(seq: int, data: bytes, flags: int = 0, level: int = 3) -> Write:
    return Write(seq, 4096 * seq, compression.compress(data, level), flags | WRITE_ZSTD, gseq=seq + 100)


def raw_write(flags: int, data: bytes, seq: int = 1) -> bytes:
    return frame_bytes(FrameType.WRITE, _WRITE.pack(seq, 0, flags, 0) + data)


@pytest.mark.parametrize("flags", [0, WRITE_COPY])
def test_a_compressed_write_arrives_as_the_plain_data_with_the_other_flags_kept(flags):
    client, server = handshake()
    sent = zstd_write(3, TEXT, flags)
    assert len(sent.data) < len(TEXT) // 10
    got = transfer(client, server, sent)
    assert got == Write(3, 3 * 4096, TEXT, flags, gseq=103)


@pytest.mark.parametrize("flags", [0, WRITE_COPY])
def test_uncompressed_writes_keep_their_flags(flags):
    client, server = handshake()
    assert transfer(client, server, Write(1, 0, b"plain", flags)) == Write(1, 0, b"plain", flags)


@pytest.mark.parametrize("flags, bit", [(4, "0x4 (bit 2)"), (1 << 31, "0x80000000 (bit 31)"),
                                        (WRITE_ZSTD | 8 | 16, "0x8 (bit 3)")])
def test_an_undefined_write_flag_is_a_protocol_error_naming_the_bit(flags, bit):
    conn = at_state(ConnState.ESTABLISHED)
    with pytest.raises(RemoteProtocolError, match=rf"write frame flag {re.escape(bit)} is not defined"):
        raw(conn, FrameType.WRITE, _WRITE.pack(1, 0, flags, 0) + b"data")
    assert conn.state is ConnState.CLOSED


@pytest.mark.parametrize("flags, message", [
    (4, r"Write: flags 4 outside the defined bits 0x3"),
    (-1, r"Write: flags -1 outside"),
])
def test_we_never_send_an_undefined_write_flag(flags, message):
    with pytest.raises(LocalProtocolError, match=message):
        at_state(ConnState.ESTABLISHED).send(Write(1, 0, b"x", flags))


def test_we_never_send_a_zstd_flag_on_data_that_is_not_a_zstd_frame():
    with pytest.raises(LocalProtocolError, match="WRITE_ZSTD set but the data is not a zstd frame"):
        at_state(ConnState.ESTABLISHED).send(Write(1, 0, TEXT, WRITE_ZSTD))


def _without_content_size(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_content_size=False).compress(data)


def _lying_size(data: bytes, claim: int) -> bytes:
    """A frame of ``data`` whose header claims ``claim`` bytes (a 4-byte size field)."""
    frame = bytearray(compression.compress(data, 3))
    assert frame[4] >> 6 == 2, "expected a 4-byte content size field for this data"
    size_at = zstandard.frame_header_size(bytes(frame)) - 4
    frame[size_at:size_at + 4] = struct.pack("<I", claim)
    return bytes(frame)


@pytest.mark.parametrize("payload, message", [
    (b"not zstd at all", r"write 1: not a zstd frame"),
    (b"\x28\xb5\x2f", r"write 1: not a zstd frame"),
    (_without_content_size(TEXT), r"write 1: zstd frame does not declare its decompressed size"),
    (compression.compress(TEXT, 3)[:-3], r"write 1: (zstd frame is cut short|corrupt zstd frame)"),
    (compression.compress(TEXT, 3) + b"xyz", r"write 1: 3 bytes follow the zstd frame"),
    (compression.compress(TEXT, 3) * 2, r"write 1: \d+ bytes follow the zstd frame"),
    (_lying_size(bytes(1 << 20), 1000), r"write 1: corrupt zstd frame"),
], ids=["garbage", "short", "no-size", "cut", "trailing", "two-frames", "lying-size"])
def test_a_bad_zstd_frame_is_a_protocol_error_saying_what_is_wrong(payload, message):
    conn = at_state(ConnState.ESTABLISHED)
    with pytest.raises(RemoteProtocolError, match=message):
        raw(conn, FrameType.WRITE, _WRITE.pack(1, 0, WRITE_ZSTD, 0) + payload)
    assert conn.state is ConnState.CLOSED


def test_a_frame_claiming_more_than_one_payload_is_refused_before_decoding():
    # 2 KiB on the wire that would become 64 MiB: refused on the size it
    # declares, never decoded (the connection's bound is one payload).
    bomb = compression.compress(bytes(64 << 20), 3)
    assert len(bomb) < 8192
    conn = at_state(ConnState.ESTABLISHED)
    with pytest.raises(RemoteProtocolError, match=r"claims 67108864 decompressed bytes, more than the bound"):
        raw(conn, FrameType.WRITE, _WRITE.pack(1, 0, WRITE_ZSTD, 0) + bomb)


def test_the_bound_is_the_connections_payload_bound_less_the_write_header():
    conn = at_state(ConnState.ESTABLISHED, max_payload=SMALL)
    fits = compression.compress(b"y" * (SMALL - _WRITE.size), 3)
    assert raw(conn, FrameType.WRITE, _WRITE.pack(1, 0, WRITE_ZSTD, 0) + fits).data == b"y" * (SMALL - 28)
    conn = at_state(ConnState.ESTABLISHED, max_payload=SMALL)
    one_more = compression.compress(b"y" * (SMALL - _WRITE.size + 1), 3)
    with pytest.raises(RemoteProtocolError, match=rf"claims {SMALL - 27} decompressed bytes"):
        raw(conn, FrameType.WRITE, _WRITE.pack(1, 0, WRITE_ZSTD, 0) + one_more)


@QUICK
@given(st.binary(max_size=300))
def test_no_bytes_behind_a_zstd_flag_raise_anything_but_a_protocol_error(junk):
    conn = at_state(ConnState.ESTABLISHED)
    try:
        ev = raw(conn, FrameType.WRITE, _WRITE.pack(1, 0, WRITE_ZSTD, 0) + junk)
    except RemoteProtocolError:
        return
    assert isinstance(ev, Write) and ev.flags == 0  # a valid frame after all: decoded


@QUICK
@given(st.binary(max_size=5000), st.integers(compression.MIN_LEVEL, 9))
def test_any_data_round_trips_through_compression(data, level):
    assert compression.decompress(compression.compress(data, level), len(data)) == data


def test_send_write_instead_replaces_an_admitted_write_without_changing_the_state():
    client, server = handshake()
    plain = Write(1, 0, TEXT)
    client.send_parts(plain)  # admitted, as the link queues it
    parts = client.send_write_instead(zstd_write(1, TEXT))
    server.receive_data(b"".join(parts))
    assert server.next_event() == Write(1, 4096, TEXT, 0, gseq=101)
    with pytest.raises(LocalProtocolError, match="replaces a WRITE already sent"):
        handshake()[0].send_write_instead(zstd_write(1, TEXT))


# ----------------------------------------------------------- the sender's policy


def test_worth_sending_needs_an_eighth_saved():
    assert worth_sending(800, 700) and not worth_sending(800, 701)
    assert not worth_sending(4096, 4096 + 13)


def test_small_writes_and_a_disabled_compressor_are_never_tried():
    assert not Compressor(enabled=False).worth_trying(1 << 20)
    c = Compressor(enabled=True)
    assert not c.worth_trying(MIN_TRY - 1) and c.worth_trying(MIN_TRY)
    assert c.untried_writes == 0  # too small is not a back-off


def test_a_run_of_incompressible_writes_backs_off_and_a_compressible_probe_ends_it():
    c = Compressor(enabled=True)
    random_len = len(compression.compress(os.urandom(4096), 3))
    for _ in range(BACKOFF_AFTER):
        assert c.worth_trying(4096)
        assert not c.judge(4096, random_len)
    assert c.incompressible_writes == BACKOFF_AFTER
    skipped = 0
    while not c.worth_trying(4096):
        skipped += 1
    assert skipped == BACKOFF_FIRST == c.untried_writes
    assert not c.judge(4096, random_len)  # the probe fails: the pause doubles
    skipped = 0
    while not c.worth_trying(4096):
        skipped += 1
    assert skipped == 2 * BACKOFF_FIRST
    assert c.judge(4096, 100)  # compressible again: no more pauses
    assert c.compressed_writes == 1
    assert all(c.worth_trying(4096) for _ in range(50))


def test_the_pause_never_exceeds_its_maximum():
    c = Compressor(enabled=True)
    pauses = []
    for _ in range(40):
        skipped = 0
        while not c.worth_trying(4096):
            skipped += 1
        pauses.append(skipped)
        c.judge(4096, 4096)
    assert max(pauses) == BACKOFF_MAX
    assert pauses == sorted(pauses)


def test_only_small_writes_at_fast_levels_are_compressed_on_the_event_loop():
    assert Compressor(enabled=True, level=3).inline(64 * 1024)
    assert not Compressor(enabled=True, level=3).inline(64 * 1024 + 1)
    assert not Compressor(enabled=True, level=19).inline(4096)
