"""The Prometheus endpoints of real daemons, scraped over HTTP while a copy runs."""

from __future__ import annotations

import os
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gmd.config import load_config
from gmd.errors import Refused
from gmd.metrics import METRICS

from .harness import (NodeSpec, WitnessProcess, daemon_processes, free_ports, in_process_daemon, witness_table,
                      write_config)
from .test_cli import run
from .test_copy import source_and_target


def scrape(port: int) -> dict[str, list]:
    """Name -> samples of one scrape of 127.0.0.1:``port`` (parsed as
    Prometheus parses it: a malformed exposition fails here)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list, name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, samples)
    return found[0]


def wait_until(predicate, what: str, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_metrics_endpoints_answer_while_a_copy_runs(tmp_path):
    """labor1 copies 64 MiB to labor2 at 16 MiB/s (about 4 s): its endpoint
    shows the copy's progress for labor2 growing, the writes, quorum and
    role; labor2's and the witness's endpoints answer too."""
    m1, m2, mw, wport = free_ports(4)
    cfg_path = write_config(tmp_path, [NodeSpec("labor1", node={"metrics": f"127.0.0.1:{m1}"}),
                                       NodeSpec("labor2", node={"metrics": f"127.0.0.1:{m2}"})],
                            mode="mwc", size="64MiB", extra_volume='copy_rate = "16MiB"',
                            extra_tables=witness_table("W", wport) + f'metrics = "127.0.0.1:{mw}"\n')
    assert load_config(cfg_path).witnesses["W"].metrics.port == mw
    source_and_target(cfg_path)
    witness = WitnessProcess(cfg_path, "W", tmp_path)
    try:
        witness.start()
        with daemon_processes(cfg_path, ["labor1", "labor2"], tmp_path) as procs:
            for node in ("labor2", "labor1"):
                procs[node].request(op="up", volume="appslv")
            wait_until(lambda: procs["labor1"].status()["members"]["labor2"]["link"] == "connected", "connected")
            device = procs["labor1"].request(op="primary", volume="appslv")["device"]
            fd = os.open(device, os.O_WRONLY)
            try:
                for i in range(8):  # through the FUSE device: the application's writes
                    os.pwrite(fd, bytes([i]) * 4096, i * (1 << 20))
                os.fsync(fd)
            finally:
                os.close(fd)

            def copy_seen():
                m = scrape(m1)
                done = m.get("gmd_member_copy_done_bytes")
                return m if done and value(done, "gmd_member_copy_done_bytes", member="labor2") > 0 else None

            first = wait_until(copy_seen, "copy progress in the metrics")
            done1 = value(first["gmd_member_copy_done_bytes"], "gmd_member_copy_done_bytes", member="labor2")
            total = value(first["gmd_member_copy_total_bytes"], "gmd_member_copy_total_bytes", member="labor2")
            assert 0 < done1 < total == 64 << 20
            later = wait_until(lambda: (m := scrape(m1)).get("gmd_member_copy_done_bytes") and value(
                m["gmd_member_copy_done_bytes"], "gmd_member_copy_done_bytes", member="labor2") > done1 and m,
                "copy progress growing")
            # Every family of a primary with a copy running is there, none undocumented.
            expected = {n for n, spec in METRICS.items() if n.startswith(("gmd_volume", "gmd_write", "gmd_quorum",
                                                                           "gmd_member", "gmd_split"))}
            expected -= {"gmd_member_verify_done_bytes", "gmd_member_verify_total_bytes"}  # no verify runs
            names = {n + "_total" if n + "_total" in METRICS else n for n in later}  # the parser drops _total
            assert expected <= names, expected - names
            assert names <= set(METRICS), names - set(METRICS)
            assert value(later["gmd_volume_role"], "gmd_volume_role", volume="appslv", role="primary") == 1
            assert value(later["gmd_quorum_ok"], "gmd_quorum_ok", volume="appslv") == 1
            assert value(later["gmd_writes_suspended"], "gmd_writes_suspended", volume="appslv") == 0
            assert value(later["gmd_member_link_state"], "gmd_member_link_state", member="labor2",
                         state="connected") == 1
            assert value(later["gmd_member_disk_state"], "gmd_member_disk_state", member="labor2",
                         state="uptodate") == 0  # not before the copy is done
            assert value(later["gmd_member_shipped_bytes"], "gmd_member_shipped_bytes_total", member="labor2") > 0

            # Each write counted once, in the counters and in the latency histogram.
            writes = value(later["gmd_writes"], "gmd_writes_total", volume="appslv")
            assert writes >= 8
            assert value(later["gmd_written_bytes"], "gmd_written_bytes_total", volume="appslv") >= 8 * 4096
            assert value(later["gmd_write_latency_seconds"], "gmd_write_latency_seconds_count") == writes

            # The secondary's endpoint, and the witness's: labor1 holds the lease.
            second = scrape(m2)
            assert value(second["gmd_volume_role"], "gmd_volume_role", role="secondary") == 1
            w = wait_until(lambda: (m := scrape(mw)).get("gmd_witness_lease_held") and m, "a lease at the witness")
            assert value(w["gmd_witness_lease_held"], "gmd_witness_lease_held", volume="appslv", node="labor1") == 1
            assert value(w["gmd_witness_node_connected"], "gmd_witness_node_connected", node="labor1") == 1
            assert value(w["gmd_witness_registrations"], "gmd_witness_registrations") == 1
            assert value(w["gmd_witness_requests"], "gmd_witness_requests_total", op="renew", granted="true") > 0
    finally:
        witness.stop()



def test_a_metrics_port_in_use_stops_the_daemon_at_start_naming_the_key(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg_path = write_config(tmp_path, [NodeSpec("labor1", node={"metrics": f"127.0.0.1:{port}"})])
        r = run("daemon", "--config", str(cfg_path), "--node", "labor1", "--no-mount", check_rc=1)
    assert (f"node labor1: cannot serve metrics on 127.0.0.1:{port} (nodes.labor1.metrics): Address already in use"
            in r.stderr), r.stderr
    assert "Traceback" not in r.stderr and "sub-exception" not in r.stderr


async def test_reload_refuses_a_changed_metrics_address(tmp_path):
    specs = [NodeSpec("labor1", node={"metrics": f"127.0.0.1:{free_ports(1)[0]}"}), NodeSpec("labor2")]
    cfg_path = write_config(tmp_path, specs)
    async with in_process_daemon(cfg_path, "labor1") as d:
        specs[0].node["metrics"] = f"127.0.0.1:{free_ports(1)[0]}"
        write_config(tmp_path, specs)
        with pytest.raises(Refused) as e:
            await d.reload()
        assert "metrics changed (restart the daemon)" in str(e.value) and "nothing applied" in str(e.value)
