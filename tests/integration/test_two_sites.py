"""Two sites without a witness, ``on_quorum_loss = "continue"`` (README, "Two
sites without a witness"), with real daemons: labor1 in this trio loop (its
engine's write is the application), labor2 a subprocess, the link through
the WAN proxy (see tests/integration/test_quorum.py's Cluster).

The default's side, a split primary that suspends its writes and a survivor
that cannot be promoted without --force, is
test_quorum.py::test_two_nodes_without_witness_split_neither_side_may_write_or_promote.
"""

from __future__ import annotations

import os
import subprocess

import trio

from statemap import DiskState, StateMap

from .harness import GMD, MiB, NodeSpec, backing, daemon_processes, file_hash, init_in_sync, wait_for, write_config
from .test_quorum import Cluster, _pwrite_regions, _read_region, heal_into_split_brain, run_in_thread

REGION = 65536
CONTINUE = 'on_quorum_loss = "continue"'


async def test_primary_writes_on_alone_and_the_lost_peer_gets_only_what_changed(tmp_path):
    """The peer is SIGKILLed: the primary's writes complete without it, the
    peer is outdated in the primary's map on disk, status names the policy;
    restarted, the peer is mini-copied exactly the regions written meanwhile
    and ends uptodate with identical data."""
    c = Cluster(tmp_path, witness=False, extra_volume=CONTINUE)
    async with c.running() as (procs, eng):
        await eng.write(0, os.urandom(8 * MiB))
        await eng.flush()
        q = eng.status()["quorum"]
        assert (q["ok"], q["policy"], q["writing_alone"]) == (True, "continue", False)
        assert "forcing it while the primary lives makes a split-brain" in q["policy_note"]

        await run_in_thread(procs["labor2"].kill)
        await wait_for(lambda: not eng.members["labor2"].connected, what="labor2 lost")
        written = {r: os.urandom(REGION) for r in (3, 17, 300)}
        with trio.fail_after(30):  # a deadline against a hang, not a measure of speed
            for r, data in written.items():
                await eng.write(r * REGION, data)
        st = eng.status()
        q = st["quorum"]
        assert (q["ok"], q["votes"], q["needed"]) == (False, 1, 2)
        assert q["writing_alone"] and q["suspended_writes_since"] is None
        assert st["members"]["labor2"]["disk"] == "outdated"
        assert st["members"]["labor2"]["out_of_sync_bytes"] == len(written) * REGION
        # Recorded on disk, not only in memory: the map as a restart would read it.
        sm = StateMap.open(tmp_path / "data/labor1/appslv.sm", readonly=True)
        try:
            assert sm.sb.peers["labor2"].disk == DiskState.OUTDATED
            assert sm.out_of_sync_bytes("labor2") == len(written) * REGION
        finally:
            sm.close()

        # labor2's own crash recovery will add the extents it had hot (a
        # mirror of labor1's intents): those are compared, and move only if
        # they differ.
        sm = StateMap.open(tmp_path / "data/labor2/appslv.sm", readonly=True)
        hot = set(sm.intent.search(1))
        sm.close()
        per_extent = eng.config.extent_size // REGION
        compared = set(written) | {r for e in hot for r in range(e * per_extent, (e + 1) * per_extent)}

        sent_before = eng.copier.bytes_sent
        await run_in_thread(procs["labor2"].start)
        await run_in_thread(lambda: procs["labor2"].request(op="up", volume="appslv"))
        await wait_for(lambda: eng.status()["members"]["labor2"]["disk"] == "uptodate", timeout=60,
                       what="labor2 caught up")
        passes = [p for name, p in eng.copier.history if name == "labor2"]
        assert [p.kind for p in passes] == ["mini"] and passes[0].total_bytes == len(compared) * REGION
        assert passes[0].regions_differing == len(written)
        # Only the regions written without it cross, not the 64 MiB of a full copy.
        assert eng.copier.bytes_sent - sent_before == len(written) * REGION
        assert not eng.status()["quorum"]["writing_alone"]
        await eng.flush()
        assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))


