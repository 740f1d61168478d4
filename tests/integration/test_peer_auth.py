"""Attacks on a real daemon's peer port by a client that does not know the secret.

Nothing such a client says may be believed, stored, logged as fact or answered
with the volume's state; and however many connect, what they make the daemon
hold stays bounded (issue 12, items 1 and 2).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

import pytest

from transport.codec import PREAUTH_MAX_PAYLOAD, Connection, FrameType, Hello, frame_bytes
from transport.link import PREAUTH_CONNECTIONS

from .harness import NodeSpec, daemon_processes, init_in_sync, write_config


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data`` to the daemon and read all it answers until it closes."""
    got = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass  # closed on us mid-send: what it answered is still readable
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            got += chunk
    return bytes(got)


def _crafted_generation() -> dict:
    return {"current": "ffffffffffffffff0000000000000001", "history": ["0123456789abcdef0123456789abcdef"],
            "bitmap_for": {"labor2": "0123456789abcdef0123456789abcdef"}}


def _old_style_hello(node: str) -> bytes:
    """A hello as protocol version 1 sent it: the volume, its geometry and a
    crafted generation history, all before any proof of the secret."""
    payload = json.dumps({
        "node": node, "volume": "appslv", "size": 64 << 20, "region_size": 64 << 10, "extent_size": 4 << 20,
        "nonce": os.urandom(32).hex(), "path": 0, "session": "forged", "protocol_min": 1, "protocol_max": 1,
        "info": {"role": "secondary", "disk": "uptodate", "generation": _crafted_generation(), "marked": {},
                 "discard_local": None, "promoted_at": None},
    }, sort_keys=True, separators=(",", ":")).encode()
    return frame_bytes(FrameType.HELLO, payload)


def _new_style_attack(node: str) -> bytes:
    """A version-2 hello naming a member, a made-up proof, and an intro with a
    crafted history sent right behind it without waiting for the challenge."""
    hello = Connection().send(Hello(node=node, nonce=os.urandom(32)))
    intro = json.dumps({"node": node, "volume": "appslv", "size": 64 << 20, "region_size": 64 << 10,
                        "extent_size": 4 << 20, "path": 0, "session": "forged",
                        "info": {"role": "primary", "disk": "uptodate", "generation": _crafted_generation()}}).encode()
    return hello + frame_bytes(FrameType.AUTH, os.urandom(32)) + frame_bytes(FrameType.INTRO, intro)


@pytest.fixture
def lone_member(tmp_path):
    """labor2 as a real daemon with the volume up and its peer labor1 away,
    under a split-brain policy that would act on what a peer claims."""
    member = NodeSpec("labor2")
    cfg = write_config(tmp_path, [NodeSpec("labor1"), member], mode="mwc",
                       extra_volume='split_brain = "discard-secondary"\n')
    init_in_sync(cfg, "labor1", ["labor2"])
    with daemon_processes(cfg, ["labor2"], tmp_path) as procs:
        p = procs["labor2"]
        p.request(op="up", volume="appslv")
        yield p, member.address[0]


def _untouched(p) -> None:
    vol = p.status()
    peer = vol["members"]["labor1"]
    assert peer["link"] != "standalone", peer
    assert "unrelated" not in (peer["reason"] or "") and "split-brain" not in (peer["reason"] or ""), peer
    assert vol["split_brain"]["resolving_towards"] is None
    log = p.log()
    for phrase in ("resolved by", "hold diverging data", "unrelated", "changes are discarded"):
        assert phrase not in log, f"the daemon acted on an unauthenticated hello: {phrase!r} in\n{log}"


@pytest.mark.parametrize("attack", [_old_style_hello, _new_style_attack], ids=["v1-hello", "forged-auth"])
def test_an_unauthenticated_hello_changes_nothing_and_learns_nothing(lone_member, attack):
    p, port = lone_member
    for _ in range(5):  # a stream of them, as an attacker would send
        answer = _exchange(port, attack("labor1"))
        # Whatever came back holds nothing about the volume.
        for secret_thing in (b"appslv", b"generation", b"uptodate", b"marked", b"labor2\",\"volume"):
            assert secret_thing not in answer, answer
    _untouched(p)


def test_pre_auth_frames_and_connections_are_bounded(lone_member):
    """Headers claiming 8 MiB are refused at the header; idle connections
    beyond the listener's limit are closed at once; the daemon's memory stays
    where it was and it still answers."""
    p, port = lone_member
    rss_before = _rss_kib(p.proc.pid)
    big = struct.pack("<2sBBIQ", b"GM", int(FrameType.HELLO), 0, 8 * 1024 * 1024, 0)
    socks = []
    try:
        for _ in range(48):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            socks.append(s)
            try:
                s.sendall(big + b"x" * (1024 * 1024))
            except OSError:
                pass  # refused at the header already
        # Each was refused for the length alone: the daemon closed them.
        closed = 0
        for s in socks:
            s.settimeout(5)
            try:
                while s.recv(65536):
                    pass
                closed += 1
            except ConnectionResetError:
                closed += 1
            except socket.timeout:
                pass
        assert closed == len(socks)
        assert f"exceeds the bound {PREAUTH_MAX_PAYLOAD} before authentication" in p.log()
    finally:
        for s in socks:
            s.close()
    socks = []
    try:
        for _ in range(200):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(1.0)
        turned_away = 0
        for s in socks:
            s.setblocking(False)
            try:
                if s.recv(1) == b"":
                    turned_away += 1
            except BlockingIOError:
                pass  # still held, waiting for its hello
            except ConnectionResetError:
                turned_away += 1
        assert turned_away >= 200 - PREAUTH_CONNECTIONS
    finally:
        for s in socks:
            s.close()
    growth_mib = (_rss_kib(p.proc.pid) - rss_before) / 1024
    assert growth_mib < 32, f"RSS grew by {growth_mib:.0f} MiB under unauthenticated connections"
    assert p.status()  # still serving
