"""The peer wire protocol as a sans-IO codec: bytes in, events out.

No sockets here (h11's shape): :meth:`Connection.receive_data` takes bytes,
:meth:`Connection.next_event` returns the next complete event (or
:data:`NEED_DATA`), :meth:`Connection.send` turns an event into bytes. A
violation by the peer raises :class:`RemoteProtocolError`, one by our own code
:class:`LocalProtocolError`; either way the link is closed with the reason
logged, and nothing from a bad frame ever reaches a disk.

Frame (all integers little-endian)::

    offset  size  field
    0       2     magic b"GM"
    2       1     frame type (FrameType)
    3       1     flags, zero in versions 1 and 2
    4       4     payload length (at most the connection's max_payload)
    8       8     xxh3_64 of bytes 0..7 and the payload
    16      ...   payload

The length is checked before a byte of the payload is buffered, so a peer can
never make us allocate more than ``max_payload``. A WRITE's payload has a u32
``flags`` field of its own: :data:`WRITE_COPY` (reserved) and
:data:`WRITE_ZSTD` (the data is one zstd frame, decompressed here, bounded by
``max_payload`` too); any other bit closes the connection. Payloads of the hot-path
frames (write, ack, read, hash) are fixed structs followed by raw bytes; the
rare ones (hello, state, error) are JSON objects.

Handshake (per connection, i.e. per path), protocol version 2: both sides
send HELLO (node name, protocol range, a random nonce: nothing about any
volume); then both send AUTH (an HMAC over the two hellos, :mod:`transport.auth`);
only then, authenticated, both send INTRO (volume, geometry, path, session and
the volume's state); then the link is ESTABLISHED. Until both AUTH frames have
passed, a frame may carry at most :data:`PREAUTH_MAX_PAYLOAD` bytes, so a peer
that has proved nothing can make us buffer only a few KiB. An ERROR frame may
be sent in any state and closes the connection after it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any

import xxhash

from .compression import CorruptFrame, decompress

MAGIC = b"GM"
# Version 2 authenticates before anything about a volume is said (version 1
# sent the volume's state in the unauthenticated hello); the two do not mix.
# Version 3: every STATE and intro field is typed (transport.messages) and
# an unknown or mistyped one closes the link; version 2 peers are not spoken to.
PROTOCOL_MIN = 3
PROTOCOL_MAX = 3
HEADER = struct.Struct("<2sBBIQ")
HEADER_SIZE = HEADER.size  # 16
DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024 + 4096  # largest write/read/bitmap chunk + header
# Bound on HELLO and AUTH payloads (and any frame before authentication): a
# hello is a node name, a nonce and two numbers.
PREAUTH_MAX_PAYLOAD = 4096
MAX_NODE_NAME = 255
# Data frames from this size on are received into a buffer of their own. The
# copy engine's 8 MiB chunks gain from it; 1 MiB application writes measured
# slower that way (bench_write, sync), for reasons not yet understood, so they
# keep the reassembling path.
LARGE_FRAME = 4 * 1024 * 1024

# The u32 ``flags`` of a WRITE frame (not the header's flags byte, which stays
# zero). An unknown bit is a protocol error naming it: a peer that means
# something we do not know must not have it half understood.
WRITE_COPY = 1  # copy or catch-up data rather than an application write (reserved: sent by no one yet)
WRITE_ZSTD = 2  # the data is one zstd frame (transport.compression); the receiver sees it decompressed
WRITE_FLAGS = WRITE_COPY | WRITE_ZSTD


class ProtocolError(Exception):
    """The protocol was violated; the connection must be closed."""


class LocalProtocolError(ProtocolError):
    """Our side tried to send something the protocol does not allow now."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or out of place."""