async def test_the_survivor_is_promoted_only_by_force_and_a_forced_split_is_detected(tmp_path):
    """The link is cut: labor1 writes on alone; on labor2 'gmd primary' is
    refused with the policy's reason, '--force' promotes it, and it writes.
    When the link is back, the two histories are a split-brain: the link
    stays down and neither side's data is overwritten."""
    c = Cluster(tmp_path, witness=False, mode="mwc", extra_volume=CONTINUE)
    env = dict(os.environ, GMD_CONFIG=str(c.cfg2), GMD_NODE="labor2")

    def gmd(*args):
        return subprocess.run([GMD, *args], env=env, capture_output=True, text=True, timeout=60)

    async with c.running() as (procs, eng):
        await eng.write(0, os.urandom(8 * MiB))
        await eng.flush()
        c.partition("reset")
        await wait_for(lambda: not eng.members["labor2"].connected, what="link lost")
        ours = {r: os.urandom(REGION) for r in (3, 40)}
        with trio.fail_after(30):
            for r, data in ours.items():
                await eng.write(r * REGION, data)
        await eng.flush()

        await wait_for(lambda: procs["labor2"].status()["members"]["labor1"]["link"] != "connected",
                       what="labor2 sees the link lost")
        refused = await run_in_thread(gmd, "primary", "appslv")
        assert refused.returncode == 1, refused.stderr
        assert 'no quorum: 1 of 2 votes needed are present. Under on_quorum_loss = "continue"' in refused.stderr
        assert "forcing it while the primary lives makes a split-brain" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert procs["labor2"].status()["role"] == "secondary"
        forced = await run_in_thread(gmd, "primary", "appslv", "--force")
        assert forced.returncode == 0, forced.stderr
        st2 = await run_in_thread(procs["labor2"].status)
        assert st2["role"] == "primary" and st2["quorum"]["forced"]
        theirs = {r: os.urandom(REGION) for r in (4, 90)}
        await run_in_thread(_pwrite_regions, st2["device"], theirs, REGION)

        await heal_into_split_brain(c, eng, procs)
        for r, data in theirs.items():  # nothing overwritten either way
            assert _read_region(backing(tmp_path, "labor2"), r, REGION) == data
        for r, data in ours.items():
            assert _read_region(backing(tmp_path, "labor1"), r, REGION) == data


async def test_a_dead_primary_s_survivor_is_forced_and_the_old_primary_comes_back_behind_it(tmp_path):
    """labor1, primary, is SIGKILLed: on labor2 'gmd primary' is refused,
    '--force' promotes it and it writes. labor1 comes back: it wrote nothing
    since, so the generations say it is behind, and it is caught up from
    labor2 (no split-brain) and ends identical."""
    cfg = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")], mode="mwc", extra_volume=CONTINUE)
    init_in_sync(cfg, "labor1", ["labor2"])
    env = dict(os.environ, GMD_CONFIG=str(cfg), GMD_NODE="labor2")

    def gmd(*args):
        return subprocess.run([GMD, *args], env=env, capture_output=True, text=True, timeout=60)

    with daemon_processes(cfg, ["labor1", "labor2"], tmp_path) as procs:
        for p in procs.values():
            await run_in_thread(lambda p=p: p.request(op="up", volume="appslv"))
        await wait_for(lambda: procs["labor2"].status()["members"]["labor1"]["link"] == "connected",
                       what="connected")
        reply = await run_in_thread(lambda: procs["labor1"].request(op="primary", volume="appslv"))
        await run_in_thread(_pwrite_regions, reply["device"], {r: os.urandom(REGION) for r in range(64)}, REGION)

        await run_in_thread(procs["labor1"].kill)
        await run_in_thread(procs["labor1"].remove_dead_mount)
        await wait_for(lambda: procs["labor2"].status()["members"]["labor1"]["link"] != "connected",
                       what="labor2 sees labor1 lost")
        refused = await run_in_thread(gmd, "primary", "appslv")
        assert refused.returncode == 1 and 'on_quorum_loss = "continue"' in refused.stderr, refused.stderr
        forced = await run_in_thread(gmd, "primary", "appslv", "--force")
        assert forced.returncode == 0, forced.stderr
        device = (await run_in_thread(procs["labor2"].status))["device"]
        theirs = {r: os.urandom(REGION) for r in (5, 200)}
        await run_in_thread(_pwrite_regions, device, theirs, REGION)

        await run_in_thread(procs["labor1"].start)
        await run_in_thread(lambda: procs["labor1"].request(op="up", volume="appslv"))
        await wait_for(lambda: procs["labor2"].status()["members"]["labor1"]["disk"] == "uptodate", timeout=60,
                       what="labor1 caught up from labor2")
        st1 = await run_in_thread(procs["labor1"].status)
        assert st1["role"] == "secondary"
        assert "split-brain" not in str(st1["members"]["labor2"].get("reason"))
        for r, data in theirs.items():
            assert _read_region(backing(tmp_path, "labor1"), r, REGION) == data
        assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))
