"""The cluster configuration: one TOML file, the same on every node.

The file is found by :func:`resolve_config_path` (``--config`` > ``GMD_CONFIG`` >
``/etc/gmd/gmd.toml``), read by :func:`load_config` and checked completely before
anything uses it: every mistake is a :class:`ConfigError` naming the file, the
dotted key (``volumes.appslv.region_size``) and what was found versus expected.
Loading never writes anything and never creates a directory; making the control
socket, the mount point or a state map is the job of the command that needs it.

File format::

    secret = "change-me"              # required: shared peer-authentication secret

    [nodes.NAME]                      # required, at least one
    address = ["10.0.0.1:7799", ...]  # required: "host:port" or a list of them
                                      #   (IPv6 as "[::1]:7799"); one per path
    control = "/run/gmd/NAME.sock"    # control socket   (this default)
    control_timeout = 10              # seconds a control client has to send its
                                      #   request line (this default; >= 1)
    mount = "/run/gmd/NAME"           # FUSE mount point (this default)
    votes = 1                         # integer >= 0     (this default)

    [witnesses.NAME]                  # optional; diskless vote holders
    address = "10.0.0.9:7800"         # required, string or list
    votes = 1                         # (this default)
    state = "/var/lib/gmd/witness-NAME.json"  # (this default) its small registration file

    [volumes.NAME]                    # optional
    size = "4GiB"                     # required; a positive multiple of region_size
    region_size = "64KiB"             # default; power of two, >= 4096
    extent_size = "4MiB"              # default; power of two, >= region_size
    mode = "mwc"                      # default; "sync", "mwc" or "async"
    on_quorum_loss = "suspend"        # default; or "fail": writes get EIO after
    quorum_timeout = 30               #   this many seconds without quorum
    split_brain = "disconnect"        # default; or "discard-secondary",
                                      #   "discard-younger-primary", "discard-least-changes"

    [volumes.NAME.members.NODE]       # 1 to 8 members; NODE is a [nodes] name
    device = "/dev/vg/lv"             # required: backing file or block device
    statemap = "/var/lib/gmd/x.sm"    # required: this member's state map file
    mode = "sync"                     # optional; default: the volume's mode
    votes = 1                         # optional; default: the node's votes

Sizes are an integer number of bytes or a string: digits with an optional unit
``B``, ``KiB``, ``MiB``, ``GiB``, ``TiB``, ``PiB`` or the LVM/dd letters ``K``,
``M``, ``G``, ``T``, ``P``; all units are 1024-based and case-insensitive. A
decimal fraction is accepted when it gives whole bytes (``"1.5GiB"``). Decimal SI
units (``"4GB"``) are refused as ambiguous. See :func:`parse_size`.

Names of nodes, witnesses and volumes match ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``
because they become file names and wire identifiers; a node and a witness may not
share a name.

**Paths** (``control``, ``mount``, ``device``, ``statemap``): a relative path is
taken relative to the directory holding the config file, not the current
directory, so a cluster described in a scratch directory works wherever the
command is started. Paths are normalized lexically (``a/../b`` is ``b``); ``~``
is not expanded and symlinks are not resolved (no file system access).

Uniqueness rules, because breaking them makes daemons or members overwrite each
other: every ``host:port`` appears once in the whole file (hosts compared in
lower case, IP literals in canonical form, no DNS: ``localhost`` and
``127.0.0.1`` are different); no two nodes share a control socket or mount point;
on one node no two members (of any volumes) share a device or state map path.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import json
import os
import re
import socket
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_EXTENT_SIZE",
    "DEFAULT_MODE",
    "DEFAULT_REGION_SIZE",
    "MAX_MEMBERS",
    "MIN_REGION_SIZE",
    "MODES",
    "NODE_ENV",
    "Address",
    "Config",
    "ConfigError",
    "Member",
    "Node",
    "VolumeConfig",
    "Witness",
    "load_config",
    "parse_config",
    "parse_size",
    "resolve_config_path",
    "resolve_node",
]

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4
PiB = 1024**5

DEFAULT_CONFIG_PATH = Path("/etc/gmd/gmd.toml")
CONFIG_ENV = "GMD_CONFIG"
NODE_ENV = "GMD_NODE"

MODES = ("sync", "mwc", "async")
DEFAULT_MODE = "mwc"
DEFAULT_REGION_SIZE = 64 * KiB
DEFAULT_EXTENT_SIZE = 4 * MiB
MIN_REGION_SIZE = 4096
MAX_MEMBERS = 8
DEFAULT_VOTES = 1
DEFAULT_CONTROL_TIMEOUT = 10  # seconds a control client may take to send its request line
QUORUM_LOSS_POLICIES = ("suspend", "fail")
SPLIT_BRAIN_POLICIES = ("disconnect", "discard-secondary", "discard-younger-primary", "discard-least-changes")
MAX_SIZE = 2**63 - 1  # byte offsets travel as signed 64-bit integers

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_HOST_RE = re.compile(r"[A-Za-z0-9._-]+")
_PORT_RE = re.compile(r"[0-9]{1,10}")
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)")

_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kib": KiB,
    "m": MiB, "mib": MiB,
    "g": GiB, "gib": GiB,
    "t": TiB, "tib": TiB,
    "p": PiB, "pib": PiB,
}  # fmt: skip
_SI_UNITS = {"kb": "KiB", "mb": "MiB", "gb": "GiB", "tb": "TiB", "pb": "PiB", "eb": "EiB"}
_UNIT_HELP = "B, KiB, MiB, GiB, TiB, PiB or K, M, G, T, P; all 1024-based"
_SIZE_EXAMPLE = 'a size such as "4GiB" or an integer number of bytes'


class ConfigError(Exception):
    """The configuration cannot be used as written.

    ``file`` is the config file, ``key`` the dotted key at fault (``""`` for
    problems with the file as a whole, or with a name given on the command line),
    ``message`` says what was found and what was expected.
    """

    def __init__(self, file: str | os.PathLike[str], key: str, message: str):
        super().__init__(str(file), key, message)
        self.file = str(file)
        self.key = key
        self.message = message

    def __str__(self) -> str:
        if self.key:
            return f"{self.file}: {self.key}: {self.message}"
        return f"{self.file}: {self.message}"


# --------------------------------------------------------------------------- model


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
            if not _HOST_RE.fullmatch(host):
                raise ConfigError(
                    file,
                    key,
                    f"{shown}: host {json.dumps(host)} is not a host name or IP address "
                    '(letters, digits, ".", "-", "_")',
                )
        if not port_text:
            raise ConfigError(file, key, f"{shown} has no port {expected}")
        if not _PORT_RE.fullmatch(port_text):
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


@dataclass(frozen=True)
class Member:
    """One copy of a volume on one node, with its effective mode and votes."""

    node: str
    device: Path
    statemap: Path
    mode: str  # the member's own mode if set, else the volume's
    votes: int  # the member's own votes if set, else the node's


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
    on_quorum_loss: str = "suspend"  # writes without quorum wait ("suspend") or get EIO ("fail")
    quorum_timeout: int = 30  # seconds a write waits for quorum under "fail"
    split_brain: str = "disconnect"  # who discards its changes after a split-brain, if anyone


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
                self.path, "", _unknown_name("node", name, self.nodes, self.witnesses)
            ) from None

    def volume(self, name: str) -> VolumeConfig:
        """The volume called ``name``; ConfigError listing the configured volumes if none."""
        try:
            return self.volumes[name]
        except KeyError:
            raise ConfigError(self.path, "", _unknown_name("volume", name, self.volumes)) from None

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
                f"{json.dumps(volume_name)} (members: {_names(volume.members)})",
            ) from None


# --------------------------------------------------------------------------- sizes


def parse_size(value: object, *, file: str, key: str, minimum: int = 1) -> int:
    """Return the number of bytes that a size value from the config means.

    ``value`` is an ``int`` (bytes) or a string: digits with an optional unit
    (``B``, ``KiB`` .. ``PiB`` or ``K`` .. ``P``, 1024-based, any case, optional
    whitespace before the unit). A fraction must give whole bytes (``"1.5GiB"``).
    Booleans, floats, decimal SI units (``"4GB"``), negative numbers, results
    below ``minimum`` (default 1: sizes must be positive) or above 2**63-1 raise
    :class:`ConfigError` naming ``file`` and ``key``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        if isinstance(value, float):
            raise ConfigError(
                file,
                key,
                f"got float {value!r}; sizes are not TOML floats "
                '(write a string such as "1.5GiB" or an integer number of bytes)',
            )
        raise ConfigError(file, key, f"expected {_SIZE_EXAMPLE}, got {_describe(value)}")

    if isinstance(value, int):
        n = value
        shown = str(value)
    else:
        shown = json.dumps(value)
        text = value.strip()
        if text.startswith("-"):
            raise ConfigError(file, key, f"{shown} is negative (expected {_SIZE_EXAMPLE})")
        m = _SIZE_RE.fullmatch(text)
        if m is None:
            raise ConfigError(
                file, key, f"{shown} is not a size (expected a number with an optional unit: "
                f'{_UNIT_HELP}; e.g. "4GiB")'
            )
        number, unit = m.group(1), m.group(2)
        if unit.lower() in _SI_UNITS:
            raise ConfigError(
                file,
                key,
                f'{shown}: unit "{unit}" is ambiguous (1000- or 1024-based?); '
                f'use "{_SI_UNITS[unit.lower()]}" (or "{unit[0].upper()}") for 1024-based sizes',
            )
        if unit.lower() not in _UNITS:
            raise ConfigError(
                file, key, f'{shown}: unknown unit "{unit}" (expected {_UNIT_HELP})'
            )
        if len(number) > 40:
            raise ConfigError(file, key, f"{shown} is too large (at most {MAX_SIZE} bytes)")
        exact = Fraction(number) * _UNITS[unit.lower()]
        if exact.denominator != 1:
            raise ConfigError(
                file, key, f"{shown} is {float(exact):g} bytes, not a whole number of bytes"
            )
        n = int(exact)

    if n < 0:
        raise ConfigError(file, key, f"{shown} is negative (expected {_SIZE_EXAMPLE})")
    if n < minimum:
        if minimum == 1:
            raise ConfigError(file, key, f"{shown} is zero (expected a positive size)")
        raise ConfigError(
            file, key, f"{shown} is smaller than the minimum {_bytes(minimum)}"
        )
    if n > MAX_SIZE:
        raise ConfigError(file, key, f"{shown} is too large (at most {MAX_SIZE} bytes)")
    return n


