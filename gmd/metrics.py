"""The Prometheus endpoint of a node daemon or a witness (docs/DESIGN.md, "Metrics").

Off unless the node's or witness's table sets ``metrics = "host:port"``.
prometheus_client serves scrapes from its own threads; those threads never
read engine state. A trio task (:meth:`MetricsEndpoint.serve`) builds every
metric family from the daemon's state on the event loop about once a second
and swaps the new list into a :class:`SnapshotCollector` (one attribute
assignment); a scrape returns the latest list. Each endpoint has its own
``CollectorRegistry``, so several daemons can run in one process (tests).

The families come from pure functions: :func:`node_families` from each
volume's status dict (gmd.status) and its latency histograms (gmd.latency),
:func:`witness_families` from a witness's registrations and counters.
Counters are the daemons' own monotonic counts, exact when sampled; the
histograms are observed where writes complete and acks arrive.

:data:`METRICS` names every metric, its type, labels and meaning; the docs'
table and the sample Grafana dashboard (docs/grafana-gmd.json) are checked
against it by the unit tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from statemap import DiskState, Role

from .config import Address
from .errors import Refused
from .latency import LatencyHistogram
from .replication import LinkState

if TYPE_CHECKING:
    from .replication import MemberLink
    from .writepath import WritePath

log = logging.getLogger(__name__)

REFRESH_INTERVAL = 1.0  # seconds between snapshots: what a scrape sees is at most this old

_V = ("volume", "node")
_M = ("volume", "node", "member")
_W = ("witness",)


@dataclass(frozen=True)
class MetricSpec:
    """One metric as documented: its Prometheus type, labels and meaning."""

    kind: str  # "counter", "gauge" or "histogram"
    labels: tuple[str, ...]
    help: str


# Every metric gmd exports. The names follow Prometheus conventions (_total
# counters, _bytes and _seconds units); docs/DESIGN.md has the same table.
METRICS: dict[str, MetricSpec] = {
    # -- node daemon, per volume
    "gmd_volume_up": MetricSpec("gauge", _V, "1 while the volume is up on this node"),
    "gmd_volume_role": MetricSpec("gauge", (*_V, "role"), "1 for the volume's role on this node (primary, secondary)"),
    "gmd_writes_total": MetricSpec("counter", _V, "application writes completed"),
    "gmd_written_bytes_total": MetricSpec("counter", _V, "bytes of application writes completed"),
    "gmd_writes_in_flight": MetricSpec("gauge", _V, "application writes started, not yet complete"),
    "gmd_write_latency_seconds": MetricSpec("histogram", _V, "application write, start to completion"),
    "gmd_writes_suspended": MetricSpec("gauge", _V, "1 while writes wait for quorum"),
    "gmd_quorum_votes": MetricSpec("gauge", _V, "votes present (this member, connected members, granting witnesses)"),
    "gmd_quorum_needed_votes": MetricSpec("gauge", _V, "votes needed for quorum"),
    "gmd_quorum_expected_votes": MetricSpec("gauge", _V, "votes expected (configured, or the operator's override)"),
    "gmd_quorum_ok": MetricSpec("gauge", _V, "1 while the volume has quorum here"),
    "gmd_quorum_witness_granted": MetricSpec("gauge", (*_V, "witness"), "1 while the witness's votes count here"),
    "gmd_split_brain": MetricSpec("gauge", _V, "1 while a member is refused for a split-brain or its risk "
                                                "(diverging data, two primaries)"),
    # -- node daemon, per member of a volume (the local one has member = node)
    "gmd_member_disk_state": MetricSpec("gauge", (*_M, "state"), "1 for the member's disk state as seen here"),
    "gmd_member_link_state": MetricSpec("gauge", (*_M, "state"), "1 for the link state to the member (local: itself)"),
    "gmd_member_paths": MetricSpec("gauge", _M, "live paths (connections) to the member"),
    "gmd_member_out_of_sync_bytes": MetricSpec("gauge", _M, "bytes the member is marked to lack"),
    "gmd_member_lag_bytes": MetricSpec("gauge", _M, "async: bytes of writes queued to it, not yet acknowledged"),
    "gmd_member_lag_seconds": MetricSpec("gauge", _M, "async: age of its oldest unacknowledged write"),
    "gmd_member_shipped_bytes_total": MetricSpec("counter", _M,
                                                 "bytes of writes and copy data shipped to it, before compression"),
    "gmd_member_wire_bytes_total": MetricSpec("counter", _M, "bytes sent to it on the wire (after compression)"),
    "gmd_member_ack_latency_seconds": MetricSpec("histogram", _M,
                                                 "a write shipped to it, from being queued to its answer"),
    "gmd_member_split_brain": MetricSpec("gauge", _M, "1 while the member is refused for a split-brain or its risk"),
    "gmd_member_copy_done_bytes": MetricSpec("gauge", _M, "bytes of the running copy (or mini-copy) done; "
                                                          "present while one runs"),
    "gmd_member_copy_total_bytes": MetricSpec("gauge", _M, "bytes the running copy covers; present while one runs"),
    "gmd_member_verify_done_bytes": MetricSpec("gauge", _M, "bytes of the running verify compared; present while "
                                                            "one runs"),
    "gmd_member_verify_total_bytes": MetricSpec("gauge", _M, "bytes the running verify covers; present while one "
                                                             "runs"),
    # -- node daemon, per witness
    "gmd_witness_link_up": MetricSpec("gauge", ("node", "witness"), "1 while this node is connected to the witness"),
    # -- witness daemon
    "gmd_witness_node_connected": MetricSpec("gauge", (*_W, "node"), "1 while the node is connected to this witness"),
    "gmd_witness_registrations": MetricSpec("gauge", _W, "volume registrations (volume and identity) it holds"),
    "gmd_witness_registered_outdated": MetricSpec("gauge", (*_W, "volume", "identity"),
                                                  "members the registration's primary writes without"),
    "gmd_witness_lease_held": MetricSpec("gauge", (*_W, "volume", "node"), "1 while the node holds the volume's "
                                                                            "lease here"),
    "gmd_witness_requests_total": MetricSpec("counter", (*_W, "op", "granted"),
                                             "requests answered, by op and whether granted"),
}


def _family(name: str) -> Metric:
    spec = METRICS[name]
    cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}[spec.kind]
    return cls(name, spec.help, labels=spec.labels)


class _Families:
    """Families by name, created on first use, in first-use order."""

    def __init__(self):
        self.by_name: dict[str, Metric] = {}

    def add(self, name: str, labels: Iterable[str], value: float) -> None:
        self._get(name).add_metric(list(labels), value)

    def histogram(self, name: str, labels: Iterable[str], hist: LatencyHistogram) -> None:
        self._get(name).add_metric(list(labels), hist.cumulative(), hist.sum)

    def _get(self, name: str) -> Metric:
        fam = self.by_name.get(name)
        if fam is None:
            fam = self.by_name[name] = _family(name)
        return fam

    def all(self) -> list[Metric]:
        return list(self.by_name.values())


# ------------------------------------------------------------------ node daemon


@dataclass
class VolumeSample:
    """What one snapshot takes of one volume: its status dict (None: down),
    its write counters (kept while it is down too) and its latency histograms."""

    name: str
    status: dict[str, Any] | None
    writes: int
    bytes_written: int
    write_latency: LatencyHistogram
    ack_latency: Mapping[str, LatencyHistogram] = field(default_factory=dict)


def _split_brain(member: Mapping[str, Any]) -> bool:
    # The rule gmd.resolution finds a split-brain peer by.
    return member.get("link") == LinkState.STANDALONE.value and "split-brain" in (member.get("reason") or "")


def node_families(node: str, volumes: Iterable[VolumeSample],
                  witness_links: Mapping[str, bool] | None = None) -> list[Metric]:
    """Every node daemon metric from its volumes' samples and its witness
    links (witness -> connected). Pure."""
    f = _Families()
    for w, up in (witness_links or {}).items():
        f.add("gmd_witness_link_up", (node, w), int(up))
    for v in volumes:
        vl = (v.name, node)
        st = v.status
        f.add("gmd_volume_up", vl, int(st is not None))
        f.add("gmd_writes_total", vl, v.writes)
        f.add("gmd_written_bytes_total", vl, v.bytes_written)
        f.histogram("gmd_write_latency_seconds", vl, v.write_latency)
        for name, hist in v.ack_latency.items():
            f.histogram("gmd_member_ack_latency_seconds", (*vl, name), hist)
        if st is None:
            continue
        for role in Role:
            f.add("gmd_volume_role", (*vl, role.value), int(st["role"] == role.value))
        f.add("gmd_writes_in_flight", vl, st["io"]["in_flight"])
        q = st["quorum"]
        f.add("gmd_writes_suspended", vl, int(q["suspended_writes_since"] is not None))
        f.add("gmd_quorum_votes", vl, q["votes"])
        f.add("gmd_quorum_needed_votes", vl, q["needed"])
        f.add("gmd_quorum_expected_votes", vl, q["expected"])
        f.add("gmd_quorum_ok", vl, int(bool(q["ok"])))
        for w, ws in q["witnesses"].items():
            f.add("gmd_quorum_witness_granted", (*vl, w), int(bool(ws["granted"])))
        f.add("gmd_split_brain", vl, int(any(_split_brain(m) for m in st["members"].values())))
        for name, m in st["members"].items():
            _member(f, (*vl, name), m, local=name == node)
    return f.all()


def _member(f: _Families, ml: tuple[str, str, str], m: Mapping[str, Any], *, local: bool) -> None:
    for state in DiskState:
        f.add("gmd_member_disk_state", (*ml, state.value), int(m["disk"] == state.value))
    # The local member's link is always "local"; a remote member's never is.
    for state in (LinkState.LOCAL,) if local else [s for s in LinkState if s is not LinkState.LOCAL]:
        f.add("gmd_member_link_state", (*ml, state.value), int(m["link"] == state.value))
    f.add("gmd_member_out_of_sync_bytes", ml, m["out_of_sync_bytes"])
    for kind in ("copy", "verify"):
        progress = m.get(kind)
        if progress:
            f.add(f"gmd_member_{kind}_done_bytes", ml, progress["done_bytes"])
            f.add(f"gmd_member_{kind}_total_bytes", ml, progress["total_bytes"])
    if local:
        return
    f.add("gmd_member_paths", ml, m["paths"])
    f.add("gmd_member_lag_bytes", ml, m["lag_bytes"])
    f.add("gmd_member_lag_seconds", ml, m["lag_seconds"])
    f.add("gmd_member_split_brain", ml, int(_split_brain(m)))
    wire = m["wire"]
    f.add("gmd_member_shipped_bytes_total", ml, wire["data_bytes"])
    f.add("gmd_member_wire_bytes_total", ml, wire["wire_bytes"])


class MetricsVolume(Protocol):
    """What a snapshot needs of a volume engine."""

    @property
    def name(self) -> str: ...
    @property
    def is_up(self) -> bool: ...
    def status(self) -> dict[str, Any]: ...
    writepath: WritePath
    members: dict[str, MemberLink]


def sample_volume(engine: MetricsVolume) -> VolumeSample:
    """A volume engine's sample, on the event loop (its status and histograms)."""
    wp = engine.writepath
    return VolumeSample(engine.name, engine.status() if engine.is_up else None, wp.writes, wp.bytes_written,
                        wp.write_latency, {name: m.ack_latency for name, m in engine.members.items()})


