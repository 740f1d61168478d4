"""TLS for peer links: mutual certificate verification against one cluster CA.

The gmd handshake (HMAC over the shared secret) still runs inside TLS; TLS adds
privacy and a second, certificate-based proof of identity. Host names are not
checked: nodes are identified by the certificate chain and the gmd handshake,
and peers are often reached through addresses that no certificate names
(NAT, a WAN emulator).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trio


@dataclass(frozen=True)
class TlsContexts:
    client: ssl.SSLContext
    server: ssl.SSLContext


def make_contexts(cert: Path, key: Path, ca: Path) -> TlsContexts:
    """Contexts for dialling and accepting; both present ``cert`` and require a
    peer certificate signed by ``ca``. Raises ``ssl.SSLError``/``OSError``
    naming the file when one cannot be loaded."""
    def ctx(purpose: ssl.Purpose) -> ssl.SSLContext:
        c = ssl.create_default_context(purpose, cafile=str(ca))
        c.minimum_version = ssl.TLSVersion.TLSv1_2
        c.check_hostname = False
        c.verify_mode = ssl.CERT_REQUIRED
        c.load_cert_chain(str(cert), str(key))
        return c

    return TlsContexts(client=ctx(ssl.Purpose.SERVER_AUTH), server=ctx(ssl.Purpose.CLIENT_AUTH))


async def wrap(stream: trio.abc.Stream, context: ssl.SSLContext, *, server_side: bool) -> trio.SSLStream:
    """Run the TLS handshake on ``stream``; raises ``trio.BrokenResourceError``
    (with the SSL reason as its cause) when it fails."""
    tls = trio.SSLStream(stream, context, server_side=server_side)
    await tls.do_handshake()
    return tls
