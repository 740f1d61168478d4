"""The refusal table: every entry complete, and no refusal worded anywhere else."""

from __future__ import annotations

import errno
import re
import string
from pathlib import Path

import pytest

from gmd.errors import REFUSALS, ExitCode, Refused, UsageError, errno_for, exit_code_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rule", sorted(REFUSALS))
def test_every_entry_has_a_message_an_errno_and_an_exit_code(rule):
    entry = REFUSALS[rule]
    assert entry.message.strip() and entry.errno in errno.errorcode
    assert entry.exit_code in (ExitCode.FAILED, ExitCode.USAGE)
    fields = {name for _, name, _, _ in string.Formatter().parse(entry.message) if name}
    exc = Refused(rule, **{name: f"<{name}>" if name != "timeout" else 5.0 for name in fields})
    assert exc.rule == rule and exit_code_for(exc) == entry.exit_code and errno_for(exc) == entry.errno
    assert isinstance(exc, UsageError) == (entry.exit_code == ExitCode.USAGE)
    for name in fields - {"timeout"}:
        assert f"<{name}>" in str(exc)  # every field shows in the message


def test_a_missing_field_is_a_bug_caught_at_once():
    with pytest.raises(KeyError):
        Refused("no-quorum", volume="v")


# Sources whose refusals still await the table (engine split and CLI in flight).
PENDING: set[str] = set()


def test_no_refusal_is_worded_inline():
    """Operator-facing refusals come from the table: no GmdError/UsageError
    raised with a message of its own."""
    inline = re.compile(r"raise (GmdError|UsageError|DeviceError)\(")
    found = []
    for path in sorted([*ROOT.glob("gmd/*.py"), *ROOT.glob("tools/*.py")]):
        rel = str(path.relative_to(ROOT))
        if rel in PENDING:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if inline.search(line):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
