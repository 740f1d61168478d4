"""The one writer of cluster config files on loopback, for the demo, the
benchmarks and the tests.

A cluster is one volume on a list of nodes (:class:`NodeSpec`), every path
relative to the config file's directory, so the whole cluster lives in one
temporary directory. The file is built as a dict and written with ``tomli_w``
(quoting and escaping done by a TOML library, not by f-strings); extra keys
and tables are merged into that dict before writing.

:func:`write_bench_cluster` writes the write benchmarks' cluster (bench_write,
bench_fuse) and readies its members to start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from gmd import admin
from gmd.config import load_config
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


def write_bench_cluster(directory: Path, setup: str, size: int, *, backing: str = "zeroed",
                        metrics: int | None = None) -> Path:
    """Write the config of the write benchmarks' cluster for ``setup``
    (``local``: ``bench1`` alone; ``sync``, ``mwc`` or ``async``: ``bench2`` a
    member of that mode; volume ``vol`` of ``size`` bytes) and ready its
    members: state maps initialised, devices allocated (``backing``
    ``"zeroed"``: written through with zeros, or ``"fallocated"``),
    ``bench1``'s data current with no initial copy; ``metrics``: a port on
    127.0.0.1 where ``bench1`` serves its metrics. Returns the config's path."""
    nodes = ["bench1"] if setup == "local" else ["bench1", "bench2"]
    mode = "mwc" if setup == "local" else setup
    specs = [NodeSpec(n, member={"device": f"data/{n}.img", "statemap": f"data/{n}.sm"}) for n in nodes]
    if metrics is not None:
        specs[0].node["metrics"] = f"127.0.0.1:{metrics}"
    path = write_cluster_config(directory, specs, volume="vol", size=size, mode=mode, secret="bench",
                                volume_settings={"async_queue": "256MiB"})
    cfg = load_config(path)
    mib = 1 << 20
    for n in nodes:
        admin.init_volume(cfg, n, "vol")
        with open(cfg.member("vol", n).device, "r+b") as f:  # allocate: no sparse-hole effects
            if backing == "zeroed":
                # Written through: no unwritten extents for the first writes to
                # convert (like a block device or a long-used file).
                zeros = bytes(mib)
                for off in range(0, size, mib):
                    f.write(zeros)
                f.flush()
                os.fsync(f.fileno())
            else:
                os.posix_fallocate(f.fileno(), 0, size)
    admin.mark_dirty(cfg, "bench1", "vol", skip_initial_copy=True)
    return path
