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
    quorum_timeout = 30               #   this many seconds without quorum;
                                      #   or "continue": two members, no witness,
                                      #   the primary writes on alone (README,
                                      #   "Two sites without a witness")
    split_brain = "disconnect"        # default; or "discard-secondary",
                                      #   "discard-younger-primary", "discard-least-changes"

    [volumes.NAME.members.NODE]       # 1 to 8 members; NODE is a [nodes] name
    device = "/dev/vg/lv"             # required: backing file or block device
    statemap = "/var/lib/gmd/x.sm"    # required: this member's state map file
    mode = "sync"                     # optional; default: the volume's mode
    votes = 1                         # optional; default: the node's votes

How data is shipped TO a member (docs/DESIGN.md, "WAN economy"), in the
volume's table as the default for every member, in a member's table for it::

    compress = "none"                 # default; or "zstd"
    compress_level = 3                # default; 1..22 (zstd's levels)
    bandwidth = 0                     # bytes/s, or a size such as "4MiB"; 0 = no limit
    bandwidth_schedule = [            # local time; the first window that covers now wins
      {from = "08:00", to = "18:00", days = ["mon", "tue", "wed", "thu", "fri"], bandwidth = "2MiB"},
    ]                                 # "to" at or before "from": through midnight; days: every day

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

The work is shared by five modules: :mod:`gmd.configvalues` (:class:`ConfigError`,
defaults and limits, :func:`parse_size`, the wording of messages),
:mod:`gmd.configmodel` (the frozen dataclasses), :mod:`gmd.configkeys` (every
table and key with its description: the reference docs/CONFIG.md is made from
it, and the schema's allowed keys come from it), :mod:`gmd.configschema`
(:func:`parse_config`: the checks) and this one (finding and reading the file,
naming the local node). Every public name is importable from here.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from .configkeys import NO_VALUE, TOP, Key, Table, documented_tables, example_table, walk
from .configmodel import Address, Config, Member, Node, Shipping, TlsConfig, VolumeConfig, Witness
from .configschema import parse_config
from .configvalues import (
    DEFAULT_CONTROL_TIMEOUT,
    DEFAULT_EXTENT_SIZE,
    DEFAULT_MODE,
    DEFAULT_REGION_SIZE,
    DEFAULT_VOTES,
    MAX_MEMBERS,
    MAX_SIZE,
    MIN_REGION_SIZE,
    MODES,
    QUORUM_LOSS_POLICIES,
    SPLIT_BRAIN_POLICIES,
    GiB,
    KiB,
    MiB,
    PiB,
    TiB,
    ConfigError,
    name_list,
    parse_size,
    unknown_name,
)

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
    "Shipping",
    "VolumeConfig",
    "Witness",
    "load_config",
    "parse_config",
    "parse_size",
    "resolve_config_path",
    "resolve_node",
]

# The key reference (gmd.configkeys) for the docs generator
# (tools/config_reference.py): NO_VALUE, TOP, Key, Table, documented_tables,
# example_table, walk.
# Also importable from here, as before the split: TlsConfig, KiB .. PiB,
# DEFAULT_VOTES, DEFAULT_CONTROL_TIMEOUT, QUORUM_LOSS_POLICIES,
# SPLIT_BRAIN_POLICIES, MAX_SIZE.

DEFAULT_CONFIG_PATH = Path("/etc/gmd/gmd.toml")
CONFIG_ENV = "GMD_CONFIG"
NODE_ENV = "GMD_NODE"


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
                    unknown_name("node", value, config.nodes, config.witnesses, source),
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
        f"(configured nodes: {name_list(config.nodes)}; "
        f"this host's name {json.dumps(short)} is not one of them)",
    )
