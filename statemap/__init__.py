"""The on-disk state map of one volume member.

Superblocks in two checksummed slots, self-checking bitmap pages, the intent (activity) bitmap at extent
granularity, one out-of-sync bitmap per other member at region granularity, the
generation history and the copy/merge fences, with crash-safe updates.

Knows nothing of sockets, FUSE, trio or the ``gmd`` package: all disk access goes
through a small file interface (:class:`statemap.fileio.FileIO` for real files,
:class:`statemap.faultio.FaultIO` for crash tests), and updates are planned in
memory and written by :class:`statemap.statemap.CommitPlan`, so the caller chooses
the thread that does the I/O.
"""

from .errors import GeometryMismatch, StateMapCorrupt, StateMapError, StateMapFull, StateMapVersionError
from .format import FORMAT_VERSION, NO_GENERATION, Fence, Layout, Superblock
from .states import CopyKind, DiskState, Role
from .statemap import BadPage, CommitPlan, Recovery, StateMap, StateMapBusy, ensure_not_in_use

__all__ = [
    "BadPage", "CommitPlan", "CopyKind", "DiskState", "FORMAT_VERSION", "Fence", "GeometryMismatch", "Layout",
    "NO_GENERATION", "Recovery", "Role", "StateMap", "StateMapBusy", "StateMapCorrupt",
    "StateMapError", "StateMapFull", "StateMapVersionError", "Superblock", "ensure_not_in_use",
]
