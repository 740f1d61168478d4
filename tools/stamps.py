"""Stamped blocks and the check that every acknowledged write survived.

The disaster-recovery drill's verifying workload writes *stamped* 4 KiB
blocks: each says which run, writer and sequence number wrote it, where it
belongs and when it was written, and ends in a checksum. After a fault the
drill reads the new primary's volume back and compares what it finds with
the journal of acknowledged writes (:class:`Ack`): :func:`verify`.

Pure logic: no I/O but the ``read_block`` callable handed to :func:`verify`,
and no ``gmd`` imports at all.

Block layout (little-endian, :data:`BLOCK` bytes)::

    0    8  magic        b"GMDSTAMP"
    8    8  run          random tag of one drill run
    16   2  version      1
    18   2  reserved     0
    20   4  writer       u32
    24   8  seq          u64, per writer, from 1
    32   8  offset       u64, the block's byte offset in the volume
    40   8  when_ns      u64, wall-clock time of the write
    48 4040 filler       xxh3_128(run, writer, seq) repeated
    4088 8  checksum     xxh3_64 of bytes 0..4088
"""

from __future__ import annotations

import struct
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import xxhash

BLOCK = 4096
MAGIC = b"GMDSTAMP"
VERSION = 1
RUN_LEN = 8

_HEADER = struct.Struct("<8s8sHHIQQQ")
_SUM = struct.Struct("<Q")
_BODY = BLOCK - _SUM.size
_FILLER = _BODY - _HEADER.size
_SEED = struct.Struct("<8sIQ")
_EXAMPLES = 10


class Stamp(NamedTuple):
    """What a stamped block says about the write that left it."""

    run: bytes
    writer: int
    seq: int
    offset: int
    when_ns: int


class Ack(NamedTuple):
    """One acknowledged write, as the workload's journal records it.

    ``index`` orders acknowledgements across all writers (strictly
    increasing); ``acked_at`` is the wall-clock time (``time.time()``) at
    which the write was recorded as acknowledged.
    """

    index: int
    writer: int
    seq: int
    offset: int
    acked_at: float
    # How many writes were acknowledged when this one was issued: everything
    # up to that index happened before it. None: not recorded (old journals).
    issued_after: int | None = None


class CorruptStamp(ValueError):
    """A block of this run that cannot be trusted: its checksum fails, or it
    says it belongs somewhere else than where it was read (a misdirected
    write)."""

    def __init__(self, offset: int, reason: str):
        super().__init__(f"corrupt block at offset {offset}: {reason}")
        self.offset = offset
        self.reason = reason


