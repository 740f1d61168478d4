"""The one writer of cluster config files on loopback, for the demo, the
benchmarks and the tests.

A cluster is one volume on a list of nodes (:class:`NodeSpec`), every path
relative to the config file's directory, so the whole cluster lives in one
temporary directory. The file is built as a dict and written with ``tomli_w``
(quoting and escaping done by a TOML library, not by f-strings); extra keys
and tables are merged into that dict before writing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from tools.procs import free_ports


@dataclass
class NodeSpec:
    """One node of a loopback cluster and its member of the volume.

    ``address``/``listen`` are ports on 127.0.0.1; an empty ``address`` is
    filled with ``paths`` free ports when the config is written (so a caller
    can read the ports back from the spec). ``node`` and ``member`` hold any
    further keys of the node's table and of its member table (they win over
    the defaults, e.g. ``member={"device": "/dev/loop0"}``)."""

    name: str
    paths: int = 1  # addresses (paths) of this node
    mode: str | None = None  # member mode override
    votes: int | None = None  # the node's votes (config default 1)
    listen: list[int] = field(default_factory=list)
    address: list[int] = field(default_factory=list)
    node: dict[str, Any] = field(default_factory=dict)
    member: dict[str, Any] = field(default_factory=dict)


def merge(into: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``extra`` into ``into`` (tables recursively, other values replaced); returns ``into``."""
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value
    return into


def cluster_document(nodes: list[NodeSpec], *, volume: str = "appslv", size: int | str = "64MiB",
                     mode: str = "mwc", secret: str = "test-secret",
                     volume_settings: Mapping[str, Any] | None = None,
                     tables: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config as a dict: a node table per spec (control socket and mount
    under ``run/``), volume ``volume`` with a member per spec (device and map
    under ``data/NODE/``); ``volume_settings`` go into the volume's table,
    ``tables`` (e.g. ``witnesses``) are merged in at the top."""
    doc: dict[str, Any] = {"secret": secret, "nodes": {}}
    for spec in nodes:
        if not spec.address:
            spec.address = free_ports(spec.paths)
        table: dict[str, Any] = {"address": [f"127.0.0.1:{p}" for p in spec.address]}
        if spec.listen:
            table["listen"] = [f"127.0.0.1:{p}" for p in spec.listen]
        if spec.votes is not None:
            table["votes"] = spec.votes
        table.update(control=f"run/{spec.name}.sock", mount=f"run/{spec.name}")
        doc["nodes"][spec.name] = merge(table, spec.node)
    members: dict[str, Any] = {}
    for spec in nodes:
        member: dict[str, Any] = {"device": f"data/{spec.name}/{volume}.img",
                                  "statemap": f"data/{spec.name}/{volume}.sm"}
        if spec.mode:
            member["mode"] = spec.mode
        members[spec.name] = merge(member, spec.member)
    vol = merge({"size": size, "mode": mode}, volume_settings or {})
    vol["members"] = members
    doc["volumes"] = {volume: vol}
    return merge(doc, tables or {})


def write_cluster_config(directory: Path, nodes: list[NodeSpec], *, name: str = "gmd.toml",
                         **options: Any) -> Path:
    """Write :func:`cluster_document` (``options`` are its keywords) to
    ``directory``/``name`` and return the path."""
    path = Path(directory) / name
    path.write_text(tomli_w.dumps(cluster_document(nodes, **options)))
    return path


def witness_table(name: str, port: int, votes: int = 1, state: str | None = None) -> dict[str, Any]:
    """A ``[witnesses.NAME]`` table for :func:`cluster_document`'s ``tables``."""
    return {"witnesses": {name: {"address": f"127.0.0.1:{port}", "votes": votes,
                                 "state": state or f"data/{name}/witness.json"}}}
