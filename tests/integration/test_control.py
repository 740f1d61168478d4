"""The control socket of a real daemon process under bad input: requests of the
wrong shape, idle and surplus connections, damaged state maps. Every refusal is
an error reply and one log line, never a traceback or a held file descriptor."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import time
from pathlib import Path

import pytest

from gmd import control
from gmd.control import MAX_CONTROL_CLIENTS

from .harness import GMD, DaemonProcess, NodeSpec, daemon_processes, init_in_sync, write_config


def one_node_cluster(tmp_path: Path, *, control_timeout: int | None = None) -> Path:
    """Volume appslv with one member, labor1 (it has quorum alone)."""
    node = {} if control_timeout is None else {"control_timeout": control_timeout}
    cfg = write_config(tmp_path, [NodeSpec("labor1", node=node)])
    init_in_sync(cfg, "labor1", [])
    return cfg


def send_line(path: Path, line: bytes, *, timeout: float = 30.0) -> dict:
    """Send raw bytes (a request line) and return the decoded reply line."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        s.sendall(line)
        return json.loads(read_until_eof(s))
    finally:
        s.close()


def read_until_eof(s: socket.socket) -> bytes:
    buf = b""
    while chunk := s.recv(65536):
        buf += chunk
    return buf


def assert_no_traceback(proc: DaemonProcess) -> str:
    log = proc.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
    return log


def test_force_given_as_a_string_is_refused_and_the_primary_stays_primary(tmp_path):
    cfg = one_node_cluster(tmp_path)
    with daemon_processes(cfg, ["labor1"], tmp_path) as procs:
        p = procs["labor1"]
        p.request(op="up", volume="appslv")
        device = p.request(op="primary", volume="appslv")["device"]
        fd = os.open(device, os.O_RDWR)  # an open device: demotion needs a real force
        try:
            reply = control.request(p.control, {"op": "secondary", "volume": "appslv", "force": "no"})
            assert reply == {"ok": False, "exit_code": 2,
                             "error": "secondary: field 'force' must be true or false, got \"no\""}
            assert p.status()["role"] == "primary"
            reply = control.request(p.control, {"op": "secondary", "volume": "appslv", "force": False})
            assert not reply["ok"] and "device in use" in reply["error"]  # the refusal the string bypassed
            assert p.status()["role"] == "primary"
        finally:
            os.close(fd)
        log = assert_no_traceback(p)
        assert "control secondary failed: secondary: field 'force' must be true or false" in log


