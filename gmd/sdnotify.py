"""Telling the service manager how a daemon is doing: systemd's notify protocol.

A service of ``Type=notify`` gets ``$NOTIFY_SOCKET``, the address of a Unix
datagram socket; each datagram sent there is newline-separated ``KEY=value``
lines (``READY=1``, ``STATUS=...``, ``STOPPING=1``; sd_notify(3)). An address
starting with ``@`` names a socket in the abstract namespace (``\\0`` first).
Without ``$NOTIFY_SOCKET`` (not started by systemd) nothing is sent.

Hand-written rather than a library's, on purpose: systemd documents this
protocol as a stable interface that programs may implement themselves
(sd_notify(3) gives a standalone version), and it is one ``sendto``. The
libraries weighed were ``sdnotify`` (unmaintained since 2017; it hides every
send error) and ``systemd-python`` (a C extension built against
libsystemd-dev: a compiler and one more system package in every install, for
the same one datagram).

Sends never block the trio loop: the socket is non-blocking, and a datagram the
manager cannot take at once is dropped with a warning (the manager reads its
socket continuously; a later STATUS= replaces a lost one).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
MAX_STATUS = 400  # characters of one STATUS= line: systemctl status shows one line


def notify_address(value: str | None) -> str | bytes | None:
    """The socket address ``$NOTIFY_SOCKET`` names: a path, or (``@name``) an
    abstract name as bytes starting with NUL. None when unset or empty, or in a
    form this implementation does not speak (``vsock:``, a relative path), which
    is logged."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    log.warning("%s=%r is neither a socket path nor an abstract name (@...); not notifying the service manager",
                NOTIFY_SOCKET_ENV, value)
    return None


def encode(fields: Mapping[str, str]) -> bytes:
    """One notification datagram: ``KEY=value`` lines. A value is one line (a
    newline would start another key), so newlines in it become spaces."""
    lines = []
    for key, value in fields.items():
        text = " ".join(str(value).splitlines())
        if key == "STATUS" and len(text) > MAX_STATUS:
            text = text[: MAX_STATUS - 3] + "..."
        lines.append(f"{key}={text}")
    return ("\n".join(lines) + "\n").encode()


class ServiceNotifier:
    """Notifications to the service manager of this process (a no-op without one)."""

    def __init__(self, address: str | bytes | None):
        self.address = address
        self._sock: socket.socket | None = None
        self._warned = False
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] = os.environ) -> ServiceNotifier:
        """The notifier ``$NOTIFY_SOCKET`` asks for. The variable is removed from
        ``environ``: commands the daemon starts (start/stop commands, losetup)
        are not the service and must not speak for it."""
        return cls(notify_address(environ.pop(NOTIFY_SOCKET_ENV, None)))

    @property
    def active(self) -> bool:
        """Whether a service manager listens (the daemon was started by systemd)."""
        return self._sock is not None

    def send(self, **fields: str) -> bool:
        """Send one notification; True if the manager got it."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto(encode(fields), self.address)
        except OSError as e:
            if not self._warned:  # once: a manager that went away would repeat it forever
                log.warning("cannot notify the service manager at %r: %s", self.address, e)
                self._warned = True
            return False
        return True

    def status(self, text: str) -> bool:
        """``STATUS=``: the one line ``systemctl status`` shows."""
        return self.send(STATUS=text)

    def ready(self, status: str) -> bool:
        """``READY=1``: start-up is complete (systemd starts the units ordered after)."""
        return self.send(READY="1", STATUS=status)

    def stopping(self, status: str) -> bool:
        """``STOPPING=1``: a clean stop has begun."""
        return self.send(STOPPING="1", STATUS=status)

    def close(self) -> None:
        """Release the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
