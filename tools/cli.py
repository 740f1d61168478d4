"""The ``gmd`` command line, and the HAGEO-style ``gmddirty`` / ``gmdclean``.

Results go to stdout (``--json`` for scripts), logs and errors to stderr. Exit
codes: 0 ok, 1 failed, 2 usage (see :mod:`gmd.errors`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import sys
import time
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from gmd import __version__, admin, control
from gmd.config import (Config, ConfigError, config_file_risks, load_config, parse_size, resolve_config_path,
                        resolve_node)
from gmd.errors import ExitCode, GmdError, Refused, UsageError, exit_code_for
from gmd.requests import check_request
from tools.demo import run_demo
from tools.drill import FAULTS as DRILL_FAULTS
from tools.drill import MODES as DRILL_MODES
from tools.drill import run_drill
from tools import units
from tools.status_text import PLAIN_WIDTH, human_bytes, render_plain, status_view, wants_colour


class DaemonRefused(GmdError):
    """The daemon answered a request with an error."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = ExitCode(exit_code) if exit_code in (0, 1, 2) else ExitCode.FAILED

log = logging.getLogger("gmd")

COMMON_EPILOG = """\
exit codes: 0 ok, 1 failed, 2 usage error

environment:
  GMD_CONFIG   cluster config file (default /etc/gmd/gmd.toml); --config wins
  GMD_NODE     this node's name in the config; --node wins (else the host name)
"""

#: The most common examples, under ``gmd --help``: (command line, what it does).
TOP_EXAMPLES: Sequence[tuple[str, str]] = (
    ("gmd demo", "a whole local cluster end to end (root)"),
    ("gmd drill --fault kill-primary", "a disaster-recovery drill on a local cluster (root)"),
    ("gmd drill --test-failover --sites 3", "a test failover on the far site under load (root)"),
    ("gmd init appslv", "create this node's state map (and backing file)"),
    ("gmd dirty appslv", "this copy is the source: others get a full copy"),
    ("gmd clean appslv", "this copy is the target of a full copy"),
    ("gmd daemon --node labor1", "run the node daemon (foreground; SIGTERM stops it cleanly)"),
    ("gmd up appslv && gmd primary appslv", ""),
    ("gmd status appslv --json", "machine-readable status (works without a daemon)"),
    ("gmd test-failover start appslv --node labor3", "a test image of labor3's copy (appslv@test in its mount)"),
    ("gmddirty -l appslv", "HAGEO spelling of 'gmd dirty appslv'"),
    ("gmd status --help", "any command's options and examples"),
)