BAD_LINES = [
    (b'{"op": "up", "volume": "appslv", "loop": "yes"}', "up: field 'loop' must be true or false"),
    (b'{"op": "primary", "volume": "appslv", "force": 1}', "primary: field 'force' must be true or false, got 1"),
    (b'{"op": "resolve", "volume": "appslv", "discard": "local", "dry_run": "no"}',
     "resolve: field 'dry_run' must be true or false"),
    (b'{"op": "resync", "volume": "appslv", "rate": true}', "resync: field 'rate' must be an integer >= 0"),
    (b'{"op": "resync", "volume": "appslv", "rate": -5}', "got -5"),
    (b'{"op": "quorum", "volume": "appslv", "expected_votes": "3"}', "quorum: field 'expected_votes'"),
    (b'{"op": "status", "volume": 42}', "status: field 'volume' must be a string or null, got 42"),
    (b'{"op": "switchover", "volume": "appslv", "to": ["labor2"]}', "switchover: field 'to' must be a string"),
    (b'{"op": "switchover", "volume": "appslv"}', "switchover: missing field 'to'"),
    (b'{"op": "secondary", "volume": "appslv", "forcee": true}', "secondary: unknown field 'forcee'"),
    (b'{"op": "explode"}', "unknown op \"explode\""),
    (b'{"volume": "appslv"}', "no field 'op'"),
    (b'["op", "status"]', "must be a JSON object"),
    (b'"status"', "must be a JSON object"),
    (b'{"op": "status"', "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"", "empty control request"),
    (b"[" * 100_000, "nested too deeply"),
]


def test_bad_requests_are_refused_cleanly_and_the_daemon_keeps_answering(tmp_path):
    cfg = one_node_cluster(tmp_path)
    with daemon_processes(cfg, ["labor1"], tmp_path) as procs:
        p = procs["labor1"]
        p.request(op="up", volume="appslv")
        p.request(op="primary", volume="appslv")
        for line, words in BAD_LINES:
            reply = send_line(p.control, line + b"\n")
            assert reply["ok"] is False and reply["exit_code"] == 2, (line[:80], reply)
            assert words in reply["error"], (line[:80], reply)
        st = p.status()
        assert st["role"] == "primary"  # nothing acted on
        log = assert_no_traceback(p)
        refused = [ln for ln in log.splitlines() if "control " in ln and " failed: " in ln]
        assert len(refused) == len(BAD_LINES), refused


def test_idle_connections_beyond_the_limit_are_refused_and_status_still_answers(tmp_path):
    cfg = one_node_cluster(tmp_path, control_timeout=120)  # the held ones stay held through the test
    with daemon_processes(cfg, ["labor1"], tmp_path) as procs:
        p = procs["labor1"]
        idle: list[socket.socket] = []
        try:
            for _ in range(300):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                idle.append(s)
                s.connect(str(p.control))  # blocking: waits while the listen backlog is full
                s.settimeout(30)
            # Exactly the connections beyond the limit get the refusal line and are closed.
            refused: set[socket.socket] = set()
            deadline = time.monotonic() + 60
            while len(refused) < 300 - MAX_CONTROL_CLIENTS and time.monotonic() < deadline:
                readable, _, _ = select.select([s for s in idle if s not in refused], [], [], 1.0)
                for s in readable:
                    assert json.loads(read_until_eof(s)) == {
                        "ok": False, "error": "too many control connections", "exit_code": 1}
                    refused.add(s)
            assert len(refused) == 300 - MAX_CONTROL_CLIENTS
            held = [s for s in idle if s not in refused]
            assert select.select(held, [], [], 0)[0] == []  # the held ones wait for their request
            # The limit holds for everyone: a status request now is refused too...
            reply = control.request(p.control, {"op": "status", "volume": "appslv"})
            assert reply["error"] == "too many control connections"
            # ...and is answered as soon as one held client goes away.
            held[0].close()
            idle.remove(held[0])
            deadline = time.monotonic() + 30
            while True:
                reply = control.request(p.control, {"op": "status", "volume": "appslv"})
                if reply["ok"] or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert reply["ok"] and reply["up"] is False, reply
            # A held client is still served when it finally sends its request.
            held[1].sendall(b'{"op": "ping"}\n')
            assert json.loads(read_until_eof(held[1]))["ok"] is True
        finally:
            for s in idle:
                s.close()
        log = assert_no_traceback(p)
        assert log.count("control connections open; refusing more") >= 1


def test_an_idle_connection_is_closed_after_the_control_timeout(tmp_path):
    cfg = one_node_cluster(tmp_path, control_timeout=1)
    with daemon_processes(cfg, ["labor1"], tmp_path) as procs:
        p = procs["labor1"]
        for sent in (b"", b'{"op": "sta'):  # nothing at all; half a line
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(60)  # far beyond the daemon's 1 s: only its timeout ends the wait
            try:
                s.connect(str(p.control))
                s.sendall(sent)
                reply = json.loads(read_until_eof(s))
            finally:
                s.close()
            assert reply == {"ok": False, "exit_code": 2, "error": "no complete request line within 1 s"}
        assert p.request(op="ping")["node"] == "labor1"
        assert_no_traceback(p)


def _both_slots_bad(sm: Path) -> None:
    with open(sm, "r+b") as f:
        for slot in (0, 1):  # a byte of each slot's JSON: its checksum no longer matches
            f.seek(slot * 4096 + 100)
            byte = f.read(1)
            f.seek(slot * 4096 + 100)
            f.write(bytes([byte[0] ^ 0xFF]))


def _truncated(sm: Path) -> None:
    os.truncate(sm, 1000)


def _zeroed(sm: Path) -> None:
    size = sm.stat().st_size
    with open(sm, "r+b") as f:
        f.write(bytes(size))


def _directory(sm: Path) -> None:
    sm.unlink()
    sm.mkdir()


def _deleted(sm: Path) -> None:
    sm.unlink()


@pytest.mark.parametrize("damage", [_both_slots_bad, _truncated, _zeroed, _directory, _deleted],
                         ids=lambda f: f.__name__.strip("_"))
def test_up_on_a_damaged_state_map_fails_with_one_line_and_no_traceback(tmp_path, damage):
    cfg = one_node_cluster(tmp_path)
    damage(tmp_path / "data/labor1/appslv.sm")
    with daemon_processes(cfg, ["labor1"], tmp_path) as procs:
        p = procs["labor1"]
        r = subprocess.run([GMD, "up", "appslv", "--config", str(cfg), "--node", "labor1"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, (r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gmd: error: ") and "appslv.sm" in lines[0], r.stderr
        reason = lines[0].removeprefix("gmd: error: ")
        assert p.request(op="ping")["node"] == "labor1"  # the daemon lives on
        log = assert_no_traceback(p)
        failed = [ln for ln in log.splitlines() if "control up failed" in ln]
        assert len(failed) == 1 and reason in failed[0], log[-4000:]


def test_every_cli_command_builds_a_request_the_daemon_accepts(tmp_path):
    cfg = one_node_cluster(tmp_path)
    commands = [
        ["up", "appslv", "--loop"], ["primary", "appslv"], ["status", "appslv"], ["status"],
        ["quorum", "appslv"], ["quorum", "appslv", "--expected-votes", "1"], ["quorum", "appslv", "--reset"],
        ["resync", "appslv", "--rate", "50MiB"], ["resync", "appslv"], ["verify", "appslv", "--no-wait"],
        ["resolve", "appslv", "--discard-local", "--dry-run"], ["switchover", "appslv", "--to", "labor1"],
        ["reload"], ["secondary", "appslv", "--force"], ["down", "appslv"],
    ]
    with daemon_processes(cfg, ["labor1"], tmp_path) as procs:
        for argv in commands:
            r = subprocess.run([GMD, *argv, "--config", str(cfg), "--node", "labor1"],
                               capture_output=True, text=True, timeout=60)
            # Some are refused for what they ask (no split-brain to resolve, a switchover to
            # itself, a verify with no other member), none for the shape of the request.
            assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) <= 1, (argv, r.stderr)
            assert "field '" not in r.stderr and "unknown op" not in r.stderr, (argv, r.stderr)
            assert r.returncode == 0 or argv[0] in ("resolve", "switchover", "verify"), (argv, r.stdout, r.stderr)
        log = assert_no_traceback(procs["labor1"])
        assert "must be" not in log and "unknown field" not in log