def _filler(run: bytes, writer: int, seq: int) -> bytes:
    # A 16-byte digest repeated: distinct for every (run, writer, seq) and
    # cheap (well under a microsecond), so stamping never limits a writer.
    digest = xxhash.xxh3_128_digest(_SEED.pack(run, writer, seq))
    return (digest * (_FILLER // 16 + 1))[:_FILLER]


def stamp(run: bytes, writer: int, seq: int, offset: int, when_ns: int) -> bytes:
    """The 4 KiB block that ``writer``'s write number ``seq`` of run ``run``
    puts at byte ``offset``, written at ``when_ns`` (wall clock, ns)."""
    if len(run) != RUN_LEN:
        raise ValueError(f"a run tag is {RUN_LEN} bytes, not {len(run)}")
    body = _HEADER.pack(MAGIC, run, VERSION, 0, writer, seq, offset, when_ns) + _filler(run, writer, seq)
    return body + _SUM.pack(xxhash.xxh3_64_intdigest(body))


def parse(block: bytes, run: bytes, offset: int) -> Stamp | None:
    """The stamp of run ``run`` in ``block``, read at byte ``offset``.

    ``None`` when the block holds no stamp of this run (zeros, other data,
    or a block an earlier run left). Raises :class:`CorruptStamp` when the
    block is of this run but its checksum fails, its version is unknown, or
    it was written for another offset.
    """
    if len(block) != BLOCK:
        raise ValueError(f"a block is {BLOCK} bytes, not {len(block)}")
    view = memoryview(block)
    if view[:8] != MAGIC or view[8:16] != run:
        return None
    (want,) = _SUM.unpack_from(view, _BODY)
    if xxhash.xxh3_64_intdigest(view[:_BODY]) != want:
        raise CorruptStamp(offset, "checksum mismatch")
    _, _, version, _, writer, seq, where, when_ns = _HEADER.unpack_from(view)
    if version != VERSION:
        raise CorruptStamp(offset, f"unknown stamp version {version}")
    if where != offset:
        raise CorruptStamp(offset, f"misdirected: the block was written for offset {where}")
    return Stamp(bytes(run), writer, seq, where, when_ns)


@dataclass(frozen=True)
class Problem:
    """One offset whose content is not what the acknowledged writes promise
    (or, with outcome ``newer``, a newer write nobody recorded as issued)."""

    offset: int
    outcome: str
    expected_writer: int
    expected_seq: int
    found: str


@dataclass
class Verification:
    """What :func:`verify` found, offset by offset and as a prefix.

    Per offset with acknowledged writes: ``ok`` (the latest acknowledged
    write is there), ``newer`` (a later write that was issued but never
    acknowledged; allowed), ``stale`` (an older write or nothing: an
    acknowledged write is lost), ``corrupt``. ``newer_unrecorded`` counts the
    ``newer`` ones that were not in the ``in_flight`` record either.

    The prefix analysis is for asynchronous copies: every ack with index up
    to ``prefix_index`` is reflected; ``lost_writes`` acks after it are not
    (``lost_bytes`` of data); the first of them was acknowledged
    ``lost_age`` seconds before the fault. ``is_prefix`` says the image is
    what a copy that keeps write order may hold: no offset holds a write
    issued after an acknowledgement the image lacks. Where the acks record
    when each write was issued (``Ack.issued_after``) that is exact, with
    ``slack`` 0: a write may complete long after it took its place in the
    order (it waited for a thread, a commit), so its acknowledgement's index
    says little. Without it, a write ranks by its acknowledgement, and
    ``slack`` acknowledgements may come out of order.
    """

    blocks_checked: int = 0
    acked_writes: int = 0
    ok: int = 0
    newer: int = 0
    newer_unrecorded: int = 0
    stale: int = 0
    corrupt: int = 0
    prefix_index: int = 0
    lost_writes: int = 0
    lost_age: float = 0.0
    is_prefix: bool = True
    slack: int = 0
    examples: list[Problem] = field(default_factory=list)

    @property
    def lost_bytes(self) -> int:
        """The data the lost acknowledged writes carried."""
        return self.lost_writes * BLOCK

    def passed(self, rpo_zero: bool) -> bool:
        """Whether the image keeps the promise: with ``rpo_zero`` (sync
        replication) every acknowledged write is there; otherwise (async)
        the image is an uncorrupted prefix of the acknowledged writes."""
        if self.corrupt:
            return False
        return self.stale == 0 if rpo_zero else self.is_prefix

    def as_dict(self) -> dict:
        """The verification as JSON-ready data (snake_case keys)."""
        d = asdict(self)
        d["lost_bytes"] = self.lost_bytes
        return d


def _describe(s: Stamp) -> str:
    return f"writer {s.writer} seq {s.seq}"


def verify(
    acks: Iterable[Ack],
    read_block: Callable[[int], bytes],
    run: bytes,
    *,
    in_flight: Mapping[int, Iterable[tuple[int, int]]] = {},
    fault_at: float | None = None,
    slack: int | None = None,
) -> Verification:
    """Check a device image against the acknowledged writes of run ``run``.

    ``read_block(offset)`` returns the :data:`BLOCK` bytes at ``offset`` of
    the device checked; it is called once for every offset that has acks.
    ``in_flight`` maps offsets to the (writer, seq) writes issued there but
    never acknowledged. ``fault_at`` is the wall-clock time of the fault
    (``lost_age`` is measured up to it; without it, up to the last ack).
    ``slack`` is how many acknowledgements may arrive out of write order,
    by default the number of writers (each has one write outstanding).

    Raises ``ValueError`` if the acks contradict the workload's rules (an
    offset written by two writers, a writer's acks out of sequence order,
    an index repeated).
    """
    ordered = sorted(acks, key=lambda a: a.index)
    v = Verification(acked_writes=len(ordered))
    per_offset: dict[int, list[Ack]] = {}
    writer_seqs: dict[int, list[int]] = {}
    writer_index: dict[int, list[int]] = {}
    last_index = None
    for a in ordered:
        if a.index == last_index:
            raise ValueError(f"ack index {a.index} appears twice")
        last_index = a.index
        there = per_offset.setdefault(a.offset, [])
        if there and there[0].writer != a.writer:
            raise ValueError(f"offset {a.offset} was written by writers {there[0].writer} and {a.writer}")
        there.append(a)
        seqs = writer_seqs.setdefault(a.writer, [])
        if seqs and a.seq <= seqs[-1]:
            raise ValueError(f"writer {a.writer}'s acks are not in sequence order (seq {a.seq} after {seqs[-1]})")
        seqs.append(a.seq)
        writer_index.setdefault(a.writer, []).append(a.index)
    issued = {(off, w, s) for off, ws in in_flight.items() for w, s in ws}
    writers = set(writer_seqs) | {w for _, w, _ in issued}
    causal = bool(ordered) and all(a.issued_after is not None for a in ordered)
    v.slack = (0 if causal else len(writers)) if slack is None else slack

    def issued_after(writer: int, seq: int) -> int:
        # The index of the writer's last ack before ``seq``: an unacknowledged
        # write was issued right after it, so it ranks just behind it.
        seqs = writer_seqs.get(writer, [])
        i = bisect_left(seqs, seq)
        return writer_index[writer][i - 1] if i else 0

    first_missing = None   # the lowest index of an ack whose effect is absent
    latest_found = 0       # the highest (effective) ack index any offset holds
    for offset in sorted(per_offset):
        there = per_offset[offset]
        want = there[-1]
        found_seq = 0
        problem = None
        try:
            st = parse(read_block(offset), run, offset)
        except CorruptStamp as e:
            v.corrupt += 1
            problem = ("corrupt", e.reason)
        else:
            if st is None:
                v.stale += 1
                problem = ("stale", "no stamp of this run")
            elif st.writer != want.writer:
                v.corrupt += 1
                problem = ("corrupt", f"{_describe(st)}, which does not own this block")
            else:
                found_seq = st.seq
                seqs = [a.seq for a in there] if len(there) > 1 else [want.seq]
                pos = bisect_left(seqs, st.seq)
                if pos < len(seqs) and seqs[pos] == st.seq:
                    rank = there[pos].issued_after if causal else there[pos].index
                else:
                    # Unacknowledged: issued no earlier than its writer's last ack before it.
                    rank = issued_after(st.writer, st.seq) + (0 if causal else 1)
                latest_found = max(latest_found, rank)
                if st.seq == want.seq:
                    v.ok += 1
                elif st.seq > want.seq:
                    v.newer += 1
                    if (offset, st.writer, st.seq) not in issued:
                        v.newer_unrecorded += 1
                        problem = ("newer", f"{_describe(st)}, not recorded as in flight")
                else:
                    v.stale += 1
                    problem = ("stale", f"older {_describe(st)}")
        if problem and len(v.examples) < _EXAMPLES:
            v.examples.append(Problem(offset, problem[0], want.writer, want.seq, problem[1]))
        # The acks reflected here are those up to the seq found (a writer's
        # acks at one offset come in seq order); the rest are missing.
        missing = [a for a in there if a.seq > found_seq] if found_seq else there
        if missing:
            v.lost_writes += len(missing)
            if first_missing is None or missing[0].index < first_missing:
                first_missing = missing[0].index
    v.blocks_checked = len(per_offset)

    if ordered:
        if first_missing is None:
            v.prefix_index = ordered[-1].index
        else:
            pos = bisect_left([a.index for a in ordered], first_missing)
            v.prefix_index = ordered[pos - 1].index if pos else 0
            end = fault_at if fault_at is not None else ordered[-1].acked_at
            # An ack made after the fault (on the new primary) and lost since
            # has no age before the fault: 0, not a negative number.
            v.lost_age = max(0.0, end - ordered[pos].acked_at)
    v.is_prefix = latest_found <= v.prefix_index + v.slack
    return v
