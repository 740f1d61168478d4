"""End to end: the volume file in a real FUSE mount, a real loop device, real ext4.

Both node daemons are subprocesses (the test does blocking file I/O on the
mount, so it must not be the process serving it). Everything made here is
removed in fixtures' ``finally`` blocks: loop devices detached, file systems
and FUSE mounts unmounted, daemons stopped by PID.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest

from gmd import admin
from gmd.config import load_config

from ..integration.harness import NodeSpec, backing, daemon_processes, file_hash, init_in_sync, write_config

MiB = 1 << 20


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (FUSE mounts, loop devices, mount)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount", "fusermount3"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def run(*cmd, check=True):
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True, text=True)


@contextmanager
def loop_device(path: Path):
    dev = run("losetup", "--find", "--show", path).stdout.strip()
    try:
        yield dev
    finally:
        run("losetup", "-d", dev, check=False)


@contextmanager
def mounted(dev: str, where: Path):
    where.mkdir(parents=True, exist_ok=True)
    run("mount", dev, where)
    try:
        yield where
    finally:
        run("umount", where, check=False)


def request(proc, **req):
    return proc.request(**req)


@pytest.fixture
def cluster(tmp_path):
    cfg = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")], mode="mwc", size="256MiB")
    init_in_sync(cfg, "labor1", ["labor2"])
    with daemon_processes(cfg, ["labor1", "labor2"], tmp_path) as procs:
        for p in procs.values():
            p.request(op="up", volume="appslv")
        _wait(lambda: procs["labor1"].status()["members"]["labor2"]["link"] == "connected")
        procs["labor1"].request(op="primary", volume="appslv")
        device = Path(procs["labor1"].status()["device"])
        _wait(device.exists)
        yield tmp_path, procs, device
        # Teardown by daemon_processes: SIGTERM unmounts and closes the maps.


def _wait(pred, timeout=30.0):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def test_ext4_on_a_loop_device_over_an_mwc_volume_is_mirrored_byte_for_byte(cluster):
    tmp, procs, device = cluster
    assert device.stat().st_size == 256 * MiB
    rng = random.Random(4)
    files = {}
    with loop_device(device) as dev:
        run("mkfs.ext4", "-q", "-F", dev)
        with mounted(dev, tmp / "fs") as fs:
            for d in range(5):
                (fs / f"dir{d}").mkdir()
                for f in range(20):
                    data = rng.randbytes(rng.choice([100, 4096, 70_000, 1_000_000]))
                    p = fs / f"dir{d}" / f"file{f}"
                    p.write_bytes(data)
                    files[p.relative_to(fs)] = zlib.crc32(data)
            run("sync")
        # Remount and read everything back through the mirror.
        with mounted(dev, tmp / "fs") as fs:
            for rel, crc in files.items():
                assert zlib.crc32((fs / rel).read_bytes()) == crc
    fd = os.open(device, os.O_RDWR)
    try:
        os.fsync(fd)  # a barrier on every member
    finally:
        os.close(fd)
    assert file_hash(backing(tmp, "labor1")) == file_hash(backing(tmp, "labor2"))
    st = procs["labor1"].status()
    assert st["members"]["labor2"]["disk"] == "uptodate" and st["members"]["labor2"]["out_of_sync_bytes"] == 0


def test_concurrent_random_writes_verify_like_fio(cluster):
    """fio --verify=crc32c, in Python: 8 threads of 4 KiB and 1 MiB writes, each
    block stamped with its offset, generation and a CRC, then all read back."""
    tmp, procs, device = cluster
    size = 256 * MiB
    stripes = 8
    stripe = size // stripes
    last: dict[int, bytes] = {}
    lock = threading.Lock()
    errors = []

    def block(offset, length, gen):
        rnd = random.Random(offset * 1000 + gen).randbytes(length - 16)
        head = offset.to_bytes(8, "little") + gen.to_bytes(4, "little")
        return head + zlib.crc32(head + rnd).to_bytes(4, "little") + rnd

    def worker(i):
        try:
            fd = os.open(device, os.O_RDWR)
            rng = random.Random(i)
            try:
                for gen in range(150):
                    length = rng.choice([4096, 4096, 4096, MiB])
                    offset = i * stripe + rng.randrange(0, (stripe - length) // 4096) * 4096
                    data = block(offset, length, gen)
                    assert os.pwrite(fd, data, offset) == length
                    with lock:
                        for b in range(offset, offset + length, 4096):
                            last[b] = data[b - offset:b - offset + 4096]
                os.fsync(fd)
            finally:
                os.close(fd)
        except Exception as e:  # reported below, with the thread's number
            errors.append((i, e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(stripes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    fd = os.open(device, os.O_RDONLY)
    try:
        wrong = [b for b, want in last.items() if os.pread(fd, 4096, b) != want]
    finally:
        os.close(fd)
    assert not wrong, f"{len(wrong)} of {len(last)} blocks read back wrong"
    # The member holds the same blocks.
    with open(backing(tmp, "labor2"), "rb") as f:
        for b in random.Random(1).sample(sorted(last), 500):
            f.seek(b)
            assert f.read(4096) == last[b]


def test_bounds_and_size_changes(cluster):
    tmp, procs, device = cluster
    fd = os.open(device, os.O_RDWR)
    try:
        assert os.pread(fd, 4096, 256 * MiB) == b""
        assert os.pread(fd, 4096, 256 * MiB + 12345) == b""
        assert len(os.pread(fd, 8192, 256 * MiB - 4096)) == 4096  # short read at the end, like a file
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x" * 4096, 256 * MiB)
        assert e.value.errno in (errno.ENOSPC, errno.EINVAL, errno.EFBIG)
        with pytest.raises(OSError) as e:
            os.ftruncate(fd, 128 * MiB)
        assert e.value.errno == errno.EPERM
    finally:
        os.close(fd)
    for bad in (lambda: (device.parent / "new").write_bytes(b"x"), device.unlink,
                lambda: device.rename(device.parent / "other")):
        with pytest.raises(OSError) as e:
            bad()
        assert e.value.errno == errno.EPERM
    assert device.stat().st_size == 256 * MiB


def test_the_file_goes_away_on_demotion_and_old_handles_get_eio(cluster):
    tmp, procs, device = cluster
    fd = os.open(device, os.O_RDWR)
    try:
        os.pwrite(fd, b"a" * 4096, 0)
        with pytest.raises(RuntimeError, match="device in use.*open handle"):
            procs["labor1"].request(op="secondary", volume="appslv")
        assert procs["labor1"].status()["role"] == "primary"  # refused: nothing changed
        os.pwrite(fd, b"b" * 4096, 0)
        procs["labor1"].request(op="secondary", volume="appslv", force=True)
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"b" * 4096, 0)
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, 0)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    _wait(lambda: not device.exists())
    assert procs["labor1"].status()["device"] is None


def test_killed_daemon_leaves_no_stale_mount_and_a_map_marked_for_recovery(cluster):
    tmp, procs, device = cluster
    stop = threading.Event()
    failures = []

    def writer():
        try:
            fd = os.open(device, os.O_RDWR)
        except OSError as e:
            failures.append(e)
            return
        i = 0
        try:
            while not stop.is_set():
                os.pwrite(fd, os.urandom(65536), (i % 1000) * 65536)
                i += 1
        except OSError as e:
            failures.append(e)  # the daemon died under it: ENOTCONN or EIO
        finally:
            try:
                os.close(fd)
            except OSError:
                pass  # closing a file of a dead FUSE mount fails too

    t = threading.Thread(target=writer)
    t.start()
    _wait(lambda: procs["labor1"].status()["io"]["writes"] > 50)
    procs["labor1"].kill()  # SIGKILL: no unmount, no clean flag
    stop.set()
    t.join(timeout=30)
    assert failures and failures[0].errno in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED)

    cfg = load_config(tmp / "gmd.toml")
    st = admin.offline_status(cfg, "labor1", "appslv")
    assert st["state_map"]["clean"] is False and st["state_map"]["recovery_needed"] is True

    procs["labor1"].start()  # the new daemon removes the dead mount and mounts again
    mount = device.parent
    os.stat(mount)  # a stale FUSE mount would fail with ENOTCONN
    assert "stale gmd mount" in procs["labor1"].log()
    with open("/proc/self/mounts") as f:
        assert sum(1 for line in f if line.split()[1] == os.path.realpath(mount)) == 1
    procs["labor1"].request(op="up", volume="appslv")
    assert "unclean stop" in procs["labor1"].log()


def test_up_with_loop_attaches_a_loop_device_while_primary(tmp_path):
    cfg = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")], mode="sync", size="64MiB")
    init_in_sync(cfg, "labor1", ["labor2"])
    with daemon_processes(cfg, ["labor1", "labor2"], tmp_path) as procs:
        procs["labor2"].request(op="up", volume="appslv")
        procs["labor1"].request(op="up", volume="appslv", loop=True)
        _wait(lambda: procs["labor1"].status()["members"]["labor2"]["link"] == "connected")
        reply = procs["labor1"].request(op="primary", volume="appslv")
        dev = reply["loop"]
        try:
            assert dev and dev.startswith("/dev/loop") and procs["labor1"].status()["loop"] == dev
            listing = run("losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE").stdout
            assert any(line.split()[0] == dev and line.split()[1] == reply["device"] for line in listing.splitlines())
            data = os.urandom(1 * MiB)
            fd = os.open(dev, os.O_RDWR)
            try:
                os.pwrite(fd, data, 8 * MiB)
                os.fsync(fd)
            finally:
                os.close(fd)
            for node in ("labor1", "labor2"):
                with open(backing(tmp_path, node), "rb") as f:
                    f.seek(8 * MiB)
                    assert f.read(MiB) == data
            run("mkfs.ext4", "-q", "-F", dev)
            with mounted(dev, tmp_path / "fs") as fs:
                with pytest.raises(RuntimeError, match=f"{dev} mounted on {fs}"):
                    procs["labor1"].request(op="down", volume="appslv")
                assert procs["labor1"].status()["loop"] == dev  # refused: still attached
            procs["labor1"].request(op="down", volume="appslv")
            listing = run("losetup", "--list", "--noheadings", "--output", "NAME").stdout.split()
            assert dev not in listing
        finally:
            run("losetup", "-d", dev, check=False) if dev else None


def test_gmd_demo_runs_end_to_end_and_leaves_nothing_behind():
    import sys

    before_loops = run("losetup", "-a").stdout
    p = subprocess.run([str(Path(sys.executable).parent / "gmd"), "demo"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "byte-identical" in p.stdout and "every file reads back intact" in p.stdout
    workdir = next(line.split()[-1] for line in p.stdout.splitlines() if "working directory" in line)
    assert not Path(workdir).exists()
    assert run("losetup", "-a").stdout == before_loops
    with open("/proc/self/mounts") as f:
        assert workdir not in f.read()


@pytest.mark.parametrize("mode,merge", [("mwc", "mini"), ("sync", "merge")])
def test_primary_killed_under_load_is_merged_on_restart(tmp_path, mode, merge):
    """(e) mwc merges only the hot extents; (f) sync, with no intent log, merges
    the whole volume (hash-compared). Reads issued while the merge runs return
    what both members hold afterwards. At the end the members are identical."""
    # A slow merge (the rate limit counts compared bytes), so the reads below
    # run while it is under way; lifted once they are done.
    cfg = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")], mode=mode, size="128MiB",
                       extra_volume='copy_rate = "4MiB"')
    init_in_sync(cfg, "labor1", ["labor2"])
    with daemon_processes(cfg, ["labor1", "labor2"], tmp_path) as procs:
        for p in procs.values():
            p.request(op="up", volume="appslv")
        _wait(lambda: procs["labor1"].status()["members"]["labor2"]["link"] == "connected")
        device = Path(procs["labor1"].request(op="primary", volume="appslv")["device"])
        stop = threading.Event()

        def writer():
            try:
                fd = os.open(device, os.O_RDWR)
            except OSError:
                return
            rng = random.Random(3)
            try:
                while not stop.is_set():
                    os.pwrite(fd, os.urandom(65536), rng.randrange(0, 128 * 16) * 65536)
            except OSError:
                pass  # the primary died under it
            finally:
                try:
                    os.close(fd)
                except OSError:
                    pass

        threads = [threading.Thread(target=writer) for _ in range(4)]
        for t in threads:
            t.start()
        _wait(lambda: procs["labor1"].status()["io"]["writes"] > 300)
        procs["labor1"].kill()
        stop.set()
        for t in threads:
            t.join(timeout=30)
        procs["labor1"].start()
        procs["labor1"].request(op="up", volume="appslv")
        _wait(lambda: procs["labor1"].status()["members"]["labor2"]["link"] == "connected")
        procs["labor1"].request(op="primary", volume="appslv")
        # Reads during the merge: a region still marked is merged before the
        # read returns, so the member holds the same bytes the moment it does.
        fd = os.open(device, os.O_RDONLY)
        try:
            with open(backing(tmp_path, "labor2"), "rb") as member:
                for offset in range(0, 128 * MiB, MiB):
                    data = os.pread(fd, MiB, offset)
                    member.seek(offset)
                    assert member.read(MiB) == data, f"member differs at {offset} after a read during the merge"
        finally:
            os.close(fd)
        member_state = procs["labor1"].status()["members"]["labor2"]
        # The reads did run during the merge: it is still under way.
        assert member_state["disk"] != "uptodate" and (member_state["copy"] or {}).get("kind") == merge, member_state
        procs["labor1"].request(op="resync", volume="appslv", rate=0)
        _wait(lambda: procs["labor1"].status()["members"]["labor2"]["disk"] == "uptodate", timeout=120)
        log = procs["labor1"].log()
        assert f"{merge} pass to labor2 done" in log
        if mode == "sync":
            assert "full merge to every member" in log and "merge pass to labor2 done: 134217728 bytes compared" in log
        else:
            assert "marked for a mini-merge" in log and "full merge" not in log
        fd = os.open(device, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))
