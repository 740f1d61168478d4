"""The control socket: a Unix socket (mode 0600) speaking JSON lines.

Request: one JSON object per line, ``{"op": "status", "volume": "appslv"}``,
checked against the schema in :mod:`gmd.requests` (every op, its fields and
their types). Reply: one JSON object per line, ``{"ok": true, ...}`` or
``{"ok": false, "error": "...", "exit_code": 1}``. The CLI is the only client;
the ops are carried out by :meth:`gmd.daemon.NodeDaemon.handle_control`.

The daemon serves at most :data:`MAX_CONTROL_CLIENTS` connections at a time
(more get the error reply "too many control connections" and are closed), and a
client must send its whole request line within the node's ``control_timeout``
(:data:`gmd.config.DEFAULT_CONTROL_TIMEOUT` seconds unless configured).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

MAX_REQUEST = 1 << 20  # bytes of one request line
MAX_CONTROL_CLIENTS = 64  # control connections served at once


class ControlUnavailable(Exception):
    """No daemon answers on the control socket."""


def request(path: str | os.PathLike[str], req: dict[str, Any], *, timeout: float = 60.0) -> dict[str, Any]:
    """Send one request to the daemon at ``path`` and return its reply (blocking).

    Raises :class:`ControlUnavailable` when nothing listens there.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                s.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise ControlUnavailable(f"no gmd daemon at {path} ({e.strerror})") from None
            except BlockingIOError:  # its listen backlog is full: it is busy accepting
                if time.monotonic() > deadline:
                    raise ControlUnavailable(f"daemon at {path} accepts no connection (backlog full)") from None
                time.sleep(0.01)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ControlUnavailable(f"daemon at {path} closed the connection without answering")
            buf += chunk
            if len(buf) > 64 * MAX_REQUEST:
                raise ControlUnavailable("reply too large")
        return json.loads(buf.decode())
    finally:
        s.close()


def daemon_listening(path: str | os.PathLike[str]) -> bool:
    """True if a process accepts connections on the control socket ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def prepare_socket_path(path: Path) -> None:
    """Make the directory; remove a stale socket a killed daemon left behind.
    Refuses if a live daemon still answers there."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.exists() or path.is_symlink():
        if daemon_listening(path):
            raise RuntimeError(f"another gmd daemon is already running on control socket {path}")
        path.unlink()