#: Examples shown under each command's --help: (command line, what it does).
#: Every command has some (tests/unit/test_cli_help.py parses each one).
EXAMPLES: dict[str, Sequence[tuple[str, str]]] = {
    "init": (("gmd init appslv", "create this node's state map (and a sparse backing file if absent)"),
             ("gmd init appslv --node labor2 --json", "the same for labor2, the result as JSON"),
             ("gmd init appslv --force", "replace an existing state map (the member then needs a full copy)")),
    "dirty": (("gmd dirty appslv", "this copy is the source: the other members get a full copy from it"),
              ("gmd dirty appslv --dry-run", "show what would change, change nothing"),
              ("gmd dirty appslv --skip-initial-copy", "all members are new zeroed files: no initial copy")),
    "clean": (("gmd clean appslv", "this copy is the target: it gets a full copy from an up-to-date member"),
              ("gmd clean appslv --dry-run --json", "the plan as JSON, nothing changed")),
    "daemon": (("gmd daemon --node labor1", "run labor1's daemon in the foreground (SIGTERM stops it)"),
               ("gmd daemon --config /etc/gmd/gmd.toml --no-mount", "a daemon that serves no FUSE mount")),
    "witness": (("gmd witness --name tiebreak", "run the witness [witnesses.tiebreak] in the foreground"),),
    "reload": (("gmd reload", "after adding a member or volume to the config: start it online"),
               ("gmd reload --node labor2", "the same in labor2's daemon")),
    "quorum": (("gmd quorum appslv", "votes present and needed"),
               ("gmd quorum appslv --expected-votes 1", "site B is lost for good: a majority of 1 vote is quorum"),
               ("gmd quorum appslv --reset", "back to the configured sum of votes")),
    "up": (("gmd up appslv", "attach appslv here and connect to its other members"),
           ("gmd up appslv --loop", "and attach a loop device whenever this node is primary")),
    "down": (("gmd down appslv", "disconnect and detach appslv here (a primary is demoted first)"),
             ("gmd down appslv --force", "even while its device is mounted (its users get I/O errors)")),
    "secondary": (("gmd secondary appslv", "demote this node (drains and flushes writes first)"),
                  ("gmd secondary appslv --force", "even while the device is mounted or open")),
    "primary": (("gmd primary appslv", "promote this node (needs quorum and an uptodate disk)"),
                ("gmd primary appslv --force", "without quorum: only when the other side is known to be down")),
    "resolve": (("gmd resolve appslv --discard-local --dry-run", "explain the split-brain and the plan"),
                ("gmd resolve appslv --discard-local", "this side's changes go (saved to an image first)")),
    "switchover": (("gmd switchover appslv --to labor2", "planned: labor2 becomes primary, no write lost"),),
    "demo": (("gmd demo", "two daemons, FUSE, loop + ext4 on loopback, mirror proved identical (root)"),
             ("gmd demo --keep", "and keep its directory (logs, config, images)")),
    "drill": (("gmd drill --fault kill-primary", "kill the primary under load, fail over, verify, fail back"),
              ("gmd drill --fault partition-primary --mode sync --report drill.md", "a partition, as Markdown too"),
              ("gmd drill --test-failover --sites 3", "a test failover on the far site under the workload"),
              ("gmd drill --config /etc/gmd/gmd.toml --volume appslv --overwrite --fault kill-secondary",
               "on a configured cluster (writes over appslv)")),
    "verify": (("gmd verify appslv", "compare every member with the primary; exit 1 if any differ"),
               ("gmd verify appslv --no-wait", "start it and return; 'gmd status' shows progress")),
    "resync": (("gmd resync appslv", "copy the regions marked out of sync"),
               ("gmd resync appslv --rate 50MiB", "at most 50 MiB/s per member")),
    "test-failover": (("gmd test-failover start appslv --node labor3", "a writable image of labor3's copy"),
                      ("gmd test-failover start appslv --loop --space 4GiB", "with a loop device and 4 GiB of room"),
                      ("gmd test-failover end appslv", "discard the image")),
    "status": (
        ("gmd status", "every volume of this node: members, copies, what to do next"),
        ("gmd status appslv --watch", "redraw in place every second until Ctrl-C"),
        ("gmd status appslv --watch --interval 5", "every 5 s (off a terminal: one plain frame each time)"),
        ("gmd status appslv --json", "machine-readable, for scripts (works without a daemon)"),
        ("gmd status appslv | less", "plain text off a terminal (so also with NO_COLOR set)"),
    ),
    "install-units": (("gmd install-units", "write gmd@.service and gmd-witness@.service to /etc/systemd/system"),
                      ("gmd install-units --dry-run", "show the units and where they would go"),
                      ("gmd install-units --config /etc/gmd/a.toml", "units that run with that config (GMD_CONFIG)")),
    "completion": (("gmd completion bash > /etc/bash_completion.d/gmd", "install bash completion"),
                   ("gmd completion zsh > /usr/local/share/zsh/site-functions/_gmd", "install zsh completion"),
                   ("gmd completion tcsh", "print the tcsh completion (source it from ~/.tcshrc)")),
    "gmddirty": (("gmddirty -l appslv", "HAGEO spelling of 'gmd dirty appslv'"),
                 ("gmddirty -l appslv --dry-run", "show what would change, change nothing")),
    "gmdclean": (("gmdclean -l appslv", "HAGEO spelling of 'gmd clean appslv'"),
                 ("gmdclean -l appslv --force", "even though this copy's data will be overwritten")),
}


_EXAMPLE_WIDTH = 46  # a longer command line has what it does on the next line


def _example_lines(examples: Sequence[tuple[str, str]]) -> str:
    width = max((len(line) for line, _ in examples if len(line) <= _EXAMPLE_WIDTH), default=0)
    lines = []
    for line, what in examples:
        if not what:
            lines.append(f"  {line}")
        elif len(line) > _EXAMPLE_WIDTH:
            lines.append(f"  {line}\n      {what}")
        else:
            lines.append(f"  {line:<{width}}  {what}")
    return "\n".join(lines)


EPILOG = COMMON_EPILOG + "\nexamples:\n" + _example_lines(TOP_EXAMPLES) + "\n"


def command_epilog(examples: Sequence[tuple[str, str]]) -> str:
    """The text under a command's --help: its examples, then exit codes and environment."""
    if not examples:
        return COMMON_EPILOG
    return "examples:\n" + _example_lines(examples) + "\n\n" + COMMON_EPILOG


