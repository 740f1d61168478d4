"""Compression of shipped write data: zstd frames, and when a write is worth it.

Two halves, both without I/O:

* :func:`compress` and :func:`decompress` turn a write's data into one zstd
  frame and back. :func:`decompress` is the receiver's: it refuses, with a
  :class:`CorruptFrame` naming why, anything that is not exactly one frame
  that declares its size, a size above the caller's bound, or bytes that do
  not decode to that size. It never allocates more than the bound, whatever
  the frame claims (zstd's own decoder writes into a buffer of the declared
  size and stops at its end).
* :class:`Compressor` is the sender's policy for one peer: which writes to
  try (at least :data:`MIN_TRY` bytes), whether a result is worth sending (at
  least 1/8 smaller, :func:`worth_sending`), the counters ``gmd status``
  shows, and a back-off that stops trying on a stream of incompressible
  writes for a while (:meth:`Compressor.judge`).

Where compression runs (on the event loop or in a thread) is the link's
choice (:mod:`transport.link`): :meth:`Compressor.inline` says which. The
measurements behind that (level 3 on source text: 64 KiB in 0.26 ms, 1 MiB in
4 ms, 8 MiB in 34 ms; level 9 is five times slower, level 19 eighty times)
are in docs/DESIGN.md, "WAN economy".

Never imports ``gmd``.
"""

from __future__ import annotations

import threading

import zstandard

MIN_LEVEL = 1
MAX_LEVEL = 22  # zstd's levels; 1..3 are the fast ones, 19..22 are for archives
DEFAULT_LEVEL = 3
MIN_TRY = 512  # smaller writes are sent as they are: a zstd frame's own header eats what it could save
# Writes up to this size are compressed on the event loop at levels up to
# INLINE_LEVEL: at most about 1 ms there (measured), less than handing the
# work to a thread and back costs for the small writes that dominate.
INLINE_BYTES = 64 * 1024
INLINE_LEVEL = 6
# After this many incompressible writes in a row, the next ones are sent
# without trying (see Compressor.judge).
BACKOFF_AFTER = 8
BACKOFF_FIRST = 16  # writes skipped after the first failed streak
BACKOFF_MAX = 1024  # at most this many writes skipped between two probes

_local = threading.local()  # one compression context per thread and level: contexts are not thread-safe


class CorruptFrame(ValueError):
    """A compressed payload that must not be used; the message says why."""


def compress(data: bytes | memoryview, level: int) -> bytes:
    """``data`` as one zstd frame at ``level``, its size written in the frame
    header (the receiver requires it). Safe to call from any thread."""
    contexts = getattr(_local, "contexts", None)
    if contexts is None:
        contexts = _local.contexts = {}
    ctx = contexts.get(level)
    if ctx is None:
        ctx = contexts[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return ctx.compress(data)


def decompress(frame: bytes | memoryview, limit: int) -> bytes:
    """The data of one zstd ``frame`` that declares a size of at most
    ``limit`` bytes; :class:`CorruptFrame` for anything else (no size
    declared, too large, corrupt, cut short, bytes after the frame)."""
    frame = bytes(frame)
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as e:
        raise CorruptFrame(f"not a zstd frame ({e})") from None
    size = params.content_size
    if size == zstandard.CONTENTSIZE_UNKNOWN or size == zstandard.CONTENTSIZE_ERROR:
        raise CorruptFrame("zstd frame does not declare its decompressed size")
    if size > limit:
        raise CorruptFrame(f"zstd frame claims {size} decompressed bytes, more than the bound {limit}")
    # The window bounds the decoder's own memory; a frame asking for more than
    # its content needs is not one of ours.
    window = max(1 << 10, 1 << max(0, (limit - 1).bit_length()))
    decoder = zstandard.ZstdDecompressor(max_window_size=window).decompressobj()
    try:
        data = decoder.decompress(frame)
    except zstandard.ZstdError as e:
        raise CorruptFrame(f"corrupt zstd frame: {e}") from None
    if not decoder.eof:
        raise CorruptFrame("zstd frame is cut short")
    if decoder.unused_data:
        raise CorruptFrame(f"{len(decoder.unused_data)} bytes follow the zstd frame")
    if len(data) != size:
        raise CorruptFrame(f"zstd frame decoded to {len(data)} bytes but declares {size}")
    return data


def worth_sending(raw: int, packed: int) -> bool:
    """A compressed result is sent only when it is at least 1/8 smaller than
    the raw data: below that the receiver's decoding costs more than the
    bytes saved, and incompressible data is sent as it is."""
    return packed * 8 <= raw * 7


class Compressor:
    """Whether and how the writes shipped to one peer are compressed, and
    what came of it (over every path of that peer, for its life).

    ``enabled`` and ``level`` may change at run time (a config reload); the
    counters go on. All methods run on the event loop; only :func:`compress`
    itself may run in a thread."""

    def __init__(self, *, enabled: bool = False, level: int = DEFAULT_LEVEL):
        self.enabled = enabled
        self.level = level
        self.compressed_writes = 0  # sent compressed
        self.incompressible_writes = 0  # tried, and sent raw: not 1/8 smaller
        self.untried_writes = 0  # large enough, sent raw untried during a back-off
        self._streak = 0  # incompressible writes in a row
        self._skip = 0  # writes still to send untried
        self._skip_next = BACKOFF_FIRST

    def configure(self, *, enabled: bool, level: int) -> None:
        """New settings (a reload); a back-off in progress ends."""
        self.enabled = enabled
        self.level = level
        self._streak = self._skip = 0
        self._skip_next = BACKOFF_FIRST

    def worth_trying(self, nbytes: int) -> bool:
        """Whether to try compressing a write of ``nbytes`` (counts a write
        skipped by a back-off)."""
        if not self.enabled or nbytes < MIN_TRY:
            return False
        if self._skip:
            self._skip -= 1
            self.untried_writes += 1
            return False
        return True

    def inline(self, nbytes: int) -> bool:
        """Whether compressing ``nbytes`` at the current level is cheap enough
        for the event loop (else a thread does it)."""
        return nbytes <= INLINE_BYTES and self.level <= INLINE_LEVEL

    def judge(self, raw: int, packed: int) -> bool:
        """Record one attempt: True if the ``packed`` result is to be sent
        instead of the ``raw`` bytes.

        Back-off: data that did not compress (encrypted, already compressed)
        usually goes on not compressing, and trying costs CPU for nothing (at
        level 9 about 1 ms per MiB of random data, measured). After
        :data:`BACKOFF_AFTER` failures in a row the next writes are sent
        untried; each probe that fails again doubles the pause, up to
        :data:`BACKOFF_MAX` writes, and one that succeeds ends it. Counted
        in writes, not seconds, so a burst of them and a trickle are treated
        alike, and a return to compressible data is seen within at most
        :data:`BACKOFF_MAX` writes."""
        if worth_sending(raw, packed):
            self.compressed_writes += 1
            self._streak = 0
            self._skip_next = BACKOFF_FIRST
            return True
        self.incompressible_writes += 1
        self._streak += 1
        if self._streak >= BACKOFF_AFTER:
            self._skip = self._skip_next
            self._skip_next = min(BACKOFF_MAX, self._skip_next * 2)
        return False
