"""The control requests: one schema for every op on the control socket.

A request is one JSON object per line, ``{"op": "secondary", "volume": "appslv",
"force": false}``. :data:`OPS` lists every op with its fields and their kinds;
:func:`decode_line` decodes a line's JSON and :func:`check_request` checks the
value (the daemon checks every request before acting, the CLI checks what it
builds before sending). Anything else is refused with a
:class:`BadRequest` naming the op and the field, e.g. ``secondary: field 'force'
must be true or false, got "no"``: a boolean must be a JSON boolean, an integer
a JSON integer (not a boolean), a string a string; unknown ops and unknown
fields are refused, never ignored.

A checked request is a plain dict holding ``op`` and every field of the op:
given, or its default. An optional field without a default (``quorum``'s
``expected_votes``, where absent means "show" and null means "reset") stays
absent when not given.

To add an op: add its entry to :data:`OPS` (fields built with :func:`flag`,
:func:`text` and :func:`count`), then its branch in
:meth:`gmd.daemon.NodeDaemon.handle_control`; the unit tests check that every op
here has a branch there.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

_ABSENT = object()  # "no default": the field stays out of the checked request
_SHOWN = 40  # characters of a bad value quoted back in a message
MAX_INT = (1 << 63) - 1  # what any integer field may hold (a byte rate, a vote count)


class BadRequest(UsageError):
    """A control request the schema refuses (exit code 2, like a bad command line)."""


@dataclass(frozen=True)
class Field:
    """One field of an op: its kind (``bool``, ``str`` or ``int``), whether it
    must be given, its default, and what it accepts."""

    kind: type
    help: str
    required: bool = False
    default: Any = _ABSENT
    nullable: bool = False
    minimum: int = 0  # for int
    choices: tuple[str, ...] = ()  # for str: the only values accepted, if any

    @property
    def expected(self) -> str:
        """What the field accepts, in words, for error messages."""
        if self.kind is bool:
            what = "true or false"
        elif self.kind is int:
            what = f"an integer >= {self.minimum}"
        elif self.choices:
            what = " or ".join(json.dumps(c) for c in self.choices)
        else:
            what = "a string"
        return what + " or null" if self.nullable else what

    def accepts(self, value: Any) -> bool:
        """True if ``value`` (decoded JSON) is of this field's kind and range."""
        if value is None:
            return self.nullable
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is int:
            return (isinstance(value, int) and not isinstance(value, bool)
                    and self.minimum <= value <= MAX_INT)
        return isinstance(value, str) and (not self.choices or value in self.choices)


def flag(help: str) -> Field:
    """A boolean option, false when not given."""
    return Field(bool, help, default=False)


def text(help: str, *, required: bool = True, nullable: bool = False, default: Any = _ABSENT,
         choices: tuple[str, ...] = ()) -> Field:
    """A string field (a volume or node name, or one of ``choices``)."""
    return Field(str, help, required=required, nullable=nullable, default=default, choices=choices)


def count(help: str, *, minimum: int, nullable: bool = False, default: Any = _ABSENT) -> Field:
    """An optional integer field of at least ``minimum``."""
    return Field(int, help, nullable=nullable, default=default, minimum=minimum)


def _volume() -> Field:
    return text("the volume's name")