class FrameType(IntEnum):
    HELLO = 1
    AUTH = 2
    ERROR = 3
    INTRO = 4
    WRITE = 16
    WRITE_ACK = 17
    FLUSH = 18
    FLUSH_ACK = 19
    READ = 20
    READ_REPLY = 21
    HASH = 22
    HASH_REPLY = 23
    BITMAP = 24
    STATE = 25
    PING = 26
    PONG = 27


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class Hello:
    """First frame each way, before authentication: only who we claim to be,
    the protocol versions we speak and a fresh nonce for the challenge."""

    node: str
    nonce: bytes
    protocol_min: int = PROTOCOL_MIN
    protocol_max: int = PROTOCOL_MAX


@dataclass(frozen=True)
class Intro:
    """First frame each way after both sides authenticated: which volume this
    connection serves, its geometry, and the sender's state of it."""

    node: str
    volume: str
    size: int
    region_size: int
    extent_size: int
    path: int = 0  # which of the member's paths this connection is
    session: str = ""  # identifies one member link across its paths
    info: dict[str, Any] = field(default_factory=dict)  # role, disk, generations...


@dataclass(frozen=True)
class Auth:
    mac: bytes


@dataclass(frozen=True)
class Error:
    """The sender is closing the connection, and says why."""

    reason: str


# Write flags. WRITE_COPY: copy data (a copy, merge or catch-up pass sends a
# region's contents), not one of the primary's writes in its order.
WRITE_COPY = 1


@dataclass(frozen=True)
class Write:
    """One write shipped to a member. A Write given to :meth:`Connection.send`
    with :data:`WRITE_ZSTD` set carries one zstd frame as ``data`` (see
    :func:`transport.compression.compress`); one returned by
    :meth:`Connection.next_event` always carries the plain data, that bit
    cleared."""

    seq: int  # the link's sequence (order of application on this connection's session)
    offset: int
    data: bytes
    flags: int = 0
    gseq: int = 0  # the primary's volume-wide sequence number of this write


@dataclass(frozen=True)
class WriteAck:
    seq: int
    status: int = 0  # 0 or an errno


@dataclass(frozen=True)
class Flush:
    seq: int  # barrier: every write with a lower sequence must be durable first
    # The primary's sequence up to which every write is durable on every
    # member in sync: a member keeps the extents of later writes hot (a
    # mirror of the primary's intents) for when the primary is lost.
    in_sync: int = 0
    # A consistency group's mark (0: none): every write of every volume of
    # the group before this point is on its way to the far member before
    # any after it; a far member applies writes only up to a mark that all
    # the group's volumes have received (gmd.groups).
    group_point: int = 0


@dataclass(frozen=True)
class FlushAck:
    seq: int
    status: int = 0


@dataclass(frozen=True)
class Read:
    request: int
    offset: int
    length: int


@dataclass(frozen=True)
class ReadReply:
    request: int
    status: int
    data: bytes = b""


@dataclass(frozen=True)
class HashRequest:
    """xxh3_64 of each ``block``-sized piece of [offset, offset+length)."""

    request: int
    offset: int
    length: int
    block: int


@dataclass(frozen=True)
class HashReply:
    request: int
    status: int
    hashes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Bitmap:
    """A piece of an out-of-sync bitmap: bits [start, start+nbits) as little-endian
    bytes; ``last`` marks the final piece of one transfer."""

    start: int
    nbits: int
    data: bytes
    last: bool = False


@dataclass(frozen=True)
class State:
    """A change of role, disk state, generation or anything else worth telling."""

    fields: dict[str, Any]


@dataclass(frozen=True)
class Ping:
    token: int


@dataclass(frozen=True)
class Pong:
    token: int


Event = Hello | Auth | Intro | Error | Write | WriteAck | Flush | FlushAck | Read | ReadReply | HashRequest | HashReply | Bitmap | State | Ping | Pong


class _Sentinel(Enum):
    NEED_DATA = "need data"
    CLOSED = "closed"


NEED_DATA = _Sentinel.NEED_DATA
CLOSED = _Sentinel.CLOSED

# ------------------------------------------------------------ payload codecs

