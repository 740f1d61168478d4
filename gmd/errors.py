"""Errors users see, their exit codes, and every refusal's wording, in one place.

A command fails by raising; :func:`exit_code_for` maps the exception to the exit
code the CLI returns (0 ok, 1 failed, 2 usage), and :data:`REFUSALS` holds the
message of every rule that can refuse an operation, so wording and codes are not
scattered through the engine.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import IntEnum

from statemap.errors import StateMapError

from .config import ConfigError


class ExitCode(IntEnum):
    """The command line's exit codes (a refusal's code comes from its table entry)."""

    OK = 0
    FAILED = 1
    USAGE = 2


class GmdError(Exception):
    """An error with a message meant for the operator."""

    exit_code = ExitCode.FAILED


class UsageError(GmdError):
    """The command line was wrong (unknown volume, missing argument)."""

    exit_code = ExitCode.USAGE


class OutOfRange(GmdError):
    """An I/O request outside the volume; carries the errno the device returns."""

    def __init__(self, message: str, errno_value: int):
        super().__init__(message)
        self.errno = errno_value


class DeviceError(GmdError):
    """The backing device failed or does not fit the volume."""


@dataclass(frozen=True)
class Refusal:
    """One rule that refuses an operation (or one failure an operator sees):
    its wording (``str.format`` fields), the errno an I/O request or a reply
    carries, and the exit code the CLI returns."""

    message: str
    errno: int = errno.EPERM
    exit_code: ExitCode = ExitCode.FAILED


_F, _U = ExitCode.FAILED, ExitCode.USAGE

# Every rule that refuses an operation, and every failure the CLI can print,
# keyed by a short stable name. Code raises Refused(name, **fields); tests refer
# to the names. Keep the wording here, nowhere else.
REFUSALS: dict[str, Refusal] = {
    # -- gmd init, dirty, clean (offline)
    "map-exists": Refusal(
        "{path}: a state map exists already; 'gmd init --force' replaces it, after "
        "which this member needs a full copy", errno.EEXIST),
    "device-too-small": Refusal(
        "{path}: backing device holds {actual} bytes but volume {volume} needs {size}", errno.ENOSPC),
    "device-not-file-or-block": Refusal(
        "{path}: backing device is neither a regular file nor a block device", errno.ENODEV),
    "device-cannot-open": Refusal("{path}: cannot open backing device: {why}", errno.EIO),
    "device-short-read": Refusal("{path}: short read ({got} of {length} bytes at {offset})", errno.EIO),
    "clean-would-discard": Refusal(
        "{volume} on {node}: this copy is {disk}; marking it the copy target discards its "
        "data at the next connect. Add --force if that is what you want"),
    "dirty-would-overwrite": Refusal(
        "{volume} on {node}: this copy is {disk}; making it the copy source overwrites the "
        "other members with it. Add --force if you are sure it holds the newest data"),
    # -- configuration and the command line
    "config": Refusal("{message}", errno.EINVAL, _U),
    "no-such-volume": Refusal("node {node} has no volume {volume!r} (volumes here: {known})", errno.ENOENT, _U),
    "no-such-witness": Refusal("{path}: no witness {name!r} (witnesses: {known})", errno.ENOENT, _U),
    "not-a-member": Refusal("{target} is not a member of {volume} (members: {members})", errno.ENOENT, _U),
    "expected-votes-too-small": Refusal("expected votes must be at least 1, not {votes}", errno.EINVAL, _U),
    "expected-votes-option": Refusal("--expected-votes must be at least 1, not {votes}", errno.EINVAL, _U),
    "bad-rate": Refusal("--rate: {message}", errno.EINVAL, _U),
    "bad-space": Refusal("--space: {message}", errno.EINVAL, _U),
    "drill-options": Refusal("{message}", errno.EINVAL, _U),
    "bad-count": Refusal("--count must be at least 1, not {count}", errno.EINVAL, _U),
    "watch-needs-terminal": Refusal("--watch redraws the view for people; scripts poll 'gmd status --json' "
                                    "instead", errno.ENOTTY, _U),
    "status-options": Refusal("{message}", errno.EINVAL, _U),
    "listen-failed": Refusal("{who}: cannot listen on {host}:{port}: {why} (is another daemon using it?)",
                             errno.EADDRINUSE),
    "metrics-listen-failed": Refusal(
        '{who}: cannot serve metrics on {address} ({key}): {why} (is another daemon using it? Choose another '
        'port, or remove the key to turn metrics off)', errno.EADDRINUSE),
    "tls-files": Refusal("{path}: tls: cannot load certificate, key or CA: {why}", errno.EINVAL),
    "reload-refused": Refusal("reload of {path} refused, nothing applied: {problems}", errno.EINVAL),
    "daemon-not-running": Refusal("{why}; start it with 'gmd daemon --node {node}'", errno.ECONNREFUSED),
    "daemon-not-running-reload": Refusal("{why}; nothing to reload", errno.ECONNREFUSED),
    "daemon-not-running-verify": Refusal("{why}; verify runs in the primary's daemon", errno.ECONNREFUSED),
    # -- the volume's state
    "volume-down": Refusal("volume {volume} is down on {node} (run 'gmd up {volume}')", errno.ENXIO, _U),
    "other-primary": Refusal("{volume}: {others} is primary; demote it first (or use switchover)", errno.EBUSY),
    "peer-newer": Refusal(
        "{volume}: {newer} holds newer data than {node}; promoting {node} would lose it. Promote {first} instead",
        errno.ESTALE),
    "no-quorum": Refusal(
        "{volume}: no quorum: {votes} of {needed} votes needed ({expected} expected) are present{witnesses}. "
        "A primary out of sight may still be writing. If it is known to be down: 'gmd primary {volume} "
        "--force' (or 'gmd quorum {volume} --expected-votes N'); if both sides are forced, their data diverges",
        errno.EAGAIN),
    "no-quorum-primary-writes-alone": Refusal(
        "{volume}: no quorum: {votes} of {needed} votes needed are present. Under on_quorum_loss = \"continue\" "
        "(two sites without a witness) the primary writes on alone when it loses this node, so it may be writing "
        "now. Only once it is known to be down: 'gmd primary {volume} --force'; forcing it while the primary lives "
        "makes a split-brain", errno.EAGAIN),
    "not-uptodate": Refusal(
        "{volume}: local disk is {disk}, not uptodate; promoting it would serve stale or inconsistent data. "
        "'gmd primary --force' makes this copy the source (other members then get a full copy)", errno.ESTALE),
    "device-in-use": Refusal(
        "{volume}: device in use ({holders}); unmount or close it first, or add --force to demote anyway "
        "(its users then get I/O errors)", errno.EBUSY),
    "losetup-failed": Refusal("losetup could not attach {path}: {why}", errno.EIO),
    "volume-tasks-stuck": Refusal(
        "{volume}: its tasks did not end within {timeout:.0f} s of going down; the state map stays marked dirty "
        "(crash recovery runs at the next start)", errno.EBUSY),
    "up-at-start-failed": Refusal(
        "{volume} could not come up at start ({why}); the daemon stops without reporting itself ready. Fix "
        "that, or take {volume} out of nodes.{node}.{key}, then start the daemon again", errno.EIO),
    "daemon-not-serving": Refusal("node {node}: the daemon is not serving; no volume can come up", errno.ENXIO),
    # -- the undo log of a consistent catch-up
    "undo-log-unopenable": Refusal("undo log {path}: cannot open or create it: {why}", errno.EIO),
    "undo-log-damaged": Refusal(
        "undo log {path} is damaged or of a newer gmd ({why}). It may hold the only consistent image of this "
        "member: nothing was changed. Copy it away for inspection; once you accept losing that image, move it "
        "aside and start again (a new, empty log is created)", errno.EIO),
    "undo-log-other-volume": Refusal(
        "undo log {path} belongs to {theirs}, not to {ours}; nothing was changed. Give each member its own "
        "undo_log path, or move the file aside", errno.EINVAL),
    # -- test failover
    "test-failover-refused": Refusal("{volume}: no test failover on {node}: {reason}", errno.EBUSY),
    "test-failover-none": Refusal("{volume}: no test failover runs on {node}{last}", errno.ENOENT),
    "test-failover-primary": Refusal(
        "{volume}: {node} is primary; a test failover runs on a secondary member (run it there: "
        "'gmd test-failover start {volume} --node MEMBER')", errno.EBUSY, _U),
    # -- split-brain
    "no-split-brain": Refusal(
        "{volume}: no split-brain to resolve on {node} (no member is standalone for diverging data)", errno.ENOENT),
    "resolve-on-primary": Refusal(
        "{volume}: {node} is primary; demote it first ('gmd secondary {volume}'), then resolve: the side that "
        "discards must not be in use", errno.EBUSY),
    # -- switchover
    "switchover-refused": Refusal("{volume}: switchover to {target} refused: {problems}. {node} stays primary",
                                  errno.EAGAIN),
    "switchover-target-lost": Refusal(
        "{volume}: {target} was lost during the switchover; {node} is primary again", errno.EAGAIN),
    "switchover-no-take-over": Refusal(
        "{volume}: {target} did not take over within {timeout:.0f} s ({why}); {node} is primary again",
        errno.ETIMEDOUT),
    "switchover-stranded": Refusal(
        "{volume}: {target} did not take over ({why}), and {node} could not become primary again: {error}",
        errno.EIO),
    # -- the witness
    # -- gmd install-units
    "units-dir-missing": Refusal("{path}: no such directory (where the systemd units go; give another with --dir)",
                                 errno.ENOENT),
    "units-differ": Refusal(
        "{path} exists and differs from the unit gmd would write; see the new one with --dry-run, then use "
        "--force to replace it", errno.EEXIST),
    "units-unsafe-path": Refusal(
        "{what} {path} contains {char!r}, which a unit file would have to quote or escape; use a path "
        "without it", errno.EINVAL, _U),
    "units-no-gmd": Refusal("cannot find the gmd executable (looked for {tried}); run install-units with the "
                            "gmd the units should start", errno.ENOENT),
    "witness-state-unreadable": Refusal("witness {name}: cannot read its state file {path}: {why}", errno.EIO),
    "witness-state-damaged": Refusal(
        "witness {name}: state file {path} is damaged ({why}). It records which members a primary wrote "
        "without; move it aside only once every volume's primary is known to be running (it registers again "
        "within a second)", errno.EIO),
    "witness-lock-unopenable": Refusal("{who}: cannot open the lock of its state file, {path}: {why}", errno.EIO),
    "witness-lock-failed": Refusal("{who}: cannot lock {path}: {why}", errno.EIO),
    "witness-state-shared": Refusal(
        "{who}: state file {state} is in use by another witness (pid {holder} holds {path}); two witnesses "
        "may not share one state file: give each its own 'state' path", errno.EBUSY),
}


class Refused(GmdError):
    """An operation a rule does not allow; ``rule`` names the entry in REFUSALS,
    which gives the wording, the errno and the exit code."""

    def __new__(cls, rule: str, **details: object):
        # A refusal of the command line itself is also a UsageError.
        if cls is Refused and REFUSALS[rule].exit_code == ExitCode.USAGE:
            cls = UsageRefused
        return super().__new__(cls)

    def __init__(self, rule: str, **details: object):
        entry = REFUSALS[rule]
        self.rule = rule
        self.details = details
        self.errno = entry.errno
        self.exit_code = entry.exit_code
        super().__init__(entry.message.format(**details))


class UsageRefused(Refused, UsageError):
    """A :class:`Refused` whose entry has the usage exit code."""


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code for an exception that ended a command."""
    if isinstance(exc, GmdError):
        return exc.exit_code
    if isinstance(exc, (ConfigError, StateMapError, OSError)):
        return ExitCode.FAILED
    return ExitCode.FAILED


def errno_for(exc: BaseException) -> int:
    """The errno an I/O request gets for an exception (FUSE edge, wire replies)."""
    if isinstance(exc, (OutOfRange, Refused)):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