#: Every control op and its fields (besides ``op``). The CLI's commands map to
#: these one to one; see tools/cli.py.
OPS: dict[str, dict[str, Field]] = {
    "ping": {},
    "status": {"volume": text("one volume (null or absent: every volume of the node)", required=False,
                              nullable=True, default=None)},
    "up": {"volume": _volume(), "loop": flag("attach a loop device whenever this node is primary")},
    "down": {"volume": _volume(), "force": flag("demote even while the device is open")},
    "primary": {"volume": _volume(), "force": flag("promote without quorum or an uptodate disk")},
    "secondary": {"volume": _volume(), "force": flag("demote even while the device is open")},
    "verify": {"volume": _volume()},
    "resync": {"volume": _volume(),
               "rate": count("copy rate limit in bytes per second, 0 for none (null: unchanged)",
                             minimum=0, nullable=True, default=None)},
    "resolve": {"volume": _volume(),
                "discard": text("whose changes go: run it on the side whose changes are discarded",
                                choices=("local",)),
                "dry_run": flag("explain what would happen, change nothing")},
    "switchover": {"volume": _volume(), "to": text("the node to hand the primary role to")},
    "reload": {},
    "test_failover": {"volume": _volume(),
                      "action": text("start a test failover on this (secondary) member, or end it",
                                     choices=("start", "end")),
                      "loop": flag("with start: also attach a loop device to the test image"),
                      "space": count("with start: bytes the image may keep and write (null: the member's "
                                     "test_image_size)", minimum=1 << 20, nullable=True, default=None)},
    "quorum": {"volume": _volume(),
               "expected_votes": count("votes to count quorum from (null: the configured sum; absent: "
                                       "only show)", minimum=1, nullable=True)},
    "events": {"volume": text("one volume's events (null or absent: every volume's and the node's)",
                              required=False, nullable=True, default=None),
               "now": flag("first the current state as events, then the changes")},
    "stop": {},
}


def _shown(value: Any) -> str:
    """``value`` as JSON, shortened, for quoting it back to the client."""
    try:
        shown = json.dumps(value)
    except (TypeError, ValueError):
        shown = repr(value)
    return shown if len(shown) <= _SHOWN else shown[:_SHOWN - 3] + "..."


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_request(value: Any) -> dict[str, Any]:
    """Check a decoded control request against :data:`OPS`; return it with the
    op's defaults filled in, or raise :class:`BadRequest` naming what is wrong."""
    known = ", ".join(OPS)
    if not isinstance(value, Mapping):
        raise BadRequest(f"a control request must be a JSON object, got {_shown(value)} "
                         f"(e.g. {{\"op\": \"ping\"}})")
    if "op" not in value:
        raise BadRequest(f"control request has no field 'op' (ops: {known})")
    op = value["op"]
    if not isinstance(op, str) or op not in OPS:
        hint = _did_you_mean(op, list(OPS)) if isinstance(op, str) else ""
        raise BadRequest(f"unknown op {_shown(op)} (ops: {known}){hint}")
    fields = OPS[op]
    checked: dict[str, Any] = {"op": op}
    for name in value:
        if name != "op" and name not in fields:
            allowed = ", ".join(fields) or "none"
            raise BadRequest(f"{op}: unknown field {name!r} (fields of {op}: {allowed})"
                             f"{_did_you_mean(str(name), list(fields))}")
    for name, spec in fields.items():
        if name not in value:
            if spec.required:
                raise BadRequest(f"{op}: missing field {name!r}: {spec.expected}, {spec.help}")
            if spec.default is not _ABSENT:
                checked[name] = spec.default
            continue
        given = value[name]
        if not spec.accepts(given):
            raise BadRequest(f"{op}: field {name!r} must be {spec.expected}, got {_shown(given)}")
        checked[name] = given
    return checked


def decode_line(line: bytes) -> Any:
    """The JSON value of one request line (without its newline), not yet checked;
    :class:`BadRequest` if it is empty, malformed, or nested too deeply to decode."""
    if not line.strip():
        raise BadRequest("empty control request (expected one JSON object per line)")
    try:
        return json.loads(line)
    except RecursionError:
        raise BadRequest("control request is not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8, an integer too long to convert
        raise BadRequest(f"control request is not valid JSON: {e}") from None


def op_of(value: Any) -> str | None:
    """The op a (possibly invalid) decoded request names, if it is a known one."""
    op = value.get("op") if isinstance(value, Mapping) else None
    return op if isinstance(op, str) and op in OPS else None