def _common_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Options accepted both before and after the subcommand."""
    d = argparse.SUPPRESS if suppress else None
    parser.add_argument("--config", metavar="FILE", default=d, help="cluster config file (or GMD_CONFIG)")
    parser.add_argument("--node", metavar="NAME", default=d, help="this node's name (or GMD_NODE)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="log debugging detail to stderr")
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="log only errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gmd",
        description="gmd mirrors block volumes between hosts (host-based volume mirroring).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gmd {__version__}")
    _common_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, func: Callable[..., int], *,
                examples: Sequence[tuple[str, str]] = ()) -> argparse.ArgumentParser:
        # Every command's --help ends with examples of that command (EXAMPLES,
        # or the ``examples`` given here), then the exit codes and environment.
        p = sub.add_parser(name, help=help, description=help,
                           epilog=command_epilog(examples or EXAMPLES.get(name, ())),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _common_options(p, suppress=True)
        p.set_defaults(func=func)
        return p

    p = command("init", "create this node's state map for VOLUME (and a sparse backing file if absent)", cmd_init)
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("--force", action="store_true", help="replace an existing state map (the member then needs a full copy)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    for name, help, func in (
        ("dirty", "mark this side of VOLUME the copy source (gmddirty)", cmd_dirty),
        ("clean", "mark this side of VOLUME the copy target (gmdclean)", cmd_clean),
    ):
        p = command(name, help, func)
        p.add_argument("volume", metavar="VOLUME")
        p.add_argument("--force", action="store_true", help="do it even though it discards or overwrites data")
        p.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        if name == "dirty":
            p.add_argument("--skip-initial-copy", action="store_true",
                           help="the other members already hold identical data (e.g. all freshly "
                                "zeroed): no full copy. Wrong use silently leaves them different")

    p = command("daemon", "run this node's daemon in the foreground (SIGTERM stops it cleanly)", cmd_daemon)
    p.add_argument("--no-mount", action="store_true",
                   help="serve no FUSE mount (this node will not expose volumes as files)")

    p = command("witness", "run a witness (a diskless vote holder) in the foreground", cmd_witness)
    p.add_argument("--name", required=True, metavar="W", help="the witness's name in the config ([witnesses.W])")

    p = command("install-units", "write the systemd units gmd@.service (node daemon, instance = node name) "
                                 "and gmd-witness@.service (witness), for this gmd and config", cmd_install_units)
    p.add_argument("--dir", metavar="DIR", default=str(units.DEFAULT_UNIT_DIR),
                   help=f"where to write them (default {units.DEFAULT_UNIT_DIR})")
    p.add_argument("--force", action="store_true", help="replace units there that differ (e.g. edited by hand)")
    p.add_argument("--dry-run", action="store_true", help="show the units and what would be written; write nothing")

    p = command("reload", "re-read the config in the running daemon: add members or volumes online",
                cmd_reload)

    p = command("quorum", "show or override VOLUME's expected votes (persisted in the state map)", cmd_quorum)
    p.add_argument("volume", metavar="VOLUME")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--expected-votes", type=int, metavar="N",
                       help="count quorum as a majority of N votes instead of the configured sum "
                            "(after a site is lost for good, as OpenVMS's SET CLUSTER/EXPECTED_VOTES)")
    group.add_argument("--reset", action="store_true", help="go back to the configured sum of votes")

    p = command("up", "attach VOLUME on this node and connect to its other members", cmd_volume_op)
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("--loop", action="store_true",
                   help="attach a loop device to the volume's file whenever this node is primary")
    for name, help in (
        ("down", "disconnect VOLUME and detach it cleanly (demotes a primary first)"),
        ("secondary", "make this node secondary for VOLUME (drains and flushes writes first)"),
    ):
        p = command(name, help, cmd_volume_op)
        p.add_argument("volume", metavar="VOLUME")
        p.add_argument("--force", action="store_true",
                       help="demote even while the device is mounted or open (its users get I/O errors)")
    p = command("primary", "make this node primary for VOLUME (needs quorum and an uptodate disk)", cmd_volume_op)
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("--force", action="store_true",
                   help="promote without quorum, or a disk that is not uptodate (it becomes the copy "
                        "source); writes then go on without quorum until it is demoted. Only when the "
                        "other side is known to be down: two forced primaries diverge (split-brain)")

    p = command("resolve", "end a split-brain of VOLUME by discarding this side's changes (saved first)",
                cmd_resolve)
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("--discard-local", action="store_true", required=True,
                   help="this side's changes since the split go; the other side's data is copied here. "
                        "The diverging regions of this side are first saved to a read-only image")
    p.add_argument("--dry-run", action="store_true", help="explain what would happen, change nothing")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = command("switchover", "hand the primary role of VOLUME to NODE with no write lost (planned)",
                cmd_volume_op)
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("--to", required=True, metavar="NODE", help="the member to become primary (must be uptodate)")

    p = command("demo", "run a whole local cluster end to end: two daemons, FUSE, loop + ext4, "
                        "and prove the mirror identical (needs root)", cmd_demo)
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs, config, images)")

    p = command("drill", "a disaster-recovery drill: a verifying workload, a fault, failover, verification, "
                         "failback and a report (needs root; exit 0 only if every check passed)", cmd_drill)
    p.add_argument("--fault", choices=DRILL_FAULTS, help="what to break (or --test-failover)")
    p.add_argument("--test-failover", action="store_true",
                   help="instead of a fault: a test failover on --on NODE under the workload (the image must "
                        "be a frozen prefix while the member stays current; the member unchanged by it)")
    p.add_argument("--on", metavar="NODE",
                   help="with --test-failover: the member that runs it (default the far site with --sites 3, "
                        "else the secondary)")
    p.add_argument("--mode", choices=DRILL_MODES, default="mwc",
                   help="replication mode of the built-in local cluster (default mwc)")
    p.add_argument("--no-auto-promote", action="store_true",
                   help="local cluster without automatic takeover: the drill takes the operator's step")
    p.add_argument("--volume", metavar="VOLUME", help="with --config: the volume to drill")
    p.add_argument("--overwrite", action="store_true",
                   help="with --config: confirm that the drill may write over the volume's data")
    p.add_argument("--proxy", action="append", default=[], metavar="NODE=SOCKET",
                   help="with --config: the control socket of a WAN proxy on NODE's links (for partitions "
                        "and slow links; repeatable)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (progress goes to stderr)")
    p.add_argument("--report", metavar="FILE.md", help="also write the report as Markdown")
    p.add_argument("--seed", type=int, help="the workload's seed (printed; replays a drill's write pattern)")
    p.add_argument("--writers", type=int, default=4, help="concurrent writers (default 4)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of writes before the fault (default 3)")
    p.add_argument("--outage", type=float, default=3.0,
                   help="seconds of writes during the fault or on the new primary (default 3)")
    p.add_argument("--no-witness", action="store_true",
                   help="local cluster of two sites alone (1 vote each): a lost primary's survivor is forced")
    p.add_argument("--wan-delay", type=float, default=0.0, metavar="SECONDS",
                   help="local cluster: one-way delay on every link (e.g. 0.02; an async member then lags)")
    p.add_argument("--sites", type=int, choices=(2, 3), default=2,
                   help="local cluster: 3 adds a far DR site (labor3: async, 0 votes, 30 ms, 20 MB/s)")
    p.add_argument("--keep", action="store_true", help="keep the local cluster's directory")

    p = command("verify", "compare VOLUME's members with the primary online; mark differences "
                          "(exit 1 if any)", cmd_verify)
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-wait", action="store_true",
                   help="start it and return; follow it with 'gmd status', which also keeps the last report")
    p = command("resync", "copy the regions marked out of sync (by verify or an outage) to the members",
                cmd_volume_op)
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("--rate", metavar="SIZE", help='copy rate limit per member, e.g. "50MiB" (per second); 0 for none')

    p = command("test-failover", "on a secondary member: a writable point-in-time image of its copy "
                                 "(VOLUME@test in its mount) while replication goes on; end discards it",
                cmd_test_failover)
    p.add_argument("action", choices=("start", "end"), help="start a test failover, or end it")
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("--loop", action="store_true", help="with start: also attach a loop device to the image")
    p.add_argument("--space", metavar="SIZE",
                   help='with start: what the image may keep of overwritten contents and write of its own, '
                        'together (e.g. "4GiB"; default the member\'s test_image_size, 1 GiB); the test ends '
                        "when it runs out")
    p.add_argument("--json", action="store_true", help="print the test's status as JSON")

    p = command("events", "stream the state changes of this node's volumes, one JSON object a line "
                          "(role, disk, link, paths, quorum, copies, split-brain, errors)", cmd_events,
                examples=[("gmd events", "every change on this node, as it happens (Ctrl-C to stop)"),
                          ("gmd events appslv --now", "appslv's current state as events, then its changes"),
                          ("gmd events --now-only", "the current state as events, then exit"),
                          ("gmd events appslv --count 1", "wait for the next change of appslv, print it, exit")])
    p.add_argument("volume", metavar="VOLUME", nargs="?", help="one volume's events (default: every volume's)")
    p.add_argument("--now", action="store_true", help="first print the current state as events (marked "
                                                      '"now": true, ended by a "now_end" event)')
    p.add_argument("--now-only", action="store_true", help="print the current state as events, then exit")
    p.add_argument("--count", type=int, metavar="N", help="exit after N events (the --now ones included)")

    p = command("status", "show roles, modes, disk and link states, out-of-sync bytes, lag, copies and "
                          "what to do next (colour only on a terminal; NO_COLOR turns it off)", cmd_status)
    p.add_argument("volume", metavar="VOLUME", nargs="?", help="one volume (default: all of this node's)")
    p.add_argument("--json", action="store_true", help="print JSON (a stable interface for scripts)")
    p.add_argument("--watch", action="store_true",
                   help="redraw in place until Ctrl-C; off a terminal, print a plain frame each interval")
    p.add_argument("--interval", type=_watch_interval, metavar="S",
                   help="with --watch: seconds between frames (default 1)")

    p = command("completion", "print a shell completion script for gmd (commands, options, choices)",
                cmd_completion)
    p.add_argument("shell", choices=COMPLETION_SHELLS, help="the shell the script is for")
    return parser


# ------------------------------------------------------------------ helpers


# The long-running services log what they do (coming up, members, holdings);
# the one-shot commands only what went wrong.
SERVICE_COMMANDS = frozenset({"daemon", "witness"})


def _setup_logging(args: argparse.Namespace) -> None:
    quiet_level = logging.INFO if getattr(args, "command", None) in SERVICE_COMMANDS else logging.WARNING
    level = logging.DEBUG if getattr(args, "debug", False) else (
        logging.ERROR if getattr(args, "quiet", False) else quiet_level)
    logging.basicConfig(level=level, stream=sys.stderr, format="gmd: %(levelname)s: %(message)s")


def _load(args: argparse.Namespace) -> tuple[Config, str]:
    config = load_config(resolve_config_path(getattr(args, "config", None), os.environ))
    try:
        node = resolve_node(getattr(args, "node", None), os.environ, config)
    except ConfigError as e:
        raise Refused("config", message=e.message) from None
    return config, node


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


# ----------------------------------------------------------------- commands


def cmd_init(args: argparse.Namespace) -> int:
    config, node = _load(args)
    r = admin.init_volume(config, node, args.volume, force=args.force)
    if args.json:
        _print_json(r.to_json())
    else:
        what = "replaced" if r.replaced_map else "created"
        print(f"{r.volume}: {what} state map {r.statemap} for member {r.node}")
        if r.created_device:
            print(f"{r.volume}: created sparse backing file {r.device}")
        print(f"{r.volume}: next, mark the source side with 'gmd dirty {r.volume}' "
              f"and the other side with 'gmd clean {r.volume}'")
    return ExitCode.OK


def _mark(args: argparse.Namespace, func: Callable[..., admin.MarkResult]) -> int:
    config, node = _load(args)
    extra = {"skip_initial_copy": True} if getattr(args, "skip_initial_copy", False) else {}
    r = func(config, node, args.volume, force=args.force, dry_run=args.dry_run, **extra)
    if args.json:
        _print_json(r.to_json())
        return ExitCode.OK
    prefix = "would mark" if r.dry_run else "marked"
    if r.action == "source":
        print(f"{r.volume}: {prefix} {r.node} the copy source (disk {r.disk_before} -> {r.disk_after})")
        if r.peers_needing_copy:
            print(f"{r.volume}: full copy pending to: {', '.join(r.peers_needing_copy)}")
        elif getattr(args, "skip_initial_copy", False):
            print(f"{r.volume}: no initial copy: the other members are taken to be identical")
    else:
        print(f"{r.volume}: {prefix} {r.node} the copy target (disk {r.disk_before} -> {r.disk_after}); "
              "it will receive a full copy from an up-to-date member")
    return ExitCode.OK


def cmd_dirty(args: argparse.Namespace) -> int:
    return _mark(args, admin.mark_dirty)


def cmd_clean(args: argparse.Namespace) -> int:
    return _mark(args, admin.mark_clean)


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(keep=args.keep)


def cmd_drill(args: argparse.Namespace) -> int:
    # --config is a common option: here it selects a configured cluster instead of the local one.
    config = getattr(args, "config", None)
    if (args.fault is None) == (not args.test_failover):
        raise Refused("drill-options", message="give one of --fault F and --test-failover")
    if args.on is not None and not args.test_failover:
        raise Refused("drill-options", message="--on NODE goes with --test-failover")
    if args.writers < 1 or args.warmup < 0 or args.outage < 0 or not 0 <= args.wan_delay <= 1:
        raise Refused("drill-options", message="--writers must be at least 1, --warmup and --outage not "
                                               "negative, --wan-delay between 0 and 1 s")
    return run_drill(fault=args.fault, mode=args.mode, auto_promote=not args.no_auto_promote,
                     config=Path(config) if config else None, volume=args.volume, overwrite=args.overwrite,
                     proxies=args.proxy, as_json=args.json, report=Path(args.report) if args.report else None,
                     keep=args.keep, seed=args.seed, writers=args.writers, warmup=args.warmup, outage=args.outage,
                     delay=args.wan_delay, witness=not args.no_witness, sites=args.sites,
                     test_failover=args.test_failover, on=args.on)


COMPLETION_SHELLS = ("bash", "zsh", "tcsh")


def cmd_completion(args: argparse.Namespace) -> int:
    # shtab writes a static script from the parser itself, so completion never
    # lags behind a new command or option; imported here, as only this needs it.
    import shtab

    sys.stdout.write(shtab.complete(build_parser(), shell=args.shell))
    return ExitCode.OK


def cmd_daemon(args: argparse.Namespace) -> int:
    # Imported here, not at the top: trio and the whole engine would slow every
    # other command (status, dirty, ...) that never runs a daemon.
    import trio

    from gmd.entry import run_daemon

    config, node = _load(args)
    trio.run(run_daemon, config, node, not args.no_mount)
    return ExitCode.OK


def cmd_witness(args: argparse.Namespace) -> int:
    import trio  # here, not at the top: see cmd_daemon

    from gmd.entry import run_witness

    config = load_config(resolve_config_path(getattr(args, "config", None), os.environ))
    if args.name not in config.witnesses:
        known = ", ".join(config.witnesses) or "none"
        raise Refused("no-such-witness", path=config.path, name=args.name, known=known)
    trio.run(run_witness, config, args.name)
    return ExitCode.OK


def cmd_install_units(args: argparse.Namespace) -> int:
    config_path = resolve_config_path(getattr(args, "config", None), os.environ).absolute()
    rendered = units.render(units.gmd_executable(), config_path)
    unit_dir = Path(args.dir)
    steps = units.plan(unit_dir, rendered, force=args.force or args.dry_run)
    if args.dry_run:
        for step in steps:
            what = {"write": "would write", "unchanged": "unchanged:",
                    "replace": "would replace" if args.force else "differs (needs --force):"}[step.action]
            print(f"--- {what} {step.path}\n{step.unit.text}")
        print("--- dry run: nothing written")
    else:
        units.install(steps)
        for step in steps:
            print({"write": "wrote", "replace": "replaced", "unchanged": "unchanged"}[step.action], step.path)
    print(f"the units run {units.gmd_executable()} with GMD_CONFIG={config_path}")
    try:
        config = load_config(config_path)
    except ConfigError as e:
        log.warning("%s; the units cannot start until it loads", e)
        config = None
    nodes, witnesses = ["NODE"], ["WITNESS"]
    if config is not None:
        for risk in config_file_risks(config_path):
            log.warning("%s: its start and stop commands run as root; make it root's, mode 0600 or 0640", risk)
        try:
            nodes = [resolve_node(getattr(args, "node", None), os.environ, config)]
        except ConfigError:
            nodes = list(config.nodes)  # this host is none of them by name: the operator picks
        witnesses = list(config.witnesses)
    print("next:\n  systemctl daemon-reload")
    for node in nodes:
        print(f"  systemctl enable --now gmd@{node}")
    for witness in witnesses:
        print(f"  systemctl enable --now gmd-witness@{witness}   # on the witness's host")
    return ExitCode.OK


def cmd_resolve(args: argparse.Namespace) -> int:
    config, node = _load(args)
    req = {"op": "resolve", "volume": args.volume, "discard": "local", "dry_run": args.dry_run}
    try:
        reply = _daemon_request(config, node, req)
    except control.ControlUnavailable as e:
        raise Refused("daemon-not-running", why=e, node=node) from None
    p = reply["plan"]
    if args.json:
        _print_json(reply)
        return ExitCode.OK

    def gens(g: dict) -> str:
        return " <- ".join([g.get("current", "?"), *g.get("history", [])])

    def size(n) -> str:
        return "unknown (the peer marked too many regions to list)" if n is None else human_bytes(n)

    print(f"{args.volume}: split-brain between {p['discard']} (this node) and {p['keep']}")
    print(f"  generations here:  {gens(p['local_generations'])}")
    print(f"  generations there: {gens(p['peer_generations'])}")
    print(f"  common generation: {p['common_generation'] or 'none'}")
    print(f"  rule: {p['rule']}")
    print(f"  direction: {p['direction']}, {p['copy']} copy")
    print(f"  written here since the split: {human_bytes(p['local_changed_bytes'])}; "
          f"there: {size(p['peer_changed_bytes'])}")
    print(f"  would move: {size(p['move_bytes'])}; this side's data replaced: {size(p['discard_bytes'])}, "
          "saved first to a read-only image beside the state map")
    if args.dry_run:
        print("  dry run: nothing changed")
    else:
        print(f"  resolving: {node} connects to {p['keep']} as the copy target ('gmd status {args.volume}' "
              "shows the copy and the saved image)")
    return ExitCode.OK


def cmd_reload(args: argparse.Namespace) -> int:
    config, node = _load(args)
    try:
        reply = _daemon_request(config, node, {"op": "reload"})
    except control.ControlUnavailable as e:
        raise Refused("daemon-not-running-reload", why=e) from None
    added = reply["added"]
    if not added:
        print(f"{node}: config reloaded; nothing added")
    for volume, members in added.items():
        print(f"{volume} on {node}: added {', '.join(members)}")
    return ExitCode.OK


def cmd_quorum(args: argparse.Namespace) -> int:
    config, node = _load(args)
    req: dict[str, Any] = {"op": "quorum", "volume": args.volume}
    if args.expected_votes is not None:
        if args.expected_votes < 1:
            raise Refused("expected-votes-option", votes=args.expected_votes)
        req["expected_votes"] = args.expected_votes
    elif args.reset:
        req["expected_votes"] = None
    try:
        reply = _daemon_request(config, node, req)
    except control.ControlUnavailable as e:
        raise Refused("daemon-not-running", why=e, node=node) from None
    q = reply["quorum"]
    print(f"{args.volume} on {node}: {q['votes']} votes present, {q['needed']} of {q['expected']} expected needed"
          + (f" (operator override {q['expected_override']})" if q.get("expected_override") else "")
          + (": quorum" if q["ok"] else ": NO QUORUM"))
    return ExitCode.OK


def _daemon_request(config: Config, node: str, req: dict[str, Any]) -> dict[str, Any]:
    check_request(req)  # the daemon's schema: a request it would refuse is a bug here
    reply = control.request(config.node(node).control, req)
    if not reply.get("ok"):
        raise DaemonRefused(reply.get("error", "daemon refused"), reply.get("exit_code", 1))
    return reply


def cmd_verify(args: argparse.Namespace) -> int:
    config, node = _load(args)
    try:
        started = _daemon_request(config, node, {"op": "verify", "volume": args.volume})["members"]
        running = [name for name, what in started.items() if what == "started"]
        if args.no_wait:
            if args.json:
                _print_json(started)
            for name, what in started.items():
                if not args.json:
                    print(f"{args.volume}: {name}: " + ("verify started; see 'gmd status'" if what == "started"
                                                         else f"not verified ({what})"))
            return ExitCode.OK if running else ExitCode.FAILED
        # A verify reads the whole volume on both sides (hours for a large one):
        # follow it in the status rather than hold one request open that long.
        progress = sys.stderr.isatty() and not args.json
        while True:
            members = _daemon_request(config, node, {"op": "status", "volume": args.volume})["status"]["members"]
            going = [members[name]["verify"] for name in running if members[name].get("verify")]
            if not going:
                break
            if progress:
                done, total = sum(v["done_bytes"] for v in going), sum(v["total_bytes"] for v in going)
                eta = max((v["eta_s"] or 0) for v in going)
                sys.stderr.write(f"\rverifying {human_bytes(done)} of {human_bytes(total)}, ETA {eta:.0f} s   ")
                sys.stderr.flush()
            time.sleep(0.5)
        if progress:
            sys.stderr.write("\n")
    except control.ControlUnavailable as e:
        raise Refused("daemon-not-running-verify", why=e) from None
    report = {name: (members[name]["last_verify"] if name in running else {"skipped": what})
              for name, what in started.items()}
    if args.json:
        _print_json(report)
    else:
        for member, r in report.items():
            if "skipped" in r:
                print(f"{args.volume}: {member}: not verified ({r['skipped']})")
            else:
                first = ", ".join(str(o) for o in r["first_offsets"])
                print(f"{args.volume}: {member}: {human_bytes(r['compared_bytes'])} compared, "
                      f"{r['differing_regions']} differing regions" + (f" (first at {first}); run "
                      f"'gmd resync {args.volume}'" if r["differing_regions"] else ""))
    found = any(r.get("differing_regions") for r in report.values())
    verified = any("skipped" not in r for r in report.values())
    return ExitCode.FAILED if found or not verified else ExitCode.OK


def _load_volume(args: argparse.Namespace) -> tuple[Config, str]:
    """The config and this node, once ``args.volume`` is known to be a configured volume."""
    config, node = _load(args)
    try:
        config.volume(args.volume)
    except ConfigError as e:
        raise Refused("config", message=e.message) from None
    return config, node


def cmd_volume_op(args: argparse.Namespace) -> int:
    config, node = _load_volume(args)
    req: dict[str, Any] = {"op": args.command, "volume": args.volume}
    if args.command in ("primary", "down", "secondary"):
        req["force"] = args.force
    if args.command == "up":
        req["loop"] = args.loop
    if args.command == "switchover":
        req["to"] = args.to
    if args.command == "resync" and args.rate is not None:
        try:
            req["rate"] = parse_size(args.rate, file="--rate", key="rate", minimum=0)
        except ConfigError as e:
            raise Refused("bad-rate", message=e.message) from None
    try:
        reply = _daemon_request(config, node, req)
    except control.ControlUnavailable as e:
        raise Refused("daemon-not-running", why=e, node=node) from None
    if args.command == "switchover":
        print(f"{args.volume}: {reply['primary']} is primary now, {reply['secondary']} secondary")
        return ExitCode.OK
    print(f"{args.volume}: {args.command} on {node}")
    if args.command == "up" and args.loop:
        print(f"{args.volume}: a loop device is attached whenever {node} is primary")
    if reply.get("device"):
        print(f"{args.volume}: device {reply['device']}")
    if reply.get("loop"):
        print(f"{args.volume}: loop device {reply['loop']}")
    return ExitCode.OK


def cmd_test_failover(args: argparse.Namespace) -> int:
    config, node = _load_volume(args)
    req: dict[str, Any] = {"op": "test_failover", "volume": args.volume, "action": args.action}
    if args.action == "start":
        req["loop"] = args.loop
        if args.space is not None:
            try:
                req["space"] = parse_size(args.space, file="--space", key="space", minimum=1 << 20)
            except ConfigError as e:
                raise Refused("bad-space", message=e.message) from None
    elif args.loop or args.space is not None:
        raise Refused("bad-space", message="--loop and --space go with 'start', not 'end'")
    try:
        tf = _daemon_request(config, node, req)["test_failover"]
    except control.ControlUnavailable as e:
        raise Refused("daemon-not-running", why=e, node=node) from None
    if args.json:
        _print_json(tf)
    elif args.action == "start":
        print(f"{args.volume}: test failover on {node}: image {tf['image']} as of {tf['consistent_at']}"
              + (f", loop device {tf['loop']}" if tf.get("loop") else "")
              + f"; space {human_bytes(tf['space'])}; replication into {node} goes on. "
              f"End it with 'gmd test-failover end {args.volume}'")
    else:
        print(f"{args.volume}: test failover on {node} ended; its image is discarded ({human_bytes(tf['kept_bytes'])} "
              f"kept, {human_bytes(tf['overlay_bytes'])} written to it)")
    return ExitCode.OK


def cmd_events(args: argparse.Namespace) -> int:
    config, node = _load(args)
    if args.count is not None and args.count < 1:
        raise Refused("bad-count", count=args.count)
    req = {"op": "events", "volume": args.volume, "now": args.now or args.now_only}
    check_request(req)
    printed = 0
    try:
        lines = control.stream(config.node(node).control, req, idle=1.0)
        reply = next(lines)
        if not reply.get("ok"):
            raise DaemonRefused(reply.get("error", "daemon refused"), reply.get("exit_code", 1))
        for event in lines:
            if event is None:  # a quiet second: has our own reader gone (gmd events | head -3)?
                if _reader_gone(sys.stdout):
                    break
                continue
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()  # a reader (a pipe, a script) gets each event as it happens
            printed += 1
            if (args.count is not None and printed >= args.count) or (args.now_only and event["kind"] == "now_end"):
                break
        else:
            print(f"{node}: the daemon closed the event stream (it stopped)", file=sys.stderr)
            return ExitCode.FAILED
    except control.ControlUnavailable as e:
        raise Refused("daemon-not-running", why=e, node=node) from None
    except BrokenPipeError:
        # The reader went away (gmd events | head): that ends the stream, no error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        if "lines" in locals():
            lines.close()
    return ExitCode.OK


def _reader_gone(out) -> bool:
    """True if ``out`` is a pipe or socket whose reading end was closed (it
    polls as an error or hang-up); a terminal or file never is."""
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    p = select.poll()
    p.register(fd, 0)  # POLLERR and POLLHUP are reported whatever is asked
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))


def _volume_status(config: Config, node: str, name: str) -> tuple[dict[str, Any], bool]:
    """From the daemon if it runs and has the volume up, else from the state
    map; and whether the daemon answered (the view's hint needs it: volume
    down, or no daemon at all)."""
    try:
        reply = _daemon_request(config, node, {"op": "status", "volume": name})
        if reply.get("up"):
            return reply["status"], True
        return admin.offline_status(config, node, name), True
    except control.ControlUnavailable:
        return admin.offline_status(config, node, name), False


def _watch_interval(text: str) -> float:
    """``--interval S``: seconds between frames of ``--watch``."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.1 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{text} s: give between 0.1 and 3600 seconds")
    return seconds


