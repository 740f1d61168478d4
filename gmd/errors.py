"""Errors users see, their exit codes, and every refusal's wording, in one place.

A command fails by raising; :func:`exit_code_for` maps the exception to the exit
code the CLI returns (0 ok, 1 failed, 2 usage), and :data:`REFUSALS` holds the
message of every rule that can refuse an operation, so wording and codes are not
scattered through the engine.
"""

from __future__ import annotations

import errno
from enum import IntEnum

from statemap.errors import StateMapError

from .config import ConfigError


class ExitCode(IntEnum):
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


# Every rule that refuses an operation, keyed by a short stable name.
REFUSALS = {
    "map-exists": (
        "{path}: a state map exists already; 'gmd init --force' replaces it, after "
        "which this member needs a full copy"
    ),
    "device-too-small": (
        "{path}: backing device holds {actual} bytes but volume {volume} needs {size}"
    ),
    "device-not-file-or-block": "{path}: backing device is neither a regular file nor a block device",
    "clean-would-discard": (
        "{volume} on {node}: this copy is {disk}; marking it the copy target discards its "
        "data at the next connect. Add --force if that is what you want"
    ),
    "dirty-would-overwrite": (
        "{volume} on {node}: this copy is {disk}; making it the copy source overwrites the "
        "other members with it. Add --force if you are sure it holds the newest data"
    ),
}


class Refused(GmdError):
    """An operation a rule does not allow; ``rule`` names the entry in REFUSALS."""

    def __init__(self, rule: str, **details: object):
        self.rule = rule
        self.details = details
        super().__init__(REFUSALS[rule].format(**details))


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code for an exception that ended a command."""
    if isinstance(exc, GmdError):
        return exc.exit_code
    if isinstance(exc, (ConfigError, StateMapError, OSError)):
        return ExitCode.FAILED
    return ExitCode.FAILED


def errno_for(exc: BaseException) -> int:
    """The errno an I/O request gets for an exception (FUSE edge, wire replies)."""
    if isinstance(exc, OutOfRange):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
