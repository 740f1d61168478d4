"""What a value in the config file may be, and how a refusal is worded.

Owns :class:`ConfigError`, the schema's defaults and limits (units, modes,
policies, region and member bounds), :func:`parse_size`, and the small helpers
that every config message is built from (dotted keys, "did you mean", what a
TOML value is). It imports nothing of gmd: the model (:mod:`gmd.configmodel`)
and the schema (:mod:`gmd.configschema`) build on it. Users import these names
from :mod:`gmd.config`.
"""

from __future__ import annotations

import datetime
import difflib
import json
import os
import re
from collections.abc import Iterable
from fractions import Fraction

from transport import compression, pacing

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4
PiB = 1024**5

MODES = ("sync", "mwc", "async")
DEFAULT_MODE = "mwc"
DEFAULT_REGION_SIZE = 64 * KiB
DEFAULT_EXTENT_SIZE = 4 * MiB
MIN_REGION_SIZE = 4096
MAX_MEMBERS = 8
DEFAULT_VOTES = 1
DEFAULT_UNDO_LOG_SIZE = 1 << 30  # an undo log's bound when undo_log_size is not given
MIN_UNDO_LOG_SIZE = 1 << 20  # smaller holds too few regions to be of use
DEFAULT_TEST_IMAGE_SIZE = 1 << 30  # what a test failover's image may keep and write, when not given
MIN_TEST_IMAGE_SIZE = 1 << 20  # smaller holds too few regions to be of use
DEFAULT_CONTROL_TIMEOUT = 10  # seconds a control client may take to send its request line
QUORUM_LOSS_POLICIES = ("suspend", "fail", "continue")
# What each on_quorum_loss policy trades, as ``gmd status`` says it (README,
# "Two sites without a witness").
QUORUM_LOSS_NOTES = {
    "suspend": "without quorum the primary's writes wait until it is back; a lost primary's survivor never "
               "diverges, and is promoted with quorum (or gmd primary --force)",
    "fail": "without quorum the primary's writes fail with EIO after quorum_timeout; a lost primary's survivor "
            "never diverges, and is promoted with quorum (or gmd primary --force)",
    "continue": "two sites without witness: the primary writes on alone when its peer is lost (the peer is "
                "outdated, then mini-copied when back); a lost primary's survivor needs gmd primary --force, "
                "and forcing it while the primary lives makes a split-brain",
}
COMPRESSORS = ("none", "zstd")
DEFAULT_COMPRESS_LEVEL = compression.DEFAULT_LEVEL
MIN_COMPRESS_LEVEL, MAX_COMPRESS_LEVEL = compression.MIN_LEVEL, compression.MAX_LEVEL
# Below this a bandwidth limit is refused: one 64 KiB piece (the pacer's
# smallest burst) must cross within a second, or a path looks dead long before
# a 1 MiB write gets through.
MIN_BANDWIDTH = pacing.MIN_BANDWIDTH
SPLIT_BRAIN_POLICIES = ("disconnect", "discard-secondary", "discard-younger-primary", "discard-least-changes")
MAX_SIZE = 2**63 - 1  # byte offsets travel as signed 64-bit integers

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
HOST_RE = re.compile(r"[A-Za-z0-9._-]+")
PORT_RE = re.compile(r"[0-9]{1,10}")
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
        raise ConfigError(file, key, f"expected {_SIZE_EXAMPLE}, got {describe(value)}")

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
            file, key, f"{shown} is smaller than the minimum {show_bytes(minimum)}"
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


def show_bytes(n: int) -> str:
    """``n`` for messages: ``65536 (64KiB)``, or just ``65000``."""
    human = _human(n)
    return str(n) if human == f"{n}B" else f"{n} ({human})"


def as_written(raw: object, n: int) -> str:
    """A size as the user wrote it, with its byte count when that differs."""
    if isinstance(raw, int) or (isinstance(raw, str) and raw.strip().isdigit()):
        return str(n)
    return f"{json.dumps(raw)} ({n} bytes)"


# --------------------------------------------------------------------------- helpers


def join_key(prefix: str, name: str) -> str:
    """Dotted key ``prefix.name``, quoting ``name`` as TOML does when needed."""
    part = name if _BARE_KEY_RE.fullmatch(name) else json.dumps(name)
    return f"{prefix}.{part}" if prefix else part


def name_list(names: Iterable[str]) -> str:
    listed = ", ".join(names)
    return listed or "none"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f'; did you mean "{close[0]}"?' if close else ""


def unknown_name(
    kind: str, name: str, known: Iterable[str], witnesses: Iterable[str] = (), via: str = ""
) -> str:
    """Message for a name given on the command line that the config lacks."""
    known = list(known)
    given = f" (given by {via})" if via else ""
    if kind == "node" and name in witnesses:
        return (
            f"{json.dumps(name)}{given} is a witness, not a node "
            f"(configured nodes: {name_list(known)})"
        )
    return (
        f"unknown {kind} {json.dumps(name)}{given} (configured {kind}s: {name_list(known)})"
        f"{did_you_mean(name, known)}"
    )


def describe(value: object) -> str:
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
