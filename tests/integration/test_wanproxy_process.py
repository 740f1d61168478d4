"""The WAN emulator as a separate process, driven the way drills drive it:
readiness line on stdout, a control socket, SIGTERM to stop."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from transport.wanproxy import control_request

ROOT = Path(__file__).resolve().parents[2]


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass


@contextmanager
def echo_server():
    """A threaded echo server on an ephemeral loopback port; yields its port."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def read_line(proc: subprocess.Popen, timeout: float = 20.0) -> str:
    """The next stdout line of ``proc``, waiting at most ``timeout`` seconds."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no output from the proxy within {timeout} s")
    return proc.stdout.readline()


@contextmanager
def wanproxy_process(*args: str):
    """Run ``python -m transport.wanproxy ARGS``; yield the process; always
    kill it by its PID afterwards."""
    proc = subprocess.Popen([sys.executable, "-m", "transport.wanproxy", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


@pytest.fixture
def short_tmp():
    """A short temp directory (Unix socket paths are limited to ~107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="wanproxy-") as path:
        yield Path(path)


def round_trip(sock: socket.socket, payload: bytes) -> float:
    start = time.monotonic()
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        received += chunk
    assert received == payload
    return time.monotonic() - start


def test_process_mode_with_control_socket(short_tmp):
    control = short_tmp / "ctl.sock"
    with echo_server() as echo_port, wanproxy_process(
            "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{echo_port}",
            "--delay", "0.0", "--control", str(control)) as proc:
        line = read_line(proc)
        assert line.startswith("listening 127.0.0.1:"), line
        port = int(line.split(":")[1])
        assert stat.S_IMODE(os.stat(control).st_mode) == 0o600

        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert round_trip(sock, b"hello") >= 0

            reply = control_request(control, {"op": "set", "delay": 0.1})
            assert reply["ok"] and reply["settings"]["delay"] == 0.1
            assert round_trip(sock, b"slow") >= 2 * 0.1 * 0.999

            reply = control_request(control, {"op": "set", "delay": -1})
            assert reply["ok"] is False and "delay" in reply["error"]
            reply = control_request(control, {"op": "launch"})
            assert reply["ok"] is False and "launch" in reply["error"]
            control_request(control, {"op": "set", "delay": 0.0})

            assert control_request(control, {"op": "partition", "mode": "blackhole"})["ok"]
            sock.sendall(b"held")
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.recv(100)
            sock.settimeout(10)
            assert control_request(control, {"op": "heal"})["ok"]
            assert sock.recv(100) == b"held"

            stats = control_request(control, {"op": "stats"})["stats"]
            assert stats["connections_open"] == 1 and stats["resets"] == 0
            assert stats["bytes_to_target"] >= len(b"hello" b"slow" b"held")

            assert control_request(control, {"op": "reset"}) == {"ok": True, "reset": 1}
            try:
                assert sock.recv(100) == b""
            except ConnectionResetError:
                pass

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
        assert not control.exists()


def test_sigint_exits_cleanly_and_bad_arguments_exit_2():
    with echo_server() as echo_port, wanproxy_process("--target", f"127.0.0.1:{echo_port}") as proc:
        assert read_line(proc).startswith("listening ")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0, proc.stderr.read()

    with wanproxy_process("--target", "127.0.0.1:1", "--drop", "1.5") as proc:
        assert proc.wait(timeout=20) == 2
        assert "drop" in proc.stderr.read()


def test_stale_control_socket_is_replaced(short_tmp):
    control = short_tmp / "ctl.sock"
    with echo_server() as echo_port:
        target = f"127.0.0.1:{echo_port}"
        with wanproxy_process("--target", target, "--control", str(control)) as proc:
            assert read_line(proc).startswith("listening ")
            os.kill(proc.pid, signal.SIGKILL)  # leaves the socket file behind
            proc.wait(timeout=10)
        assert control.exists()
        with wanproxy_process("--target", target, "--control", str(control)) as proc:
            assert read_line(proc).startswith("listening ")
            assert control_request(control, {"op": "stats"})["ok"]
            # A second proxy on the same live control socket is refused.
            with wanproxy_process("--target", target, "--control", str(control)) as second:
                assert second.wait(timeout=20) == 1
                assert "another process" in second.stderr.read()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