# ------------------------------------------------------------------ witness


def witness_families(witness: str, holdings: Iterable[Mapping[str, Any]], connected: Mapping[str, bool],
                     requests: Mapping[tuple[str, bool], int]) -> list[Metric]:
    """Every witness metric: from its registrations (``WitnessBook.holdings``),
    which configured nodes are connected, and the requests answered by (op,
    granted). Pure."""
    f = _Families()
    for node, up in connected.items():
        f.add("gmd_witness_node_connected", (witness, node), int(up))
    rows = list(holdings)
    f.add("gmd_witness_registrations", (witness,), len(rows))
    for r in rows:
        f.add("gmd_witness_registered_outdated", (witness, r["volume"], r["identity"] or ""), len(r["outdated"]))
        if r["lease"] is not None:
            f.add("gmd_witness_lease_held", (witness, r["volume"], r["lease"]), 1)
    for (op, granted), n in sorted(requests.items()):
        f.add("gmd_witness_requests_total", (witness, op, str(granted).lower()), n)
    return f.all()


# ------------------------------------------------------------------ serving


class SnapshotCollector:
    """A prometheus_client collector returning the latest published families:
    the HTTP threads read one reference, the event loop replaces it."""

    def __init__(self):
        self._families: list[Metric] = []

    def publish(self, families: list[Metric]) -> None:
        self._families = families  # one assignment: a scrape sees the old list or the new one

    def collect(self) -> list[Metric]:
        return self._families

    def describe(self) -> list[Metric]:
        return []  # the names change with the volumes; the registry need not check them