_WRITE = struct.Struct("<QQIQ")  # link seq, offset, flags, volume seq
_FLUSH = struct.Struct("<QQ")  # link seq, in-sync volume seq
_FLUSH_GROUP = struct.Struct("<QQQ")  # ... and a consistency group's mark
_SEQ_STATUS = struct.Struct("<Qi")
_SEQ = struct.Struct("<Q")
_READ = struct.Struct("<QQI")
_READ_REPLY = struct.Struct("<Qi")
_HASH = struct.Struct("<QQII")
_BITMAP = struct.Struct("<QIB")
_HASH_VALUE = struct.Struct("<Q")


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _encode(event: Event) -> tuple[FrameType, bytes]:
    ftype, parts = _encode_parts(event)
    return ftype, b"".join(parts)


def _encode_parts(event: Event) -> tuple[FrameType, list]:
    """The payload as a list of byte strings, so a large write's data is never
    copied here: it is joined once, with whatever else is queued, at send time."""
    match event:
        case Write():
            return FrameType.WRITE, [_WRITE.pack(event.seq, event.offset, event.flags, event.gseq), event.data]
        case ReadReply():
            return FrameType.READ_REPLY, [_READ_REPLY.pack(event.request, event.status), event.data]
    ftype, payload = _encode_single(event)
    return ftype, [payload]


def _encode_single(event: Event) -> tuple[FrameType, bytes]:
    match event:
        case Hello():
            return FrameType.HELLO, _json({
                "node": event.node, "nonce": event.nonce.hex(),
                "protocol_min": event.protocol_min, "protocol_max": event.protocol_max,
            })
        case Intro():
            return FrameType.INTRO, _json({
                "node": event.node, "volume": event.volume, "size": event.size,
                "region_size": event.region_size, "extent_size": event.extent_size,
                "path": event.path, "session": event.session, "info": event.info,
            })
        case Auth():
            return FrameType.AUTH, bytes(event.mac)
        case Error():
            return FrameType.ERROR, _json({"reason": event.reason})
        case Write():
            return FrameType.WRITE, _WRITE.pack(event.seq, event.offset, event.flags, event.gseq) + event.data
        case WriteAck():
            return FrameType.WRITE_ACK, _SEQ_STATUS.pack(event.seq, event.status)
        case Flush():
            if event.group_point:
                return FrameType.FLUSH, _FLUSH_GROUP.pack(event.seq, event.in_sync, event.group_point)
            return FrameType.FLUSH, _FLUSH.pack(event.seq, event.in_sync)
        case FlushAck():
            return FrameType.FLUSH_ACK, _SEQ_STATUS.pack(event.seq, event.status)
        case Read():
            return FrameType.READ, _READ.pack(event.request, event.offset, event.length)
        case ReadReply():
            return FrameType.READ_REPLY, _READ_REPLY.pack(event.request, event.status) + event.data
        case HashRequest():
            return FrameType.HASH, _HASH.pack(event.request, event.offset, event.length, event.block)
        case HashReply():
            return FrameType.HASH_REPLY, _READ_REPLY.pack(event.request, event.status) + b"".join(
                _HASH_VALUE.pack(h) for h in event.hashes)
        case Bitmap():
            return FrameType.BITMAP, _BITMAP.pack(event.start, event.nbits, 1 if event.last else 0) + event.data
        case State():
            return FrameType.STATE, _json(event.fields)
        case Ping():
            return FrameType.PING, _SEQ.pack(event.token)
        case Pong():
            return FrameType.PONG, _SEQ.pack(event.token)
    raise LocalProtocolError(f"not a protocol event: {event!r}")


def _need(payload: bytes, n: int, what: str) -> None:
    if len(payload) < n:
        raise RemoteProtocolError(f"{what} frame of {len(payload)} bytes is shorter than its {n}-byte header")


def _exact(payload: bytes, n: int, what: str) -> None:
    if len(payload) != n:
        raise RemoteProtocolError(f"{what} frame is {len(payload)} bytes, expected {n}")


