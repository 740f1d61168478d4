"""Shared fixtures: temp clusters described by real config files."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gmd.config import load_config


def write_cluster_config(directory: Path, *, size: str = "64MiB", mode: str = "mwc",
                         nodes: tuple[str, ...] = ("labor1", "labor2"), base_port: int = 17800) -> Path:
    """A cluster config in ``directory`` with one volume ``appslv`` on ``nodes``;
    every path is relative, so it lives wholly inside the directory."""
    parts = ['secret = "test-secret"\n']
    for i, node in enumerate(nodes):
        parts.append(textwrap.dedent(f"""
            [nodes.{node}]
            address = "127.0.0.1:{base_port + i}"
            control = "run/{node}.sock"
            mount = "run/{node}"
            """))
    parts.append(textwrap.dedent(f"""
        [volumes.appslv]
        size = "{size}"
        mode = "{mode}"
        """))
    for node in nodes:
        parts.append(textwrap.dedent(f"""
            [volumes.appslv.members.{node}]
            device = "data/{node}/appslv.img"
            statemap = "data/{node}/appslv.sm"
            """))
    path = directory / "gmd.toml"
    path.write_text("".join(parts))
    return path


@pytest.fixture
def cluster_config(tmp_path):
    """(path, Config) of a two-node cluster in a temp directory."""
    path = write_cluster_config(tmp_path)
    return path, load_config(path)
