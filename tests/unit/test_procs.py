"""The shared process and port helpers (tools/procs.py)."""

from __future__ import annotations

from tools.procs import free_ports


def test_free_ports_never_hands_out_a_port_twice():
    """Clusters take their ports from several calls: one port twice would be a
    config error (or two daemons on one port) on a busy machine."""
    seen = [p for _ in range(200) for p in free_ports(3)]
    assert len(seen) == len(set(seen)) == 600
