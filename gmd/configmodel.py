"""The cluster configuration as the rest of gmd sees it: frozen dataclasses.

Owns :class:`Config` and its parts (:class:`Node`, :class:`Witness`,
:class:`VolumeConfig`, :class:`Member`, :class:`TlsConfig`, :class:`Address`)
and their small look-ups. Instances are made by the schema
(:mod:`gmd.configschema`) once the whole file checked out; this module never
reads or parses a file (``Address.parse`` parses one ``host:port`` value).
Users import these names from :mod:`gmd.config`.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path

from transport.pacing import BandwidthRule, BandwidthSchedule

from .configvalues import (
    DEFAULT_COMPRESS_LEVEL,
    DEFAULT_CONTROL_TIMEOUT,
    HOST_RE,
    PORT_RE,
    ConfigError,
    name_list,
    unknown_name,
)


@dataclass(frozen=True)
class Address:
    """One network endpoint (a path to a node or witness)."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, *, file: str = "<config>", key: str = "") -> Address:
        """Parse ``"host:port"`` or ``"[ipv6]:port"``; port must be 1..65535."""
        expected = '(expected "host:port", e.g. "10.0.0.1:7799" or "[::1]:7799")'
        shown = json.dumps(text)
        if "://" in text:
            raise ConfigError(file, key, f"{shown} has a URL scheme {expected}")
        if text.startswith("["):
            close = text.find("]")
            if close < 0:
                raise ConfigError(file, key, f"{shown} has no closing ']' {expected}")
            host, rest = text[1:close], text[close + 1 :]
            if not rest.startswith(":"):
                raise ConfigError(file, key, f"{shown} has no port {expected}")
            port_text = rest[1:]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ConfigError(
                    file, key, f"{shown}: {json.dumps(host)} in brackets is not an IPv6 address"
                ) from None
        else:
            colons = text.count(":")
            if colons == 0:
                raise ConfigError(file, key, f"{shown} has no port {expected}")
            if colons > 1:
                raise ConfigError(
                    file, key, f'{shown}: IPv6 addresses need brackets, e.g. "[::1]:7799"'
                )
            host, port_text = text.split(":")
            if not host:
                raise ConfigError(file, key, f"{shown} has no host {expected}")
            if not HOST_RE.fullmatch(host):
                raise ConfigError(
                    file,
                    key,
                    f"{shown}: host {json.dumps(host)} is not a host name or IP address "
                    '(letters, digits, ".", "-", "_")',
                )
        if not port_text:
            raise ConfigError(file, key, f"{shown} has no port {expected}")
        if not PORT_RE.fullmatch(port_text):
            raise ConfigError(
                file, key, f"{shown}: port {json.dumps(port_text)} is not a number 1..65535"
            )
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ConfigError(
                file, key, f"{shown}: port {port} is out of range (expected 1..65535)"
            )
        return cls(host, port)


@dataclass(frozen=True)
class Node:
    """A host that runs a node daemon and may hold volume members."""

    name: str
    addresses: tuple[Address, ...]
    control: Path
    mount: Path
    votes: int
    listen: tuple[Address, ...] = ()  # where the daemon binds; default: addresses
    control_timeout: int = DEFAULT_CONTROL_TIMEOUT  # seconds to send a control request line
    # Volumes the daemon attaches when it starts, as 'gmd up' (up_loop: as
    # 'gmd up --loop'), before it reports itself ready; file order.
    up: tuple[str, ...] = ()
    up_loop: tuple[str, ...] = ()
    metrics: Address | None = None  # where the daemon serves Prometheus metrics (gmd.metrics); None: off

    @property
    def listen_addresses(self) -> tuple[Address, ...]:
        return self.listen or self.addresses


@dataclass(frozen=True)
class Witness:
    """A diskless daemon that only holds votes."""

    name: str
    addresses: tuple[Address, ...]
    votes: int
    state: Path = Path("/var/lib/gmd/witness.json")  # its registrations, kept across restarts
    metrics: Address | None = None  # where the witness serves Prometheus metrics (gmd.metrics); None: off


@dataclass(frozen=True)
class Shipping:
    """How every node ships data *to* one member: compression and a bandwidth
    limit (docs/DESIGN.md, "WAN economy"). Each key is the member's own if
    set, else the volume's, else the default."""

    compress: str = "none"  # "zstd" or "none"
    compress_level: int = DEFAULT_COMPRESS_LEVEL  # zstd level, 1..22
    bandwidth: int = 0  # bytes/s outside the schedule's windows; 0: no limit
    bandwidth_schedule: tuple[BandwidthRule, ...] = ()  # first window covering the local time wins

    @property
    def schedule(self) -> BandwidthSchedule:
        """The limits as :class:`transport.pacing.Pacer` takes them."""
        return BandwidthSchedule(self.bandwidth, self.bandwidth_schedule)


