"""Typed peer messages: what a STATE frame and an intro's info may say.

The codec frames STATE payloads and the intro's ``info`` as JSON objects; this
module says which keys each message may hold, of which type, and turns them
into frozen structs (``msgspec``: strict types, unknown keys refused, the
offending path named in the error). A misspelt key or a value of the wrong
type is a :class:`~transport.codec.RemoteProtocolError` naming it, and the
link is closed with that reason: nothing a peer says is silently ignored or
half-understood. Sans-IO, like the codec.

Messages:

* :class:`IntroInfo` - a member's (or witness's) state in its INTRO;
* :class:`PeerState` - a STATE between members (role, disk, generation...);
* :class:`WitnessRequest` / :class:`WitnessReply` - STATE to and from a witness.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from .codec import RemoteProtocolError

# The values statemap.states uses (this package does not import it; a unit
# test keeps the two lists equal).
RoleName = Literal["primary", "secondary"]
DiskName = Literal["uptodate", "outdated", "copying", "merging", "inconsistent", "failed", "unknown"]
WitnessOp = Literal["renew", "promote", "query", "release", "status"]


class _Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    def to_fields(self) -> dict[str, Any]:
        """The JSON object this message travels as (defaults left out)."""
        return msgspec.to_builtins(self)


class GenerationInfo(_Message):
    """A member's generation history (see quorum.generations)."""

    current: str
    history: tuple[str, ...] = ()
    bitmap_for: dict[str, str] = {}


class MarkedSummary(_Message):
    """What a member marked for a peer: how many regions, and where (when few)."""

    count: int
    runs: list[tuple[int, int]] | None = None


class IntroInfo(_Message):
    """The sender's state of the volume, in its intro (after authentication)."""

    role: RoleName | None = None
    disk: DiskName | None = None
    # Absent (a witness, a poke) or an object, never null: the engines read
    # its fields whenever it is there.
    generation: GenerationInfo | msgspec.UnsetType = msgspec.UNSET
    marked: dict[str, MarkedSummary] = {}  # per peer: what we wrote that it lacks (gmd resolve plans)
    discard_local: str | None = None  # the peer we yield to in a split-brain resolution
    promoted_at: float | None = None
    identity: str | None = None  # which life of the volume the data belongs to
    awaiting_full_copy: bool = False  # a copy target (gmd clean)
    poke: bool = False  # only to say "dial me now"
    witness: bool = False  # the sender is a witness
    refused: str | None = None  # the server refuses this connection, for this reason
    # {primary: sequence}: how far the sender's disk holds that primary's
    # writes in order, from their last session (the primary replays from there).
    resume: Annotated[dict[str, Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]], msgspec.Meta(max_length=16)] = {}


Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # bytes or regions: never negative, fits 64 bits
MAX_CATCH_UP_RUNS = 10_000  # region runs a catch-up question lists at most (more: it gives the byte count only)


class CatchUp(_Message):
    """The primary's question before a catch-up pass: the pass overwrites
    ``bytes`` of whole regions (``runs`` of regions (first, count) when they
    are few enough to list); can the member's undo log hold their old contents?"""

    id: Count
    bytes: Count
    runs: Annotated[list[tuple[Count, Count]], msgspec.Meta(max_length=MAX_CATCH_UP_RUNS)] | None = None


class CatchUpAnswer(_Message):
    """The member's answer to :class:`CatchUp`. ``ok``: the pass may copy.
    ``undo_log``: it has one; ``preserving``: its disk holds a consistent image
    that the log keeps through the pass. ``needed`` and ``capacity`` (bytes
    left in the log) say why it refused; ``consistent_at`` is the wall-clock
    time of the image it can return to."""

    id: Count
    ok: bool
    undo_log: bool = False
    preserving: bool = False
    needed: Count = 0
    capacity: Count = 0
    consistent_at: float | None = None
    reason: str | None = None


class TestFailoverNote(_Message):
    """A member's word on a test failover running on it (docs/DESIGN.md,
    "Test failover"): wall-clock times of its start and of the image."""

    active: bool
    started_at: float | None = None
    consistent_at: float | None = None
    ended_reason: str | None = None


class PeerState(_Message):
    """A STATE between members: a change of role, a judgement of the receiver's
    disk, a generation to adopt, a take-over request or its failure, the
    catch-up question and its answer, a test failover on the sender."""

    role: RoleName | None = None
    your_disk: DiskName | None = None  # the primary's judgement of the receiver's disk
    disk: DiskName | None = None  # the sender's own disk
    generation: str | None = None
    identity: str | None = None
    take_over: bool = False
    take_over_failed: str | None = None
    catch_up: CatchUp | None = None
    catch_up_answer: CatchUpAnswer | None = None
    test_failover: TestFailoverNote | None = None  # the sender's test failover began or ended


class WitnessRequest(_Message):
    """A member's claim (or question) to a witness."""

    id: int
    op: WitnessOp
    volume: str
    identity: str | None = None
    current: str | None = None
    history: tuple[str, ...] = ()
    outdated: tuple[str, ...] = ()


class WitnessRecord(_Message):
    """One registration a witness holds (its status answer)."""

    volume: str
    identity: str | None = None
    generation: str = ""
    parent: str = ""
    outdated: tuple[str, ...] = ()
    primary: str | None = None
    lease: str | None = None


class WitnessReply(_Message):
    """A witness's answer to one request."""

    id: int | None
    granted: bool
    reason: str
    votes: int = 0
    notes: tuple[str, ...] = ()
    superseded: bool = False
    records: tuple[WitnessRecord, ...] = ()


def intro_problem(info: Any, what: str) -> str | None:
    """Why an intro's ``info`` cannot be believed (an undeclared key, a wrong
    type), or None: the refusal reason a handshake gives."""
    try:
        decode(IntroInfo, info, what)
    except RemoteProtocolError as e:
        return str(e)
    return None


def decode(kind: type[_Message], fields: Any, what: str) -> Any:
    """``fields`` (a decoded JSON object) as a ``kind``; RemoteProtocolError
    naming ``what`` and the offending key or type otherwise."""
    try:
        return msgspec.convert(fields, kind, strict=True)
    except msgspec.ValidationError as e:
        raise RemoteProtocolError(f"{what}: {e}") from None