def _load_json(payload: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RemoteProtocolError(f"{what} frame is not valid JSON: {e}") from None
    except RecursionError:
        raise RemoteProtocolError(f"{what} frame nests JSON too deeply") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{what} frame is not a JSON object")
    return obj


def _field(obj: dict[str, Any], key: str, typ: type | tuple[type, ...], what: str) -> Any:
    v = obj.get(key)
    if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
        raise RemoteProtocolError(f"{what} field {key!r} is missing or has the wrong type")
    return v


def _decode(ftype: FrameType, payload: bytes, max_payload: int) -> Event:
    match ftype:
        case FrameType.HELLO:
            o = _load_json(payload, "hello")
            # The versions first: a peer of another version is told so, not
            # that some field of ours is missing from its hello.
            ints = {k: _field(o, k, int, "hello") for k in ("protocol_min", "protocol_max")}
            if any(v < 0 for v in ints.values()):
                raise RemoteProtocolError("hello has a negative number")
            try:
                nonce = bytes.fromhex(_field(o, "nonce", str, "hello"))
            except ValueError:
                raise RemoteProtocolError("hello field 'nonce' is not hex") from None
            node = _field(o, "node", str, "hello")
            if not node or len(node) > MAX_NODE_NAME:
                raise RemoteProtocolError(f"hello field 'node' must be 1..{MAX_NODE_NAME} characters")
            return Hello(node=node, nonce=nonce, **ints)
        case FrameType.INTRO:
            o = _load_json(payload, "intro")
            info = o.get("info", {})
            if not isinstance(info, dict):
                raise RemoteProtocolError("intro field 'info' is not an object")
            ints = {k: _field(o, k, int, "intro") for k in ("size", "region_size", "extent_size", "path")}
            if any(v < 0 for v in ints.values()):
                raise RemoteProtocolError("intro has a negative number")
            return Intro(node=_field(o, "node", str, "intro"), volume=_field(o, "volume", str, "intro"),
                         session=_field(o, "session", str, "intro"), info=info, **ints)
        case FrameType.AUTH:
            if not 16 <= len(payload) <= 64:
                raise RemoteProtocolError(f"auth frame of {len(payload)} bytes")
            return Auth(payload)
        case FrameType.ERROR:
            o = _load_json(payload, "error")
            return Error(str(o.get("reason", "no reason given"))[:1000])
        case FrameType.WRITE:
            _need(payload, _WRITE.size, "write")
            seq, offset, flags, gseq = _WRITE.unpack_from(payload)
            unknown = flags & ~WRITE_FLAGS
            if unknown:
                bit = unknown & -unknown
                raise RemoteProtocolError(f"write frame flag {bit:#x} (bit {bit.bit_length() - 1}) is not "
                                          "defined in protocol version 3")
            # A read-only view of the (immutable) payload: the data is not copied again.
            data: bytes | memoryview = memoryview(payload)[_WRITE.size:]
            if flags & WRITE_ZSTD:
                # Bounded as if it had arrived raw: no frame makes us hold more
                # than one payload's worth of decompressed data.
                try:
                    data = decompress(data, max_payload - _WRITE.size)
                except CorruptFrame as e:
                    raise RemoteProtocolError(f"write {seq}: {e}") from None
                flags &= ~WRITE_ZSTD
            return Write(seq, offset, data, flags, gseq)
        case FrameType.WRITE_ACK:
            _exact(payload, _SEQ_STATUS.size, "write ack")
            return WriteAck(*_SEQ_STATUS.unpack(payload))
        case FrameType.FLUSH:
            if len(payload) == _FLUSH_GROUP.size:
                return Flush(*_FLUSH_GROUP.unpack(payload))
            _exact(payload, _FLUSH.size, "flush")
            return Flush(*_FLUSH.unpack(payload))
        case FrameType.FLUSH_ACK:
            _exact(payload, _SEQ_STATUS.size, "flush ack")
            return FlushAck(*_SEQ_STATUS.unpack(payload))
        case FrameType.READ:
            _exact(payload, _READ.size, "read")
            return Read(*_READ.unpack(payload))
        case FrameType.READ_REPLY:
            _need(payload, _READ_REPLY.size, "read reply")
            req, status = _READ_REPLY.unpack_from(payload)
            return ReadReply(req, status, memoryview(payload)[_READ_REPLY.size:])
        case FrameType.HASH:
            _exact(payload, _HASH.size, "hash")
            req, offset, length, block = _HASH.unpack(payload)
            if block == 0:
                raise RemoteProtocolError("hash request with block size 0")
            return HashRequest(req, offset, length, block)
        case FrameType.HASH_REPLY:
            _need(payload, _READ_REPLY.size, "hash reply")
            req, status = _READ_REPLY.unpack_from(payload)
            rest = payload[_READ_REPLY.size:]
            if len(rest) % 8:
                raise RemoteProtocolError("hash reply length is not a whole number of hashes")
            return HashReply(req, status, tuple(h for (h,) in _HASH_VALUE.iter_unpack(rest)))
        case FrameType.BITMAP:
            _need(payload, _BITMAP.size, "bitmap")
            start, nbits, last = _BITMAP.unpack_from(payload)
            data = bytes(payload[_BITMAP.size:])
            if last > 1:
                raise RemoteProtocolError(f"bitmap frame 'last' flag is {last}, not 0 or 1")
            if len(data) != (nbits + 7) // 8:
                raise RemoteProtocolError(f"bitmap frame carries {len(data)} bytes for {nbits} bits")
            return Bitmap(start, nbits, data, bool(last))
        case FrameType.STATE:
            return State(_load_json(payload, "state"))
        case FrameType.PING:
            _exact(payload, _SEQ.size, "ping")
            return Ping(*_SEQ.unpack(payload))
        case FrameType.PONG:
            _exact(payload, _SEQ.size, "pong")
            return Pong(*_SEQ.unpack(payload))
    raise RemoteProtocolError(f"frame type {ftype} has no decoder")  # pragma: no cover


# ------------------------------------------------------------ state machine


class ConnState(Enum):
    HELLO = "hello"  # exchanging hellos
    AUTH = "auth"  # exchanging MACs
    INTRO = "intro"  # authenticated: exchanging volume introductions
    ESTABLISHED = "established"
    CLOSED = "closed"


# Frames whose (large) payload is handed over without a copy: only the data
# carriers, whose decoders take a view of it.
_ZERO_COPY = frozenset({int(FrameType.WRITE), int(FrameType.READ_REPLY)})

_DATA_FRAMES = frozenset({
    FrameType.WRITE, FrameType.WRITE_ACK, FrameType.FLUSH, FrameType.FLUSH_ACK, FrameType.READ,
    FrameType.READ_REPLY, FrameType.HASH, FrameType.HASH_REPLY, FrameType.BITMAP, FrameType.STATE,
    FrameType.PING, FrameType.PONG,
})

_HANDSHAKE_FRAMES = frozenset({FrameType.HELLO, FrameType.AUTH, FrameType.INTRO})

# Which frames may travel in each state (either way). ERROR is allowed in all
# states but CLOSED; HELLO, AUTH and INTRO may each be sent and received once.
ALLOWED: dict[ConnState, frozenset[FrameType]] = {
    ConnState.HELLO: frozenset({FrameType.HELLO, FrameType.ERROR}),
    ConnState.AUTH: frozenset({FrameType.AUTH, FrameType.ERROR}),
    ConnState.INTRO: frozenset({FrameType.INTRO, FrameType.ERROR}),
    ConnState.ESTABLISHED: _DATA_FRAMES | {FrameType.ERROR},
    ConnState.CLOSED: frozenset(),
}


class Connection:
    """Protocol state of one connection (one path), both directions."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD):
        self.max_payload = max_payload
        self._buf = bytearray()
        self._eof = False
        self.sent: set[FrameType] = set()
        self.received: set[FrameType] = set()
        self.state = ConnState.HELLO
        self.closed_reason: str | None = None
        self.last_frame = b""  # raw bytes of the last frame received (auth transcript)

    # -- transitions

    def _advance(self) -> None:
        if self.state is ConnState.HELLO and {FrameType.HELLO} <= self.sent & self.received:
            self.state = ConnState.AUTH
        if self.state is ConnState.AUTH and {FrameType.AUTH} <= self.sent & self.received:
            self.state = ConnState.INTRO
        if self.state is ConnState.INTRO and {FrameType.INTRO} <= self.sent & self.received:
            self.state = ConnState.ESTABLISHED

    def _check(self, ftype: FrameType, direction: set[FrameType], error: type[ProtocolError], verb: str) -> None:
        if ftype not in ALLOWED[self.state]:
            raise error(f"{ftype.name} frame {verb} in state {self.state.value}")
        if ftype in _HANDSHAKE_FRAMES and ftype in direction:
            raise error(f"second {ftype.name} frame {verb}")
        if ftype is FrameType.AUTH and FrameType.HELLO not in direction:
            raise error(f"AUTH frame {verb} before HELLO")
        if ftype is FrameType.INTRO and FrameType.AUTH not in direction:
            raise error(f"INTRO frame {verb} before authentication")
        if ftype in _DATA_FRAMES and FrameType.INTRO not in direction:
            raise error(f"{ftype.name} frame {verb} before INTRO")

    @property
    def authenticated(self) -> bool:
        """True once both sides' AUTH frames have passed (the MACs themselves
        are checked by the caller, :mod:`transport.link`, before it goes on)."""
        return self.state in (ConnState.INTRO, ConnState.ESTABLISHED)

    @property
    def frame_bound(self) -> int:
        """The largest payload accepted now: a few KiB until authenticated."""
        return self.max_payload if self.authenticated else min(self.max_payload, PREAUTH_MAX_PAYLOAD)

    # -- sending

    def send(self, event: Event) -> bytes:
        """The bytes of ``event``; raises LocalProtocolError if not allowed now or
        if the peer would have to refuse it."""
        return b"".join(self.send_parts(event))

    def send_parts(self, event: Event) -> list:
        """Like :meth:`send`, but the frame as a list of byte strings (header
        first) that are sent in order; a write's data is not copied."""
        ftype, parts, length = _encode_checked(event)
        bound = self.max_payload if ftype not in (FrameType.HELLO, FrameType.AUTH) else self.frame_bound
        if length > bound:
            raise LocalProtocolError(f"{ftype.name} payload of {length} bytes exceeds {bound}")
        self._check(ftype, self.sent, LocalProtocolError, "sent")
        self.sent.add(ftype)
        self._advance()
        if ftype is FrameType.ERROR:
            self.state = ConnState.CLOSED
            self.closed_reason = f"we closed: {event.reason}"  # type: ignore[union-attr]
        return _frame_parts(ftype, parts, length)

    def send_write_instead(self, write: Write) -> list:
        """The frame of ``write`` in place of a write already sent (admitted
        by :meth:`send_parts`, not yet on the wire) with the same sequence: the
        same write compressed by the link just before it goes out. No state
        changes; LocalProtocolError if it is not such a write or not allowed."""
        if not isinstance(write, Write) or FrameType.WRITE not in self.sent:
            raise LocalProtocolError("send_write_instead replaces a WRITE already sent")
        ftype, parts, length = _encode_checked(write)
        if length > self.max_payload:
            raise LocalProtocolError(f"WRITE payload of {length} bytes exceeds {self.max_payload}")
        return _frame_parts(ftype, parts, length)

    # -- receiving

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side.
        Bytes arriving after the connection closed are dropped unbuffered."""
        if self.state is ConnState.CLOSED:
            return
        if self._eof and data:
            raise RemoteProtocolError("data after end of stream")
        if not data:
            self._eof = True
        else:
            self._buf += data

    def frame_remainder(self) -> tuple[int, int] | None:
        """When the buffered bytes are the start of one large data frame (a
        write or read reply of at least :data:`LARGE_FRAME` bytes) and nothing
        more: (frame size, bytes still missing), so the caller can receive the
        rest straight into one buffer (see :meth:`receive_frame`). Else None."""
        if len(self._buf) < HEADER_SIZE or self.state is ConnState.CLOSED:
            return None
        magic, ftype_raw, _flags, length, _checksum = HEADER.unpack_from(self._buf)
        total = HEADER_SIZE + length
        if (magic != MAGIC or ftype_raw not in _ZERO_COPY or length < LARGE_FRAME
                or length > self.frame_bound or len(self._buf) >= total):
            return None  # anything odd is left to next_event to judge
        return total, total - len(self._buf)

    def start_frame(self, total: int) -> bytearray:
        """A buffer of ``total`` bytes holding what is buffered so far (the
        start of the frame :meth:`frame_remainder` described)."""
        frame = bytearray(total)
        frame[:len(self._buf)] = self._buf
        return frame

    def receive_frame(self, frame: bytearray, got: int) -> None:
        """Feed the frame buffer from :meth:`start_frame` once ``got`` bytes of
        it are filled (all of it, or less at end of stream)."""
        # Cut short, the part that arrived is copied (views of the frame buffer
        # may outlive a cancelled receive, so it cannot be shrunk in place).
        self._buf = frame if got == len(frame) else frame[:got]

    def next_event(self) -> Event | _Sentinel:
        """The next complete event, NEED_DATA, or CLOSED (after EOF or ERROR).

        After a :class:`RemoteProtocolError` the connection is CLOSED: nothing
        that follows a bad frame is ever delivered."""
        if self.state is ConnState.CLOSED:
            return CLOSED
        try:
            return self._next_event()
        except RemoteProtocolError as e:
            self.state = ConnState.CLOSED
            self.closed_reason = f"protocol error: {e}"
            raise

    def _next_event(self) -> Event | _Sentinel:
        if len(self._buf) < HEADER_SIZE:
            return self._at_end(partial=bool(self._buf))
        magic, ftype_raw, flags, length, checksum = HEADER.unpack_from(self._buf)
        if magic != MAGIC:
            raise RemoteProtocolError(f"bad frame magic {bytes(magic)!r}")
        try:
            ftype = FrameType(ftype_raw)
        except ValueError:
            raise RemoteProtocolError(f"unknown frame type {ftype_raw}") from None
        if flags:
            raise RemoteProtocolError(f"frame flags {flags:#x} not defined in protocol version 3")
        bound = self.frame_bound
        if length > bound:
            what = "before authentication " if bound < self.max_payload else ""
            raise RemoteProtocolError(f"{ftype.name} frame length {length} exceeds the bound {bound} {what}".rstrip())
        if len(self._buf) < HEADER_SIZE + length:
            return self._at_end(partial=True)
        payload: bytes | memoryview
        if len(self._buf) == HEADER_SIZE + length and ftype_raw in _ZERO_COPY and length >= LARGE_FRAME:
            # The buffer is exactly this frame (see frame_remainder): hand it
            # over as the payload instead of copying it, and start a new one.
            frame, self._buf = self._buf, bytearray()
            payload = memoryview(frame)[HEADER_SIZE:]
            head8 = bytes(frame[:8])
        else:
            with memoryview(self._buf) as mv:  # one copy of the payload, no more
                payload = bytes(mv[HEADER_SIZE:HEADER_SIZE + length])
                head8 = bytes(mv[:8])
        if _checksum(head8, payload) != checksum:
            raise RemoteProtocolError(f"{ftype.name} frame checksum mismatch")
        if ftype in (FrameType.HELLO, FrameType.AUTH):
            self.last_frame = head8 + bytes(self._buf[8:HEADER_SIZE]) + payload
        if not isinstance(payload, memoryview):
            del self._buf[:HEADER_SIZE + length]
        self._check(ftype, self.received, RemoteProtocolError, "received")
        event = _decode(ftype, payload, self.max_payload)
        self.received.add(ftype)
        self._advance()
        if isinstance(event, Error):
            self.state = ConnState.CLOSED
            self.closed_reason = f"peer closed: {event.reason}"
        return event

    def _at_end(self, *, partial: bool) -> _Sentinel:
        if not self._eof:
            return NEED_DATA
        if partial:
            raise RemoteProtocolError("connection closed in the middle of a frame")
        self.state = ConnState.CLOSED
        self.closed_reason = self.closed_reason or "peer closed the connection"
        return CLOSED


_U64 = 1 << 64


def _validate(event: Event) -> None:
    """Refuse, on our side, what the peer's decoder would refuse (our own bug
    must not surface as the peer's protocol error)."""
    def bad(why: str) -> None:
        raise LocalProtocolError(f"{type(event).__name__}: {why}")

    match event:
        case Hello():
            for name in ("protocol_min", "protocol_max"):
                v = getattr(event, name)
                if not isinstance(v, int) or isinstance(v, bool):
                    bad(f"{name} is not an integer")
                if v < 0:
                    bad(f"{name} is negative")
            if not isinstance(event.node, str):
                bad("node is not a string")
            if not 1 <= len(event.node) <= MAX_NODE_NAME:
                bad(f"node must be 1..{MAX_NODE_NAME} characters")
            if not isinstance(event.nonce, (bytes, bytearray)):
                bad("nonce is not bytes")
        case Intro():
            for name in ("size", "region_size", "extent_size", "path"):
                v = getattr(event, name)
                if not isinstance(v, int) or isinstance(v, bool):
                    bad(f"{name} is not an integer")
                if v < 0:
                    bad(f"{name} is negative")
            for name in ("node", "volume", "session"):
                if not isinstance(getattr(event, name), str):
                    bad(f"{name} is not a string")
            if not isinstance(event.info, dict):
                bad("info is not a dict")
        case State():
            if not isinstance(event.fields, dict):
                bad("fields is not a dict")
        case Error():
            if not isinstance(event.reason, str):
                bad("reason is not a string")
        case Auth():
            if not 16 <= len(event.mac) <= 64:
                bad(f"MAC of {len(event.mac)} bytes (16..64 allowed)")
        case Bitmap():
            if len(event.data) != (event.nbits + 7) // 8:
                bad(f"{len(event.data)} bytes for {event.nbits} bits")
        case HashRequest():
            if event.block <= 0:
                bad("block size must be positive")
        case Write():
            if not isinstance(event.flags, int) or event.flags & ~WRITE_FLAGS or event.flags < 0:
                bad(f"flags {event.flags!r} outside the defined bits {WRITE_FLAGS:#x}")
            if event.flags & WRITE_ZSTD and not event.data[:4] == b"\x28\xb5\x2f\xfd":
                bad("WRITE_ZSTD set but the data is not a zstd frame")
    for name in ("seq", "offset", "request", "token", "start", "gseq", "in_sync", "group_point"):
        v = getattr(event, name, None)
        if v is not None and not 0 <= v < _U64:
            bad(f"{name} {v} outside 0..2**64-1")


