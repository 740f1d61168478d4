"""Shared fixtures: temp clusters described by real config files."""

from __future__ import annotations

from pathlib import Path

import pytest

from gmd.config import load_config
from tools.cluster_config import NodeSpec, write_cluster_config as write_config_file


def write_cluster_config(directory: Path, *, size: str = "64MiB", mode: str = "mwc",
                         nodes: tuple[str, ...] = ("labor1", "labor2"), base_port: int = 17800) -> Path:
    """A cluster config in ``directory`` with one volume ``appslv`` on ``nodes``
    (fixed ports from ``base_port``: nothing listens in these tests); every path
    is relative, so it lives wholly inside the directory."""
    specs = [NodeSpec(node, address=[base_port + i]) for i, node in enumerate(nodes)]
    return write_config_file(directory, specs, size=size, mode=mode)


@pytest.fixture
def cluster_config(tmp_path):
    """(path, Config) of a two-node cluster in a temp directory."""
    path = write_cluster_config(tmp_path)
    return path, load_config(path)
