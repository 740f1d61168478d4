"""Synchronous writers to a volume file overlap in the engine.

Without FOPEN_PARALLEL_DIRECT_WRITES in the reply to OPEN the kernel takes the
inode lock exclusively for every direct write to a FUSE file, so threads that
each do one ``pwrite`` reach the daemon one at a time. gmd sets the flag when
pyfuse3 can send it (the build ``./quickstart`` makes, see ``patches/``).

The primary (``labor1``) and an ``mwc`` member (``labor2``) are daemon
subprocesses; labor1 reaches labor2 through a WAN proxy with a delay, so every
write waits in the engine for the member's acknowledgement. While
:data:`WRITERS` threads are blocked in one O_DIRECT ``pwrite`` each (distinct
offsets), the test reads the engine's count of writes in flight from the
daemon's status: overlapping writers show there as more than one. The delay
only widens the window in which they are all blocked; nothing is timed.
"""

from __future__ import annotations

import mmap
import os
import shutil
import threading

import pytest
import trio

from gmd import fuse as gmd_fuse
from transport.wanproxy import WanProxy

from .harness import NodeSpec, daemon_processes, free_ports, init_in_sync, write_config

WRITERS = 4
BLOCK = 4096
DELAY = 1.0  # seconds, one way: a write waits at least 2 s for labor2's ack (PATH_TIMEOUT is 6 s)
DEADLINE = 60.0  # seconds for the overlap to show (it shows within a round trip) or every writer to return


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (FUSE mounts)"
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        return "needs /dev/fuse and fusermount3"
    if not gmd_fuse.PARALLEL_DIRECT_WRITES:
        return ("stock pyfuse3 cannot send FOPEN_PARALLEL_DIRECT_WRITES (./quickstart builds the patched one): "
                "synchronous writers to a volume file are serialized by the kernel")
    if tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit()) < (6, 2):
        return "Linux older than 6.2 ignores FOPEN_PARALLEL_DIRECT_WRITES"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def _pattern(i: int) -> mmap.mmap:
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
    buf.write(bytes([0x41 + i]) * BLOCK)
    return buf


def _write_one(device: str, i: int, errors: list[BaseException]) -> None:
    """One synchronous O_DIRECT write of block ``i * 16`` (distinct, not adjacent)."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_DIRECT)
        try:
            assert os.pwrite(fd, _pattern(i), i * 16 * BLOCK) == BLOCK
        finally:
            os.close(fd)
    except BaseException as e:  # reported by the test, not lost in the thread
        errors.append(e)


def _read_block(device: str, i: int) -> bytes:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.pread(fd, BLOCK, i * 16 * BLOCK)
    finally:
        os.close(fd)


async def test_synchronous_direct_writes_overlap_in_the_engine(tmp_path):
    listen = free_ports(1)
    labor2 = NodeSpec("labor2", mode="mwc", listen=listen)  # labor2 listens here ...
    labor2.address = free_ports(1)  # ... and labor1 dials it here, the proxy
    cfg = write_config(tmp_path, [NodeSpec("labor1"), labor2], mode="mwc")
    init_in_sync(cfg, "labor1", ["labor2"])
    proxy = WanProxy(("127.0.0.1", listen[0]), ("127.0.0.1", labor2.address[0]))
    async with trio.open_nursery() as pn:
        await pn.start(proxy.serve)
        try:
            with daemon_processes(cfg, ["labor1", "labor2"], tmp_path) as procs:
                p1 = procs["labor1"]
                # Requests from threads: the proxy runs on this trio loop.
                for p in procs.values():
                    await trio.to_thread.run_sync(lambda p=p: p.request(op="up", volume="appslv"))

                async def in_flight() -> int:
                    return (await trio.to_thread.run_sync(p1.status))["io"]["in_flight"]

                with trio.fail_after(30):
                    while (await trio.to_thread.run_sync(p1.status))["members"]["labor2"]["link"] != "connected":
                        await trio.sleep(0.05)
                device = (await trio.to_thread.run_sync(
                    lambda: p1.request(op="primary", volume="appslv")))["device"]
                assert "parallel direct writes on" in p1.log_path.read_text(errors="replace")
                proxy.update(delay=DELAY)
                try:
                    errors: list[BaseException] = []
                    writers = [threading.Thread(target=_write_one, args=(device, i, errors), daemon=True)
                               for i in range(WRITERS)]
                    for t in writers:
                        t.start()
                    most = 0
                    with trio.move_on_after(DEADLINE):
                        while most < 2 and any(t.is_alive() for t in writers):
                            most = max(most, await in_flight())
                            await trio.sleep(0.02)
                    still_blocked = sum(t.is_alive() for t in writers)
                    proxy.update(delay=0)
                    for t in writers:
                        await trio.to_thread.run_sync(t.join, 30)
                    assert not errors, errors
                    assert most >= 2, (
                        f"at most {most} write(s) in flight in the engine while {WRITERS} synchronous writers "
                        f"were blocked (still blocked at the end: {still_blocked}): the kernel serialized them")
                    for i in range(WRITERS):
                        data = await trio.to_thread.run_sync(_read_block, device, i)
                        assert data == bytes([0x41 + i]) * BLOCK, f"block of writer {i} reads back wrong"
                finally:
                    proxy.update(delay=0)
        finally:
            pn.cancel_scope.cancel()