@dataclass(frozen=True)
class Member:
    """One copy of a volume on one node, with its effective mode and votes."""

    node: str
    device: Path
    statemap: Path
    mode: str  # the member's own mode if set, else the volume's
    votes: int  # the member's own votes if set, else the node's
    # Where this node, as primary, keeps the writes its async members have
    # not acknowledged beyond their queue (one file per member: PATH.MEMBER),
    # so a long outage keeps write order (gmd.backlog). None: memory only.
    journal: Path | None = None
    journal_size: int = 1 << 30  # bytes per async member
    # Consistent catch-up (docs/DESIGN.md, "Consistent catch-up: the undo
    # log"): the member's own undo log file, and the most it may hold.
    undo_log: Path | None = None
    undo_log_size: int = 0  # bytes; set (default 1 GiB) when undo_log is
    # Test failover (docs/DESIGN.md, "Test failover"): what the image may
    # keep of the member's old contents and write of its own, together.
    test_image_size: int = 1 << 30
    shipping: Shipping = Shipping()  # how data is shipped to this member


@dataclass(frozen=True)
class Hook:
    """A command run on some of a volume's events (``[[volumes.V.hooks]]``, gmd.hooks)."""

    on: tuple[str, ...]  # event kinds (gmd.events.KINDS)
    run: tuple[str, ...]  # argv
    where: tuple[tuple[str, tuple[object, ...]], ...] = ()  # (field, accepted values): all must hold
    timeout: int = 60  # seconds before its process group is killed


@dataclass(frozen=True)
class VolumeConfig:
    """A mirrored volume: geometry, mode and members (keyed by node, file order)."""

    name: str
    size: int
    region_size: int
    extent_size: int
    mode: str
    members: dict[str, Member]
    async_queue: int = 64 * 1024 * 1024  # bytes an async member may lag before bitmap tracking
    copy_rate: int = 0  # bytes/s the copy engine may compare (and send) per member; 0: no limit
    # Writes without quorum wait ("suspend") or get EIO ("fail"); "continue":
    # two sites without a witness, the primary writes on alone when it loses
    # its only peer (docs/DESIGN.md, "Two sites without a witness").
    on_quorum_loss: str = "suspend"
    quorum_timeout: int = 30  # seconds a write waits for quorum under "fail"
    split_brain: str = "disconnect"  # who discards its changes after a split-brain, if anyone
    # Automatic takeover (docs/DESIGN.md, "Automatic takeover"): a secondary
    # with an uptodate disk and quorum promotes itself when no primary is in
    # sight; a primary that loses quorum fences itself.
    auto_promote: bool = False
    start_command: tuple[str, ...] | None = None  # argv run after this node becomes primary
    stop_command: tuple[str, ...] | None = None  # argv run before this node stops being primary
    command_timeout: int = 60  # seconds a start or stop command may run before it is killed
    # RPO alert (docs/DESIGN.md, "RPO and lag"): a member that would lose more
    # than this, in seconds of writes or in bytes, if the primary were lost
    # now is logged once and flagged in status. None: no alert on that measure.
    rpo_alert_seconds: int | None = None
    rpo_alert_bytes: int | None = None
    shipping: Shipping = Shipping()  # the members' default (each member's is in Member.shipping)
    # A consistency group (docs/DESIGN.md, "Consistency groups"): volumes
    # whose far members stop at one instant of all of them. None: alone.
    group: str | None = None
    hooks: tuple[Hook, ...] = ()  # commands run on the volume's events (gmd.hooks)


@dataclass(frozen=True)
class TlsConfig:
    """TLS for peer links: this node's certificate and key, and the CA that signed
    every peer's certificate (verified both ways)."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class Config:
    """The whole cluster configuration, validated. Dicts keep the file's order."""

    path: Path
    secret: str = field(repr=False)
    nodes: dict[str, Node]
    witnesses: dict[str, Witness]
    volumes: dict[str, VolumeConfig]
    tls: TlsConfig | None = None

    def node(self, name: str) -> Node:
        """The node called ``name``; ConfigError listing the configured nodes if none."""
        try:
            return self.nodes[name]
        except KeyError:
            raise ConfigError(
                self.path, "", unknown_name("node", name, self.nodes, self.witnesses)
            ) from None

    def volume(self, name: str) -> VolumeConfig:
        """The volume called ``name``; ConfigError listing the configured volumes if none."""
        try:
            return self.volumes[name]
        except KeyError:
            raise ConfigError(self.path, "", unknown_name("volume", name, self.volumes)) from None

    def volumes_for_node(self, node_name: str) -> list[VolumeConfig]:
        """The volumes with a member on ``node_name``, in file order."""
        self.node(node_name)
        return [v for v in self.volumes.values() if node_name in v.members]

    def member(self, volume_name: str, node_name: str) -> Member:
        """The member of ``volume_name`` on ``node_name``; ConfigError if it has none."""
        volume = self.volume(volume_name)
        try:
            return volume.members[node_name]
        except KeyError:
            raise ConfigError(
                self.path,
                "",
                f"node {json.dumps(node_name)} has no member in volume "
                f"{json.dumps(volume_name)} (members: {name_list(volume.members)})",
            ) from None
