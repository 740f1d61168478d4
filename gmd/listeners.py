"""Opening the TCP listeners of a node daemon or a witness, with a clear
refusal naming the address when the port cannot be had."""

from __future__ import annotations

import trio

from .config import Address
from .errors import Refused


async def open_listeners(addr: Address, who: str) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners`` for ``addr``; an address in use (another
    daemon, a leftover process) or not on this host is one refusal naming
    ``who``, the address and the reason, not a traceback."""
    try:
        return await trio.open_tcp_listeners(addr.port, host=addr.host)
    except OSError as e:
        raise Refused("listen-failed", who=who, host=addr.host, port=addr.port,
                      why=e.strerror or str(e)) from None
