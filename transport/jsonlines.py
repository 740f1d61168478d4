"""JSON lines over a Unix socket: the one server and client machinery behind
every control socket (the node daemon's, :mod:`gmd.control`, and the WAN
emulator's, :mod:`transport.wanproxy`).

A request is one JSON object on one line; its reply is one JSON object on one
line. What the requests *mean* is the caller's business: this module only
opens the socket safely, splits lines with a length limit, and encodes replies.

* :func:`prepare_socket_path` removes a stale socket a killed process left
  behind and refuses to take over one that a live process still answers on.
  It connects (a blocking probe): call it in a thread from trio code.
* :func:`open_listener` binds the socket with mode 0600 from the start (the
  umask is narrowed around ``bind``, so there is no moment it is wider).
* :class:`LineReader` yields request lines from a stream, refusing a line
  longer than its limit with :class:`LineTooLong`.
* :func:`request` is the blocking client; :func:`request_async` the same for
  trio code, so the connect never blocks the event loop; :func:`stream`
  the blocking client of a request answered by a stream of lines.

Knows nothing of volumes and never imports ``gmd``.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from typing import Any

import trio

__all__ = [
    "LineReader", "LineTooLong", "NoReply", "encode", "open_listener", "prepare_socket_path", "request",
    "request_async", "socket_answers", "stream",
]

RECEIVE_CHUNK = 65536  # bytes asked for per read


class LineTooLong(ValueError):
    """A peer sent more than the limit without a newline."""


class NoReply(ConnectionError):
    """The server closed the connection without answering, or its reply was too large."""


def encode(value: Any) -> bytes:
    """One JSON line (newline included) for ``value``."""
    return json.dumps(value).encode() + b"\n"


def socket_answers(path: str | os.PathLike[str], timeout: float = 2.0) -> bool:
    """True if a process accepts connections on the Unix socket ``path``
    (blocking, at most ``timeout`` seconds)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(os.fspath(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def prepare_socket_path(path: str | os.PathLike[str]) -> None:
    """Make ready to bind ``path``: create its directory, remove a stale socket
    nobody listens on. Raises ``OSError`` EEXIST if something other than a
    socket is there, EADDRINUSE if a live process answers on it. Blocking."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, "it exists and is not a socket", path)
    if socket_answers(path):
        raise OSError(errno.EADDRINUSE, "another process is listening on it", path)
    os.unlink(path)


async def open_listener(path: str | os.PathLike[str], backlog: int) -> trio.SocketListener:
    """Bind and listen on the Unix socket ``path``, mode 0600 (control is for
    its owner only). The caller removes ``path`` when it stops serving."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)  # created 0600: never readable by others, even briefly
        try:
            await sock.bind(os.fspath(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


class LineReader:
    """Request lines from one stream, at most ``limit`` bytes each (newline excluded)."""

    def __init__(self, stream: trio.abc.ReceiveStream, limit: int):
        self._stream = stream
        self._limit = limit
        self._buffer = bytearray()

    async def next_line(self) -> bytes | None:
        """The next line without its newline; None at end of stream. Raises
        :class:`LineTooLong` once more than ``limit`` bytes came without a newline."""
        while True:
            end = self._buffer.find(b"\n")
            if (end if end >= 0 else len(self._buffer)) > self._limit:
                raise LineTooLong(f"line longer than {self._limit} bytes")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                return line
            chunk = await self._stream.receive_some(RECEIVE_CHUNK)
            if not chunk:
                return None
            self._buffer += chunk


def request(path: str | os.PathLike[str], value: Any, *, timeout: float, max_reply: int) -> Any:
    """Send ``value`` as one line to the server at ``path`` and return its
    decoded one-line reply (blocking, at most ``timeout`` seconds per socket call).

    Raises ``FileNotFoundError``/``ConnectionRefusedError`` when nothing
    listens there, ``TimeoutError`` when it does not answer in time,
    :class:`NoReply` when it closes without a reply or the reply exceeds
    ``max_reply`` bytes. A full listen backlog (the server busy accepting) is
    retried until ``timeout``."""
    with _connected(path, timeout) as sock:
        sock.sendall(encode(value))
        buffer = bytearray()
        while b"\n" not in buffer:
            chunk = sock.recv(RECEIVE_CHUNK)
            if not chunk:
                raise NoReply(f"{os.fspath(path)} closed the connection without answering")
            buffer += chunk
            if len(buffer) > max_reply:
                raise NoReply(f"reply from {os.fspath(path)} longer than {max_reply} bytes")
    return json.loads(buffer.split(b"\n", 1)[0])


def _connected(path: str | os.PathLike[str], timeout: float) -> socket.socket:
    """A blocking socket connected to ``path`` (each call at most ``timeout``
    seconds); a full listen backlog is retried until ``timeout``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock.connect(os.fspath(path))
                return sock
            except BlockingIOError:  # EAGAIN: its backlog is full
                if time.monotonic() > deadline:
                    raise TimeoutError(errno.EAGAIN, f"{os.fspath(path)} accepts no connection (backlog full)") \
                        from None
                time.sleep(0.01)
    except BaseException:
        sock.close()
        raise


def stream(path: str | os.PathLike[str], value: Any, *, timeout: float, max_line: int,
           idle: float | None = None) -> Iterator[Any]:
    """Send ``value`` as one line to the server at ``path``, then yield each
    decoded line it sends (blocking) until it closes the connection: the
    reply first (within ``timeout``), then lines as they come, however long
    apart; with ``idle``, None after each ``idle`` seconds without a line (so
    the caller can look around, e.g. whether its own reader went away).
    Raises as :func:`request` does; a line longer than ``max_line`` bytes
    raises :class:`NoReply`. Closing the generator closes the socket."""
    with _connected(path, timeout) as sock:
        sock.sendall(encode(value))
        buffer = bytearray()
        first = True
        while True:
            end = buffer.find(b"\n")
            if end >= 0:
                line = bytes(buffer[:end])
                del buffer[:end + 1]
                yield json.loads(line)
                if first:
                    first = False
                    sock.settimeout(idle)  # a stream may be quiet for hours
                continue
            if len(buffer) > max_line:
                raise NoReply(f"a line from {os.fspath(path)} longer than {max_line} bytes")
            try:
                chunk = sock.recv(RECEIVE_CHUNK)
            except TimeoutError:
                if first:
                    raise
                yield None
                continue
            if not chunk:
                if first:
                    raise NoReply(f"{os.fspath(path)} closed the connection without answering")
                return
            buffer += chunk


async def request_async(path: str | os.PathLike[str], value: Any, *, timeout: float, max_reply: int) -> Any:
    """:func:`request` for trio code: the connect, send and receive all wait on
    the event loop instead of blocking it. Raises the same errors
    (``TimeoutError`` when the whole exchange takes longer than ``timeout``)."""
    line: bytes | None = None
    with trio.move_on_after(timeout) as scope:
        while True:
            try:
                stream = await trio.open_unix_socket(os.fspath(path))
                break
            except BlockingIOError:  # EAGAIN: its backlog is full
                await trio.sleep(0.01)
        async with stream:
            await stream.send_all(encode(value))
            try:
                line = await LineReader(stream, max_reply).next_line()
            except LineTooLong:
                raise NoReply(f"reply from {os.fspath(path)} longer than {max_reply} bytes") from None
    if scope.cancelled_caught:
        raise TimeoutError(f"{os.fspath(path)} did not answer within {timeout} s")
    if line is None:
        raise NoReply(f"{os.fspath(path)} closed the connection without answering")
    return json.loads(line)
