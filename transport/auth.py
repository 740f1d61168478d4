"""Peer authentication: an HMAC challenge-response over a shared secret.

Each side's HELLO carries its node name and a fresh random nonce, nothing
else. Each side then proves it knows
the secret with ``HMAC-SHA256(secret, label | own role | both hellos' bytes)``:
the MAC binds the whole hello transcript (so identity and geometry cannot be
altered in flight) and both nonces (so a recorded exchange cannot be replayed),
and the role label stops a reflection of one side's MAC back to it. The secret
itself never crosses the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import os

NONCE_BYTES = 32
LABEL = b"gmd-peer-auth-v1"


def _key(secret: str | bytes) -> bytes:
    """The HMAC key: a hash of the secret, so secrets that HMAC's zero padding
    would make equal ("k" and "k\\0") stay different, and every key is 32 bytes."""
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    return hashlib.sha256(b"gmd-peer-secret-v1|" + raw).digest()


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def auth_mac(secret: str | bytes, role: str, client_hello: bytes, server_hello: bytes) -> bytes:
    """The MAC that side ``role`` ("client" or "server") sends.

    ``client_hello`` / ``server_hello`` are the exact frame bytes of the two
    HELLO frames, as sent and received.
    """
    if role not in ("client", "server"):
        raise ValueError(f"role must be client or server, not {role!r}")
    key = _key(secret)
    msg = b"|".join([LABEL, role.encode(), hashlib.sha256(client_hello).digest(),
                     hashlib.sha256(server_hello).digest()])
    return hmac.new(key, msg, hashlib.sha256).digest()


def verify_mac(secret: str | bytes, role: str, client_hello: bytes, server_hello: bytes, mac: bytes) -> bool:
    """True if ``mac`` is what side ``role`` must send; constant-time."""
    return hmac.compare_digest(auth_mac(secret, role, client_hello, server_hello), mac)
