"""The drill's verifying workload: writer threads stamping blocks of a volume
and a journal of every write that was acknowledged.

``gmd drill`` starts a :class:`Workload` on the primary's volume file,
injects a fault, :meth:`Workload.retarget` s it to the new primary's file
and checks the result with :func:`tools.stamps.verify`. The journal lets a
report be rebuilt later (:func:`load_journal`, :func:`load_in_flight`).

Imports no ``gmd`` module.

Concurrency rules (one lock, ``Workload._cond``):

- A writer decides to issue a write (seq, offset) and registers it as
  *pending* under the lock, so :meth:`pause` sees every write it must wait
  for; the pwrite itself runs outside the lock.
- An acknowledgement takes the next global index, appends its journal line
  and enters the in-memory list under the lock, so the journal's order is
  the index order.
- A pwrite cannot be interrupted from Python: a writer blocked in the
  kernel (a suspended FUSE daemon) stays blocked until the kernel returns.
  :meth:`pause` and :meth:`stop` therefore take timeouts and report the
  writers still blocked; the threads are not daemon threads, so a caller
  must end the fault (resume the daemon, or abort the FUSE connection)
  before the process can exit.

Journal format (text, one record a line, appended with ``O_APPEND``)::

    # gmd workload journal v1 run=<16 hex> writers=<n> area=<offset>+<length>
    a <index> <writer> <seq> <offset> <acked_at>
    f <writer> <seq> <offset> <reason>

``a`` lines are acknowledged writes in index order (``acked_at`` is
``time.time()`` written with ``repr``, so it reads back exactly); ``f``
lines are writes issued but never acknowledged (the errno name, or
``SHORT_WRITE``). A write still blocked in the kernel gets its line when
it returns. No line is fsynced: a torn last line is ignored when reading
back.
"""

from __future__ import annotations

import errno as errno_mod
import mmap
import os
import random
import threading
import time
from bisect import bisect_right
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from tools.stamps import BLOCK, Ack, stamp

PROBE_WRITER = 0xFFFF
JOURNAL_HEADER = "# gmd workload journal v1"
DEVICE_SPAN = 1 << 40  # where each device of a multi-device workload starts in its address space


class Pending(NamedTuple):
    """A write issued and not yet returned: its writer is in the pwrite (or
    the fsync) since ``since`` (wall clock)."""

    writer: int
    seq: int
    offset: int
    since: float


def _errno_name(e: OSError) -> str:
    return errno_mod.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else type(e).__name__


class ShortWrite(OSError):
    """A pwrite that wrote less than a block: the write is not acknowledged."""


def _open_flags(direct: bool) -> int:
    return os.O_RDWR | (os.O_DIRECT if direct else 0)


