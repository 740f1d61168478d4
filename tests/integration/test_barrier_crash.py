"""An fsync on the volume file is a barrier: a primary SIGKILLed at a random
moment loses none of what it promised (docs/DESIGN.md, [I1], "What each mode
guarantees", "Barriers").

Two real ``gmd daemon`` processes on loopback, labor1 primary and labor2 its
member, the volume's mode (both members') being the parametrized ``mode``;
labor1 reaches labor2 through a WAN proxy (see ``LINK``). Several writer
processes write 4 KiB blocks with O_DIRECT through the primary's FUSE file,
at random blocks of one region, overwriting each other. Each block is stamped
(writer, sequence, block) and otherwise a deterministic pattern with a CRC, so
a torn, stale or foreign block is recognised. A writer journals on local disk,
per write, its issue time (taken before ``pwrite``) and its completion time
(taken after ``pwrite`` returned); after some writes (1 to 3) it calls
``fsync`` and only once that returned does it journal them as acknowledged
(journal fsynced) before it writes again. At a seeded random moment 0.3-1.5 s
after every writer's first acknowledged write, labor1 is SIGKILLed; labor2 is
promoted with ``gmd primary --force`` (a two-node cluster of one vote each has
no quorum without the lost primary) and the region is read back through
labor2's FUSE file, as a user would see it. ``ROUNDS`` rounds per mode, each
on a fresh cluster.

"A is strictly older than B" means A's ``pwrite`` returned before B's was
issued; then A's ``gseq`` is lower than B's, since a write gets its ``gseq``
before it completes ("The write path", step 6). Two overlapping-in-time
writes to one block are unordered: either may be the newer.

What each mode promises, and what is checked:

* every mode: a member applies the writes it gets in ``gseq`` order (the
  primary queues them in sequence order; the member applies link-sequence
  order; at a session's end writes not yet started are dropped, never
  applied), so labor2's disk is an earlier instant of labor1's: a prefix of
  the write history. Checked: every non-zero block is an intact stamp of a
  write that was issued to that block; and for every write A strictly older
  than some write found on labor2 (A was applied, since a later ``gseq`` was),
  A's block holds A or a write not strictly older than A (never zeros, never
  an older stamp). For one writer this is "a prefix of its sequence".
* ``sync`` and ``mwc``: a barrier returns once every completed write is
  durable on the primary and on every connected ``sync``/``mwc`` member
  ([I1]), and a write completes only with quorum, which here needs labor2
  connected. So RPO 0: checked, for every acknowledged write A, that A's block
  on labor2 holds A or a write not strictly older than A (a later write,
  perhaps never acknowledged, may have replaced it; an older one or zeros may
  not).
* ``async``: an fsync does not wait for async members (the FLUSH is queued
  behind the writes as a marker); losing the primary loses what was still
  queued. Only the prefix property above is promised and checked. The async
  queue (64 MiB) is far larger than a round writes, so the member never falls
  ``behind`` (which would turn shipping into an unordered copy).

``GMD_BARRIER_SEED=N`` (N: the number that begins the seed printed in every
failure) repeats the kill delays and the writers' block choices; the
scheduling at the kill is the machine's.
"""

from __future__ import annotations

import inspect
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tools.procs import die_with_parent
from transport.wanproxy import WanProxy, WanSettings

from .harness import GMD, NodeSpec, daemon_processes, free_ports, init_in_sync, wait_for, write_config

BLOCK = 4096
BLOCKS = 128  # the stamped region: the volume's first 512 KiB (small: writers overwrite each other)
WRITERS = 3
ROUNDS = 3
KILL_AFTER = (0.3, 1.5)  # seconds after every writer's first acknowledged write
# labor1 reaches labor2 through a WAN proxy. For sync/mwc a short delay, so
# writes are in transit when the kill comes (a primary that did not wait for
# the member would be caught). For async a narrow link with a small proxy
# buffer, so labor1's queue to labor2 fills and the kill loses what it holds:
# labor2 is then really behind, and the prefix check bites.
LINK = {"sync": WanSettings(delay=0.005), "mwc": WanSettings(delay=0.005),
        "async": WanSettings(bandwidth=1_000_000)}
PROXY_BUFFER = 256 << 10
SEED = int(os.environ.get("GMD_BARRIER_SEED") or random.SystemRandom().randrange(1 << 32))


