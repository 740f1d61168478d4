"""The FUSE front: each volume this node is primary for appears as one file,
and the image of a test failover on a secondary as ``<volume>@test``.

One mount per node daemon (pyfuse3 inside the daemon's trio loop). The file
``<mount>/<volume>`` has the volume's exact size; reads and writes go through
the volume engine, so a write that returns has passed the mode's completion
rule (``direct_io``: no kernel page cache, and no writeback cache, between the
application and the engine). ``fsync`` and ``flush`` are barriers on every
member. Nothing may change the file's size or the directory: truncate, create,
unlink, rename and their kin fail with EPERM.

Only errnos cross this edge (:func:`_errnos`). When the node stops being
primary the file disappears, and a handle opened before that gets EIO, never
data from a copy that may be stale.

A test failover's image (docs/DESIGN.md, "Test failover") appears as
``<mount>/<volume>@test`` on the member that runs it, readable and writable,
while the test runs; its reads and writes go to the test image (never to the
member's disk), ``fsync`` promises nothing (a crash discards the image), and
a handle opened before the test ended gets EIO.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pyfuse3
import trio

from .engine import DeviceFront, VolumeEngine
from .errors import errno_for
from .quorum_keeper import NoQuorum
from .testfailover import IMAGE_SUFFIX


log = logging.getLogger(__name__)

BLOCK = 4096
ENTRY_TIMEOUT = 1.0  # files come and go with the role; keep the kernel's memory short
# Without FOPEN_PARALLEL_DIRECT_WRITES in the open reply the kernel lets one
# direct write per file through at a time, so synchronous writers (threads,
# databases, a file system on a loop device) are serialized before the engine.
# Stock pyfuse3 cannot send it; the build ./quickstart makes with
# patches/pyfuse3-3.5.0-parallel-direct-writes.patch can (FileInfo.parallel_direct_writes).
PARALLEL_DIRECT_WRITES = hasattr(pyfuse3.FileInfo(), "parallel_direct_writes")


def _errnos(op):
    """Only FUSEError leaves a handler: domain errors become their errno, and an
    unexpected fault becomes EIO (logged), never a dead daemon."""

    @functools.wraps(op)
    async def wrapper(*args, **kwargs):
        try:
            return await op(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            code = errno_for(e)
            if isinstance(e, NoQuorum):
                # The documented end of a write that waited for quorum (or was
                # in flight at a demotion): never acknowledged, nothing lost.
                log.warning("FUSE %s: EIO: %s", op.__name__, e)
            elif code == errno.EIO:
                log.error("FUSE %s failed: %s", op.__name__, e)
            raise pyfuse3.FUSEError(code) from None

    return wrapper


class VolumeFS(pyfuse3.Operations):
    """The node's mount: a flat directory of volume files."""

    enable_writeback_cache = False
    supports_dot_lookup = False

    def __init__(self, engines: Mapping[str, VolumeEngine], mount: Path, node: str):
        super().__init__()
        self.mount = Path(mount)
        self.node = node
        self.inode_of: dict[str, int] = {}
        self.engine_of: dict[int, VolumeEngine] = {}
        self.images: set[int] = set()  # inodes of test images (``<volume>@test``)
        for i, (name, engine) in enumerate(engines.items()):
            ino = pyfuse3.ROOT_INODE + 1 + 2 * i
            self.inode_of[name] = ino
            self.engine_of[ino] = engine
            self.inode_of[name + IMAGE_SUFFIX] = ino + 1
            self.engine_of[ino + 1] = engine
            self.images.add(ino + 1)
            # The engine asks us who holds its file open, and tells us when its role changes.
            engine.attach_front(DeviceFront(str(self.mount / name), functools.partial(self.open_handles, engine)))
            engine.subscribe_role_change(self.role_changed)
        self._handles: dict[int, tuple[VolumeEngine, int, bool]] = {}  # fh -> (engine, epoch, a test image)
        self._next_fh = 1

    # ----------------------------------------------------------- visibility

    @staticmethod
    def visible(engine: VolumeEngine) -> bool:
        return engine.is_up and engine.role.value == "primary"

    def shown(self, inode: int) -> bool:
        """The file of ``inode`` is there now: the volume on its primary, a test image while its test runs."""
        engine = self.engine_of[inode]
        return engine.is_up and engine.testfailover.active if inode in self.images else self.visible(engine)

    @staticmethod
    def _epoch(engine: VolumeEngine, image: bool) -> int:
        return engine.testfailover.epoch if image else engine.role_epoch

    def _engine(self, inode: int) -> VolumeEngine:
        engine = self.engine_of.get(inode)
        if engine is None or not self.shown(inode):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return engine

    def open_handles(self, engine: VolumeEngine) -> int:
        """Handles of ``engine``'s file opened in its current role epoch (not its test image's)."""
        return sum(1 for e, epoch, image in self._handles.values()
                   if e is engine and not image and epoch == engine.role_epoch)

    def role_changed(self, engine: VolumeEngine) -> None:
        """Tell the kernel to forget the entries (called on promote/demote/down,
        and when a test image comes or goes)."""
        for name in (engine.name, engine.name + IMAGE_SUFFIX):
            try:
                # ENOENT only means the kernel never looked the entry up (or forgot
                # it already): nothing to forget, and no traceback in the log.
                pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, name.encode(), ignore_enoent=True)
            except Exception as e:  # not mounted yet, or already gone
                log.debug("invalidate %s: %s", name, e)

    # ----------------------------------------------------------- attributes

    def _root_attr(self) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = pyfuse3.ROOT_INODE
        e.st_mode = stat.S_IFDIR | 0o755
        e.st_nlink = 2
        e.st_size = 0
        e.st_blksize = BLOCK
        e.attr_timeout = ENTRY_TIMEOUT
        e.entry_timeout = ENTRY_TIMEOUT
        return e

    def _file_attr(self, inode: int, engine: VolumeEngine) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        e.st_mode = stat.S_IFREG | 0o600
        e.st_nlink = 1
        e.st_size = engine.config.size
        e.st_blksize = BLOCK
        e.st_blocks = engine.config.size // 512
        e.st_uid = os.getuid()
        e.st_gid = os.getgid()
        e.attr_timeout = ENTRY_TIMEOUT
        e.entry_timeout = ENTRY_TIMEOUT
        e.generation = self._epoch(engine, inode in self.images)
        return e

    @_errnos
    async def getattr(self, inode, ctx=None):
        if inode == pyfuse3.ROOT_INODE:
            return self._root_attr()
        return self._file_attr(inode, self._engine(inode))

    @_errnos
    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        ino = self.inode_of.get(name.decode(errors="replace"))
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._file_attr(ino, self._engine(ino))

    @_errnos
    async def setattr(self, inode, attr, fields, fh, ctx):
        engine = self._engine(inode)
        if fields.update_size and attr.st_size != engine.config.size:
            raise pyfuse3.FUSEError(errno.EPERM)  # a volume's size is its config's
        # Mode, owner and times are not stored; accept and report the fixed ones.
        return self._file_attr(inode, engine)

    # ------------------------------------------------------------ directory

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_errnos
    async def readdir(self, fh, start_id, token):
        entries = [(name, ino) for name, ino in self.inode_of.items() if self.shown(ino)]
        for i, (name, ino) in enumerate(entries):
            if i < start_id:
                continue
            if not pyfuse3.readdir_reply(token, name.encode(), self._file_attr(ino, self.engine_of[ino]), i + 1):
                break

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLOCK
        total = sum(self.engine_of[ino].config.size for name, ino in self.inode_of.items()
                    if ino not in self.images) // BLOCK
        s.f_blocks = total
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.engine_of) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # Nothing may change the directory or a file's identity.
    async def create(self, parent_inode, name, mode, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, parent_inode, name, target, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    # -------------------------------------------------------------------- I/O

    @_errnos
    async def open(self, inode, flags, ctx):
        engine = self._engine(inode)
        if flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EPERM)
        fh = self._next_fh
        self._next_fh += 1
        image = inode in self.images
        self._handles[fh] = (engine, self._epoch(engine, image), image)
        fi = pyfuse3.FileInfo(fh=fh)
        fi.direct_io = True  # every request reaches the engine; no stale page cache
        fi.keep_cache = False
        if PARALLEL_DIRECT_WRITES:
            # Direct writes to the file reach the engine concurrently; it orders
            # overlapping ones itself (range locks), as it does for async I/O.
            fi.parallel_direct_writes = True
        return fi

    def _valid(self, entry: tuple[VolumeEngine, int, bool]) -> bool:
        engine, epoch, image = entry
        if image:
            return engine.is_up and engine.testfailover.active and engine.testfailover.epoch == epoch
        return engine.role_epoch == epoch and self.visible(engine)

    def _handle(self, fh: int) -> tuple[VolumeEngine, bool]:
        entry = self._handles.get(fh)
        if entry is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if not self._valid(entry):
            # The node stopped being primary (or the test ended) since this handle was opened.
            raise pyfuse3.FUSEError(errno.EIO)
        return entry[0], entry[2]

    @_errnos
    async def read(self, fh, off, size):
        engine, image = self._handle(fh)
        vsize = engine.config.size
        if off >= vsize or size <= 0:
            return b""
        if image:
            return await engine.testfailover.read(off, min(size, vsize - off))
        return await engine.read(off, min(size, vsize - off))

    @_errnos
    async def write(self, fh, off, buf):
        engine, image = self._handle(fh)
        if image:
            await engine.testfailover.write(off, bytes(buf))
        else:
            await engine.write(off, bytes(buf))
        return len(buf)

    @_errnos
    async def fsync(self, fh, datasync):
        engine, image = self._handle(fh)
        if not image:  # a test image promises nothing durable: a crash discards it
            await engine.flush()

    @_errnos
    async def flush(self, fh):
        entry = self._handles.get(fh)
        if entry is not None and not entry[2] and self._valid(entry):
            await entry[0].flush()

    async def release(self, fh):
        self._handles.pop(fh, None)


