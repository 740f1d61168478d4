"""A damaged state map page with real daemons (issue 12, item 7): a zeroed
out-of-sync page of a stopped primary's map must not make its member current."""

from __future__ import annotations

import logging
import os

import trio

from statemap import StateMap
from statemap.format import PAGE

from .harness import MiB, NodeSpec, backing, daemon_processes, file_hash, in_process_daemon, init_in_sync, \
    status_of, wait_for, write_config
from .test_replication import start_primary

REGION = 64 * 1024


def zero_first_out_of_sync_page(smpath, member: str) -> None:
    """Zero, behind gmd's back, the first out-of-sync page of ``member``'s slot."""
    sm = StateMap.open(smpath, readonly=True)
    offset = sm.layout.oos_offset(sm.sb.peers[member].slot)
    sm.close()
    with open(smpath, "r+b") as f:
        f.seek(offset)
        f.write(bytes(PAGE))


async def test_zeroed_out_of_sync_page_leads_to_a_copy_not_a_silent_uptodate(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    cfg = write_config(tmp_path, [NodeSpec("labor1", votes=2), NodeSpec("labor2")], mode="mwc")
    init_in_sync(cfg, "labor1", ["labor2"])

    # Run 1: in sync, then labor2 goes down and labor1 writes on alone.
    with daemon_processes(cfg, ["labor2"], tmp_path) as procs:
        async with in_process_daemon(cfg, "labor1") as d:
            eng = await start_primary(d, procs)
            await eng.write(0, os.urandom(REGION))
            await eng.flush()
            await trio.to_thread.run_sync(lambda: procs["labor2"].request(op="down", volume="appslv"))
            await wait_for(lambda: not eng.members["labor2"].connected, what="labor2 down")
            for r in range(1, 1000, 37):  # scattered regions, all within the first bitmap page
                await eng.write(r * REGION, os.urandom(REGION))
            await eng.flush()
            assert eng.status()["members"]["labor2"]["out_of_sync_bytes"] == 27 * REGION
    assert file_hash(backing(tmp_path, "labor1")) != file_hash(backing(tmp_path, "labor2"))

    # Both stopped: the page that records what labor2 lacks is zeroed.
    zero_first_out_of_sync_page(tmp_path / "data/labor1/appslv.sm", "labor2")

    # Run 2: the damage is seen, assumed the worst, reported; a copy repairs labor2.
    with daemon_processes(cfg, ["labor2"], tmp_path) as procs:
        async with in_process_daemon(cfg, "labor1") as d:
            eng = d.engines["appslv"]
            await eng.up()
            st = eng.status()
            assert st["members"]["labor2"]["out_of_sync_bytes"] == 64 * MiB  # the page covers it all
            assert st["members"]["labor2"]["disk"] != "uptodate"
            (warning,) = st["state_map"]["warnings"]
            assert "out-of-sync bitmap of member labor2 (slot 0) page 0" in warning
            assert "all zeros" in warning and warning in caplog.text
            await trio.to_thread.run_sync(lambda: procs["labor2"].request(op="up", volume="appslv"))
            await wait_for(lambda: eng.members["labor2"].connected, what="labor2 connected")
            await eng.promote()
            await wait_for(lambda: eng.status()["members"]["labor2"]["disk"] == "uptodate",
                           timeout=60, what="labor2 copied and current")
            await eng.flush()
            assert eng.copier.bytes_sent >= 27 * REGION  # what differed moved
            assert eng.status()["members"]["labor2"]["out_of_sync_bytes"] == 0
            assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))
            st2 = await status_of(procs["labor2"])
            assert st2["members"]["labor2"]["disk"] == "uptodate"
            ident = eng.status()["state_map"]["identity"]
            assert ident and len(ident) == 32  # created by init's gmd dirty on labor1