def cmd_status(args: argparse.Namespace) -> int:
    if args.interval is not None and not args.watch:
        raise Refused("status-options", message="--interval goes with --watch")
    if args.watch:
        if args.json:
            raise Refused("watch-needs-terminal")
        return _watch_status(args, args.interval or 1.0)
    code, results = _read_statuses(args)
    if args.json:
        _print_json(results[0][0] if args.volume else [st for st, _ in results])
        return code
    if wants_colour(sys.stdout.isatty(), os.environ):
        console = Console(highlight=False)
        console.print(_status_renderable(args, results, True, console.width))
    else:
        print(render_plain(_status_renderable(args, results, False, PLAIN_WIDTH)))
    return code


def _watch_status(args: argparse.Namespace, interval: float) -> int:
    """``--watch``: on a terminal, the view redrawn in place (rich's Live: no
    full-screen flicker); off one (a log, a pipe), one plain frame per
    interval under a time stamp. Ctrl-C ends it with exit 0."""
    def frame(colour: bool, width: int):
        _code, results = _read_statuses(args)
        return _status_renderable(args, results, colour, width)

    title = f"gmd status{' ' + args.volume if args.volume else ''} every {interval:g} s"
    try:
        if not sys.stdout.isatty():
            while True:
                print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {title}\n{render_plain(frame(False, PLAIN_WIDTH))}\n", flush=True)
                time.sleep(interval)
        colour = wants_colour(True, os.environ)
        console = Console(highlight=False)
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                view = frame(colour, console.width)
                if not colour:  # NO_COLOR: the plain text, only the cursor moves
                    view = Text(render_plain(view, console.width))
                live.update(Group(Text(f"{time.strftime('%H:%M:%S')}  {title} (Ctrl-C to stop)\n",
                                       style="dim"), view), refresh=True)
                time.sleep(interval)
    except KeyboardInterrupt:
        return ExitCode.OK


