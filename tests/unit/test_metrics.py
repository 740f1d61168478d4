"""gmd.metrics and gmd.latency: the metric families built from a status dict
and a witness's registrations, the histograms, and the docs and the sample
Grafana dashboard checked against the list of metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gmd.latency import LATENCY_BUCKETS, LatencyHistogram
from gmd.metrics import METRICS, SnapshotCollector, VolumeSample, node_families, witness_families

DOCS = Path(__file__).resolve().parents[2] / "docs"


def exposition(families) -> dict[str, dict[tuple, float]]:
    """Sample name -> {sorted labels: value}, through prometheus_client's own
    rendering and parsing (what a scrape would see)."""
    collector = SnapshotCollector()
    collector.publish(families)
    registry = CollectorRegistry()
    registry.register(collector)
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def one(samples: dict[tuple, float], **labels: str) -> float:
    found = [v for k, v in samples.items() if all((n, labels[n]) in k for n in labels)]
    assert len(found) == 1, (labels, samples)
    return found[0]


def member(**over):
    m = {"disk": "uptodate", "link": "connected", "mode": "mwc", "out_of_sync_bytes": 0, "lag_bytes": 0,
         "lag_seconds": 0.0, "copy": None, "verify": None, "paths": 1, "reason": None,
         "wire": {"data_bytes": 0, "wire_bytes": 0}}
    m.update(over)
    return m


def status(**over):
    """A primary's status dict with the keys gmd.metrics reads (gmd.status has them all)."""
    st_ = {"role": "primary", "io": {"writes": 5, "bytes_written": 20480, "in_flight": 2},
           "quorum": {"votes": 2, "needed": 2, "expected": 3, "ok": True, "suspended_writes_since": None,
                      "witnesses": {"W": {"granted": False}}},
           "members": {"n1": {"disk": "uptodate", "link": "local", "mode": "mwc", "out_of_sync_bytes": 0,
                              "copy": None},
                       "n2": member(copy={"kind": "full", "done_bytes": 1 << 20, "total_bytes": 8 << 20},
                                    disk="inconsistent", out_of_sync_bytes=7 << 20,
                                    wire={"data_bytes": 4096, "wire_bytes": 1500}),
                       "n3": member(link="standalone", disk="unknown", paths=0,
                                    reason="split-brain: n1 and n3 hold diverging data of v; nothing is overwritten")}}
    st_.update(over)
    return st_


def sample(status_dict, **over):
    args = dict(name="v", status=status_dict, writes=5, bytes_written=20480, write_latency=LatencyHistogram(),
                ack_latency={"n2": LatencyHistogram(), "n3": LatencyHistogram()})
    args.update(over)
    return VolumeSample(**args)


def test_a_primary_with_a_copy_running_and_a_member_in_split_brain():
    hist = LatencyHistogram()
    for s in (0.0002, 0.003, 0.003, 7.0):
        hist.observe(s)
    out = exposition(node_families("n1", [sample(status(), write_latency=hist)], {"W": True}))
    assert one(out["gmd_volume_up"], volume="v", node="n1") == 1
    assert one(out["gmd_volume_role"], role="primary") == 1 and one(out["gmd_volume_role"], role="secondary") == 0
    assert one(out["gmd_writes_total"]) == 5 and one(out["gmd_written_bytes_total"]) == 20480
    assert one(out["gmd_writes_in_flight"]) == 2
    assert one(out["gmd_write_latency_seconds_count"]) == 4
    assert one(out["gmd_write_latency_seconds_bucket"], le="0.005") == 3
    assert one(out["gmd_write_latency_seconds_bucket"], le="+Inf") == 4
    assert one(out["gmd_write_latency_seconds_sum"]) == pytest.approx(7.0062)
    assert (one(out["gmd_quorum_votes"]), one(out["gmd_quorum_needed_votes"]), one(out["gmd_quorum_expected_votes"]),
            one(out["gmd_quorum_ok"]), one(out["gmd_writes_suspended"])) == (2, 2, 3, 1, 0)
    assert one(out["gmd_quorum_witness_granted"], witness="W") == 0
    assert one(out["gmd_witness_link_up"], witness="W") == 1
    # The copy to n2: its progress, its state, what was shipped to it.
    assert one(out["gmd_member_copy_done_bytes"], member="n2") == 1 << 20
    assert one(out["gmd_member_copy_total_bytes"], member="n2") == 8 << 20
    assert len(out["gmd_member_copy_done_bytes"]) == 1  # only while a copy runs
    assert one(out["gmd_member_out_of_sync_bytes"], member="n2") == 7 << 20
    assert one(out["gmd_member_disk_state"], member="n2", state="inconsistent") == 1
    assert sum(v for k, v in out["gmd_member_disk_state"].items() if ("member", "n2") in k) == 1
    assert one(out["gmd_member_shipped_bytes_total"], member="n2") == 4096
    assert one(out["gmd_member_wire_bytes_total"], member="n2") == 1500
    assert one(out["gmd_member_ack_latency_seconds_count"], member="n2") == 0
    # n3 refused for diverging data: split-brain, on the member and the volume.
    assert one(out["gmd_member_split_brain"], member="n3") == 1 and one(out["gmd_member_split_brain"], member="n2") == 0
    assert one(out["gmd_split_brain"], volume="v") == 1
    assert one(out["gmd_member_link_state"], member="n3", state="standalone") == 1
    # The local member: its own disk and link, no lag or shipping of its own.
    assert one(out["gmd_member_link_state"], member="n1", state="local") == 1
    assert [k for k in out["gmd_member_link_state"] if ("member", "n1") in k] == [
        (("member", "n1"), ("node", "n1"), ("state", "local"), ("volume", "v"))]
    assert not any(("member", "n1") in k for k in out["gmd_member_lag_bytes"])
    assert not any(("state", "local") in k for k in out["gmd_member_link_state"] if ("member", "n2") in k)