def _human(n: int) -> str:
    """``n`` in the largest binary unit that divides it exactly, e.g. ``64KiB``."""
    for unit, mult in (("PiB", PiB), ("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return f"{n}B"


def _bytes(n: int) -> str:
    """``n`` for messages: ``65536 (64KiB)``, or just ``65000``."""
    human = _human(n)
    return str(n) if human == f"{n}B" else f"{n} ({human})"


def _as_written(raw: object, n: int) -> str:
    """A size as the user wrote it, with its byte count when that differs."""
    if isinstance(raw, int) or (isinstance(raw, str) and raw.strip().isdigit()):
        return str(n)
    return f"{json.dumps(raw)} ({n} bytes)"


# --------------------------------------------------------------------------- helpers


def _join(prefix: str, name: str) -> str:
    """Dotted key ``prefix.name``, quoting ``name`` as TOML does when needed."""
    part = name if _BARE_KEY_RE.fullmatch(name) else json.dumps(name)
    return f"{prefix}.{part}" if prefix else part


def _names(names: Iterable[str]) -> str:
    listed = ", ".join(names)
    return listed or "none"


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f'; did you mean "{close[0]}"?' if close else ""


def _unknown_name(
    kind: str, name: str, known: Iterable[str], witnesses: Iterable[str] = (), via: str = ""
) -> str:
    """Message for a name given on the command line that the config lacks."""
    known = list(known)
    given = f" (given by {via})" if via else ""
    if kind == "node" and name in witnesses:
        return (
            f"{json.dumps(name)}{given} is a witness, not a node "
            f"(configured nodes: {_names(known)})"
        )
    return (
        f"unknown {kind} {json.dumps(name)}{given} (configured {kind}s: {_names(known)})"
        f"{_did_you_mean(name, known)}"
    )


def _describe(value: object) -> str:
    """What a TOML value is, for 'expected X, got Y' messages."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {json.dumps(shown)}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return f"date/time {value.isoformat()}"
    return type(value).__name__


class _Parser:
    """Validates the decoded TOML document; every error names ``file`` and a key."""

    def __init__(self, file: str, base_dir: Path):
        self.file = file
        self.base_dir = base_dir
        self.addresses: dict[tuple[str, int], str] = {}  # normalized -> where
        self.listen_addresses: dict[tuple[str, int], str] = {}  # bind addresses, own scope
        self.node_paths: dict[Path, str] = {}  # control/mount -> where
        self.member_paths: dict[tuple[str, Path], str] = {}  # (node, path) -> where

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.file, key, message)

    # -- generic checks

    def table(self, value: object, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {_describe(value)}")
        return value

    def check_keys(self, table: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> None:
        for name in table:
            if name not in allowed:
                raise self.error(
                    _join(key, name),
                    f'unknown key "{name}" (expected one of: {", ".join(allowed)})'
                    f"{_did_you_mean(name, allowed)}",
                )

    def require(self, table: Mapping[str, Any], key: str, name: str, expected: str) -> Any:
        if name not in table:
            raise self.error(
                _join(key, name), f'missing required key "{name}" (expected {expected})'
            )
        return table[name]

    def string(self, value: object, key: str, what: str = "a non-empty string") -> str:
        if not isinstance(value, str):
            raise self.error(key, f"expected {what}, got {_describe(value)}")
        if not value:
            raise self.error(key, f"empty string (expected {what})")
        return value

    def integer(self, value: object, key: str, minimum: int) -> int:
        expected = f"an integer >= {minimum}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected {expected}, got {_describe(value)}")
        if value < minimum:
            raise self.error(key, f"{value} is too small (expected {expected})")
        return value

    def path(self, value: object, key: str) -> Path:
        text = self.string(value, key, "a path (string)")
        if "\0" in text:
            raise self.error(key, "path contains a NUL character")
        return Path(os.path.normpath(self.base_dir / text))

    def name(self, name: str, key: str, kind: str) -> str:
        if not _NAME_RE.fullmatch(name):
            raise self.error(
                key,
                f"invalid {kind} name {json.dumps(name)}: names are 1 to 64 letters, "
                'digits, ".", "_" or "-", starting with a letter or digit '
                "(they become file names and wire identifiers)",
            )
        return name

    def mode(self, value: object, key: str) -> str:
        text = self.string(value, key, f"one of: {', '.join(MODES)}")
        if text not in MODES:
            raise self.error(
                key,
                f"{json.dumps(text)} is not a mode (expected one of: {', '.join(MODES)})"
                f"{_did_you_mean(text, MODES)}",
            )
        return text

    def named_tables(self, value: object, key: str, kind: str) -> dict[str, dict[str, Any]]:
        """A table of ``[key.NAME]`` tables, names checked."""
        tables = self.table(value, key)
        for name, sub in tables.items():
            self.name(name, _join(key, name), kind)
            self.table(sub, _join(key, name))
        return tables

    def addresses_of(self, table: Mapping[str, Any], key: str, field: str = "address",
                     registry: dict[tuple[str, int], str] | None = None) -> tuple[Address, ...]:
        """The ``address`` key: one string or a non-empty list; each unique file-wide
        (``registry`` chooses the uniqueness scope; default: all addresses)."""
        expected = 'a "host:port" string or a list of them'
        raw = self.require(table, key, field, expected)
        key = _join(key, field)
        registry = self.addresses if registry is None else registry
        if isinstance(raw, str):
            items = [(raw, key)]
        elif isinstance(raw, list):
            if not raw:
                raise self.error(key, f"empty list (expected {expected})")
            items = [(item, f"{key}[{i}]") for i, item in enumerate(raw)]
        else:
            raise self.error(key, f"expected {expected}, got {_describe(raw)}")
        result = []
        for item, where in items:
            text = self.string(item, where, 'a "host:port" string')
            addr = Address.parse(text, file=self.file, key=where)
            norm = _normalized(addr)
            if norm in registry:
                raise self.error(
                    where,
                    f"address {addr} is also used by {registry[norm]} "
                    "(each host:port may appear only once)",
                )
            registry[norm] = where
            result.append(addr)
        return tuple(result)

    # -- sections

    def tls(self, value: object) -> TlsConfig | None:
        """The optional ``[tls]`` table: cert, key and ca, all required."""
        if value is None:
            return None
        table = self.table(value, "tls")
        self.check_keys(table, "tls", ("cert", "key", "ca"))
        paths = {}
        for k, what in (("cert", "this node's certificate (PEM)"), ("key", "its private key (PEM)"),
                        ("ca", "the CA certificate that signed every node's certificate (PEM)")):
            paths[k] = self.path(self.require(table, "tls", k, f"the path of {what}"), _join("tls", k))
        return TlsConfig(**paths)

    def document(self, doc: dict[str, Any]) -> tuple[str, dict, dict, dict]:
        self.check_keys(doc, "", ("secret", "nodes", "witnesses", "volumes", "tls"))
        secret = self.string(
            self.require(doc, "", "secret", "a non-empty string shared by all nodes"),
            "secret",
            "a non-empty string shared by all nodes",
        )
        nodes = self.nodes(self.require(doc, "", "nodes", "at least one [nodes.NAME] table"))
        witnesses = self.witnesses(doc.get("witnesses", {}), nodes)
        volumes = self.volumes(doc.get("volumes", {}), nodes, witnesses)
        return secret, nodes, witnesses, volumes

    def nodes(self, value: object) -> dict[str, Node]:
        tables = self.named_tables(value, "nodes", "node")
        if not tables:
            raise self.error(
                "nodes", "no nodes configured (expected at least one [nodes.NAME] table)"
            )
        nodes = {}
        for name, table in tables.items():
            key = _join("nodes", name)
            self.check_keys(table, key, ("address", "listen", "control", "control_timeout", "mount", "votes"))
            addresses = self.addresses_of(table, key)
            listen: tuple[Address, ...] = ()
            if "listen" in table:
                # Where the daemon binds, when peers reach it at another address
                # (NAT, a WAN emulator in between); one per path, like address.
                listen = self.addresses_of(table, key, "listen", self.listen_addresses)
                if len(listen) != len(addresses):
                    raise self.error(
                        _join(key, "listen"),
                        f"{len(listen)} listen addresses for {len(addresses)} addresses "
                        "(one per path: listen[i] is where address[i] arrives)",
                    )
            control = table.get("control", f"/run/gmd/{name}.sock")
            control = self.path(control, _join(key, "control"))
            mount = self.path(table.get("mount", f"/run/gmd/{name}"), _join(key, "mount"))
            for path, what in ((control, "control"), (mount, "mount")):
                where = _join(key, what)
                if path in self.node_paths:
                    raise self.error(
                        where,
                        f"{path} is also used by {self.node_paths[path]} (two node daemons "
                        "cannot share a control socket or mount point)",
                    )
                self.node_paths[path] = where
            votes = self.integer(table.get("votes", DEFAULT_VOTES), _join(key, "votes"), 0)
            control_timeout = self.integer(table.get("control_timeout", DEFAULT_CONTROL_TIMEOUT),
                                           _join(key, "control_timeout"), 1)
            nodes[name] = Node(name, addresses, control, mount, votes, listen, control_timeout)
        return nodes

    def witnesses(self, value: object, nodes: Mapping[str, Node]) -> dict[str, Witness]:
        tables = self.named_tables(value, "witnesses", "witness")
        witnesses = {}
        for name, table in tables.items():
            key = _join("witnesses", name)
            if name in nodes:
                raise self.error(
                    key, f"{json.dumps(name)} is already a node (nodes.{name}); "
                    "a node and a witness may not share a name"
                )
            self.check_keys(table, key, ("address", "votes", "state"))
            addresses = self.addresses_of(table, key)
            votes = self.integer(table.get("votes", DEFAULT_VOTES), _join(key, "votes"), 0)
            state = self.path(table.get("state", f"/var/lib/gmd/witness-{name}.json"), _join(key, "state"))
            witnesses[name] = Witness(name, addresses, votes, state)
        return witnesses

    def volumes(
        self, value: object, nodes: Mapping[str, Node], witnesses: Mapping[str, Witness]
    ) -> dict[str, VolumeConfig]:
        tables = self.named_tables(value, "volumes", "volume")
        return {
            name: self.volume(name, table, nodes, witnesses) for name, table in tables.items()
        }

    def size(self, raw: object, key: str) -> tuple[int, object]:
        """A size in bytes, plus the value as written for messages."""
        return parse_size(raw, file=self.file, key=key), raw

    def power_of_two(self, n: int, raw: object, key: str) -> None:
        if n & (n - 1):
            raise self.error(
                key, f'{_as_written(raw, n)} is not a power of two (expected e.g. "64KiB")'
            )

    def volume(
        self,
        name: str,
        table: Mapping[str, Any],
        nodes: Mapping[str, Node],
        witnesses: Mapping[str, Witness],
    ) -> VolumeConfig:
        key = _join("volumes", name)
        self.check_keys(table, key, ("size", "region_size", "extent_size", "mode", "members", "async_queue",
                                     "copy_rate", "on_quorum_loss", "quorum_timeout", "split_brain"))

        size, raw_size = self.size(
            self.require(table, key, "size", 'a size such as "4GiB"'), _join(key, "size")
        )

        region, raw = self.size(
            table.get("region_size", DEFAULT_REGION_SIZE), _join(key, "region_size")
        )
        self.power_of_two(region, raw, _join(key, "region_size"))
        if region < MIN_REGION_SIZE:
            raise self.error(
                _join(key, "region_size"),
                f"{_as_written(raw, region)} is smaller than the minimum region size "
                f"{_bytes(MIN_REGION_SIZE)}",
            )

        extent, raw = self.size(
            table.get("extent_size", DEFAULT_EXTENT_SIZE), _join(key, "extent_size")
        )
        self.power_of_two(extent, raw, _join(key, "extent_size"))
        if extent < region:
            raise self.error(
                _join(key, "extent_size"),
                f"{_as_written(raw, extent)} is smaller than region_size {_bytes(region)} "
                "(an extent holds whole regions)",
            )

        if size % region:
            below = size - size % region
            above = below + region
            nearest = f"{_bytes(below)} or {_bytes(above)}" if below else _bytes(above)
            raise self.error(
                _join(key, "size"),
                f"{_as_written(raw_size, size)} is not a multiple of region_size "
                f"{_bytes(region)} (nearest valid sizes: {nearest})",
            )

        mode = self.mode(table.get("mode", DEFAULT_MODE), _join(key, "mode"))
        members = self.members(
            self.require(table, key, "members", "a table of [members.NODE] tables"),
            _join(key, "members"),
            mode,
            nodes,
            witnesses,
        )
        async_queue, _ = self.size(table.get("async_queue", "64MiB"), _join(key, "async_queue"))
        copy_rate = 0
        if "copy_rate" in table:  # bytes per second, e.g. "50MiB"
            copy_rate, _ = self.size(table["copy_rate"], _join(key, "copy_rate"))
        on_loss = self.string(table.get("on_quorum_loss", "suspend"), _join(key, "on_quorum_loss"),
                              'one of: "suspend", "fail"')
        if on_loss not in QUORUM_LOSS_POLICIES:
            raise self.error(_join(key, "on_quorum_loss"),
                             f'{json.dumps(on_loss)} is not a policy (expected "suspend" or "fail")'
                             f"{_did_you_mean(on_loss, QUORUM_LOSS_POLICIES)}")
        timeout = self.integer(table.get("quorum_timeout", 30), _join(key, "quorum_timeout"), 1)
        split = self.string(table.get("split_brain", "disconnect"), _join(key, "split_brain"),
                            f"one of: {', '.join(SPLIT_BRAIN_POLICIES)}")
        if split not in SPLIT_BRAIN_POLICIES:
            raise self.error(_join(key, "split_brain"),
                             f"{json.dumps(split)} is not a split-brain policy (expected one of: "
                             f"{', '.join(SPLIT_BRAIN_POLICIES)}){_did_you_mean(split, SPLIT_BRAIN_POLICIES)}")
        return VolumeConfig(name, size, region, extent, mode, members, async_queue, copy_rate, on_loss, timeout,
                            split)

    def members(
        self,
        value: object,
        key: str,
        volume_mode: str,
        nodes: Mapping[str, Node],
        witnesses: Mapping[str, Witness],
    ) -> dict[str, Member]:
        tables = self.table(value, key)
        if not tables:
            raise self.error(key, "no members (expected 1 to 8 [members.NODE] tables)")
        if len(tables) > MAX_MEMBERS:
            raise self.error(
                key, f"{len(tables)} members; a volume has at most {MAX_MEMBERS}"
            )
        members = {}
        for node_name, table in tables.items():
            mkey = _join(key, node_name)
            if node_name not in nodes:
                if node_name in witnesses:
                    message = (
                        f"{json.dumps(node_name)} is a witness, not a node: witnesses hold "
                        f"only votes, members need a node (configured nodes: {_names(nodes)})"
                    )
                else:
                    message = (
                        f"{json.dumps(node_name)} is not a configured node "
                        f"(configured nodes: {_names(nodes)}){_did_you_mean(node_name, nodes)}"
                    )
                raise self.error(mkey, message)
            self.table(table, mkey)
            self.check_keys(table, mkey, ("device", "statemap", "mode", "votes"))
            device = self.path(
                self.require(table, mkey, "device", "a path"), _join(mkey, "device")
            )
            statemap = self.path(
                self.require(table, mkey, "statemap", "a path"), _join(mkey, "statemap")
            )
            for path, what in ((device, "device"), (statemap, "statemap")):
                where = _join(mkey, what)
                seen = self.member_paths.get((node_name, path))
                if seen is not None:
                    raise self.error(
                        where,
                        f"{path} on node {node_name} is also used by {seen} "
                        "(two members would overwrite each other)",
                    )
                self.member_paths[(node_name, path)] = where
            mode = volume_mode
            if "mode" in table:
                mode = self.mode(table["mode"], _join(mkey, "mode"))
            votes = nodes[node_name].votes
            if "votes" in table:
                votes = self.integer(table["votes"], _join(mkey, "votes"), 0)
            members[node_name] = Member(node_name, device, statemap, mode, votes)
        return members


def _normalized(addr: Address) -> tuple[str, int]:
    """Comparison key for duplicate detection: canonical IP or lower-case name."""
    try:
        host = str(ipaddress.ip_address(addr.host))
    except ValueError:
        host = addr.host.lower()
    return host, addr.port


# --------------------------------------------------------------------------- entry points


def parse_config(text: str, *, file: str, base_dir: Path) -> Config:
    """Parse and validate config ``text``; ``file`` names it in errors.

    Relative paths in the text are resolved against ``base_dir`` (the config
    file's directory). Raises :class:`ConfigError` on the first mistake found.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(file, "", f"TOML syntax error: {e}") from None
    base_dir = Path(base_dir)
    if not base_dir.is_absolute():
        base_dir = base_dir.absolute()
    parser = _Parser(file, base_dir)
    secret, nodes, witnesses, volumes = parser.document(doc)
    return Config(Path(file), secret, nodes, witnesses, volumes, parser.tls(doc.get("tls")))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate the config file at ``path``.

    Only reads: nothing is written and no directory is created. A missing,
    unreadable or non-UTF-8 file, a TOML syntax error (with tomllib's line and
    column) and every schema mistake raise :class:`ConfigError`.
    """
    path = Path(path)
    file = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            file, "", f"no such file (pass --config FILE or set {CONFIG_ENV})"
        ) from None
    except IsADirectoryError:
        raise ConfigError(file, "", "is a directory (expected the TOML config file)") from None
    except PermissionError:
        raise ConfigError(file, "", "not readable: permission denied") from None
    except OSError as e:
        raise ConfigError(file, "", f"cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            file,
            "",
            f"not UTF-8 text: byte 0x{data[e.start]:02x} at line {line} "
            "(TOML files must be UTF-8)",
        ) from None
    text = text.removeprefix("\ufeff")  # tolerate a byte-order mark from some editors
    return parse_config(text, file=file, base_dir=path.absolute().parent)


def resolve_config_path(cli_value: str | None, environ: Mapping[str, str]) -> Path:
    """The config file to use: ``--config`` > ``$GMD_CONFIG`` > /etc/gmd/gmd.toml.

    An empty string counts as not given.
    """
    if cli_value:
        return Path(cli_value)
    env = environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH


def resolve_node(
    cli_value: str | None,
    environ: Mapping[str, str],
    config: Config,
    hostname: str | None = None,
) -> str:
    """The local node's name: ``--node`` > ``$GMD_NODE`` > this host's short name.

    The host name (``hostname``, default :func:`socket.gethostname`, cut at the
    first dot) is used only if it is a configured node. A name given explicitly
    that is not configured, or no usable name at all, raises :class:`ConfigError`
    listing the configured nodes. Empty strings count as not given.
    """
    for value, source in ((cli_value, "--node"), (environ.get(NODE_ENV), NODE_ENV)):
        if value:
            if value not in config.nodes:
                raise ConfigError(
                    config.path,
                    "",
                    _unknown_name("node", value, config.nodes, config.witnesses, source),
                )
            return value
    if hostname is None:
        hostname = socket.gethostname()
    short = hostname.split(".", 1)[0]
    if short in config.nodes:
        return short
    raise ConfigError(
        config.path,
        "",
        f"no node given: pass --node NAME or set {NODE_ENV} "
        f"(configured nodes: {_names(config.nodes)}; "
        f"this host's name {json.dumps(short)} is not one of them)",
    )
