"""Peer connections over trio TCP streams: handshake, authentication, framing.

The codec (:mod:`transport.codec`) decides what is valid; this module only pumps
bytes. One :class:`PeerLink` is one TCP connection (one path). Every socket gets
TCP_NODELAY, and frames queued while a send is in progress are coalesced into
the next ``send_all``, so small acks do not each wait for Nagle's 40 ms.

Shaping (docs/DESIGN.md, "WAN economy"): a link started with a
:class:`transport.pacing.Pacer` asks it before every piece it writes to the
socket, so all the paths to one peer together keep to its bandwidth limit,
and counts what it sent there; with a :class:`transport.compression.Compressor`
it sends writes compressed where that pays. Both are decided where bytes go
to the socket, never where frames are queued: :meth:`PeerLink.send_nowait`
never waits, so the queue order stays the order of the callers. A write to
compress is queued as it is and compressed just before it goes out, on the
event loop if it is small (:meth:`Compressor.inline`), else in a thread by
the sender task. Frames are not reordered: a keepalive waits behind queued
data like any frame (a frame cannot be interrupted on a stream anyway), and
a path is judged alive by the bytes that arrive (:attr:`PeerLink.last_received_at`),
not by whole frames.

Cancellation: a :class:`PeerLink` owns a sender task started with
:meth:`PeerLink.start`; cancelling the nursery it runs in closes the link. A
caller cancelled inside :meth:`PeerLink.send` leaves its frame queued (it is
either sent whole or the link is closed); a caller cancelled inside
:meth:`PeerLink.receive` loses nothing (partial frames stay buffered).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import trio

from . import compression
from .auth import NONCE_BYTES, auth_mac, new_nonce, verify_mac
from .codec import (
    CLOSED,
    HEADER_SIZE,
    PROTOCOL_MAX,
    PROTOCOL_MIN,
    NEED_DATA,
    WRITE_ZSTD,
    Auth,
    Connection,
    ConnState,
    Error,
    Event,
    Hello,
    Intro,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    Write,
)
from .compression import Compressor
from .pacing import Pacer

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
REFUSED = "refused"  # intro info key: the server refuses this connection, for this reason
# Connections one listener lets sit in their handshake (unauthenticated) at
# once; each may hold at most one small pre-auth frame (codec.PREAUTH_MAX_PAYLOAD).
PREAUTH_CONNECTIONS = 32
RECEIVE_CHUNK = 1024 * 1024
SEND_HIGH_WATER = 16 * 1024 * 1024  # queued bytes above which senders wait
SENDMSG_MAX_BUFFERS = 512  # per sendmsg call, well under Linux's IOV_MAX of 1024


class LinkClosed(Exception):
    """The connection is gone; ``reason`` says why (peer's ERROR, EOF, I/O error)."""


class LinkRefused(LinkClosed):
    """The handshake failed: a mismatch, a bad secret, or the peer said no."""


@dataclass(eq=False)
class _ToCompress:
    """A queued write to be compressed just before it goes out: the write,
    its frame as admitted (sent as it is if compressing does not pay), and
    the level chosen when it was queued."""

    write: Write
    raw: list
    level: int

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.raw)


