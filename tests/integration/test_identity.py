"""A volume's identity, and a member whose map is too old to relate by history.

A map restored from an old backup holds the volume's identity but none of the
generations the others still remember: it must be named for what it is (too
old, needs a full copy: ``gmd clean`` on it) and never be called up to date
(issue 12, items 6 and 8).
"""

from __future__ import annotations

from gmd import admin
from gmd.config import load_config
from statemap import StateMap

from .harness import NodeSpec, backing, daemon_processes, file_hash, init_in_sync, wait_for, write_config


async def test_a_map_restored_from_an_old_backup_is_called_too_old_not_uptodate(tmp_path):
    cfg = write_config(tmp_path, [NodeSpec("labor1", votes=2), NodeSpec("labor2")], mode="mwc")
    init_in_sync(cfg, "labor1", ["labor2"])
    config = load_config(cfg)
    with daemon_processes(cfg, ["labor1", "labor2"], tmp_path) as procs:
        p1, p2 = procs["labor1"], procs["labor2"]
        for p in (p1, p2):
            p.request(op="up", volume="appslv")
        await wait_for(lambda: p1.status()["members"]["labor2"]["link"] == "connected", what="connected")
        p1.request(op="primary", volume="appslv")
        await wait_for(lambda: p2.status()["state_map"]["identity"] is not None, what="identity learned")
        identity = p1.status()["state_map"]["identity"]
        assert identity and p2.status()["state_map"]["identity"] == identity
        for p in (p1, p2):
            p.request(op="down", volume="appslv")

        # labor1 lives through five more generations (more than the history
        # holds) with labor2 along; then labor2's map is "restored" from the
        # backup taken before them: same identity, no generation in common.
        sm = StateMap.open(config.volumes["appslv"].members["labor1"].statemap)
        try:
            for _ in range(5):
                sm.start_new_generation()
            sm.set_bitmap_generation(sm.sb.generations.current, member="labor2")
            sm.commit()
        finally:
            sm.close()
        with open(backing(tmp_path, "labor1"), "r+b") as f:
            f.write(b"newer data" * 400)  # what the backup's era never saw

        for p in (p1, p2):
            p.request(op="up", volume="appslv")
        p1.request(op="primary", volume="appslv", force=False)

        def refused():
            m = p1.status()["members"]["labor2"]
            return m["link"] == "standalone" and "labor2's data is too old to relate by history" in (m["reason"] or "")
        # (Refused at once as "the data of labor2 or labor1"; once labor1 is
        # primary, the next attempt knows which one is old.)
        await wait_for(refused, what="labor2 refused as too old")
        reason = p1.status()["members"]["labor2"]["reason"]
        assert "labor2's data is too old" in reason and "gmd clean appslv' on labor2" in reason, reason
        assert p1.status()["members"]["labor2"]["disk"] != "uptodate"
        st2 = p2.status()
        assert st2["members"]["labor2"]["disk"] == "outdated", st2["members"]["labor2"]
        assert "too old to relate by history" in (st2["members"]["labor1"]["reason"] or "")
        assert "unrelated" not in p1.log() + p2.log()

        # The advice works: cleaned, labor2 gets a full copy and is identical.
        p2.request(op="down", volume="appslv")
        admin.mark_clean(config, "labor2", "appslv", force=True)
        p2.request(op="up", volume="appslv")

        def copied():
            m = p1.status()["members"]["labor2"]
            return m["disk"] == "uptodate" and m["copy"] is None and m["out_of_sync_bytes"] == 0
        await wait_for(copied, timeout=60, what="labor2 copied")
        await wait_for(lambda: p2.status()["state_map"]["identity"] == identity,
                       what="the copy target learns the identity again")
        p1.request(op="secondary", volume="appslv")
        assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))