def stamp(wid: int, seq: int, block: int) -> bytes:
    """The 4 KiB that write ``seq`` of writer ``wid`` puts at ``block``: a
    header repeated, then a CRC32 of everything before it."""
    import struct
    import zlib
    head = struct.pack("<8sIQI", b"GMDBARR1", wid, seq, block)
    body = (head * (4096 // len(head) + 1))[:4092]
    return body + struct.pack("<I", zlib.crc32(body))


def writer_main(device: str, wid: int, seed: str, blocks: int, journal: str) -> None:
    """One writer process (its source is sent to ``python -c``). Journal lines:
    ``I seq block t`` before a write is issued (``t`` taken before it),
    ``D seq t`` once it returned, ``A seq`` once an fsync after it returned
    (the journal fsynced before the next write), ``E errno`` at the end."""
    import mmap
    import os
    import random
    import time
    rng = random.Random(seed)
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)  # page aligned, as O_DIRECT wants
    j = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    print("writing", flush=True)
    seq = 0
    try:
        while True:
            done = []
            for _ in range(rng.randint(1, 3)):
                seq += 1
                block = rng.randrange(blocks)
                buf[:] = stamp(wid, seq, block)
                t = time.monotonic_ns()
                os.write(j, f"I {seq} {block} {t}\n".encode())
                n = os.pwrite(fd, buf, block * 4096)
                t = time.monotonic_ns()
                if n != 4096:
                    raise OSError(0, f"short write {n}")
                os.write(j, f"D {seq} {t}\n".encode())
                done.append(seq)
            os.fsync(fd)
            os.write(j, "".join(f"A {s}\n" for s in done).encode())
            os.fsync(j)
    except OSError as e:
        os.write(j, f"E {e.errno}\n".encode())
        os.fsync(j)


WRITER_SCRIPT = "\n".join([
    textwrap.dedent(inspect.getsource(stamp)),
    textwrap.dedent(inspect.getsource(writer_main)),
    "import sys",
    "writer_main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5])",
])


@dataclass
class Write:
    wid: int
    seq: int
    block: int
    issued: int  # monotonic ns, before pwrite was called
    done: int | None = None  # monotonic ns, after pwrite returned
    acked: bool = False

    def older_than(self, other: Write) -> bool:
        """Strictly older: this write returned before ``other`` was issued."""
        return self.done is not None and self.done < other.issued

    def __str__(self) -> str:
        state = "acknowledged" if self.acked else "completed" if self.done is not None else "in flight"
        return f"w{self.wid}#{self.seq} ({state})"


def read_journal(path: Path, wid: int) -> dict[tuple[int, int], Write]:
    writes: dict[tuple[int, int], Write] = {}
    for line in path.read_text().splitlines():
        kind, *f = line.split()
        if kind == "I":
            writes[(wid, int(f[0]))] = Write(wid, int(f[0]), int(f[1]), int(f[2]))
        elif kind == "D":
            writes[(wid, int(f[0]))].done = int(f[1])
        elif kind == "A":
            writes[(wid, int(f[0]))].acked = True
    return writes


def identify(piece: bytes, block: int, writes: dict[tuple[int, int], Write]) -> tuple[Write | None, str | None]:
    """(the write whose stamp ``piece`` is, None) or (None, what is wrong); zeros are (None, None)."""
    if piece == bytes(BLOCK):
        return None, None
    import struct
    magic, wid, seq, b = struct.unpack_from("<8sIQI", piece)
    if magic != b"GMDBARR1" or piece != stamp(wid, seq, b):
        return None, "garbage or a torn block"
    if b != block:
        return None, f"the stamp of block {b}"
    if (wid, seq) not in writes:
        return None, f"w{wid}#{seq}, a write never issued"
    return writes[(wid, seq)], None


def violations(found: list[Write | None], required: list[Write]) -> list[str]:
    """For each write in ``required``, its block must hold it or a write not
    strictly older than it."""
    out = []
    for a in required:
        y = found[a.block]
        if y is None:
            out.append(f"block {a.block}: zeros, but {a} must be there (or a later write)")
        elif y.older_than(a):
            out.append(f"block {a.block}: {y}, older than {a}")
    return out


def wait_lines(procs: list[subprocess.Popen], expect: bytes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([p.stdout], [], [], max(left, 0))
        line = p.stdout.readline() if ready else b""
        if not line.startswith(expect):
            raise AssertionError(f"writer pid {p.pid} did not start writing within {timeout} s: {line!r}")


async def one_round(tmp: Path, mode: str, seed: str) -> str:
    """Run one kill-and-promote round; returns a summary line. Raises
    AssertionError naming the seed on any broken promise."""
    rng = random.Random(seed)
    delay = rng.uniform(*KILL_AFTER)
    real, proxied = free_ports(2)  # labor2's port, and where labor1 reaches it (labor1 dials)
    labor1 = NodeSpec("labor1")
    cfg1 = write_config(tmp, [labor1, NodeSpec("labor2", address=[proxied], listen=[real])], mode=mode,
                        name="labor1.toml")
    cfg2 = write_config(tmp, [labor1, NodeSpec("labor2", address=[real])], mode=mode, name="labor2.toml")
    init_in_sync(cfg2, "labor1", ["labor2"])
    proxy = WanProxy(("127.0.0.1", real), ("127.0.0.1", proxied), LINK[mode], buffer_limit=PROXY_BUFFER)
    writers: list[subprocess.Popen] = []
    async with trio.open_nursery() as pn:
        await pn.start(proxy.serve)
        with daemon_processes(cfg1, ["labor1"], tmp) as d1, daemon_processes(cfg2, ["labor2"], tmp) as d2:
            p1, p2 = d1["labor1"], d2["labor2"]
            try:
                for p in (p1, p2):
                    p.request(op="up", volume="appslv")
                await wait_for(lambda: p1.status()["members"]["labor2"]["link"] == "connected", timeout=30,
                               what="labor2 connected")
                device = p1.request(op="primary", volume="appslv")["device"]
                await wait_for(lambda: (m := p1.status()["members"]["labor2"])["disk"] == "uptodate"
                               and m["replication"] == "shipping" and m["out_of_sync_bytes"] == 0, timeout=30,
                               what="labor2 uptodate and shipped to")
                for wid in range(1, WRITERS + 1):
                    writers.append(subprocess.Popen(
                        [sys.executable, "-c", WRITER_SCRIPT, device, str(wid), f"{seed}/w{wid}", str(BLOCKS),
                         str(tmp / f"journal-{wid}")],
                        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent))
                wait_lines(writers, b"writing", 20)
                await wait_for(lambda: all(b"\nA " in (tmp / f"journal-{wid}").read_bytes()
                                           for wid in range(1, WRITERS + 1)), timeout=30,
                               what="every writer's first acknowledged write")
                await trio.sleep(delay)
                for w in writers:
                    assert w.poll() is None, f"seed {seed}: a writer stopped before the kill: {w.returncode}"
                before = p1.status()["members"]["labor2"]
                lag = before["lag_bytes"]
                assert before["replication"] == "shipping" and before["disk"] == "uptodate", (
                    f"seed {seed}: labor2 was not being shipped to in order before the kill: {before}")
                p1.kill(signal.SIGKILL)
                for w in writers:  # their next request fails (ENOTCONN): they journal it and exit
                    await wait_for(lambda w=w: w.poll() is not None, timeout=20,
                                   what=f"writer pid {w.pid} to exit")
                p1.remove_dead_mount()

                await wait_for(lambda: p2.status()["lost_primary"] == "labor1", timeout=30,
                               what="labor2 to see labor1 lost")
                cli = subprocess.run([GMD, "primary", "appslv", "--force", "--config", str(cfg2),
                                      "--node", "labor2"], capture_output=True, text=True, timeout=60)
                assert cli.returncode == 0, f"gmd primary --force on labor2 failed: {cli.stdout}{cli.stderr}"
                st = p2.status()
                assert st["role"] == "primary" and st["device"], st
                fd = os.open(st["device"], os.O_RDONLY)
                try:
                    region = os.pread(fd, BLOCKS * BLOCK, 0)
                finally:
                    os.close(fd)
            finally:
                for w in writers:
                    if w.poll() is None:
                        os.kill(w.pid, signal.SIGKILL)
                        w.wait(timeout=30)
                    w.stdout.close()
            log2 = p2.log()
        pn.cancel_scope.cancel()

    assert len(region) == BLOCKS * BLOCK, f"seed {seed}: short read {len(region)}"
    writes: dict[tuple[int, int], Write] = {}
    for wid in range(1, WRITERS + 1):
        writes.update(read_journal(tmp / f"journal-{wid}", wid))
    acked = [w for w in writes.values() if w.acked]
    found: list[Write | None] = []
    broken: list[str] = []
    for b in range(BLOCKS):
        y, wrong = identify(region[b * BLOCK:(b + 1) * BLOCK], b, writes)
        found.append(y)
        if wrong:
            broken.append(f"block {b}: {wrong}")
    # The prefix: every write strictly older than one labor2 holds was applied there.
    newest = max((y.issued for y in found if y is not None), default=0)
    applied = [a for a in writes.values() if a.done is not None and a.done < newest]
    broken += violations(found, applied)
    lost = violations(found, acked)  # acknowledged writes labor2 lacks
    if mode in ("sync", "mwc"):
        broken += [v for v in lost if v not in broken]
    summary = (f"{mode} seed {seed}: killed {delay:.2f} s in, lag {lag} bytes; {len(writes)} writes issued, "
               f"{len(acked)} acknowledged, {sum(w.done is None for w in writes.values())} in flight; labor2 "
               f"holds {sum(y is not None for y in found)} stamped blocks, so {len(applied)} writes must have "
               f"reached it; acknowledged writes it lacks: {len(lost)}")
    assert not broken, (f"{summary}\n{len(broken)} broken promises (mode {mode}, seed {seed}):\n  "
                        + "\n  ".join(broken[:20]) + f"\nlabor2's log:\n{log2}")
    return summary


@pytest.mark.parametrize("mode", ["sync", "mwc", "async"])
async def test_acknowledged_blocks_survive_a_primary_killed_at_random(tmp_path, mode):
    summaries = []
    for r in range(ROUNDS):
        d = tmp_path / f"round{r}"
        d.mkdir()
        summaries.append(await one_round(d, mode, f"{SEED}-{mode}-{r}"))
    print("\n".join(summaries))
