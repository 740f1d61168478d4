"""Latency histograms cheap enough for every write (docs/DESIGN.md, "Metrics").

A :class:`LatencyHistogram` is plain ints in fixed buckets, observed on the
event loop where a write completes (gmd.writepath) or a member acknowledges
one (gmd.replication): one bisect and two additions per observation, no lock,
no label lookup. :mod:`gmd.metrics` exports them as Prometheus histograms
from its once-a-second snapshot. Imports nothing of gmd.
"""

from __future__ import annotations

from bisect import bisect_left

# Upper bounds in seconds: a local or loopback write takes tens of µs to a
# few ms, a WAN member's ack tens to hundreds of ms, a write waiting for
# quorum seconds. Prometheus buckets are cumulative with "le" (<=) bounds.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LatencyHistogram:
    """Counts of observed durations per bucket, and their sum (seconds)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one duration (in the first bucket whose bound is >= it)."""
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """The buckets as Prometheus shows them: ("le" bound, observations <=
        it), ending with ("+Inf", all of them)."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out
