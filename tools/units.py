"""``gmd install-units``: the systemd units of the node daemon and the witness.

The units are templates kept beside this module (``tools/systemd/``, package
data): ``gmd@.service`` (instance = node name) and ``gmd-witness@.service``
(instance = witness name). Rendering puts in the absolute path of the ``gmd``
executable that should run and of the config file; installing writes them
into the unit directory, leaves an identical unit alone, and refuses to replace
one that differs unless forced (an administrator's edit is not lost silently).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gmd.errors import Refused

UNIT_NAMES = ("gmd@.service", "gmd-witness@.service")
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")

# What a path may hold to go into a unit file as it is: anything else (a
# space, a quote, "%" which systemd reads as a specifier, "$" which ExecStart
# expands, a backslash) would need quoting or escaping.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9/._+@:,=-]+")


@dataclass(frozen=True)
class Unit:
    """One rendered unit: its file name and text."""

    name: str
    text: str


@dataclass(frozen=True)
class Step:
    """What installing one unit does: ``write`` (new), ``replace`` (forced over a
    different one) or ``unchanged`` (the same text is there already)."""

    path: Path
    action: str
    unit: Unit


def template(name: str) -> str:
    """The text of the unit template ``name`` (one of :data:`UNIT_NAMES`)."""
    return resources.files("tools").joinpath("systemd", name).read_text()


def plain_path(path: Path, what: str) -> str:
    """``path`` made absolute, as unit-file text; refused if it holds a
    character that would need quoting."""
    text = str(path.absolute())
    bad = next((c for c in text if not _PLAIN_PATH.fullmatch(c)), None)
    if bad is not None:
        raise Refused("units-unsafe-path", what=what, path=text, char=bad)
    return text


def render(gmd: Path, config: Path) -> list[Unit]:
    """Every unit, with ``gmd`` (the executable) and ``config`` (the config
    file, as ``GMD_CONFIG``) put in, both as absolute paths."""
    values = {"@GMD@": plain_path(gmd, "the gmd executable"), "@CONFIG@": plain_path(config, "the config file")}
    units = []
    for name in UNIT_NAMES:
        text = template(name)
        for placeholder, value in values.items():
            text = text.replace(placeholder, value)
        units.append(Unit(name, text))
    return units


def gmd_executable() -> Path:
    """The ``gmd`` that should run under systemd: the one beside this Python
    (the virtual environment's or the system's), else the first on $PATH."""
    beside = Path(sys.executable).parent / "gmd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside.absolute()
    found = shutil.which("gmd")
    if found:
        return Path(found).absolute()
    raise Refused("units-no-gmd", tried=f"{beside} and $PATH")


def plan(unit_dir: Path, units: list[Unit], *, force: bool) -> list[Step]:
    """What installing ``units`` into ``unit_dir`` would do, unit by unit.
    Refuses (writing nothing) if the directory is missing, or if a unit there
    differs and ``force`` is not given."""
    if not unit_dir.is_dir():
        raise Refused("units-dir-missing", path=unit_dir)
    steps = []
    for unit in units:
        path = unit_dir / unit.name
        try:
            current = path.read_text()
        except FileNotFoundError:
            steps.append(Step(path, "write", unit))
            continue
        except (OSError, UnicodeDecodeError):
            current = None  # unreadable: it differs
        if current == unit.text:
            steps.append(Step(path, "unchanged", unit))
        elif force:
            steps.append(Step(path, "replace", unit))
        else:
            raise Refused("units-differ", path=path)
    return steps


def install(steps: list[Step]) -> None:
    """Write the units ``plan`` decided on: each to a temporary file in the same
    directory, mode 0644, then renamed over the unit (never half a unit)."""
    for step in steps:
        if step.action == "unchanged":
            continue
        tmp = step.path.with_name(f".{step.path.name}.gmd-tmp")
        try:
            with open(tmp, "w") as f:
                f.write(step.unit.text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, step.path)
        finally:
            tmp.unlink(missing_ok=True)
