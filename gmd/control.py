"""The control socket: a Unix socket (mode 0600) speaking JSON lines.

Request: one JSON object per line, ``{"op": "status", "volume": "appslv"}``,
checked against the schema in :mod:`gmd.requests` (every op, its fields and
their types). Reply: one JSON object per line, ``{"ok": true, ...}`` or
``{"ok": false, "error": "...", "exit_code": 1}``. The ``events`` request is
answered by its reply line, then one line per event until the client closes
the connection (:func:`stream`). The CLI is the only client;
the ops are carried out by :meth:`gmd.daemon.NodeDaemon.handle_control`.

The daemon serves at most :data:`MAX_CONTROL_CLIENTS` connections at a time
(more get the error reply "too many control connections" and are closed), and a
client must send its whole request line within the node's ``control_timeout``
(:data:`gmd.config.DEFAULT_CONTROL_TIMEOUT` seconds unless configured).

The socket machinery (safe bind, line splitting, the client) is
:mod:`transport.jsonlines`, shared with the WAN emulator's control socket.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from transport import jsonlines

MAX_REQUEST = 1 << 20  # bytes of one request line
MAX_REPLY = 64 * MAX_REQUEST  # bytes of one reply line (a status of many volumes)
MAX_CONTROL_CLIENTS = 64  # control connections served at once


class ControlUnavailable(Exception):
    """No daemon answers on the control socket."""


def _unavailable(path: str | os.PathLike[str], exc: OSError) -> ControlUnavailable:
    if isinstance(exc, jsonlines.NoReply):
        return ControlUnavailable(f"daemon at {path}: {exc}")
    if isinstance(exc, TimeoutError) and exc.errno == errno.EAGAIN:
        return ControlUnavailable(f"daemon at {path} accepts no connection (backlog full)")
    return ControlUnavailable(f"no gmd daemon at {path} ({exc.strerror or exc})")


@contextlib.contextmanager
def _no_daemon_is_unavailable(path: str | os.PathLike[str]) -> Iterator[None]:
    """Nothing listening at ``path`` (or a full backlog) becomes :class:`ControlUnavailable`."""
    try:
        yield
    except (FileNotFoundError, ConnectionRefusedError, jsonlines.NoReply) as e:
        raise _unavailable(path, e) from None
    except TimeoutError as e:
        if e.errno != errno.EAGAIN:
            raise
        raise _unavailable(path, e) from None


def request(path: str | os.PathLike[str], req: dict[str, Any], *, timeout: float = 60.0) -> dict[str, Any]:
    """Send one request to the daemon at ``path`` and return its reply (blocking;
    from trio code use :func:`request_async`).

    Raises :class:`ControlUnavailable` when nothing listens there.
    """
    with _no_daemon_is_unavailable(path):
        return jsonlines.request(path, req, timeout=timeout, max_reply=MAX_REPLY)


def stream(path: str | os.PathLike[str], req: dict[str, Any], *, timeout: float = 60.0,
           idle: float | None = None) -> Iterator[dict[str, Any] | None]:
    """Send a request answered by a stream (``events``): yield its reply,
    then each line the daemon sends, until it closes the connection (with
    ``idle``, None after each ``idle`` seconds without one). Raises
    :class:`ControlUnavailable` when nothing listens there."""
    lines = jsonlines.stream(path, req, timeout=timeout, max_line=MAX_REPLY, idle=idle)
    try:
        with _no_daemon_is_unavailable(path):
            first = next(lines)
        yield first
        yield from lines
    finally:
        lines.close()


async def request_async(path: str | os.PathLike[str], req: dict[str, Any], *,
                        timeout: float = 60.0) -> dict[str, Any]:
    """:func:`request` for trio code: never blocks the event loop."""
    try:
        return await jsonlines.request_async(path, req, timeout=timeout, max_reply=MAX_REPLY)
    except (FileNotFoundError, ConnectionRefusedError, jsonlines.NoReply) as e:
        raise _unavailable(path, e) from None


def daemon_listening(path: str | os.PathLike[str]) -> bool:
    """True if a process accepts connections on the control socket ``path`` (blocking)."""
    return jsonlines.socket_answers(path)


def prepare_socket_path(path: Path) -> None:
    """Make the directory; remove a stale socket a killed daemon left behind.
    Refuses if a live daemon still answers there, or if something other than a
    socket is in the way. Blocking (it probes the socket): run it in a thread
    from trio code."""
    try:
        jsonlines.prepare_socket_path(path)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise RuntimeError(f"another gmd daemon is already running on control socket {path}") from None
        raise
