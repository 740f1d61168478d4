"""Test failover of one volume on a secondary member (docs/DESIGN.md, "Test
failover"): ``gmd test-failover start|end``. The member freezes a writable
point-in-time image of its disk (:meth:`gmd.volume.LocalVolume.start_test`,
:mod:`gmd.testimage`) shown as ``<mount>/<volume>@test`` (and a loop device
if asked) while replication into it goes on; ending the test discards the
image. The member tells its peers (STATE ``test_failover``), so the
primary's status shows a line for it.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from statemap import Role

from .errors import Refused
from .replication import MemberLink
from .roles import losetup_attach, losetup_detach
from .undolog import iso_utc

if TYPE_CHECKING:
    from .config import VolumeConfig
    from .engine import DeviceFront
    from .peerstate import PeerState
    from .testimage import TestImage
    from .volume import LocalVolume

log = logging.getLogger(__name__)

IMAGE_SUFFIX = "@test"  # the image's name in the mount: a volume name cannot hold "@"
ENDED_BY_OPERATOR = "ended by the operator"


class TestFailoverVolume(Protocol):
    """What the test failover needs of its volume (the engine provides it)."""

    config: VolumeConfig
    front: DeviceFront | None
    def front_changed(self) -> None: ...
    local: LocalVolume | None
    members: dict[str, MemberLink]
    @property
    def name(self) -> str: ...
    node: str
    peerstate: PeerState
    def require_up(self) -> LocalVolume: ...
    role: Role
    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None: ...


class TestFailover:
    """The test failover of this node's member: start, end, the image's I/O
    for the FUSE front, its status, and what members say of theirs."""

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(self, engine: TestFailoverVolume):
        self.engine = engine
        self.loop_device: str | None = None
        self.epoch = 0  # bumped at every start and end: FUSE handles of another epoch get EIO
        self._last: dict[str, Any] | None = None  # the status of the last test, once it ended
        self._cleaned: trio.Event | None = None  # set once the last ended test's loop and files are gone

    # ------------------------------------------------------------ what runs

    @property
    def image(self) -> TestImage | None:
        local = self.engine.local
        return local.test if local is not None else None

    @property
    def active(self) -> bool:
        return self.image is not None

    @property
    def path(self) -> str | None:
        """The image's file in the node's mount, while a test runs."""
        front = self.engine.front
        if self.image is None or front is None:
            return None
        return front.path + IMAGE_SUFFIX

    # ------------------------------------------------------------ start, end

    async def start(self, *, loop: bool = False, space: int | None = None) -> dict[str, Any]:
        """``gmd test-failover start VOLUME``: freeze the image (refused, with
        the reason, on the primary or a disk out of write order), show it,
        attach a loop device if asked, tell the peers. Returns the status."""
        local = self.engine.require_up()
        if self.engine.role == Role.PRIMARY:
            raise Refused("test-failover-primary", volume=self.engine.name, node=self.engine.node)
        space = space or self.engine.config.members[self.engine.node].test_image_size
        image = await local.start_test(space, self._ended)
        self.epoch += 1
        self._last = None
        self.engine.front_changed()
        log.warning("%s: test failover started: image %s of the disk as of %s (space %d bytes); replication "
                    "into this member goes on", self.engine.name, self.path or "(no FUSE mount)",
                    iso_utc(image.consistent_at), space)
        if loop:
            if self.path is None:
                local.end_test("no FUSE mount to attach a loop device to")
                raise Refused("test-failover-refused", volume=self.engine.name, node=self.engine.node,
                              reason="this daemon serves no FUSE mount (--no-mount): no image file for a loop device")
            try:
                self.loop_device = await trio.to_thread.run_sync(losetup_attach, self.path)
            except Exception:
                local.end_test("the loop device could not be attached")
                raise
            log.info("%s: test image loop device %s", self.engine.name, self.loop_device)
        await self._tell_peers()
        return self.status()

    async def end(self, reason: str = ENDED_BY_OPERATOR) -> dict[str, Any]:
        """``gmd test-failover end VOLUME``: the image is discarded (its loop
        device detached, its files removed); the member's disk is what it
        would be without the test. Returns the status."""
        local = self.engine.require_up()
        if local.test is None:
            last = f" (the last one ended: {local.test_ended})" if local.test_ended else ""
            raise Refused("test-failover-none", volume=self.engine.name, node=self.engine.node, last=last)
        local.end_test(reason)  # calls _ended, which starts the clean-up
        if self._cleaned is not None:
            await self._cleaned.wait()
        return self.status()

    def _ended(self, image: TestImage, reason: str) -> None:
        """The test ended (the operator, a promotion, space used up): from now
        on the image is gone; its loop device and files follow."""
        self._last = self._image_status(image, active=False, loop=self.loop_device)
        self._last["ended_reason"] = reason
        loop, self.loop_device = self.loop_device, None
        self.epoch += 1
        self.engine.front_changed()
        cleaned = self._cleaned = trio.Event()
        self.engine.spawn(self._clean_up, image, loop, cleaned)

    async def _clean_up(self, image: TestImage, loop: str | None, cleaned: trio.Event) -> None:
        try:
            with trio.CancelScope(shield=True):  # a half-removed image would stay behind
                if loop is not None:
                    # The loop driver holds the image file open: detach first (a
                    # mounted one is detached lazily, its users get I/O errors).
                    await trio.to_thread.run_sync(losetup_detach, loop)
                    if self._last is not None:
                        self._last["loop"] = None
                local = self.engine.local
                if local is not None:
                    await local.discard_test(image)
        finally:
            cleaned.set()
        await self._tell_peers()

    async def _tell_peers(self) -> None:
        for m in self.engine.members.values():
            if m.connected:
                await self.engine.peerstate.send_state(m, {"test_failover": self.note()})

    # ------------------------------------------------------------ the image's I/O

    def _require(self) -> tuple[LocalVolume, TestImage]:
        local = self.engine.require_up()
        image = local.test
        if image is None:
            raise OSError(errno.EIO, f"{self.engine.name}: no test failover runs ({local.test_ended})")
        return local, image

    async def read(self, offset: int, length: int) -> bytes:
        """The image's bytes (the FUSE front's read of ``<volume>@test``)."""
        local, image = self._require()
        return await local.read_test(image, offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        """A write into the image; the member's own disk is never touched."""
        local, image = self._require()
        await local.write_test(image, offset, data)

    # ------------------------------------------------------------ status

    def _image_status(self, image: TestImage, *, active: bool, loop: str | None) -> dict[str, Any]:
        return {"active": active, "started_at": iso_utc(image.started_at),
                "consistent_at": iso_utc(image.consistent_at), "image": self.path if active else None,
                "loop": loop, "kept_bytes": image.kept_bytes, "kept_regions": image.kept_regions,
                "space": image.space, "overlay_bytes": image.overlay_bytes, "ended_reason": None}

    def status(self) -> dict[str, Any]:
        """``test_failover`` in the status: the test running here, or the last
        one (active false, with ``ended_reason``)."""
        image = self.image
        if image is not None:
            return self._image_status(image, active=True, loop=self.loop_device)
        if self._last is not None:
            return dict(self._last)
        local = self.engine.local
        return {"active": False, "started_at": None, "consistent_at": None, "image": None, "loop": None,
                "kept_bytes": 0, "kept_regions": 0, "space": None, "overlay_bytes": 0,
                "ended_reason": local.test_ended if local is not None else None}

    def note(self) -> dict[str, Any]:
        """What this member tells its peers of its test (STATE ``test_failover``)."""
        image = self.image
        if image is not None:
            return {"active": True, "started_at": image.started_at, "consistent_at": image.consistent_at}
        local = self.engine.local
        ended = (self._last or {}).get("ended_reason") or (local.test_ended if local is not None else None)
        return {"active": False, "ended_reason": ended} if ended else {"active": False}

    async def tell_primary(self, m: MemberLink) -> None:
        """The primary judged our disk (a session began): tell it of a test running here."""
        if self.active:
            await self.engine.peerstate.send_state(m, {"test_failover": self.note()})

    def member_said(self, m: MemberLink, note: dict[str, Any]) -> None:
        """A member told us of its test failover (shown in our status for it)."""
        was = (m.test_failover or {}).get("active")
        m.test_failover = {**note, "told_at": time.time()}
        if note.get("active") and not was:
            log.info("%s: a test failover runs on member %s (image as of %s)", self.engine.name, m.name,
                     iso_utc(note.get("consistent_at")))
        elif was and not note.get("active"):
            log.info("%s: the test failover on member %s ended%s", self.engine.name, m.name,
                     f": {note['ended_reason']}" if note.get("ended_reason") else "")