def test_suspended_writes_no_quorum_and_a_standalone_member_that_is_no_split_brain():
    st_ = status()
    st_["quorum"].update(ok=False, votes=1, suspended_writes_since=123.4)
    st_["members"]["n3"]["reason"] = "volume v size mismatch: n1 has 1, n3 has 2"
    out = exposition(node_families("n1", [sample(st_)]))
    assert one(out["gmd_writes_suspended"]) == 1 and one(out["gmd_quorum_ok"]) == 0
    assert one(out["gmd_split_brain"]) == 0 and one(out["gmd_member_split_brain"], member="n3") == 0


def test_a_volume_that_is_down_keeps_its_counters_and_shows_nothing_else():
    out = exposition(node_families("n1", [sample(None, writes=7, bytes_written=7 * 4096), sample(status(), name="u")]))
    assert one(out["gmd_volume_up"], volume="v") == 0 and one(out["gmd_volume_up"], volume="u") == 1
    assert one(out["gmd_writes_total"], volume="v") == 7
    assert all(("volume", "u") in k for k in out["gmd_quorum_ok"])
    assert all(("volume", "u") in k for k in out["gmd_member_out_of_sync_bytes"])


def test_witness_families():
    holdings = [{"volume": "v", "identity": "9f0c", "generation": "g1", "parent": None, "outdated": ["n2"],
                 "primary": "n1", "lease": "n1"},
                {"volume": "u", "identity": None, "generation": "g2", "parent": None, "outdated": [],
                 "primary": None, "lease": None}]
    out = exposition(witness_families("W", holdings, {"n1": True, "n2": False},
                                      {("renew", True): 3, ("query", False): 2}))
    assert one(out["gmd_witness_registrations"], witness="W") == 2
    assert one(out["gmd_witness_registered_outdated"], volume="v", identity="9f0c") == 1
    assert one(out["gmd_witness_registered_outdated"], volume="u", identity="") == 0
    assert out["gmd_witness_lease_held"] == {(("node", "n1"), ("volume", "v"), ("witness", "W")): 1}
    assert one(out["gmd_witness_node_connected"], node="n1") == 1 and one(out["gmd_witness_node_connected"],
                                                                          node="n2") == 0
    assert one(out["gmd_witness_requests_total"], op="renew", granted="true") == 3
    assert one(out["gmd_witness_requests_total"], op="query", granted="false") == 2


def test_every_family_built_is_documented_with_its_type_and_labels():
    fams = (node_families("n1", [sample(status()), sample(None, name="u")], {"W": False})
            + witness_families("W", [{"volume": "v", "identity": None, "outdated": [], "lease": "n1"}],
                               {"n1": True}, {("renew", True): 1}))
    for fam in fams:
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        spec = METRICS[name]
        assert fam.type == spec.kind, name
        for s in fam.samples:
            assert set(s.labels) - {"le"} == set(spec.labels), (name, s.labels)


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=50))
def test_histogram_buckets_are_cumulative_and_inclusive(values):
    h = LatencyHistogram()
    for v in values:
        h.observe(v)
    buckets = h.cumulative()
    assert [le for le, _ in buckets] == [repr(b) for b in LATENCY_BUCKETS] + ["+Inf"]
    for (le, n), bound in zip(buckets, (*LATENCY_BUCKETS, float("inf"))):
        assert n == sum(1 for v in values if v <= bound), le
    assert h.count == len(values) and h.sum == pytest.approx(sum(values))


def documented_names() -> list[str]:
    """The metric names in the first column of DESIGN.md's "Metrics" table."""
    text = (DOCS / "DESIGN.md").read_text()
    section = text[text.index("\n## Metrics"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"^\| `(gmd_\w+)` \|", section, re.M)


def test_the_design_doc_lists_every_metric_once():
    names = documented_names()
    assert sorted(names) == sorted(METRICS), set(names) ^ set(METRICS)


def test_the_grafana_dashboard_queries_only_documented_metrics():
    dashboard = json.loads((DOCS / "grafana-gmd.json").read_text())
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dashboard)
    assert len(exprs) >= 10
    used = {n for e in exprs for n in re.findall(r"\bgmd_\w+", e)}
    histograms = {n for n, s in METRICS.items() if s.kind == "histogram"}
    for name in used:
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        assert name in METRICS or (base in histograms and base != name), name