class MetricsEndpoint:
    """Serves one daemon's metrics on ``address`` while :meth:`serve` runs;
    ``build`` (called on the event loop) returns the families of a snapshot;
    ``key`` names the config key in errors."""

    def __init__(self, address: Address, key: str, who: str, build: Callable[[], list[Metric]]):
        self.address = address
        self.key = key
        self.who = who
        self.build = build
        self.collector = SnapshotCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.bound: tuple[str, int] | None = None
        self._failed_logged = False

    def refresh(self) -> None:
        """Build and publish a snapshot now (a bug in building is logged once,
        and the last snapshot stays: the metrics never take the daemon down)."""
        try:
            self.collector.publish(self.build())
            self._failed_logged = False
        except Exception:
            if not self._failed_logged:
                log.exception("%s: building the metrics snapshot failed; scrapes see the previous one", self.who)
                self._failed_logged = True

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen (a refusal naming the key if that fails), report the bound
        address as readiness, refresh every :data:`REFRESH_INTERVAL` until
        cancelled; the HTTP server is shut down and its socket closed on the
        way out."""
        self.refresh()  # the first scrape already has data
        try:
            server, thread = await trio.to_thread.run_sync(
                lambda: start_http_server(self.address.port, self.address.host, registry=self.registry))
        except OSError as e:
            raise Refused("metrics-listen-failed", who=self.who, key=self.key, address=self.address,
                          why=e.strerror or e) from None
        self.bound = server.server_address[:2]
        log.info("%s: metrics on http://%s/metrics", self.who, self.address)
        try:
            task_status.started(self.bound)
            while True:
                await trio.sleep(REFRESH_INTERVAL)
                self.refresh()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_shut_down, server, thread)


def _shut_down(server, thread) -> None:
    server.shutdown()  # serve_forever returns within its poll interval (0.5 s)
    server.server_close()
    thread.join()