def clean_stale_mount(mount: Path) -> bool:
    """Unmount a mount left at ``mount`` by a killed daemon. Returns True if one
    was found. Only a FUSE mount of ours (fsname ``gmd``) is touched."""
    target = os.path.realpath(mount)
    found = False
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1].replace("\\040", " ") == target:
                    if parts[0] != "gmd" or not parts[2].startswith("fuse"):
                        raise RuntimeError(
                            f"{mount} is already a mount point of something else ({parts[0]} {parts[2]}); "
                            "refusing to mount over it")
                    found = True
    except FileNotFoundError:
        return False
    if found:
        log.warning("%s: stale gmd mount from a previous daemon found; unmounting it", mount)
        r = subprocess.run(["fusermount3", "-u", "-z", target], capture_output=True, text=True)
        if r.returncode != 0:
            r = subprocess.run(["umount", "-l", target], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"cannot remove stale mount {mount}: {r.stderr.strip()}")
    return found


def is_mounted(mount: Path) -> bool:
    target = os.path.realpath(mount)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f if len(line.split()) > 1)


async def serve_fuse(fs: VolumeFS, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Mount ``fs`` at its mount point and serve it until cancelled; the
    mount is removed on the way out, whatever ended it."""
    mount = fs.mount
    # First: a dead FUSE mount fails even a stat (ENOTCONN). It reads /proc and
    # may run fusermount: in a thread, never on the event loop.
    await trio.to_thread.run_sync(clean_stale_mount, mount)
    await trio.to_thread.run_sync(functools.partial(mount.mkdir, parents=True, exist_ok=True))
    opts = set(pyfuse3.default_options)
    opts.add("fsname=gmd")
    opts.add("subtype=gmd")
    pyfuse3.init(fs, str(mount), opts)
    log.info("%s: volumes appear under %s", fs.node, mount)
    if PARALLEL_DIRECT_WRITES:
        log.info("%s: parallel direct writes on: writers to a volume file reach the engine concurrently", fs.node)
    else:
        log.info("%s: parallel direct writes off (stock pyfuse3 %s; ./quickstart builds the patched one): "
                 "the kernel passes one direct write per file at a time", fs.node,
                 getattr(pyfuse3, "__version__", "?"))
    try:
        task_status.started()
        await pyfuse3.main()
    finally:
        with trio.CancelScope(shield=True):
            pyfuse3.close(unmount=True)
            log.info("%s: unmounted %s", fs.node, mount)
