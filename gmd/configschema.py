"""The schema of the config file: a decoded TOML document checked into a Config.

Owns :func:`parse_config` and its ``_Parser``, which checks every key, type,
name, size and uniqueness rule (the file format is described in
:mod:`gmd.config`) and raises a :class:`ConfigError` naming the file and the
dotted key at the first mistake. Users import :func:`parse_config` from
:mod:`gmd.config`.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transport.pacing import DAYS, BandwidthRule, clock_text

from . import configkeys
from .configmodel import Address, Config, Hook, Member, Node, Shipping, TlsConfig, VolumeConfig, Witness
from .configvalues import (
    COMPRESSORS,
    DEFAULT_CONTROL_TIMEOUT,
    DEFAULT_EXTENT_SIZE,
    DEFAULT_MODE,
    DEFAULT_REGION_SIZE,
    DEFAULT_TEST_IMAGE_SIZE,
    DEFAULT_UNDO_LOG_SIZE,
    DEFAULT_VOTES,
    MAX_COMPRESS_LEVEL,
    MAX_MEMBERS,
    MIN_BANDWIDTH,
    MIN_COMPRESS_LEVEL,
    MIN_REGION_SIZE,
    MIN_TEST_IMAGE_SIZE,
    MIN_UNDO_LOG_SIZE,
    MODES,
    NAME_RE,
    QUORUM_LOSS_POLICIES,
    SPLIT_BRAIN_POLICIES,
    ConfigError,
    as_written,
    describe,
    did_you_mean,
    join_key,
    name_list,
    parse_size,
    show_bytes,
)
from .events import KINDS

# Event kinds a hook may run on: every kind but the stream's own
# bookkeeping, and "hook" (a hook's own result: no hook feeds itself).
HOOK_KINDS = tuple(k for k in KINDS if k not in ("dropped", "now_end", "hook"))

# The keys each table accepts come from the reference (gmd.configkeys), so a
# key accepted here is a key docs/CONFIG.md explains.

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
            raise self.error(key, f"expected a table, got {describe(value)}")
        return value

    def check_keys(self, table: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> None:
        for name in table:
            if name not in allowed:
                raise self.error(
                    join_key(key, name),
                    f'unknown key "{name}" (expected one of: {", ".join(allowed)})'
                    f"{did_you_mean(name, allowed)}",
                )

    def require(self, table: Mapping[str, Any], key: str, name: str, expected: str) -> Any:
        if name not in table:
            raise self.error(
                join_key(key, name), f'missing required key "{name}" (expected {expected})'
            )
        return table[name]

    def string(self, value: object, key: str, what: str = "a non-empty string") -> str:
        if not isinstance(value, str):
            raise self.error(key, f"expected {what}, got {describe(value)}")
        if not value:
            raise self.error(key, f"empty string (expected {what})")
        return value

    def integer(self, value: object, key: str, minimum: int) -> int:
        expected = f"an integer >= {minimum}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected {expected}, got {describe(value)}")
        if value < minimum:
            raise self.error(key, f"{value} is too small (expected {expected})")
        return value

    def boolean(self, value: object, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {describe(value)}")
        return value

    def command(self, value: object, key: str) -> tuple[str, ...]:
        """A command to run: a list of strings (argv, no shell) or one string
        (run by ``/bin/sh -c``, for pipelines and redirections)."""
        if isinstance(value, str):
            argv = ("/bin/sh", "-c", self.string(value, key, "a command (string or list of strings)"))
        elif isinstance(value, list) and value and all(isinstance(a, str) and a for a in value):
            argv = tuple(value)
        else:
            raise self.error(key, f"expected a command: a string (run by /bin/sh -c) or a non-empty list of "
                                  f"non-empty strings (argv), got {describe(value)}")
        if any("\0" in a for a in argv):
            raise self.error(key, "command contains a NUL character")
        return argv

    def path(self, value: object, key: str) -> Path:
        text = self.string(value, key, "a path (string)")
        if "\0" in text:
            raise self.error(key, "path contains a NUL character")
        return Path(os.path.normpath(self.base_dir / text))

    def name(self, name: str, key: str, kind: str) -> str:
        if not NAME_RE.fullmatch(name):
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
                f"{did_you_mean(text, MODES)}",
            )
        return text

    def named_tables(self, value: object, key: str, kind: str) -> dict[str, dict[str, Any]]:
        """A table of ``[key.NAME]`` tables, names checked."""
        tables = self.table(value, key)
        for name, sub in tables.items():
            self.name(name, join_key(key, name), kind)
            self.table(sub, join_key(key, name))
        return tables

    def addresses_of(self, table: Mapping[str, Any], key: str, field: str = "address",
                     registry: dict[tuple[str, int], str] | None = None) -> tuple[Address, ...]:
        """The ``address`` key: one string or a non-empty list; each unique file-wide
        (``registry`` chooses the uniqueness scope; default: all addresses)."""
        expected = 'a "host:port" string or a list of them'
        raw = self.require(table, key, field, expected)
        key = join_key(key, field)
        registry = self.addresses if registry is None else registry
        if isinstance(raw, str):
            items = [(raw, key)]
        elif isinstance(raw, list):
            if not raw:
                raise self.error(key, f"empty list (expected {expected})")
            items = [(item, f"{key}[{i}]") for i, item in enumerate(raw)]
        else:
            raise self.error(key, f"expected {expected}, got {describe(raw)}")
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

    # -- how data is shipped to a member

    def shipping(self, table: Mapping[str, Any], key: str, base: Shipping) -> Shipping:
        """The shipping keys of ``table`` (a volume's or a member's) over ``base``."""
        compress, level = base.compress, base.compress_level
        if "compress" in table:
            where = join_key(key, "compress")
            compress = self.string(table["compress"], where, 'one of: "zstd", "none"')
            if compress not in COMPRESSORS:
                raise self.error(where, f'{json.dumps(compress)} is not a compressor (expected "zstd" or "none")'
                                        f"{did_you_mean(compress, COMPRESSORS)}")
        if "compress_level" in table:
            where = join_key(key, "compress_level")
            level = self.integer(table["compress_level"], where, MIN_COMPRESS_LEVEL)
            if level > MAX_COMPRESS_LEVEL:
                raise self.error(where, f"{level} is too large (expected {MIN_COMPRESS_LEVEL}..{MAX_COMPRESS_LEVEL}, "
                                        "zstd's levels; 1..3 are the fast ones)")
        bandwidth = base.bandwidth
        if "bandwidth" in table:
            bandwidth = self.bandwidth(table["bandwidth"], join_key(key, "bandwidth"))
        rules = base.bandwidth_schedule
        if "bandwidth_schedule" in table:
            rules = self.bandwidth_schedule(table["bandwidth_schedule"], join_key(key, "bandwidth_schedule"))
        return Shipping(compress, level, bandwidth, rules)

    def bandwidth(self, value: object, key: str) -> int:
        """Bytes per second: an integer or a size such as ``"4MiB"``; 0 for no limit."""
        n = parse_size(value, file=self.file, key=key, minimum=0)
        if 0 < n < MIN_BANDWIDTH:
            raise self.error(key, f"{as_written(value, n)} bytes/s is below the least limit "
                                  f"{show_bytes(MIN_BANDWIDTH)} bytes/s (0 means no limit)")
        return n

    def bandwidth_schedule(self, value: object, key: str) -> tuple[BandwidthRule, ...]:
        """A list of ``{from, to, days, bandwidth}`` tables."""
        if not isinstance(value, list):
            raise self.error(key, "expected a list of tables such as "
                                  '{from = "08:00", to = "18:00", days = ["mon"], bandwidth = "2MiB"}, '
                                  f"got {describe(value)}")
        rules = []
        for i, entry in enumerate(value):
            where = f"{key}[{i}]"
            entry = self.table(entry, where)
            self.check_keys(entry, where, configkeys.RULE.names)
            start = self.clock(self.require(entry, where, "from", 'a time of day such as "08:00"'),
                               join_key(where, "from"), end=False)
            end = self.clock(self.require(entry, where, "to", 'a time of day such as "18:00"'),
                             join_key(where, "to"), end=True)
            if start == end:
                raise self.error(join_key(where, "to"), f'"to" equals "from" ({clock_text(start)}): a window needs a '
                                                        'length (for the whole day: from = "00:00", to = "24:00")')
            days = frozenset(range(7))
            if "days" in entry:
                days = self.days(entry["days"], join_key(where, "days"))
            bandwidth = self.bandwidth(self.require(entry, where, "bandwidth", "bytes/s, 0 for no limit"),
                                       join_key(where, "bandwidth"))
            rules.append(BandwidthRule(start, end, days, bandwidth))
        return tuple(rules)

    def clock(self, value: object, key: str, *, end: bool) -> int:
        """A local time of day, ``"HH:MM"`` (or a TOML time), as minutes since
        midnight; ``"24:00"`` is allowed as the end of a window."""
        expected = '"HH:MM", e.g. "08:00"' + (' or "24:00"' if end else "")
        if isinstance(value, datetime.time):
            if value.second or value.microsecond or value.tzinfo is not None:
                raise self.error(key, f"{value.isoformat()} has seconds or a time zone (expected {expected})")
            return value.hour * 60 + value.minute
        text = self.string(value, key, f"a time of day {expected}")
        m = _CLOCK_RE.fullmatch(text)
        if m is None:
            raise self.error(key, f"{json.dumps(text)} is not a time of day (expected {expected})")
        hours, mins = int(m.group(1)), int(m.group(2))
        if (hours, mins) == (24, 0) and end:
            return 24 * 60
        if hours > 23 or mins > 59:
            raise self.error(key, f"{json.dumps(text)} is not a time of day (expected {expected})")
        return hours * 60 + mins

    def days(self, value: object, key: str) -> frozenset[int]:
        """A non-empty list of weekday names, ``"mon"`` .. ``"sun"``."""
        expected = f"a list of days from {', '.join(DAYS)}"
        if not isinstance(value, list) or not value:
            raise self.error(key, f"expected {expected}, got {describe(value)}")
        days = set()
        for i, day in enumerate(value):
            where = f"{key}[{i}]"
            name = self.string(day, where, f"a day ({', '.join(DAYS)})")
            if name not in DAYS:
                raise self.error(where, f"{json.dumps(name)} is not a day (expected one of: {', '.join(DAYS)})"
                                        f"{did_you_mean(name.lower(), DAYS)}")
            if DAYS.index(name) in days:
                raise self.error(where, f"{json.dumps(name)} is listed twice")
            days.add(DAYS.index(name))
        return frozenset(days)

    # -- sections

    def tls(self, value: object) -> TlsConfig | None:
        """The optional ``[tls]`` table: cert, key and ca, all required."""
        if value is None:
            return None
        table = self.table(value, "tls")
        self.check_keys(table, "tls", configkeys.TLS.names)
        paths = {}
        for k, what in (("cert", "this node's certificate (PEM)"), ("key", "its private key (PEM)"),
                        ("ca", "the CA certificate that signed every node's certificate (PEM)")):
            paths[k] = self.path(self.require(table, "tls", k, f"the path of {what}"), join_key("tls", k))
        return TlsConfig(**paths)

    def document(self, doc: dict[str, Any]) -> tuple[str, dict, dict, dict]:
        self.check_keys(doc, "", configkeys.TOP.names)
        secret = self.string(
            self.require(doc, "", "secret", "a non-empty string shared by all nodes"),
            "secret",
            "a non-empty string shared by all nodes",
        )
        nodes = self.nodes(self.require(doc, "", "nodes", "at least one [nodes.NAME] table"))
        witnesses = self.witnesses(doc.get("witnesses", {}), nodes)
        volumes = self.volumes(doc.get("volumes", {}), nodes, witnesses)
        self.node_volumes(nodes, volumes)
        return secret, nodes, witnesses, volumes

    def nodes(self, value: object) -> dict[str, Node]:
        tables = self.named_tables(value, "nodes", "node")
        if not tables:
            raise self.error(
                "nodes", "no nodes configured (expected at least one [nodes.NAME] table)"
            )
        nodes = {}
        for name, table in tables.items():
            key = join_key("nodes", name)
            self.check_keys(table, key, configkeys.NODE.names)
            addresses = self.addresses_of(table, key)
            listen: tuple[Address, ...] = ()
            if "listen" in table:
                # Where the daemon binds, when peers reach it at another address
                # (NAT, a WAN emulator in between); one per path, like address.
                listen = self.addresses_of(table, key, "listen", self.listen_addresses)
                if len(listen) != len(addresses):
                    raise self.error(
                        join_key(key, "listen"),
                        f"{len(listen)} listen addresses for {len(addresses)} addresses "
                        "(one per path: listen[i] is where address[i] arrives)",
                    )
            control = table.get("control", f"/run/gmd/{name}.sock")
            control = self.path(control, join_key(key, "control"))
            mount = self.path(table.get("mount", f"/run/gmd/{name}"), join_key(key, "mount"))
            for path, what in ((control, "control"), (mount, "mount")):
                where = join_key(key, what)
                if path in self.node_paths:
                    raise self.error(
                        where,
                        f"{path} is also used by {self.node_paths[path]} (two node daemons "
                        "cannot share a control socket or mount point)",
                    )
                self.node_paths[path] = where
            votes = self.integer(table.get("votes", DEFAULT_VOTES), join_key(key, "votes"), 0)
            control_timeout = self.integer(table.get("control_timeout", DEFAULT_CONTROL_TIMEOUT),
                                           join_key(key, "control_timeout"), 1)
            up = self.names(table.get("up", []), join_key(key, "up"), "volume")
            up_loop = self.names(table.get("up_loop", []), join_key(key, "up_loop"), "volume")
            both = [v for v in up if v in up_loop]
            if both:
                raise self.error(join_key(key, "up_loop"),
                                 f"volume {json.dumps(both[0])} is also in up (list it in up, or in up_loop "
                                 "for a loop device as well, not in both)")
            metrics = self.metrics_address(table, key, listen or addresses)
            nodes[name] = Node(name, addresses, control, mount, votes, listen, control_timeout, up, up_loop,
                               metrics)
        return nodes

    def names(self, value: object, key: str, kind: str) -> tuple[str, ...]:
        """A list of distinct names (checked as names, not yet against what they name)."""
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of {kind} names, got {describe(value)}")
        names: list[str] = []
        for i, item in enumerate(value):
            where = f"{key}[{i}]"
            name = self.name(self.string(item, where, f"a {kind} name"), where, kind)
            if name in names:
                raise self.error(where, f"{kind} {json.dumps(name)} is listed twice")
            names.append(name)
        return tuple(names)

    def node_volumes(self, nodes: Mapping[str, Node], volumes: Mapping[str, VolumeConfig]) -> None:
        """Every volume a node brings up at start exists and has a member there."""
        for node in nodes.values():
            for field_name in ("up", "up_loop"):
                for i, vol in enumerate(getattr(node, field_name)):
                    where = f"{join_key(join_key('nodes', node.name), field_name)}[{i}]"
                    if vol not in volumes:
                        raise self.error(where, f"{json.dumps(vol)} is not a configured volume (volumes: "
                                                f"{name_list(volumes)}){did_you_mean(vol, volumes)}")
                    if node.name not in volumes[vol].members:
                        raise self.error(where, f"volume {json.dumps(vol)} has no member on node {node.name} "
                                                f"(members: {name_list(volumes[vol].members)})")

    def witnesses(self, value: object, nodes: Mapping[str, Node]) -> dict[str, Witness]:
        tables = self.named_tables(value, "witnesses", "witness")
        witnesses = {}
        for name, table in tables.items():
            key = join_key("witnesses", name)
            if name in nodes:
                raise self.error(
                    key, f"{json.dumps(name)} is already a node (nodes.{name}); "
                    "a node and a witness may not share a name"
                )
            self.check_keys(table, key, configkeys.WITNESS.names)
            addresses = self.addresses_of(table, key)
            votes = self.integer(table.get("votes", DEFAULT_VOTES), join_key(key, "votes"), 0)
            state = self.path(table.get("state", f"/var/lib/gmd/witness-{name}.json"), join_key(key, "state"))
            witnesses[name] = Witness(name, addresses, votes, state, self.metrics_address(table, key, addresses))
        return witnesses

    def metrics_address(self, table: Mapping[str, Any], key: str, binds: tuple[Address, ...]) -> Address | None:
        """The optional ``metrics`` key of a node or witness: where its daemon
        serves Prometheus metrics (absent: off). Not unique file-wide (every
        node may use "127.0.0.1:9942" on its own host), but never one of the
        daemon's own peer listen addresses (``binds``): both would bind it."""
        if "metrics" not in table:
            return None
        where = join_key(key, "metrics")
        text = self.string(table["metrics"], where, 'a "host:port" string, e.g. "127.0.0.1:9942"')
        addr = Address.parse(text, file=self.file, key=where)
        for bind in binds:
            if _same_socket(addr, bind):
                raise self.error(where, f"{addr} is also where this daemon listens for peers ({bind}); the "
                                        "metrics endpoint needs a port of its own")
        return addr

    def volumes(
        self, value: object, nodes: Mapping[str, Node], witnesses: Mapping[str, Witness]
    ) -> dict[str, VolumeConfig]:
        tables = self.named_tables(value, "volumes", "volume")
        volumes = {
            name: self.volume(name, table, nodes, witnesses) for name, table in tables.items()
        }
        # A consistency group's volumes share one write order towards their
        # far members: they must have their members on the same nodes, in
        # the same modes (one primary, one far site, failing over together).
        first: dict[str, VolumeConfig] = {}
        for v in volumes.values():
            if v.group is None:
                continue
            other = first.setdefault(v.group, v)
            layout = {n: m.mode for n, m in v.members.items()}
            theirs = {n: m.mode for n, m in other.members.items()}
            if layout != theirs:
                raise self.error(join_key("volumes", v.name, "group"),
                                 f"volume {v.name} has members {layout} but {other.name} of group "
                                 f"{json.dumps(v.group)} has {theirs}: a group's volumes have their members "
                                 "on the same nodes in the same modes")
        return volumes

    def size(self, raw: object, key: str) -> tuple[int, object]:
        """A size in bytes, plus the value as written for messages."""
        return parse_size(raw, file=self.file, key=key), raw

    def power_of_two(self, n: int, raw: object, key: str) -> None:
        if n & (n - 1):
            raise self.error(
                key, f'{as_written(raw, n)} is not a power of two (expected e.g. "64KiB")'
            )

    def volume(
        self,
        name: str,
        table: Mapping[str, Any],
        nodes: Mapping[str, Node],
        witnesses: Mapping[str, Witness],
    ) -> VolumeConfig:
        key = join_key("volumes", name)
        self.check_keys(table, key, configkeys.VOLUME.names)

        size, raw_size = self.size(
            self.require(table, key, "size", 'a size such as "4GiB"'), join_key(key, "size")
        )

        region, raw = self.size(
            table.get("region_size", DEFAULT_REGION_SIZE), join_key(key, "region_size")
        )
        self.power_of_two(region, raw, join_key(key, "region_size"))
        if region < MIN_REGION_SIZE:
            raise self.error(
                join_key(key, "region_size"),
                f"{as_written(raw, region)} is smaller than the minimum region size "
                f"{show_bytes(MIN_REGION_SIZE)}",
            )

        extent, raw = self.size(
            table.get("extent_size", DEFAULT_EXTENT_SIZE), join_key(key, "extent_size")
        )
        self.power_of_two(extent, raw, join_key(key, "extent_size"))
        if extent < region:
            raise self.error(
                join_key(key, "extent_size"),
                f"{as_written(raw, extent)} is smaller than region_size {show_bytes(region)} "
                "(an extent holds whole regions)",
            )

        if size % region:
            below = size - size % region
            above = below + region
            nearest = f"{show_bytes(below)} or {show_bytes(above)}" if below else show_bytes(above)
            raise self.error(
                join_key(key, "size"),
                f"{as_written(raw_size, size)} is not a multiple of region_size "
                f"{show_bytes(region)} (nearest valid sizes: {nearest})",
            )

        mode = self.mode(table.get("mode", DEFAULT_MODE), join_key(key, "mode"))
        shipping = self.shipping(table, key, Shipping())
        members = self.members(
            self.require(table, key, "members", "a table of [members.NODE] tables"),
            join_key(key, "members"),
            mode,
            nodes,
            witnesses,
            shipping,
        )
        async_queue, _ = self.size(table.get("async_queue", "64MiB"), join_key(key, "async_queue"))
        copy_rate = 0
        if "copy_rate" in table:  # bytes per second, e.g. "50MiB"
            copy_rate, _ = self.size(table["copy_rate"], join_key(key, "copy_rate"))
        on_loss = self.string(table.get("on_quorum_loss", "suspend"), join_key(key, "on_quorum_loss"),
                              'one of: "suspend", "fail", "continue"')
        if on_loss not in QUORUM_LOSS_POLICIES:
            raise self.error(join_key(key, "on_quorum_loss"),
                             f'{json.dumps(on_loss)} is not a policy (expected "suspend", "fail" or "continue")'
                             f"{did_you_mean(on_loss, QUORUM_LOSS_POLICIES)}")
        timeout = self.integer(table.get("quorum_timeout", 30), join_key(key, "quorum_timeout"), 1)
        split = self.string(table.get("split_brain", "disconnect"), join_key(key, "split_brain"),
                            f"one of: {', '.join(SPLIT_BRAIN_POLICIES)}")
        if split not in SPLIT_BRAIN_POLICIES:
            raise self.error(join_key(key, "split_brain"),
                             f"{json.dumps(split)} is not a split-brain policy (expected one of: "
                             f"{', '.join(SPLIT_BRAIN_POLICIES)}){did_you_mean(split, SPLIT_BRAIN_POLICIES)}")
        auto_promote = self.boolean(table.get("auto_promote", False), join_key(key, "auto_promote"))
        if on_loss == "continue":
            self.two_sites_alone(join_key(key, "on_quorum_loss"), members, witnesses, auto_promote)
        start = stop = None
        if "start_command" in table:
            start = self.command(table["start_command"], join_key(key, "start_command"))
        if "stop_command" in table:
            stop = self.command(table["stop_command"], join_key(key, "stop_command"))
        command_timeout = self.integer(table.get("command_timeout", 60), join_key(key, "command_timeout"), 1)
        alert_seconds = alert_bytes = None
        if "rpo_alert_seconds" in table:
            alert_seconds = self.integer(table["rpo_alert_seconds"], join_key(key, "rpo_alert_seconds"), 1)
        if "rpo_alert_bytes" in table:
            alert_bytes, _ = self.size(table["rpo_alert_bytes"], join_key(key, "rpo_alert_bytes"))
            if alert_bytes <= 0:
                raise self.error(join_key(key, "rpo_alert_bytes"), "must be more than 0 bytes (leave it out "
                                 "for no alert on bytes)")
        return VolumeConfig(name, size, region, extent, mode, members, async_queue, copy_rate, on_loss, timeout,
                            split, auto_promote, start, stop, command_timeout, rpo_alert_seconds=alert_seconds,
                            rpo_alert_bytes=alert_bytes, shipping=shipping,
                            group=self.name(self.string(table["group"], join_key(key, "group")), join_key(key, "group"),
                                            "consistency group") if "group" in table else None,
                            hooks=self.hooks(table.get("hooks", []), join_key(key, "hooks"), command_timeout))

    def hooks(self, value: object, key: str, default_timeout: int) -> tuple[Hook, ...]:
        """``[[volumes.V.hooks]]``: ``on`` (event kinds), ``run`` (a command),
        optional ``where`` (event field -> a value or a list of values) and
        ``timeout`` (seconds, default the volume's command_timeout)."""
        if not isinstance(value, list):
            raise self.error(key, f"expected an array of tables ([[{key}]]), got {describe(value)}")
        hooks = []
        for i, table in enumerate(value):
            at = f"{key}[{i}]"
            table = self.table(table, at)
            self.check_keys(table, at, configkeys.HOOK.names)
            on = self.require(table, at, "on", 'an event kind or a list of them, e.g. ["link", "split_brain"]')
            kinds = [on] if isinstance(on, str) else on
            if not isinstance(kinds, list) or not kinds or not all(isinstance(k, str) for k in kinds):
                raise self.error(join_key(at, "on"), f"expected an event kind or a non-empty list of them, "
                                                     f"got {describe(on)}")
            for k in kinds:
                if k not in HOOK_KINDS:
                    raise self.error(join_key(at, "on"), f"{json.dumps(k)} is not an event kind (expected one of: "
                                                         f"{', '.join(HOOK_KINDS)}){did_you_mean(k, HOOK_KINDS)}")
            run = self.command(self.require(table, at, "run", "a command (string or list of strings)"),
                               join_key(at, "run"))
            fields = {"volume", "node", "member", *(f for k in kinds for f in KINDS[k])}
            where = []
            raw_where = self.table(table.get("where", {}), join_key(at, "where"))
            for name, accepted in raw_where.items():
                wkey = join_key(join_key(at, "where"), name)
                if name not in fields:
                    raise self.error(wkey, f"{', '.join(kinds)} events have no field {json.dumps(name)} (fields: "
                                           f"{', '.join(sorted(fields))}){did_you_mean(name, sorted(fields))}")
                values = accepted if isinstance(accepted, list) else [accepted]
                if not values or not all(isinstance(v, (str, bool, int)) for v in values):
                    raise self.error(wkey, f"expected a string, boolean or integer, or a list of them, got "
                                           f"{describe(accepted)}")
                where.append((name, tuple(values)))
            timeout = self.integer(table.get("timeout", default_timeout), join_key(at, "timeout"), 1)
            hooks.append(Hook(tuple(kinds), run, tuple(where), timeout))
        return tuple(hooks)

    def two_sites_alone(self, key: str, members: Mapping[str, Member], witnesses: Mapping[str, Witness],
                        auto_promote: bool) -> None:
        """``on_quorum_loss = "continue"`` (two sites without a witness) is safe
        only where a lost peer cannot take over by itself: exactly two voting
        members, no witness votes (they would give the survivor a quorum), and
        no ``auto_promote`` (the survivor must only ever be forced)."""
        why = None
        if len(members) != 2:
            why = (f"this volume has {len(members)} member(s); with three or more a majority survives the loss "
                   'of one, so use "suspend"')
        elif silent := [name for name, m in members.items() if m.votes < 1]:
            why = f"member {silent[0]} has no vote; both members must vote (votes >= 1)"
        elif voting := [w.name for w in witnesses.values() if w.votes > 0]:
            why = (f"witness {voting[0]} holds votes; with a witness the survivor of a lost primary can get "
                   'quorum, so keep "suspend" (or give the witnesses 0 votes)')
        elif auto_promote:
            why = ("auto_promote = true is set; the survivor of a lost primary must never promote itself "
                   "(only 'gmd primary --force'); remove auto_promote")
        if why:
            raise self.error(key, f'"continue" is for two sites without a witness: exactly two members, '
                                  f"both voting, no witness votes, no auto_promote; {why}")

    def members(
        self,
        value: object,
        key: str,
        volume_mode: str,
        nodes: Mapping[str, Node],
        witnesses: Mapping[str, Witness],
        shipping: Shipping,
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
            mkey = join_key(key, node_name)
            if node_name not in nodes:
                if node_name in witnesses:
                    message = (
                        f"{json.dumps(node_name)} is a witness, not a node: witnesses hold "
                        f"only votes, members need a node (configured nodes: {name_list(nodes)})"
                    )
                else:
                    message = (
                        f"{json.dumps(node_name)} is not a configured node "
                        f"(configured nodes: {name_list(nodes)}){did_you_mean(node_name, nodes)}"
                    )
                raise self.error(mkey, message)
            self.table(table, mkey)
            self.check_keys(table, mkey, configkeys.MEMBER.names)
            device = self.path(
                self.require(table, mkey, "device", "a path"), join_key(mkey, "device")
            )
            statemap = self.path(
                self.require(table, mkey, "statemap", "a path"), join_key(mkey, "statemap")
            )
            undo_log, undo_size = self.undo_log(table, mkey)
            paths = [(device, "device"), (statemap, "statemap")] + ([(undo_log, "undo_log")] if undo_log else [])
            for path, what in paths:
                where = join_key(mkey, what)
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
                mode = self.mode(table["mode"], join_key(mkey, "mode"))
            votes = nodes[node_name].votes
            if "votes" in table:
                votes = self.integer(table["votes"], join_key(mkey, "votes"), 0)
            journal = None
            journal_size = DEFAULT_JOURNAL_SIZE
            if "journal" in table:
                journal = self.path(table["journal"], join_key(mkey, "journal"))
                where = join_key(mkey, "journal")
                for other in (device, statemap):
                    if journal == other:
                        raise self.error(where, f"{journal} is also this member's device or state map")
            if "journal_size" in table:
                if journal is None:
                    raise self.error(join_key(mkey, "journal_size"), "set without a journal (add journal = "
                                     '"/var/lib/gmd/VOLUME.journal" or remove it)')
                journal_size, _ = self.size(table["journal_size"], join_key(mkey, "journal_size"))
                if journal_size < MIN_JOURNAL_SIZE:
                    raise self.error(join_key(mkey, "journal_size"),
                                     f"{show_bytes(journal_size)} is below the minimum {show_bytes(MIN_JOURNAL_SIZE)}")
            test_size = DEFAULT_TEST_IMAGE_SIZE
            if "test_image_size" in table:
                raw = table["test_image_size"]
                test_size, _ = self.size(raw, join_key(mkey, "test_image_size"))
                if test_size < MIN_TEST_IMAGE_SIZE:
                    raise self.error(join_key(mkey, "test_image_size"), f"{as_written(raw, test_size)} is smaller "
                                     f"than the minimum {show_bytes(MIN_TEST_IMAGE_SIZE)}")
            members[node_name] = Member(node_name, device, statemap, mode, votes, journal=journal,
                                        journal_size=journal_size, undo_log=undo_log, undo_log_size=undo_size,
                                        test_image_size=test_size, shipping=self.shipping(table, mkey, shipping))
        return members

    def undo_log(self, table: Mapping[str, Any], mkey: str) -> tuple[Path | None, int]:
        """A member's ``undo_log`` (a path) and ``undo_log_size`` (a size, at
        least :data:`MIN_UNDO_LOG_SIZE`; default :data:`DEFAULT_UNDO_LOG_SIZE`).
        A size without a log is refused: it would promise a consistent
        catch-up that nothing keeps."""
        if "undo_log" not in table:
            if "undo_log_size" in table:
                raise self.error(join_key(mkey, "undo_log_size"),
                                 "set without undo_log (expected undo_log = \"/path/file\" beside it)")
            return None, 0
        path = self.path(table["undo_log"], join_key(mkey, "undo_log"))
        raw = table.get("undo_log_size", DEFAULT_UNDO_LOG_SIZE)
        size, _ = self.size(raw, join_key(mkey, "undo_log_size"))
        if size < MIN_UNDO_LOG_SIZE:
            raise self.error(join_key(mkey, "undo_log_size"),
                             f"{as_written(raw, size)} is smaller than the minimum {show_bytes(MIN_UNDO_LOG_SIZE)}")
        return path, size


DEFAULT_JOURNAL_SIZE = 1 << 30  # bytes per async member a journal may hold
MIN_JOURNAL_SIZE = 1 << 20


_CLOCK_RE = re.compile(r"([0-9]{2}):([0-9]{2})")


def _normalized(addr: Address) -> tuple[str, int]:
    """Comparison key for duplicate detection: canonical IP or lower-case name."""
    try:
        host = str(ipaddress.ip_address(addr.host))
    except ValueError:
        host = addr.host.lower()
    return host, addr.port


_WILDCARDS = ("0.0.0.0", "::")


def _same_socket(a: Address, b: Address) -> bool:
    """Binding both would clash: one port, and one host or a wildcard host on either."""
    (host_a, port_a), (host_b, port_b) = _normalized(a), _normalized(b)
    return port_a == port_b and (host_a == host_b or host_a in _WILDCARDS or host_b in _WILDCARDS)


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
