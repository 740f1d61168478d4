"""The persisted states of a member, with the values operators see in status."""

from enum import StrEnum


class Role(StrEnum):
    """Whether this member's node accepts writes for the volume."""

    PRIMARY = "primary"
    SECONDARY = "secondary"


class DiskState(StrEnum):
    """How far a member's data can be trusted (DRBD's disk states, HAGEO's names)."""

    UPTODATE = "uptodate"  # holds the newest data
    OUTDATED = "outdated"  # consistent but behind; a bitmap elsewhere says what it misses
    COPYING = "copying"  # full-copy target; current only below its copy fence
    MERGING = "merging"  # after a crash; readable, regions merged on demand
    INCONSISTENT = "inconsistent"  # contents not to be trusted (new, or cleaned)
    FAILED = "failed"  # an I/O error took it out of service
    UNKNOWN = "unknown"  # not connected: nothing known now


class CopyKind(StrEnum):
    """What a per-member fence is driving: a full copy or a full merge."""

    FULL = "full"
    MERGE = "merge"
