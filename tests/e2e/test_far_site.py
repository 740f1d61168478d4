"""A far async member across a WAN (30 ms one way, a bandwidth cap), brought
back in the primary's write order from its backlog and journal after an
outage (issue 16 (f)), and sent to bitmap tracking when the journal fills.

Real daemons, WAN proxy processes and FUSE mounts (the drill's local
cluster), a stamping workload on the primary. The far member's image is
read straight from its backing file while its links are held (blackholed for
a moment, so nothing more arrives): it must always be an exact prefix of the
acknowledged writes.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from tools.drill import read_blocks
from tools.drill_cluster import LocalCluster
from tools.procs import file_hash
from tools.stamps import parse, verify
from tools.workload import Workload, device_of

from .test_drill import _missing, leftovers

pytestmark = [pytest.mark.skipif(_missing() is not None, reason=_missing() or ""), pytest.mark.slow]

AREA = 24 << 20
FAR_BANDWIDTH = 20_000_000  # bytes/s on the far site's links


def far_cluster(tmp_path, *, journal_size: str, bandwidth: int = FAR_BANDWIDTH) -> LocalCluster:
    return LocalCluster(
        mode="mwc", size="64MiB", auto_promote=False, witness=None, directory=tmp_path / "cluster",
        keep=bool(os.environ.get("GMD_TEST_KEEP")),  # its logs, to look into a failure
        volume_settings={"async_queue": "2MiB"},
        member_settings={"labor1": {"journal": "data/labor1/appslv.journal", "journal_size": journal_size},
                         "labor2": {"mode": "async", "votes": 0}},
        far={"labor2": {"delay": 0.03, "bandwidth": bandwidth}})


@pytest.fixture
def cluster_factory(tmp_path):
    made: list[LocalCluster] = []

    def make(**kw) -> LocalCluster:
        c = far_cluster(tmp_path, **kw)
        made.append(c)
        c.init_volume("labor1")
        c.start()
        c.wait("labor2 to connect", lambda: c.status("labor1")["members"]["labor2"]["link"] == "connected",
               timeout=60)
        c.ask("labor1", op="primary", volume=c.volume)
        return c

    yield make
    for c in made:
        c.teardown()
    assert not leftovers(tmp_path), leftovers(tmp_path)


def far_view(c: LocalCluster) -> dict:
    return c.status("labor1")["members"]["labor2"]


def far_image_is_a_prefix(c: LocalCluster, w: Workload) -> tuple[bool, str]:
    """Hold the far site's links (the session survives a blackhole this
    short), let what reached it be applied, read its image; then let go."""
    c.partition("labor2")
    try:
        time.sleep(0.5)
        acks = w.acks()
        read, close = read_blocks(str(c.backing("labor2")))
        try:
            v = verify(acks, read, w.run, in_flight=w.in_flight)
            out_of_order = [] if v.passed(rpo_zero=False) else out_of_order_writes(acks, read, w.run, v.prefix_index)
        finally:
            close()
    finally:
        c.heal()
    return v.passed(rpo_zero=False), (f"prefix up to write {v.prefix_index} of {v.acked_writes}, "
                                      f"{v.corrupt} corrupt, {v.stale} behind; held though issued after "
                                      f"an ack it lacks (ack, issued after, offset): {out_of_order[:5]}")


def out_of_order_writes(acks, read, run, prefix_index: int) -> list[tuple[int, int, int]]:
    """The acknowledged writes an image holds that were issued after an ack
    it lacks: what makes it no prefix (for the failure message)."""
    index = {(a.writer, a.seq): a for a in acks}
    found = []
    for off in sorted({a.offset for a in acks}):
        st = parse(read(off), run, off)
        a = index.get((st.writer, st.seq)) if st is not None else None
        if a is not None and (a.issued_after or 0) > prefix_index:
            found.append((a.index, a.issued_after, off))
    return sorted(found)


def level(c: LocalCluster) -> bool:
    m = far_view(c)
    return (m["link"] == "connected" and m["disk"] == "uptodate" and not m["out_of_sync_bytes"]
            and m["copy"] is None and not m["lag_bytes"])


def test_an_outage_longer_than_the_queue_is_caught_up_in_write_order_from_the_journal(cluster_factory, tmp_path):
    c = cluster_factory(journal_size="768MiB")  # more than the outage's writes at this machine's pace
    w = Workload(c.device("labor1"), area=(0, AREA), writers=4, direct=True,
                 journal=tmp_path / "acknowledged.journal", seed=random.randrange(1 << 30))
    w.start()
    try:
        assert w.wait_acked(200, timeout=30)
        c.partition("labor2")  # past the 6 s path timeout: the session ends
        t0 = time.monotonic()
        c.wait("the backlog to outgrow the queue", lambda: far_view(c)["backlog"]["journal_bytes"] > 0,
               timeout=60)
        # Until the session has ended (the 6 s path timeout), and a moment more.
        c.wait("the far session to end", lambda: far_view(c)["link"] != "connected", timeout=30)
        time.sleep(max(0.5, 7.0 - (time.monotonic() - t0)))
        during = far_view(c)
        assert during["link"] != "connected" and during["backlog"]["state"] == "waiting", during
        assert during["backlog"]["journal_bytes"] > 0 and during["rpo"]["bytes"] > 0
        # The application writes faster than the far link carries: it pauses
        # (a quiet hour), so the far site can catch up from the journal.
        assert not w.pause(timeout=30)
        c.heal()
        c.wait("the replay to start", lambda: far_view(c)["replication"] == "replaying", timeout=30, interval=0.02)
        # Sampled at random moments of the replay: always a prefix.
        samples = 0
        while far_view(c)["replication"] == "replaying" and samples < 3:
            time.sleep(random.uniform(0.1, 0.5))
            ok, detail = far_image_is_a_prefix(c, w)
            b = far_view(c)["backlog"]
            assert b["dropped"] == 0, b  # still the backlog's work, not a copy's
            assert ok, f"during the replay: {detail}"
            samples += 1
        assert samples, "the replay ended before it could be sampled"
        assert far_view(c)["backlog"]["replays"] >= 1
        w.resume()
        assert w.wait_acked(200, timeout=30, since=w.acked())
    finally:
        assert not w.stop(timeout=30)
    c.wait("labor2 to be level", lambda: level(c), timeout=180)
    copies = [p for p in c.status("labor1")["copies"] if p["member"] == "labor2"]
    assert all(p["kind"] != "full" for p in copies), copies
    end = far_view(c)["backlog"]
    assert end["state"] == "shipping" and end["dropped"] == 0 and end["writes"] == 0, end
    assert file_hash(c.backing("labor1")) == file_hash(c.backing("labor2"))


def test_a_full_journal_degrades_to_bitmap_tracking_and_a_mini_copy(cluster_factory, tmp_path):
    c = cluster_factory(journal_size="4MiB")
    w = Workload(c.device("labor1"), area=(0, AREA), writers=4, direct=True,
                 journal=tmp_path / "acknowledged.journal", seed=random.randrange(1 << 30))
    w.start()
    try:
        assert w.wait_acked(200, timeout=30)
        c.partition("labor2")
        c.wait("the journal to fill", lambda: far_view(c)["backlog"]["state"] == "bitmap", timeout=60)
        b = far_view(c)["backlog"]
        assert "full" in b["dropped_reason"] and b["dropped"] == 1 and b["writes"] == 0, b
        assert far_view(c)["out_of_sync_bytes"] > 0  # the bitmap holds what it lacks
        time.sleep(1)
        c.heal()
    finally:
        assert not w.stop(timeout=30)
    c.wait("labor2 to be level", lambda: level(c), timeout=180)
    copies = [p for p in c.status("labor1")["copies"] if p["member"] == "labor2"]
    assert copies and all(p["kind"] == "mini" for p in copies), copies
    assert file_hash(c.backing("labor1")) == file_hash(c.backing("labor2"))


def test_a_consistency_group_of_three_volumes_stops_at_one_instant_at_the_far_site(tmp_path):
    """Issue 16 (e): one workload writing across three volumes of a group;
    the primary SIGKILLed at a random moment; the far site's three volumes
    together are an exact prefix of the group's write sequence."""
    volumes = ["appslv", "db2", "db3"]
    c = LocalCluster(mode="mwc", size="32MiB", auto_promote=False, witness=None, directory=tmp_path / "cluster",
                     keep=bool(os.environ.get("GMD_TEST_KEEP")), more_volumes=volumes[1:],
                     volume_settings={"group": "db", "async_queue": "8MiB"},
                     member_settings={"labor2": {"mode": "async", "votes": 0}},
                     far={"labor2": {"delay": 0.03, "bandwidth": FAR_BANDWIDTH}})
    try:
        c.init_volume("labor1")
        c.start()
        for v in volumes:
            c.wait(f"{v} to connect", lambda v=v: c.ask("labor1", op="status", volume=v)["status"]["members"]
                   ["labor2"]["link"] == "connected", timeout=60)
            c.ask("labor1", op="primary", volume=v)
        w = Workload([str(c.nodes["labor1"].mount / v) for v in volumes], area=(0, 8 << 20), writers=6,
                     direct=True, journal=tmp_path / "acknowledged.journal", seed=random.randrange(1 << 30))
        w.start()
        try:
            assert w.wait_acked(500, timeout=30)
            time.sleep(random.uniform(0.5, 3.0))
            far = c.ask("labor2", op="status", volume="db2")["status"]["group"]
            assert far["name"] == "db" and sorted(far["hold"]["received"]) == volumes, far
            c.kill("labor1")
        finally:
            w.stop(timeout=30)
        time.sleep(1.5)  # the far site applies what came before the group's last mark, and drops the rest
        acks = w.acks()
        files = [open(c.backing("labor2", v), "rb") for v in volumes]
        try:
            def read(off):
                d, at = device_of(off)
                files[d].seek(at)
                return files[d].read(4096)
            v = verify(acks, read, w.run, in_flight=w.in_flight)
        finally:
            for f in files:
                f.close()
        assert v.corrupt == 0 and v.passed(rpo_zero=False), (
            f"prefix up to write {v.prefix_index} of {v.acked_writes}: {v.as_dict()}")
        assert v.prefix_index > 0
    finally:
        c.teardown()
    assert not leftovers(tmp_path), leftovers(tmp_path)
