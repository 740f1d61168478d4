"""Test failover end to end (docs/DESIGN.md, "Test failover"): real daemons,
FUSE mounts, WAN proxies, the stamping workload on the primary.

* ``gmd drill --test-failover --sites 3 --json``, run as the operator runs
  it: the far member's image is a frozen prefix of the acknowledged writes
  while the member stays current, and the member ends byte-identical;
* a test whose space runs out ends cleanly with the reason in the status
  while the member stays current and correct;
* the command line's refusals name what is wrong, without a traceback.

Nothing may be left behind: no process naming the test's directory, no
mount under it, no loop device on its files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_drill import GMD, _missing, checks, drill, leftovers, why
from tools.drill_cluster import LocalCluster
from tools.procs import file_hash
from tools.stamps import BLOCK, verify
from tools.workload import Workload

pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")

FAR = {"labor3": {"mode": "async", "votes": 0}}


def no_loop_devices_on(directory: Path) -> list[str]:
    r = subprocess.run(["losetup", "-a"], capture_output=True, text=True)
    return [line for line in r.stdout.splitlines() if str(directory) in line]


@pytest.mark.slow
def test_the_drill_freezes_a_prefix_on_the_far_site_which_stays_current_and_ends_unchanged(tmp_path):
    rc, doc, err = drill(tmp_path, "--test-failover", "--sites", "3")
    assert rc == 0 and doc["passed"], why(doc, err)
    names = checks(doc)
    for name in ("the image is a prefix of the acknowledged writes", "the image stays frozen (xxh3-128 of the image)",
                 "the image is still the same prefix", "labor3 stays current while the test runs",
                 "labor3's lag is not hurt beyond noise", "labor3 keeps receiving the primary's writes",
                 "the image's writes never reach labor3's disk", "ending the test discards the image",
                 "members byte-identical after the test (xxh3-128 of the backing files)"):
        assert names[name], name
    f = doc["figures"]
    assert f["image_prefix_writes"] > 0 and f["image_writes_after_freeze"] > 0 and f["kept_bytes"] > 0
    assert doc["verifications"]["image at the start"]["is_prefix"]
    assert not no_loop_devices_on(tmp_path)


@pytest.mark.slow
def test_a_test_whose_space_runs_out_ends_with_the_reason_and_the_member_stays_current_and_correct(tmp_path):
    cluster = LocalCluster(names=("labor1", "labor2", "labor3"), member_settings=FAR, directory=tmp_path / "c")
    w = None
    try:
        cluster.init_volume("labor1")
        cluster.start()
        cluster.wait("every member to connect", lambda: all(
            m["link"] == "connected" for n, m in cluster.status("labor1")["members"].items() if n != "labor1"))
        cluster.ask("labor1", op="primary", volume="appslv")
        w = Workload(cluster.device("labor1"), area=(0, 32 << 20), writers=4, direct=True,
                     journal=tmp_path / "acks.journal", seed=11)
        w.start()
        assert w.wait_acked(200, timeout=30)
        # 1 MiB holds 15 regions of kept contents: the workload's 512 regions overflow it at once.
        tf = cluster.ask("labor3", op="test_failover", volume="appslv", action="start", space=1 << 20)["test_failover"]
        assert tf["active"] and tf["space"] == 1 << 20
        image = tf["image"]
        ended = cluster.wait("the test to end for want of space", lambda: (
            s := cluster.status("labor3")["test_failover"]) and not s["active"] and s, timeout=30)
        assert ended["ended_reason"].startswith("out of space"), ended
        assert ended["kept_bytes"] <= 1 << 20
        assert not os.path.exists(image)
        assert not list((tmp_path / "c" / "data" / "labor3").glob("*.test-*"))
        told = cluster.wait("the primary to learn it ended", lambda: (
            m := cluster.status("labor1")["members"]["labor3"])["test_failover"] and m, timeout=10)
        assert told["test_failover"]["active"] is False and "out of space" in told["test_failover"]["ended_reason"]
        # The member never stopped taking writes: current throughout, and correct at the end.
        assert told["disk"] == "uptodate" and told["replication"] == "shipping" and not told["out_of_sync_bytes"]
        since = w.acked()
        assert w.wait_acked(200, timeout=30, since=since)
        assert not w.stop(timeout=30)
        acks = w.acks()
        with open(cluster.device("labor1"), "rb+") as f:
            os.fsync(f.fileno())
        cluster.wait("labor3 to drain", lambda: not (m := cluster.status("labor1")["members"]["labor3"])[
            "lag_bytes"] and m["disk"] == "uptodate" and not m["out_of_sync_bytes"], timeout=60)
        hashes = {n: file_hash(cluster.backing(n)) for n in cluster.names}
        assert len(set(hashes.values())) == 1, hashes
        with open(cluster.backing("labor3"), "rb") as f:
            v = verify(acks, lambda off: os.pread(f.fileno(), BLOCK, off), w.run, in_flight=w.in_flight)
        assert v.passed(rpo_zero=True), v.as_dict()
        # A second test may start once the first ended; `end` then ends it.
        again = cluster.ask("labor3", op="test_failover", volume="appslv", action="start")["test_failover"]
        assert again["active"] and again["ended_reason"] is None
        assert cluster.ask("labor3", op="test_failover", volume="appslv", action="end")["test_failover"][
            "ended_reason"] == "ended by the operator"
    finally:
        if w is not None:
            w.stop(timeout=30)
        cluster.teardown()
    assert not leftovers(tmp_path), leftovers(tmp_path)
    assert not no_loop_devices_on(tmp_path)


def test_the_command_line_refuses_with_the_reason_and_no_traceback(tmp_path):
    cluster = LocalCluster(names=("labor1", "labor2"), witness=None, directory=tmp_path / "c")
    try:
        cluster.init_volume("labor1")
        cluster.start()
        cluster.wait("labor2 to connect", lambda: cluster.status("labor1")["members"]["labor2"]["link"] == "connected")
        cluster.ask("labor1", op="primary", volume="appslv")

        def gmd(node: str, *args: str) -> subprocess.CompletedProcess:
            return subprocess.run([GMD, "test-failover", *args, "--config", str(cluster.nodes[node].config),
                                   "--node", node], capture_output=True, text=True, timeout=60,
                                  env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))

        r = gmd("labor1", "start", "appslv")
        assert r.returncode == 2 and "labor1 is primary" in r.stderr and "Traceback" not in r.stderr, r.stderr
        r = gmd("labor2", "end", "appslv")
        assert r.returncode == 1 and "no test failover runs on labor2" in r.stderr, r.stderr
        r = gmd("labor2", "start", "appslv", "--space", "12kB")
        assert r.returncode == 2 and "--space" in r.stderr and "Traceback" not in r.stderr, r.stderr
        r = gmd("labor2", "start", "nosuchvolume")
        assert r.returncode == 2 and "nosuchvolume" in r.stderr and "Traceback" not in r.stderr, r.stderr
        r = gmd("labor2", "start", "appslv")
        assert r.returncode == 0 and "appslv@test" in r.stdout, r.stderr
        r = gmd("labor2", "start", "appslv")
        assert r.returncode == 1 and "runs already" in r.stderr, r.stderr
        st = subprocess.run([GMD, "status", "appslv", "--config", str(cluster.nodes["labor2"].config), "--node",
                             "labor2"], capture_output=True, text=True, timeout=60)
        assert "test failover: image" in st.stdout, st.stdout
        r = gmd("labor2", "end", "appslv")
        assert r.returncode == 0 and "ended" in r.stdout, r.stderr
        assert not (cluster.nodes["labor2"].mount / "appslv@test").exists()
    finally:
        cluster.teardown()
    time.sleep(0.1)
    assert not leftovers(tmp_path), leftovers(tmp_path)