class Workload:
    """``writers`` threads writing stamped blocks into ``area`` of ``path``.

    ``area`` is (offset, length), both multiples of :data:`BLOCK`. Writer
    ``w`` owns the area's blocks whose index % ``writers`` == ``w`` and
    writes them in a random order seeded from ``seed``. With ``direct`` the
    file is opened ``O_DIRECT`` (a write is acknowledged when pwrite
    returns); without, each pwrite is followed by an fsync. ``journal`` is a
    local file, truncated at :meth:`start`. ``run`` (8 bytes) tags every
    block of this run; a random one by default.

    ``path`` may also be a list of paths (the volumes of a consistency
    group): the same area of each, one address space in which device ``i``
    starts at ``i * DEVICE_SPAN`` (the offsets in acks and stamps are these
    *logical* offsets; :func:`device_of` maps one back). Every writer writes
    to all of them, so one order runs across the devices.
    """

    def __init__(self, path: str | Path | list[str | Path], *, area: tuple[int, int], writers: int = 4, direct: bool = True,
                 journal: str | Path, run: bytes | None = None, seed: int | None = None):
        offset, length = area
        if offset % BLOCK or length % BLOCK or offset < 0 or length <= 0:
            raise ValueError(f"the area ({offset}, {length}) must be whole {BLOCK}-byte blocks")
        if not 1 <= writers < PROBE_WRITER:
            raise ValueError(f"writers must be between 1 and {PROBE_WRITER - 1}, not {writers}")
        if length // BLOCK < writers:
            raise ValueError(f"an area of {length // BLOCK} blocks cannot give each of {writers} writers one")
        self.paths = [str(p) for p in path] if isinstance(path, (list, tuple)) else [str(path)]
        if not self.paths:
            raise ValueError("no device to write to")
        self.path = self.paths[0]
        self.area = (offset, length)
        self.writers = writers
        self.direct = direct
        self.journal = Path(journal)
        self.run = os.urandom(8) if run is None else bytes(run)
        if len(self.run) != 8:
            raise ValueError("a run tag is 8 bytes")
        self.seed = random.randrange(2**63) if seed is None else seed
        self._errors: Counter[str] = Counter()
        self._cond = threading.Condition()
        self._acks: list[Ack] = []
        self._acked_at: list[float] = []
        self._failed: dict[int, list[tuple[int, int]]] = {}
        self._pending: dict[int, Pending] = {}
        self._waiting: set[int] = set()
        self._generation = 0
        self._paused = False
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._alive = 0
        self._journal_fd: int | None = None

    # --- lifecycle ---

    def start(self) -> None:
        """Open (truncate) the journal and start the writer threads."""
        with self._cond:
            if self._threads:
                raise RuntimeError("the workload was started already")
            self._journal_fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
            off, length = self.area
            os.write(self._journal_fd, (f"{JOURNAL_HEADER} run={self.run.hex()} writers={self.writers} "
                                        f"area={off}+{length}\n").encode())
            self._threads = [threading.Thread(target=self._writer, args=(w,), name=f"workload-writer-{w}")
                             for w in range(self.writers)]
            self._alive = len(self._threads)
        for t in self._threads:
            t.start()

    def stop(self, timeout: float | None = None) -> list[Pending]:
        """Stop issuing writes and join the writers; the writes still blocked
        in the kernel after ``timeout`` seconds (none when every thread was
        joined). Those threads end, and record their write, when the kernel
        returns; the journal stays open until the last one has."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._cond:
            blocked = list(self._pending.values())
            if self._alive == 0:
                self._close_journal()
            return blocked

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc) -> None:
        # No timeout: leaving the block with a writer still in the kernel
        # would leak its thread; end the fault first (see the module doc).
        self.stop()

    def retarget(self, path: str | Path) -> None:
        """Move every writer to ``path``: each closes its file and opens the
        new one before its next write (a writer blocked in a write does so
        when that write returns). Writers waiting after a failure go on."""
        with self._cond:
            self.path = str(path)
            self._generation += 1
            self._cond.notify_all()

    def pause(self, timeout: float | None = None) -> list[Pending]:
        """Issue no new write, and wait up to ``timeout`` seconds for those
        issued to return; the writes still blocked (empty: the device is
        quiet and the acks and :attr:`in_flight` are final until
        :meth:`resume`)."""
        with self._cond:
            self._paused = True
            self._cond.wait_for(lambda: not self._pending, timeout)
            return list(self._pending.values())

    def resume(self) -> None:
        """Let the writers issue writes again after :meth:`pause`."""
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    # --- what happened ---

    def acked(self) -> int:
        """How many writes were acknowledged since :meth:`start`."""
        with self._cond:
            return len(self._acks)

    def wait_acked(self, n: int, timeout: float, *, since: int = 0) -> bool:
        """Wait until ``n`` writes were acknowledged after the first ``since``
        (a count :meth:`acked` returned earlier); False if ``timeout``
        seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._acks) - since >= n, timeout)

    def acks(self) -> list[Ack]:
        """The acknowledged writes so far, in index order."""
        with self._cond:
            return list(self._acks)

    def first_ack_after(self, t: float) -> float | None:
        """The ``acked_at`` (wall clock) of the first ack after wall-clock
        time ``t``, or None: after a fault, when writes went on again.
        (A binary search: ``acked_at`` is read under the lock that assigns
        the index, so it rises with it unless the wall clock steps back.)"""
        with self._cond:
            i = bisect_right(self._acked_at, t)
            return self._acked_at[i] if i < len(self._acked_at) else None

    @property
    def in_flight(self) -> dict[int, list[tuple[int, int]]]:
        """offset -> [(writer, seq)] of the writes issued and never
        acknowledged: those that failed, and those still pending."""
        with self._cond:
            out = {off: list(ws) for off, ws in self._failed.items()}
            for p in self._pending.values():
                out.setdefault(p.offset, []).append((p.writer, p.seq))
            return out

    @property
    def errors(self) -> dict[str, int]:
        """Failures by errno name: a write's (``ENOTCONN``, ``EIO``,
        ``SHORT_WRITE``...), or an ``open:`` or ``close:`` one."""
        with self._cond:
            return dict(self._errors)

    def pending(self) -> list[Pending]:
        """The writes issued and not yet returned."""
        with self._cond:
            return list(self._pending.values())

    def waiting(self) -> list[int]:
        """The writers with no usable file (their write or their open
        failed), waiting for :meth:`retarget`."""
        with self._cond:
            return sorted(self._waiting)

    def wait_waiting(self, timeout: float, n: int | None = None) -> bool:
        """Wait until at least ``n`` writers (all by default) wait for
        :meth:`retarget` after a failure: the fault has reached them all.
        False if ``timeout`` seconds passed first."""
        want = self.writers if n is None else n
        with self._cond:
            return self._cond.wait_for(lambda: len(self._waiting) >= want, timeout)

    # --- the writers ---

    def _journal(self, line: str) -> None:
        # Under the lock. Local disk, one small write: cheap enough to keep
        # the journal's order the index order.
        if self._journal_fd is not None:
            os.write(self._journal_fd, line.encode())

    def _close_journal(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None

    def _writer(self, w: int) -> None:
        rng = random.Random(f"{self.seed}/{w}")
        base = self.area[0] + w * BLOCK
        owned = (self.area[1] // BLOCK - w + self.writers - 1) // self.writers
        stride = self.writers * BLOCK
        flags = _open_flags(self.direct)
        buf = mmap.mmap(-1, BLOCK) if self.direct else None  # page-aligned, as O_DIRECT needs
        fd: int | None = None
        others: list[int] = []  # the other devices' files, when there are several
        generation = -1
        seq = 0
        try:
            while True:
                with self._cond:
                    reopen = False
                    while True:
                        if self._stopping:
                            return
                        if self._paused:
                            self._cond.wait()
                        elif generation != self._generation:
                            reopen = True
                            generation, path = self._generation, self.path
                            break
                        elif fd is None:
                            self._cond.wait()  # failed: wait for retarget() or stop()
                        else:
                            break
                    if not reopen:
                        seq += 1
                        offset = base + rng.randrange(owned) * stride
                        if len(self.paths) > 1:
                            offset += rng.randrange(len(self.paths)) * DEVICE_SPAN
                        self._pending[w] = Pending(w, seq, offset, time.time())
                        issued_after = len(self._acks)  # what it may depend on (tools.stamps.verify)
                if reopen:
                    for extra in others:
                        self._close(extra)
                    others = []
                    if fd is not None:
                        self._close(fd)
                    fd = self._open(w, path, flags)
                    if fd is not None and len(self.paths) > 1:
                        others = [self._open(w, p, flags) for p in self.paths[1:]]
                        if None in others:
                            for extra in others:
                                if extra is not None:
                                    self._close(extra)
                            others = []
                            self._close(fd)
                            fd = None
                    continue
                block = stamp(self.run, w, seq, offset, time.time_ns())
                device, at = device_of(offset)
                try:
                    _write_block(fd if device == 0 else others[device - 1], buf, block, at)
                except OSError as e:
                    reason = "SHORT_WRITE" if isinstance(e, ShortWrite) else _errno_name(e)
                    with self._cond:
                        del self._pending[w]
                        self._failed.setdefault(offset, []).append((w, seq))
                        self._errors[reason] += 1
                        self._journal(f"f {w} {seq} {offset} {reason}\n")
                        self._waiting.add(w)
                        self._cond.notify_all()
                    self._close(fd)
                    fd = None
                    continue
                with self._cond:
                    del self._pending[w]
                    acked_at = time.time()
                    ack = Ack(len(self._acks) + 1, w, seq, offset, acked_at, issued_after)
                    self._journal(f"a {ack.index} {w} {seq} {offset} {acked_at!r} {issued_after}\n")
                    self._acks.append(ack)
                    self._acked_at.append(acked_at)
                    self._cond.notify_all()
        finally:
            for extra in others:
                self._close(extra)
            if fd is not None:
                self._close(fd)
            if buf is not None:
                buf.close()
            with self._cond:
                lost = self._pending.pop(w, None)
                if lost is not None:  # an unexpected error escaped the write
                    self._failed.setdefault(lost.offset, []).append((w, lost.seq))
                    self._journal(f"f {w} {lost.seq} {lost.offset} CRASHED\n")
                self._alive -= 1
                if self._stopping and self._alive == 0:
                    self._close_journal()
                self._cond.notify_all()

    def _open(self, w: int, path: str, flags: int) -> int | None:
        # Outside the lock: opening a file in a hung FUSE mount may block.
        try:
            fd = os.open(path, flags)
        except OSError as e:
            with self._cond:
                self._errors[f"open:{_errno_name(e)}"] += 1
                self._waiting.add(w)
                self._cond.notify_all()
            return None
        with self._cond:
            self._waiting.discard(w)
        return fd

    def _close(self, fd: int) -> None:
        # Closing a file in a dead FUSE mount fails too; the fd is gone anyway.
        try:
            os.close(fd)
        except OSError as e:
            with self._cond:
                self._errors[f"close:{_errno_name(e)}"] += 1


def device_of(offset: int) -> tuple[int, int]:
    """(device index, offset in it) of a logical offset (see :class:`Workload`)."""
    return offset // DEVICE_SPAN, offset % DEVICE_SPAN


def _write_block(fd: int, buf: mmap.mmap | None, block: bytes, offset: int) -> None:
    """Write one stamped block: through the aligned ``buf`` on an O_DIRECT
    file (acknowledged when pwrite returns), else followed by an fsync.
    Raises :class:`ShortWrite` for a partial write."""
    if buf is not None:
        buf[:] = block
        n = os.pwrite(fd, buf, offset)
    else:
        n = os.pwrite(fd, block, offset)
        if n == BLOCK:
            os.fsync(fd)
    if n != BLOCK:
        raise ShortWrite(errno_mod.EIO, f"short write: {n} of {BLOCK} bytes")


def probe(path: str | Path, offset: int, *, run: bytes = b"gmdprobe", seq: int = 1, direct: bool = True) -> float:
    """Write one stamped block (writer :data:`PROBE_WRITER`) at ``offset``
    of ``path`` and return the wall-clock time it completed: the drill
    probes the new primary until a write succeeds, for the RTO. Raises the
    ``OSError`` of a failed open or write. ``offset`` should lie outside
    the workload's area (the verification does not expect it)."""
    fd = os.open(path, _open_flags(direct))
    try:
        block = stamp(run, PROBE_WRITER, seq, offset, time.time_ns())
        if direct:
            with mmap.mmap(-1, BLOCK) as buf:
                _write_block(fd, buf, block, offset)
        else:
            _write_block(fd, None, block, offset)
        return time.time()
    finally:
        os.close(fd)


def _records(path: str | Path):
    # Every complete line; the last one only if it ends in a newline (it
    # may be torn: the journal is never fsynced).
    with open(path, "rb") as f:
        data = f.read()
    for raw in data.split(b"\n")[:-1]:
        line = raw.decode("utf-8", "replace")
        if line and not line.startswith("#"):
            yield line.split()


def load_journal(path: str | Path) -> list[Ack]:
    """The acknowledged writes a workload journal records, in index order."""
    acks = []
    for f in _records(path):
        if f[0] == "a" and len(f) in (6, 7):  # 6: before issued_after was recorded
            acks.append(Ack(int(f[1]), int(f[2]), int(f[3]), int(f[4]), float(f[5]),
                            int(f[6]) if len(f) == 7 else None))
    return acks


def load_in_flight(path: str | Path) -> dict[int, list[tuple[int, int]]]:
    """offset -> [(writer, seq)] of the writes a journal records as issued
    and failed: the ``in_flight`` argument of :func:`tools.stamps.verify`."""
    out: dict[int, list[tuple[int, int]]] = {}
    for f in _records(path):
        if f[0] == "f" and len(f) == 5:
            out.setdefault(int(f[3]), []).append((int(f[1]), int(f[2])))
    return out


def journal_run(path: str | Path) -> bytes | None:
    """The run tag a journal's header names (None without a header)."""
    with open(path, "rb") as f:
        first = f.readline().decode("utf-8", "replace")
    if first.startswith(JOURNAL_HEADER):
        for word in first.split():
            if word.startswith("run="):
                return bytes.fromhex(word[4:])
    return None
