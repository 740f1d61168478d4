"""Every table and key of the config file, declared once: the reference.

Owns :class:`Key`, :class:`Table` and the tree of tables rooted at
:data:`TOP`. The schema (:mod:`gmd.configschema`) takes each table's allowed
keys from here (``Table.names``), and ``python -m tools.config_reference``
renders docs/CONFIG.md from it, so a key the parser accepts is a key the
reference explains. The checks themselves (types, bounds, uniqueness) stay in
the schema; this module only says what each key is for. It imports only the
model and the value constants (for the choices a key accepts).

To add a key: add a :class:`Key` to its table below (in the order the
schema's "expected one of" message should list it), then regenerate the
reference with ``python -m tools.config_reference > docs/CONFIG.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .configmodel import Config, Member, Node, TlsConfig, VolumeConfig, Witness
from .configvalues import COMPRESSORS, MODES, QUORUM_LOSS_POLICIES, SPLIT_BRAIN_POLICIES, join_key


class _NoValue:
    def __repr__(self) -> str:
        return "NO_VALUE"


#: A key whose default is not one fixed value (it is inherited, or absent).
NO_VALUE: Any = _NoValue()


@dataclass(frozen=True)
class Key:
    """One key of a table, as the administrator meets it.

    ``type`` says in words what the value may be; ``description`` what it does
    (units, when to use it). ``default`` is the default written as a TOML value
    (``'"64KiB"'``), when there is one the file could spell; ``default_text``
    says it in words otherwise (or adds to it), and ``value`` is then what the
    parser makes of the key's absence, where that is one fixed value.
    ``requires`` names a key of the same table without which this one is
    refused (its default applies only beside it). ``example`` is a value the
    parser accepts (the tests parse a config made of every key's example).
    ``attr`` is the model attribute the key fills (dotted for a nested one,
    ``None`` for none). A key holding tables has ``table`` and ``shape``:
    ``"table"`` (one), ``"named"`` (``[key.NAME]`` tables) or ``"list"``.
    ``values`` documents each choice of a key limited to ``choices``.
    """

    name: str
    type: str
    description: str
    example: Any = None
    default: str | None = None
    default_text: str | None = None
    value: Any = NO_VALUE
    required: bool = False
    requires: str | None = None
    attr: str | None = ""  # "": the key's name
    table: Table | None = None
    shape: str = ""
    choices: tuple[str, ...] = ()
    values: tuple[tuple[str, str], ...] = ()

    @property
    def model_attr(self) -> str | None:
        """The dotted model attribute this key fills, or None."""
        return self.name if self.attr == "" else self.attr


@dataclass(frozen=True)
class Table:
    """One kind of TOML table: its keys, and the keys it shares with others."""

    title: str  # as it is written in the file, e.g. "[volumes.VOLUME]"
    description: str
    keys: tuple[Key, ...]
    includes: tuple[Table, ...] = ()  # key groups shared with other tables (shipping)
    placeholder: str = ""  # the NAME of a named table ("NODE")
    model: type | None = None  # the configmodel dataclass its keys fill

    @property
    def all_keys(self) -> tuple[Key, ...]:
        """Its own keys, then those of the groups it includes, in that order."""
        return self.keys + tuple(k for group in self.includes for k in group.keys)

    @property
    def names(self) -> tuple[str, ...]:
        """The keys the schema accepts here, in the order its messages list them."""
        return tuple(k.name for k in self.all_keys)

    def key(self, name: str) -> Key:
        """The key called ``name`` (KeyError if the table has none)."""
        for k in self.all_keys:
            if k.name == name:
                return k
        raise KeyError(name)


def _choices(key_values: tuple[tuple[str, str], ...]) -> str:
    return "one of: " + ", ".join(f'"{v}"' for v, _ in key_values)


SIZE = 'a size (bytes, or a string such as "64KiB")'
PATH = "a path (string; relative to the config file's directory)"
COMMAND = "a command: a string (run by /bin/sh -c) or a list of strings (argv, no shell)"
ADDRESSES = 'a "host:port" string or a list of them ("[::1]:7799" for IPv6)'


# ------------------------------------------------------- bandwidth_schedule


RULE = Table(
    title="bandwidth_schedule entries",
    description="One window of a bandwidth schedule, an inline table such as "
                '`{from = "08:00", to = "18:00", days = ["mon", "tue"], bandwidth = "2MiB"}`. '
                "The first window that covers the local time wins; outside every window the enclosing "
                "table's `bandwidth` applies.",
    keys=(
        Key("from", 'a local time of day, "HH:MM"', "Where the window starts (local time).",
            example="08:00", required=True),
        Key("to", 'a local time of day, "HH:MM", or "24:00"',
            "Where the window ends. At or before `from`, the window runs through midnight and "
            'belongs to the day it starts; "24:00" ends it at midnight.', example="18:00", required=True),
        Key("days", 'a list of days: "mon", "tue", "wed", "thu", "fri", "sat", "sun"',
            "The days (of the window's start) it applies on.", example=["mon", "tue", "wed", "thu", "fri"],
            default_text="every day"),
        Key("bandwidth", SIZE + " per second, or 0",
            "The limit in bytes per second inside the window; 0 for no limit, else at least 64 KiB/s.",
            example="2MiB", required=True),
    ),
)


# ---------------------------------------------------------------- hooks


HOOK = Table(
    title="[[volumes.VOLUME.hooks]]",
    description="A command run on some of the volume's events (the kinds and fields `gmd events` "
                "prints; docs/DESIGN.md, \"Events\"), e.g. to page someone on a split-brain or a lost "
                "member. It runs as the daemon's user (root) with the event in `GMD_*` variables: "
                "`GMD_EVENT` (the kind), `GMD_EVENT_JSON` (the whole event) and each field as "
                "`GMD_<FIELD>` (`GMD_VOLUME`, `GMD_NODE`, `GMD_MEMBER`, `GMD_LINK`, `GMD_WAS`, `GMD_SEQ`, "
                "...). At most 4 hooks run at once on a node; each run's end is a `hook` event.",
    keys=(
        Key("on", "an event kind or a list of them",
            "The kinds of event the hook runs on, e.g. `[\"link\", \"split_brain\", \"quorum\"]`.",
            example=["link", "split_brain"], required=True),
        Key("run", COMMAND, "The command.", example="logger -t gmd \"$GMD_VOLUME: $GMD_EVENT\"",
            required=True),
        Key("where", "a table: event field = a value or a list of values",
            "Run only on events whose fields have these values, e.g. `{was = \"connected\"}` with "
            "`on = \"link\"` for the loss of a member, `{ok = false}` with `on = \"quorum\"`.",
            example={"was": "connected"}, default_text="every event of those kinds"),
        Key("timeout", "an integer >= 1 (seconds)",
            "How long the command may run before it is killed with its process group.", example=30,
            default_text="the volume's `command_timeout`"),
    ),
)


# ------------------------------------------------------------- shipping


SHIPPING = Table(
    title="shipping keys",
    description="How every node ships data *to* a member over its links: compression and a bandwidth "
                "limit (docs/DESIGN.md, \"WAN economy\"). In a volume's table they are the default for "
                "each of its members; in a member's table they set that member's own, key by key. "
                "`gmd reload` applies a change at once. The defaults below are the volume's; a member's "
                "default is its volume's value.",
    keys=(
        Key("compress", _choices((("none", ""), ("zstd", ""))),
            "Compress writes and copy data sent to the member. Worth it on a slow WAN link; writes "
            "under 512 bytes, and data that does not shrink by an eighth, are sent as they are.",
            example="zstd", default='"none"', attr="shipping.compress", choices=COMPRESSORS,
            values=(("none", "send data as it is"),
                    ("zstd", "compress with zstd at `compress_level`"))),
        Key("compress_level", "an integer, 1 to 22 (zstd's levels)",
            "How hard zstd works: 1..3 are the fast levels, higher ones shrink a little more for much "
            "more CPU.", example=3, default="3", attr="shipping.compress_level"),
        Key("bandwidth", SIZE + " per second, or 0",
            "The most bytes per second sent to the member for this volume, all traffic included (writes, "
            "copies, bitmaps, pings), outside the schedule's windows; 0 for no limit, else at least 64 KiB/s.",
            example="10MiB", default="0", attr="shipping.bandwidth"),
        Key("bandwidth_schedule", "a list of tables {from, to, days, bandwidth}",
            "Time windows with their own limit, e.g. less during office hours (see below).",
            default="[]", attr="shipping.bandwidth_schedule", table=RULE, shape="list"),
    ),
)


# --------------------------------------------------------------- members


MEMBER = Table(
    title="[volumes.VOLUME.members.NODE]",
    description="One copy of the volume, on the node NODE (a `[nodes.NODE]` name); a volume has 1 to 8. "
                "Every member also takes the shipping keys.",
    placeholder="NODE",
    model=Member,
    keys=(
        Key("device", PATH, "The member's backing store on NODE: a file or a block device, at least the "
            "volume's size. `gmd init` creates a sparse file if there is none.",
            example="/srv/gmd/VOLUME.img", required=True),
        Key("statemap", PATH, "The member's state map file on NODE (its roles, generations and bitmap of "
            "out-of-sync regions); made by `gmd init`.",
            example="/var/lib/gmd/VOLUME.sm", required=True),
        Key("mode", _choices(tuple((m, "") for m in MODES)),
            "This member's replication mode, when it differs from the volume's (a far DR copy is "
            "usually \"async\").", example="sync", default_text="the volume's `mode`", choices=MODES,
            values=(("sync", "a write completes once this member has written it; as primary, no intent log"),
                    ("mwc", "a write completes once this member has written it; as primary, it logs intent"),
                    ("async", "a write completes without waiting for this member; it gets writes later, in "
                              "order"))),
        Key("votes", "an integer >= 0", "This member's votes in the volume's quorum, when they differ "
            "from the node's (0 for a far copy that should never decide).", example=1,
            default_text="the node's `votes`"),
        Key("journal", PATH, "Where this node, as primary, keeps the writes its async members have not "
            "acknowledged beyond `async_queue` (one file per member: PATH.MEMBER), so a long outage "
            "keeps write order instead of falling back to the bitmap.",
            example="/var/lib/gmd/VOLUME.journal", default_text="none: memory only", value=None),
        Key("journal_size", SIZE + ", at least 1MiB",
            "The most a journal file holds per async member; a longer outage falls back to the bitmap "
            "and a mini-copy.", example="20GiB", default='"1GiB"', requires="journal"),
        Key("undo_log", PATH, "The member's own undo log: while it is caught up out of order (from the "
            "bitmap), it keeps its last consistent image, and `gmd primary --force` rolls back to it. "
            "For a far async copy that must stay usable.", example="/var/lib/gmd/VOLUME.undo",
            default_text="none", value=None),
        Key("undo_log_size", SIZE + ", at least 1MiB", "The most the undo log holds; a catch-up that "
            "needs more is refused (nothing copied, the member stays consistent, the reason in `gmd status`) "
            "and retried. `gmd reload` applies a change.",
            example="4GiB", default='"1GiB"', requires="undo_log"),
        Key("test_image_size", SIZE + ", at least 1MiB", "What a test failover on this member may keep "
            "of overwritten contents and write of its own, together; the test ends when it runs out "
            "(`gmd test-failover start --space` overrides it).", example="8GiB", default='"1GiB"'),
    ),
    includes=(SHIPPING,),
)


# ---------------------------------------------------------------- volumes


VOLUME = Table(
    title="[volumes.VOLUME]",
    description="A mirrored volume: its geometry, replication mode, policies and members. Every "
                "volume also takes the shipping keys, as its members' default.",
    placeholder="VOLUME",
    model=VolumeConfig,
    keys=(
        Key("size", SIZE + "; a multiple of `region_size`", "The volume's size, the same on every member.",
            example="4GiB", required=True),
        Key("region_size", SIZE + "; a power of two, at least 4KiB",
            "The granularity of out-of-sync tracking: a write marks whole regions, and a copy moves "
            "whole regions. Larger means smaller state maps and coarser copies.",
            example="64KiB", default='"64KiB"'),
        Key("extent_size", SIZE + "; a power of two, at least `region_size`",
            "The unit of write intent (the activity log of mwc and async primaries): after a crash of "
            "the primary only its hot extents are merged. Larger means fewer state map commits and "
            "larger merges after a crash.",
            example="4MiB", default='"4MiB"'),
        Key("mode", _choices(tuple((m, "") for m in MODES)),
            "When a write completes, for every member that does not set its own.", example="mwc",
            default='"mwc"', choices=MODES,
            values=(("sync", "once it is written locally and on every connected sync/mwc member; no "
                             "intent log, so a crash of the primary costs a full merge"),
                    ("mwc", "as sync, and the primary logs intent per extent (mirror write consistency), "
                            "so a crash of the primary costs a merge of its hot extents only"),
                    ("async", "once it is written locally; members get it later, in order (their lag is "
                              "their RPO)"))),
        Key("members", "a table of [volumes.VOLUME.members.NODE] tables",
            "The volume's copies, 1 to 8, keyed by node.", required=True, table=MEMBER, shape="named"),
        Key("async_queue", SIZE, "How far (in bytes of writes) an async member may trail in memory "
            "before its writes go to the `journal`, or are tracked in the bitmap only.",
            example="64MiB", default='"64MiB"'),
        Key("copy_rate", SIZE + " per second",
            "The most the copy engine works through per member per second, counted in bytes compared "
            "(read on both sides). Application writes always go first; `gmd resync --rate` changes it "
            "for a running copy.", example="50MiB", default_text="no limit", value=0),
        Key("on_quorum_loss", _choices(tuple((p, "") for p in QUORUM_LOSS_POLICIES)),
            "What a write does while the primary has no quorum.", example="fail", default='"suspend"',
            choices=QUORUM_LOSS_POLICIES,
            values=(("suspend", "it waits until quorum returns"),
                    ("fail", "it gets EIO after `quorum_timeout` seconds"),
                    ("continue", "two sites without a witness, HAGEO style: only for a volume of exactly two "
                                 "voting members, no witness with votes and no `auto_promote`. The primary "
                                 "writes on alone when its peer is lost (the peer is recorded outdated first, "
                                 "and gets a mini-copy when back); the survivor of a lost primary is promoted "
                                 "only with `gmd primary --force`, and forcing it while the primary lives "
                                 "makes a split-brain (README, \"Two sites without a witness\")"))),
        Key("quorum_timeout", "an integer >= 1 (seconds)",
            'How long a write waits for quorum before EIO, under on_quorum_loss = "fail".',
            example=30, default="30"),
        Key("split_brain", _choices(tuple((p, "") for p in SPLIT_BRAIN_POLICIES)),
            "Which side discards its changes when two members that both wrote meet again "
            "(`gmd resolve` ends it by hand).", example="discard-secondary", default='"disconnect"',
            choices=SPLIT_BRAIN_POLICIES,
            values=(("disconnect", "none: they stay apart until the operator decides"),
                    ("discard-secondary", "the side that is secondary then, if exactly one is"),
                    ("discard-younger-primary", "the side promoted last"),
                    ("discard-least-changes", "the side that wrote fewer regions since the split"))),
        Key("auto_promote", "true or false",
            "Automatic takeover: a secondary with an uptodate disk and quorum promotes itself when no "
            "primary is in sight for 6 s, and a primary that loses quorum fences itself. Changeable "
            "with `gmd reload`.", example=True, default="false"),
        Key("start_command", COMMAND,
            "Run after this node becomes primary (in the background), e.g. to mount and start the "
            "application; it gets GMD_EVENT, GMD_VOLUME, GMD_NODE, GMD_REASON, GMD_DEVICE and GMD_LOOP.",
            example="mount $GMD_LOOP /srv/app && systemctl start app", default_text="none", value=None),
        Key("stop_command", COMMAND, "Run before this node stops being primary, e.g. to stop the "
            "application and unmount; same environment as `start_command`.",
            example=["/usr/local/sbin/stop-app"], default_text="none", value=None),
        Key("command_timeout", "an integer >= 1 (seconds)",
            "How long a start or stop command may run before it is killed with its process group.",
            example=60, default="60"),
        Key("rpo_alert_seconds", "an integer >= 1 (seconds)",
            "Warn (log once, flag in `gmd status`) when a member would lose more than this many seconds "
            "of writes if the primary were lost now.", example=60, default_text="no alert", value=None),
        Key("rpo_alert_bytes", SIZE, "The same alert, measured in bytes the member lacks.",
            example="256MiB", default_text="no alert", value=None),
        Key("group", "a name (letters, digits, \".\", \"_\", \"-\")",
            "A consistency group: volumes with the same group (a database's data and logs) stop at one "
            "instant of all of them at their far members. They need members on the same nodes in the "
            "same modes.", example="erp", default_text="none: the volume stands alone", value=None),
        Key("hooks", "a list of [[volumes.VOLUME.hooks]] tables",
            "Commands run on the volume's events.", table=HOOK, shape="list",
            default_text="none", value=()),
    ),
    includes=(SHIPPING,),
)


# --------------------------------------------------------- nodes, witnesses


NODE = Table(
    title="[nodes.NODE]",
    description="A host that runs a node daemon (`gmd daemon`) and may hold members. NODE is matched "
                "against `--node`, GMD_NODE or the host's short name.",
    placeholder="NODE",
    model=Node,
    keys=(
        Key("address", ADDRESSES, "Where peers reach this node's daemon; one entry per network path "
            "(the daemon uses every path, and survives the loss of all but one).",
            example=["10.0.0.1:7799", "10.0.1.1:7799"], required=True, attr="addresses"),
        Key("listen", ADDRESSES + "; as many as `address`",
            "Where the daemon binds, when peers reach it at another address (NAT, a WAN emulator in "
            "between): listen[i] is where address[i] arrives.",
            example=["0.0.0.0:7799", "0.0.0.0:7800"], default_text="the addresses in `address`", value=()),
        Key("control", PATH, "The daemon's control socket, which every `gmd` command talks to.",
            example="/run/gmd/NODE.sock", default='"/run/gmd/NODE.sock"'),
        Key("control_timeout", "an integer >= 1 (seconds)",
            "How long a control client may take to send its request line before the daemon drops it.",
            example=10, default="10"),
        Key("mount", PATH, "The node's FUSE mount point: each volume appears there as a file (VOLUME), "
            "while this node is primary.", example="/run/gmd/NODE", default='"/run/gmd/NODE"'),
        Key("votes", "an integer >= 0", "The node's votes in each volume's quorum (a member may set its "
            "own); 0 for a node that should never decide.", example=1, default="1"),
        Key("up", "a list of volume names (volumes with a member on this node)",
            "Volumes the daemon attaches when it starts, as `gmd up` would; it reports ready to systemd "
            "only once they are up, and fails its start if one cannot come up. Read at start only.",
            example=["VOLUME"], default="[]"),
        Key("up_loop", "a list of volume names (not also in `up`)",
            "The same, each with a loop device whenever this node is primary (`gmd up --loop`).",
            example=[], default="[]"),
        Key("metrics", 'a "host:port" string',
            "Where the daemon serves Prometheus metrics over HTTP (`/metrics`; docs/DESIGN.md, "
            "\"Metrics\"). Not one of its peer listen addresses; the metrics are unauthenticated, so "
            "keep it on loopback or a management network.", example="127.0.0.1:9942",
            default_text="off", value=None),
    ),
)

WITNESS = Table(
    title="[witnesses.WITNESS]",
    description="A diskless vote holder (`gmd witness --name WITNESS`), best at a third site: it breaks "
                "the tie between two sites and grants takeovers. A witness may not share a node's name.",
    placeholder="WITNESS",
    model=Witness,
    keys=(
        Key("address", ADDRESSES, "Where nodes reach the witness; one entry per path.",
            example="10.0.2.1:7800", required=True, attr="addresses"),
        Key("votes", "an integer >= 0", "The witness's votes in the quorum of every volume.",
            example=1, default="1"),
        Key("state", PATH, "The witness's small registration file (which generation each volume writes "
            "with, which members are outdated), kept across its restarts.",
            example="/var/lib/gmd/witness-WITNESS.json", default='"/var/lib/gmd/witness-WITNESS.json"'),
        Key("metrics", 'a "host:port" string',
            "Where the witness serves Prometheus metrics (registrations, leases, requests).",
            example="127.0.0.1:9943", default_text="off", value=None),
    ),
)

TLS = Table(
    title="[tls]",
    description="TLS on every peer link, verified both ways against the cluster's CA; the HMAC handshake "
                "with `secret` still runs inside it. The paths are the same on every node; each node keeps "
                "its own certificate and key there.",
    model=TlsConfig,
    keys=(
        Key("cert", PATH, "This node's certificate (PEM).", example="/etc/gmd/tls/node.crt", required=True),
        Key("key", PATH, "Its private key (PEM).", example="/etc/gmd/tls/node.key", required=True),
        Key("ca", PATH, "The CA certificate that signed every node's certificate (PEM).",
            example="/etc/gmd/tls/ca.crt", required=True),
    ),
)

TOP = Table(
    title="top level",
    description="The file itself: one TOML file, the same on every node (`--config FILE`, else "
                "GMD_CONFIG, else /etc/gmd/gmd.toml).",
    model=Config,
    keys=(
        Key("secret", "a non-empty string", "Shared by all nodes and witnesses: every peer connection "
            "proves it knows it (HMAC handshake). Keep the file readable by root only.",
            example="change-me", required=True),
        Key("nodes", "a table of [nodes.NODE] tables", "The hosts running node daemons; at least one.",
            required=True, table=NODE, shape="named"),
        Key("witnesses", "a table of [witnesses.WITNESS] tables", "Diskless vote holders.",
            default_text="none", table=WITNESS, shape="named"),
        Key("volumes", "a table of [volumes.VOLUME] tables", "The mirrored volumes.",
            default_text="none", table=VOLUME, shape="named"),
        Key("tls", "a table", "TLS for peer links.", default_text="none: plain TCP (still authenticated "
            "by `secret`)", value=None, table=TLS, shape="table"),
    ),
)


def walk(table: Table = TOP, path: str = "") -> Iterator[tuple[str, Table]]:
    """Every table under ``table`` with its dotted path, placeholders for names:
    ``("", TOP)``, ``("nodes.NODE", NODE)``, ...,
    ``("volumes.VOLUME.bandwidth_schedule[]", RULE)``; each once per place."""
    yield path, table
    for key in table.all_keys:
        if key.table is None:
            continue
        sub = join_key(path, key.name)
        if key.shape == "named":
            sub = join_key(sub, key.table.placeholder)
        elif key.shape == "list":
            sub += "[]"
        yield from walk(key.table, sub)


def documented_tables() -> tuple[Table, ...]:
    """Each kind of table once, in reference order: as :func:`walk` meets
    them, a shared key group right after the last table that includes it."""
    tables: list[Table] = []
    for _, table in walk():
        if not any(table is t for t in tables):
            tables.append(table)
    for group in {id(g): g for t in list(tables) for g in t.includes}.values():
        last = max(i for i, t in enumerate(tables) if any(g is group for g in t.includes))
        tables.insert(last + 1, group)
    return tuple(tables)


def example_table(table: Table = TOP, *, minimal: bool = False,
                  extra: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A TOML document (as a dict) for ``table`` made of its keys' examples,
    one of each sub-table, named by the placeholders (``[nodes.NODE]``).

    ``minimal``: only the required keys (and those named in ``extra``), but
    still one of each kind of named table, so each default can be seen applied."""
    doc: dict[str, Any] = {}
    for key in table.all_keys:
        if key.table is not None and (not minimal or key.required or key.shape == "named"):
            sub = example_table(key.table, minimal=minimal, extra=extra)
            doc[key.name] = {"named": {key.table.placeholder: sub}, "list": [sub]}.get(key.shape, sub)
        elif key.table is None and (not minimal or key.required or key.name in extra):
            doc[key.name] = key.example
    return doc