def set_nodelay(stream: trio.SocketStream) -> None:
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class PeerLink:
    """One established, authenticated connection to a peer; ``remote`` is the
    peer's intro (node, volume, geometry, path, session, state)."""

    def __init__(self, stream: trio.abc.Stream, conn: Connection, remote: Intro, *, label: str):
        self.stream = stream
        self.conn = conn
        self.remote = remote
        self.label = label
        self._out: list = []  # frames' parts, in order, handed to one sendmsg
        self._out_bytes = 0
        self._wake = trio.Event()
        self._drained = trio.Event()
        self._idle = trio.Event()  # set when the sender has nothing left to send
        self._started = False
        self._sending = False
        self._raw: socket.socket | None = None  # see start
        self._closed: str | None = None
        self._closed_event = trio.Event()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_received_at = trio.current_time()  # when a byte last arrived (path liveness)
        self.pacer: Pacer | None = None  # see start
        self.compressor: Compressor | None = None
        self._to_compress = 0  # _ToCompress items in _out

    # ------------------------------------------------------------ lifecycle

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def close_reason(self) -> str | None:
        return self._closed

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    def start(self, nursery: trio.Nursery, *, pacer: Pacer | None = None,
              compressor: Compressor | None = None) -> None:
        """Start the sender task in ``nursery``. ``pacer`` (shared by every
        path to the same peer) holds what this link sends to its limit and
        counts it; ``compressor`` (likewise shared) decides which writes go
        compressed."""
        self.pacer = pacer
        self.compressor = compressor
        self._started = True
        if isinstance(self.stream, trio.SocketStream):
            # A second handle on the same socket, for sends that do not wait
            # (trio's socket has only awaiting ones); closed with the link.
            self._raw = socket.socket(fileno=os.dup(self.stream.socket.fileno()))
            self._raw.setblocking(False)
        nursery.start_soon(self._sender)

    def _mark_closed(self, reason: str) -> None:
        if self._raw is not None:
            self._raw.close()  # only the duplicate handle: the stream itself is closed by its owner
            self._raw = None
        if self._closed is None:
            self._closed = reason
            self._closed_event.set()
            self._wake.set()
            self._drained.set()
            self._idle.set()

    async def aclose(self, reason: str = "closed", *, tell_peer: bool = True) -> None:
        """Close the link; with ``tell_peer`` the sender first flushes an ERROR
        frame carrying the reason (for at most a second)."""
        if self._closed is None and tell_peer:
            try:
                self._queue(self.conn.send_parts(Error(reason)))
            except ProtocolError:
                pass
            self._wake.set()
            if self._started:
                with trio.move_on_after(1):
                    while (self._out or self._sending) and self._closed is None:
                        if self._idle.is_set():  # shared by every closer waiting (see send)
                            self._idle = trio.Event()
                        await self._idle.wait()
            else:
                with trio.move_on_after(1):
                    try:
                        await self.stream.send_all(b"".join(self._out))
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
        self._mark_closed(reason)
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)

    # --------------------------------------------------------------- sending

    def _queue(self, parts: list, write: Write | None = None) -> None:
        c = self.compressor
        if write is not None and c is not None and c.worth_trying(len(write.data)):
            if c.inline(len(write.data)):
                parts = self._compressed(write, parts, compression.compress(write.data, c.level))
            else:
                item = _ToCompress(write, parts, c.level)
                self._out.append(item)
                self._to_compress += 1
                self._out_bytes += item.size
                self._wake.set()
                return
        if not self._out and not self._sending and self._raw is not None:
            size = sum(len(p) for p in parts)
            if self.pacer is None or self.pacer.try_reserve(size):
                parts = self._send_now(parts, size)
                if not parts:
                    return
        self._out.extend(parts)
        self._out_bytes += sum(len(p) for p in parts)
        self._wake.set()

    def _compressed(self, write: Write, raw: list, packed: bytes) -> list:
        """The frame to send for ``write``: compressed if the compressor judges
        ``packed`` worth it, else the ``raw`` frame as admitted."""
        if not self.compressor.judge(len(write.data), len(packed)):
            return raw
        return self.conn.send_write_instead(replace(write, data=packed, flags=write.flags | WRITE_ZSTD))

    async def _compress_queued(self, batch: list) -> list:
        """``batch`` with each write queued for compression replaced by the
        frame to send (compressed in a thread: these are the large ones)."""
        out: list = []
        for item in batch:
            if not isinstance(item, _ToCompress):
                out.append(item)
                continue
            self._to_compress -= 1
            packed = await trio.to_thread.run_sync(compression.compress, item.write.data, item.level)
            out.extend(self._compressed(item.write, item.raw, packed))
        return out

    def _count_sent(self, n: int) -> None:
        self.bytes_sent += n
        if self.pacer is not None:
            self.pacer.sent(n)

    def _send_now(self, parts: list, size: int) -> list:
        """Send a frame of ``size`` bytes at once when nothing is queued before
        it (and the pacer reserved ``size`` for it): one sendmsg that does not
        wait (MSG_DONTWAIT), instead of waking the sender task (a task switch
        on each side of every write's round trip). Returns what did not go
        out, for the sender task, in order; errors are left to it."""
        n = 0
        try:
            if len(parts) <= SENDMSG_MAX_BUFFERS:
                n = self._raw.sendmsg(parts, (), socket.MSG_DONTWAIT)
        except OSError:  # EAGAIN (the socket buffer is full), or a broken link: the sender finds out
            pass
        if self.pacer is not None:
            self.pacer.give_back(size - n)  # the rest is paced again by the sender task
        if not n:
            return parts
        self._count_sent(n)
        for i, part in enumerate(parts):
            if n < len(part):
                return [memoryview(part)[n:], *parts[i + 1:]]
            n -= len(part)
        return []

    def _frame(self, event: Event) -> list:
        try:
            return self.conn.send_parts(event)
        except LocalProtocolError:
            if self.conn.state is ConnState.CLOSED:  # closed by the peer's ERROR or EOF just now
                self._mark_closed(self.conn.closed_reason or "closed")
                raise LinkClosed(self._closed) from None
            raise

    def send_nowait(self, event: Event) -> None:
        """Queue ``event`` without waiting (callers bound their own queues)."""
        if self._closed is not None:
            raise LinkClosed(self._closed)
        self._queue(self._frame(event), event if isinstance(event, Write) else None)

    async def send(self, event: Event) -> None:
        """Queue ``event`` for the sender task; waits only when much is queued."""
        if self._closed is not None:
            raise LinkClosed(self._closed)
        self._queue(self._frame(event))
        while self._out_bytes > SEND_HIGH_WATER and self._closed is None:
            # One event for every sender waiting: replacing it while another
            # waits on it would leave that one waiting for ever.
            if self._drained.is_set():
                self._drained = trio.Event()
            await self._drained.wait()
        if self._closed is not None:
            raise LinkClosed(self._closed)

    async def _sender(self) -> None:
        try:
            while True:
                if not self._out:
                    self._idle.set()
                    if self._closed is not None:
                        break
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                parts = self._out
                self._out = []
                self._out_bytes = 0
                self._drained.set()
                self._sending = True
                try:
                    if self._to_compress:
                        parts = await self._compress_queued(parts)
                    await self._send_parts(parts)
                finally:
                    self._sending = False
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self._mark_closed(f"send failed: {e!r}")
        finally:
            if self._closed is None:
                self._mark_closed("sender stopped")
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)

    async def _reserve(self, want: int) -> int:
        return want if self.pacer is None else await self.pacer.reserve(want)

    async def _send_parts(self, parts: list) -> None:
        """Send the queued frame parts in order, each piece as the pacer allows
        (all at once without a limit). On a plain TCP stream they go out by
        ``sendmsg`` straight from the caller's buffers (a write's data is
        never copied in user space); TLS needs one contiguous buffer, and the
        limit counts its plaintext."""
        if not isinstance(self.stream, trio.SocketStream):
            data = memoryview(b"".join(parts))
            while data:
                n = await self._reserve(len(data))
                try:
                    await self.stream.send_all(data[:n])
                except BaseException:
                    if self.pacer is not None:
                        self.pacer.give_back(n)
                    raise
                self._count_sent(n)
                data = data[n:]
            return
        sock = self.stream.socket
        views = [memoryview(p) for p in parts]
        remaining = sum(len(v) for v in views)
        i = 0
        while i < len(views):
            allowed = await self._reserve(remaining)
            batch = []
            room = allowed
            for v in views[i:i + SENDMSG_MAX_BUFFERS]:
                if room <= 0:
                    break
                batch.append(v if len(v) <= room else v[:room])
                room -= len(batch[-1])
            try:
                n = await sock.sendmsg(batch)
            except BaseException:
                if self.pacer is not None:
                    self.pacer.give_back(allowed)
                raise
            if self.pacer is not None:
                self.pacer.give_back(allowed - n)
            self._count_sent(n)
            remaining -= n
            # Skip what went out; a partly sent buffer continues from its tail.
            while n:
                v = views[i]
                if n >= len(v):
                    n -= len(v)
                    i += 1
                else:
                    views[i] = v[n:]
                    n = 0

    # ------------------------------------------------------------- receiving

    async def receive(self) -> Event:
        """The next event from the peer; raises :class:`LinkClosed` at the end."""
        while True:
            if self._closed is not None:
                raise LinkClosed(self._closed)
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as e:
                log.warning("%s: closing link: protocol error from peer: %s", self.label, e)
                await self.aclose(f"protocol error: {e}")
                raise LinkClosed(f"protocol error: {e}") from None
            if event is CLOSED:
                reason = self.conn.closed_reason or "closed"
                self._mark_closed(reason)
                raise LinkClosed(reason)
            if event is NEED_DATA:
                large = self.conn.frame_remainder() if isinstance(self.stream, trio.SocketStream) else None
                if large is not None:
                    await self._receive_large_frame(*large)
                    continue
                try:
                    data = await self.stream.receive_some(RECEIVE_CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                    self._mark_closed(f"receive failed: {e!r}")
                    raise LinkClosed(self._closed) from None
                self.bytes_received += len(data)
                self.last_received_at = trio.current_time()
                self.conn.receive_data(data)
                continue
            if isinstance(event, Error):
                log.warning("%s: peer closed the link: %s", self.label, event.reason)
                self._mark_closed(f"peer: {event.reason}")
                raise LinkClosed(f"peer: {event.reason}")
            return event


    async def _receive_large_frame(self, total: int, missing: int) -> None:
        """Receive the rest of a large data frame straight into a buffer of its
        own, which becomes the payload: no reassembly copy, no payload copy.
        Cancelled or cut short, what arrived stays with the codec."""
        frame = self.conn.start_frame(total)
        got = total - missing
        try:
            with memoryview(frame) as view:
                while got < total:
                    n = await self.stream.socket.recv_into(view[got:])
                    if n == 0:
                        break
                    got += n
                    self.bytes_received += n
                    self.last_received_at = trio.current_time()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self._mark_closed(f"receive failed: {e!r}")
            raise LinkClosed(self._closed) from None
        finally:
            self.conn.receive_frame(frame, got)
        if got < total:
            self.conn.receive_data(b"")  # end of stream in the middle of a frame


# ---------------------------------------------------------------- handshake


async def _next_event(stream: trio.abc.Stream, conn: Connection) -> Event:
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            # Before authentication read no more than one bounded frame at a
            # time: what an unauthenticated peer sends is never buffered in bulk.
            data = await stream.receive_some(min(RECEIVE_CHUNK, HEADER_SIZE + conn.frame_bound))
            conn.receive_data(data)
            continue
        if ev is CLOSED:
            raise LinkRefused(conn.closed_reason or "connection closed during handshake")
        return ev


def hello_problem(hello: Hello) -> str | None:
    """What makes a peer's hello unusable before anything else is looked at: no
    protocol version in common, or a nonce that is not a fresh 32 bytes."""
    if hello.protocol_min > hello.protocol_max:
        return f"protocol range {hello.protocol_min}..{hello.protocol_max} is empty"
    if hello.protocol_max < PROTOCOL_MIN or hello.protocol_min > PROTOCOL_MAX:
        return (f"no common protocol version: peer speaks {hello.protocol_min}..{hello.protocol_max}, "
                f"this side {PROTOCOL_MIN}..{PROTOCOL_MAX}")
    if len(hello.nonce) != NONCE_BYTES:
        return f"hello nonce of {len(hello.nonce)} bytes, expected {NONCE_BYTES}"
    return None


def intro_problem(hello: Hello, intro: Intro) -> str | None:
    """An authenticated peer's intro must speak for the node that authenticated."""
    if intro.node != hello.node:
        return f"intro names node {intro.node!r} but the peer authenticated as {hello.node!r}"
    return None


async def _refuse(stream: trio.abc.Stream, conn: Connection, reason: str) -> None:
    try:
        with trio.move_on_after(1):
            await stream.send_all(conn.send(Error(reason)))
    except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    await trio.aclose_forcefully(stream)


_last_refusal: dict[str, tuple[str, float]] = {}
REPEAT_LOG_INTERVAL = 60.0


def log_refusal(label: str, message: str) -> None:
    """Log a failed or refused connection at WARNING the first time, when the
    reason changes, and once a minute while it repeats; at DEBUG otherwise, so a
    peer that stays down does not flood the log with one line per retry."""
    key = label.rsplit(":", 1)[0] if "<-" in label else label  # an acceptor's label carries the peer's port
    now = time.monotonic()
    last = _last_refusal.get(key)
    if last is None or last[0] != message or now - last[1] >= REPEAT_LOG_INTERVAL:
        _last_refusal[key] = (message, now)
        log.warning("%s: %s", label, message)
    else:
        log.debug("%s: %s (repeated)", label, message)


async def _handshake_failed(stream: trio.abc.Stream, label: str, exc: BaseException) -> None:
    """Close the stream, log why, and raise :class:`LinkRefused` (or re-raise
    what is not a handshake failure, such as a cancellation)."""
    with trio.CancelScope(shield=True):
        await trio.aclose_forcefully(stream)
    if isinstance(exc, LinkRefused):
        log_refusal(label, str(exc))
        raise exc
    if isinstance(exc, trio.TooSlowError):
        log_refusal(label, "handshake timed out")
        raise LinkRefused("handshake timed out") from None
    if isinstance(exc, (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
        log_refusal(label, f"handshake failed: {exc}")
        raise LinkRefused(f"handshake failed: {exc}") from None
    raise exc


async def client_handshake(
    stream: trio.abc.Stream,
    intro: Intro,
    secret: str,
    check_remote: Callable[[Intro], str | None],
    *,
    label: str,
    max_payload: int | None = None,
) -> PeerLink:
    """Run the client side of the handshake on a connected stream.

    Both sides prove the secret over the two hellos (node name and nonce only)
    before either says anything about a volume; then ``intro`` goes out and
    ``check_remote`` judges the peer's intro (a refusal reason, or None).
    Raises :class:`LinkRefused` (logged) on any failure; the stream is closed then.
    """
    conn = Connection() if max_payload is None else Connection(max_payload)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            mine = conn.send(Hello(node=intro.node, nonce=new_nonce()))
            await stream.send_all(mine)
            remote = await _next_event(stream, conn)
            if isinstance(remote, Error):
                raise LinkRefused(f"refused by peer: {remote.reason}")
            if not isinstance(remote, Hello):
                raise RemoteProtocolError(f"expected HELLO, got {type(remote).__name__}")
            theirs = conn.last_frame
            reason = hello_problem(remote)
            if reason:
                await _refuse(stream, conn, reason)
                raise LinkRefused(f"refusing peer {remote.node}: {reason}")
            await stream.send_all(conn.send(Auth(auth_mac(secret, "client", mine, theirs))))
            auth = await _next_event(stream, conn)
            if isinstance(auth, Error):
                raise LinkRefused(f"refused by peer {remote.node}: {auth.reason}")
            if not isinstance(auth, Auth) or not verify_mac(secret, "server", mine, theirs, auth.mac):
                await _refuse(stream, conn, "authentication failed: server's proof is wrong (check the secret)")
                raise LinkRefused(f"peer claiming to be {remote.node} failed authentication (wrong secret?)")
            # Authenticated both ways: from here on the peer's words count.
            await stream.send_all(conn.send(intro))
            theirs_intro = await _next_event(stream, conn)
            if isinstance(theirs_intro, Error):
                raise LinkRefused(f"refused by peer {remote.node}: {theirs_intro.reason}")
            if not isinstance(theirs_intro, Intro):
                raise RemoteProtocolError(f"expected INTRO, got {type(theirs_intro).__name__}")
            refused = theirs_intro.info.get(REFUSED)
            if refused is not None:
                # The server refuses, and says who it is so that this side can
                # judge it too (and show what it found, e.g. that our data is
                # the stale one).
                if intro_problem(remote, theirs_intro) is None:
                    check_remote(theirs_intro)
                raise LinkRefused(f"refused by peer {remote.node}: {refused}")
            reason = intro_problem(remote, theirs_intro) or check_remote(theirs_intro)
            if reason:
                await _refuse(stream, conn, reason)
                raise LinkRefused(f"refusing peer {remote.node}: {reason}")
    except BaseException as e:
        await _handshake_failed(stream, label, e)
        raise AssertionError("unreachable")  # _handshake_failed always raises
    return PeerLink(stream, conn, theirs_intro, label=label)


async def server_handshake(
    stream: trio.abc.Stream,
    node: str,
    secret: str,
    reply_to: Callable[[Intro], Intro | str | tuple[Intro, str]],
    *,
    label: str,
    max_payload: int | None = None,
) -> PeerLink:
    """Run the server side of the handshake on an accepted stream, as ``node``.

    The client must prove the secret before anything it says is looked at and
    before we prove ours; only then ``reply_to`` turns its intro into ours, or
    returns a refusal reason (unknown volume, geometry mismatch...), or both
    (our intro, the reason): the client then learns who refused it, marked
    :data:`REFUSED`, and judges us too. Raises :class:`LinkRefused` (logged).
    """
    conn = Connection() if max_payload is None else Connection(max_payload)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            remote = await _next_event(stream, conn)
            if not isinstance(remote, Hello):
                raise RemoteProtocolError(f"expected HELLO, got {type(remote).__name__}")
            theirs = conn.last_frame
            reason = hello_problem(remote)
            if reason:
                await _refuse(stream, conn, reason)
                raise LinkRefused(f"refusing connection claiming to be {remote.node}: {reason}")
            mine = conn.send(Hello(node=node, nonce=new_nonce()))
            await stream.send_all(mine)
            auth = await _next_event(stream, conn)
            if isinstance(auth, Error):
                raise LinkRefused(f"connection claiming to be {remote.node} gave up: {auth.reason}")
            if not isinstance(auth, Auth) or not verify_mac(secret, "client", theirs, mine, auth.mac):
                await _refuse(stream, conn, "authentication failed: wrong secret")
                raise LinkRefused(f"refusing connection claiming to be {remote.node}: "
                                  "authentication failed (wrong secret)")
            await stream.send_all(conn.send(Auth(auth_mac(secret, "server", theirs, mine))))
            intro = await _next_event(stream, conn)
            if isinstance(intro, Error):
                raise LinkRefused(f"peer {remote.node} gave up: {intro.reason}")
            if not isinstance(intro, Intro):
                raise RemoteProtocolError(f"expected INTRO, got {type(intro).__name__}")
            reply = intro_problem(remote, intro) or reply_to(intro)
            if isinstance(reply, tuple):
                ours, reason = reply
                await stream.send_all(conn.send(replace(ours, info={**ours.info, REFUSED: reason})))
                await _refuse(stream, conn, reason)
                raise LinkRefused(f"refusing peer {remote.node}: {reason}")
            if isinstance(reply, str):
                await _refuse(stream, conn, reply)
                raise LinkRefused(f"refusing peer {remote.node}: {reply}")
            await stream.send_all(conn.send(reply))
    except BaseException as e:
        await _handshake_failed(stream, label, e)
        raise AssertionError("unreachable")  # _handshake_failed always raises
    return PeerLink(stream, conn, intro, label=label)


class HandshakeGate:
    """Bounds the connections of one listener that have not authenticated yet:
    beyond ``limit`` a new connection is closed at once, so strangers cannot
    make the daemon hold more than ``limit`` small handshake buffers."""

    def __init__(self, limit: int, label: str):
        self.limit = limit
        self.label = label
        self.pending = 0
        self.turned_away = 0

    def try_enter(self) -> bool:
        """Count one more unauthenticated connection, or False at the limit."""
        if self.pending >= self.limit:
            self.turned_away += 1
            log_refusal(self.label, f"refusing connection: {self.pending} connections are already "
                                    f"in their handshake (limit {self.limit}); {self.turned_away} turned away so far")
            return False
        self.pending += 1
        return True

    def leave(self) -> None:
        """The connection authenticated, failed or closed."""
        self.pending -= 1


async def open_peer_stream(host: str, port: int, *, timeout: float = 5.0) -> trio.SocketStream:
    """Connect to a peer address with a deadline and TCP_NODELAY set."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, port)
    set_nodelay(stream)
    return stream


def _tls_reason(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    return f"{cause}" if cause is not None else (str(e) or type(e).__name__)


async def connect_secured(host: str, port: int, tls, *, label: str, what: str) -> trio.abc.Stream:
    """Connect to ``host:port`` and, with ``tls`` (a :class:`transport.tls.TlsContexts`),
    run the TLS client handshake; :class:`LinkRefused` naming ``what`` on failure."""
    from .tls import wrap

    try:
        stream = await open_peer_stream(host, port)
    except (OSError, trio.TooSlowError) as e:
        raise LinkRefused(f"cannot connect to {what} at {host}:{port}: {e}") from None
    if tls is None:
        return stream
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            return await wrap(stream, tls.client, server_side=False)
    except (trio.BrokenResourceError, trio.TooSlowError, OSError) as e:
        await trio.aclose_forcefully(stream)
        log_refusal(label, f"TLS handshake failed: {_tls_reason(e)}")
        raise LinkRefused(f"TLS handshake with {what} at {host}:{port} refused: {_tls_reason(e)}") from None


async def accept_secured(stream: trio.SocketStream, tls, *, label: str) -> trio.abc.Stream | None:
    """An accepted connection, with TCP_NODELAY and, with ``tls``, the TLS server
    handshake done; None (logged, closed) when that fails."""
    from .tls import wrap

    set_nodelay(stream)
    if tls is None:
        return stream
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            return await wrap(stream, tls.server, server_side=True)
    except (trio.BrokenResourceError, trio.TooSlowError, OSError) as e:
        log_refusal(label, f"refusing connection: TLS handshake failed: {_tls_reason(e)}")
        await trio.aclose_forcefully(stream)
        return None
