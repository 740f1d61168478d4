"""Each part of the volume engine sees the engine only through its own narrow
protocol: every use of the engine in a part's module is declared there, the
protocol declares nothing the part does not use, and the engine provides all
of it. A part that reaches for something new must say so in its protocol."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import trio

from gmd.config import load_config
from gmd.engine import NodePorts, VolumeEngine
from tools.cluster_config import NodeSpec, write_cluster_config

GMD = Path(__file__).resolve().parents[2] / "gmd"

# module -> the protocol it declares for its engine
PARTS = {
    "writepath": "WritePathVolume",
    "roles": "RolesVolume",
    "handshake": "HandshakeVolume",
    "sessions": "SessionsVolume",
    "dispatch": "DispatchVolume",
    "peerstate": "PeerStateVolume",
    "copyengine": "CopyVolume",
    "resolution": "ResolutionVolume",
    "quorum_keeper": "QuorumVolume",
    "status": "StatusVolume",
    "takeover": "TakeoverVolume",
    "testfailover": "TestFailoverVolume",
}


def _declared(cls: ast.ClassDef) -> set[str]:
    names = set()
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
    return names


def _engine_uses(tree: ast.Module, protocol: str) -> set[str]:
    """Attributes read or written on ``self.engine`` or a parameter ``engine``."""
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == protocol:
            continue
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        if (isinstance(base, ast.Attribute) and base.attr == "engine" and isinstance(base.value, ast.Name)
                and base.value.id == "self") or (isinstance(base, ast.Name) and base.id == "engine"):
            used.add(node.attr)
    return used


@pytest.mark.parametrize("module", sorted(PARTS))
def test_a_part_uses_exactly_what_its_protocol_declares(module):
    tree = ast.parse((GMD / f"{module}.py").read_text())
    protocols = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == PARTS[module]]
    assert protocols, f"gmd/{module}.py declares no {PARTS[module]}"
    declared = _declared(protocols[0])
    used = _engine_uses(tree, PARTS[module])
    assert used - declared == set(), f"gmd/{module}.py uses engine members its protocol does not declare"
    assert declared - used == set(), f"{PARTS[module]} declares members gmd/{module}.py never uses"
    # The part is typed by its protocol, never by the whole engine.
    assert "VolumeEngine" not in (GMD / f"{module}.py").read_text().replace("~gmd.engine.VolumeEngine", "")


def test_the_engine_provides_every_parts_protocol(tmp_path):
    cfg = load_config(write_cluster_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")]))

    async def dial(*args, **kwargs):
        raise AssertionError("not dialled in this test")

    ports = NodePorts(dial=dial, peer_addresses=lambda name: [], limiter=trio.CapacityLimiter(1),
                      witnesses={}, host=lambda: None)
    engine = VolumeEngine(cfg.volume("appslv"), "labor1", ports)
    for module, protocol in PARTS.items():
        cls = getattr(importlib.import_module(f"gmd.{module}"), protocol)
        members = _declared(next(n for n in ast.parse(inspect.getsource(cls)).body if isinstance(n, ast.ClassDef)))
        for name in members:
            # Static lookup: a property such as ``statemap`` refuses while the volume is down.
            assert name in vars(engine) or hasattr(type(engine), name), f"engine lacks {protocol}.{name}"