def _read_statuses(args: argparse.Namespace) -> tuple[int, list[tuple[dict[str, Any], bool]]]:
    """Each volume's status (the one asked for, or all of this node's), with
    whether the daemon answered; exit 1 if one could not be read."""
    config, node = _load(args)
    if args.volume:
        names = [args.volume]
    else:
        names = [v.name for v in config.volumes_for_node(node)]
    results: list[tuple[dict[str, Any], bool]] = []
    failed = False
    for name in names:
        try:
            results.append(_volume_status(config, node, name))
        except UsageError:
            raise
        except Exception as e:
            if args.volume:
                raise
            failed = True
            results.append(({"volume": name, "node": node, "error": str(e)}, False))
    return (ExitCode.FAILED if failed else ExitCode.OK), results


def _status_renderable(args: argparse.Namespace, results: list[tuple[dict[str, Any], bool]], colour: bool,
                       width: int):
    """The view of every volume read, one under the other."""
    if not results:
        config, node = _load(args)
        return Text(f"node {node} has no volumes in {config.path}")
    views = []
    for i, (st, reachable) in enumerate(results):
        if i:
            views.append(Text(""))
        views.append(status_view(st, colour=colour, width=width, daemon_reachable=reachable))
    return Group(*views)


# --------------------------------------------------------------------- entry


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "debug", False):
            log.exception("failed")
        while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
            e = e.exceptions[0]  # a task group's one failure: say what it was
        code = exit_code_for(e)
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return int(code)


def main(argv: Sequence[str] | None = None) -> int:
    """``gmd``: the operator's command line."""
    return _run(build_parser(), argv)


def _hageo_parser(prog: str, action: str, help: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"{help} (HAGEO-compatible spelling of 'gmd {action}').",
        epilog=command_epilog(EXAMPLES[prog]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-l", "--local", action="store_true",
                        help="this node's state map (the only form gmd supports; the default)")
    parser.add_argument("--force", action="store_true", help="do it even though it discards or overwrites data")
    parser.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    _common_options(parser, suppress=False)
    parser.add_argument("volume", metavar="VOLUME")
    parser.set_defaults(func=cmd_dirty if action == "dirty" else cmd_clean)
    return parser


def gmddirty_main(argv: Sequence[str] | None = None) -> int:
    """``gmddirty -l VOLUME``: mark this side the copy source."""
    return _run(_hageo_parser("gmddirty", "dirty", "mark this side of VOLUME the copy source"), argv)


def gmdclean_main(argv: Sequence[str] | None = None) -> int:
    """``gmdclean -l VOLUME``: mark this side the copy target."""
    return _run(_hageo_parser("gmdclean", "clean", "mark this side of VOLUME the copy target"), argv)


if __name__ == "__main__":
    sys.exit(main())
