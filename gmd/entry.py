"""The daemons' entry points, the only part of the running daemons that
``tools`` may import (see the import contracts in ``pyproject.toml``).

``gmd daemon`` and ``gmd witness`` call these; everything else in ``tools``
talks to a running daemon through :mod:`gmd.control`.
"""

from __future__ import annotations

from .daemon import run_daemon
from .witness import run_witness

__all__ = ["run_daemon", "run_witness"]