def _encode_checked(event: Event) -> tuple[FrameType, list, int]:
    """(frame type, payload parts, payload length) of an event our side may
    send; LocalProtocolError for one the peer would refuse."""
    try:
        _validate(event)
        ftype, parts = _encode_parts(event)
    except (struct.error, OverflowError, TypeError, ValueError, AttributeError) as e:
        raise LocalProtocolError(f"cannot encode {type(event).__name__}: {e}") from None
    return ftype, parts, sum(len(p) for p in parts)


def _frame_parts(ftype: FrameType, parts: list, length: int) -> list:
    """Header (with the checksum over it and every part) followed by the parts."""
    head8 = struct.pack("<2sBBI", MAGIC, int(ftype), 0, length)
    h = xxhash.xxh3_64()
    h.update(head8)
    for p in parts:
        h.update(p)
    return [head8 + struct.pack("<Q", h.intdigest()), *parts]


def _checksum(header8: bytes, payload: bytes) -> int:
    h = xxhash.xxh3_64()
    h.update(header8)
    h.update(payload)
    return h.intdigest()


def frame_bytes(ftype: FrameType, payload: bytes) -> bytes:
    """One complete frame (header + payload); no state checks (tests use it)."""
    head8 = struct.pack("<2sBBI", MAGIC, int(ftype), 0, len(payload))
    return head8 + struct.pack("<Q", _checksum(head8, payload)) + payload
