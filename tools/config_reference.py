"""docs/CONFIG.md, the reference of every config key, rendered from the registry.

``python -m tools.config_reference > docs/CONFIG.md`` regenerates it; a test
(tests/unit/test_config_reference.py) fails while the file differs from what
:func:`render` makes, so the reference follows every key the parser accepts.
The registry itself is :mod:`gmd.configkeys` (reached through gmd.config).
"""

from __future__ import annotations

import re
import sys
from typing import Any

import tomli_w

from gmd.config import Key, Table, documented_tables, example_table

REGENERATE = "python -m tools.config_reference > docs/CONFIG.md"

_INTRO = """\
# gmd configuration reference

<!-- Generated from gmd/configkeys.py by `{regenerate}`.
     Do not edit by hand: a test compares this file with that command's output. -->

Every table and key of the config file, what it does and its default. The
file is TOML, one file the same on every node: `--config FILE`, else
`$GMD_CONFIG`, else `/etc/gmd/gmd.toml`. gmd checks the whole file before it
uses any of it, and every mistake names the file, the dotted key and what was
expected, e.g. `gmd.toml: volumes.appslv.region_size: 65000 is not a power of two`.
An unknown key is refused, with the keys its table accepts.

- **Names** (`NODE`, `WITNESS`, `VOLUME` below) are 1 to 64 letters, digits,
  `.`, `_` or `-`, starting with a letter or digit: they become file names and
  wire identifiers. A node and a witness may not share a name.
- **Sizes** are an integer number of bytes or a string such as `"64KiB"`,
  `"4GiB"`, `"1.5GiB"` or `"4G"`: every unit is 1024-based (`B`, `KiB` ..
  `PiB`, or `K` .. `P`); `"4GB"` is refused as ambiguous.
- **Paths** relative to the config file's directory are taken from there.
- **Uniqueness**: each `host:port` appears once in the file; no two nodes share
  a control socket or mount point; on one node no two members share a device,
  state map or undo log.
- `gmd reload` adds members and volumes to a running daemon and applies the
  keys whose description says so; it refuses other changes.

The narrative (why, and how the parts work together) is in the README,
"Configuration", and docs/DESIGN.md.

## Contents

"""


def _anchor(title: str) -> str:
    """The heading's anchor as GitHub makes it."""
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")


def _toml(value: Any) -> str:
    """``value`` as a one-line TOML value."""
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).removeprefix("v = ").rstrip("\n")


def _default(key: Key) -> str:
    if key.required:
        return "required"
    if key.default is not None:
        shown = f"default `{key.default}`"
        return f"{shown} ({key.default_text})" if key.default_text else shown
    return f"default: {key.default_text}" if key.default_text else "optional"


def _key(key: Key) -> list[str]:
    lines = [f"- **`{key.name}`**: {key.type}. *{_default(key)}*."
             + (f" Only with `{key.requires}`." if key.requires else "")]
    lines.append(f"  {key.description}")
    if key.table is not None:
        lines.append(f"  See [{key.table.title}](#{_anchor(key.table.title)}).")
    if key.example is not None:
        lines.append(f"  Example: `{key.name} = {_toml(key.example)}`")
    for value, meaning in key.values:  # last: a sub-list would swallow a line after it
        lines.append(f"  - `\"{value}\"`: {meaning}")
    return lines


def _table(table: Table) -> list[str]:
    lines = [f"## {table.title}", "", table.description, ""]
    for key in table.keys:
        lines += _key(key)
    for group in table.includes:
        lines.append(f"- and the [{group.title}](#{_anchor(group.title)}): "
                     + ", ".join(f"`{k.name}`" for k in group.keys) + ".")
    return lines + [""]


def render() -> str:
    """The whole of docs/CONFIG.md."""
    tables = documented_tables()
    out = _INTRO.format(regenerate=REGENERATE)
    out += "".join(f"- [{t.title}](#{_anchor(t.title)})\n" for t in tables)
    out += "- [Every key at once](#every-key-at-once)\n\n"
    for table in tables:
        out += "\n".join(_table(table)) + "\n"
    out += ("## Every key at once\n\nA config that sets every key to its example (the tests parse "
            "it; a real cluster has more nodes and members):\n\n```toml\n"
            + tomli_w.dumps(example_table()) + "```\n")
    return out


def main() -> int:
    """Print the reference to stdout."""
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
