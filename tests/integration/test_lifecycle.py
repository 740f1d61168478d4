"""A volume's lifecycle: its tasks live in its own nursery and end with it,
and the daemon closes every volume cleanly however its run ends."""

from __future__ import annotations

import pytest
import trio

from gmd import admin
from gmd.config import load_config
from gmd.daemon import NodeDaemon

from .harness import NodeSpec, init_in_sync, wait_for, write_config


def _names(tasks) -> list[str]:
    return [t.name for t in tasks]


async def test_down_leaves_no_task_of_the_volume_behind(tmp_path):
    cfg_path = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")])
    init_in_sync(cfg_path, "labor1", ["labor2"])
    daemon = NodeDaemon(load_config(cfg_path), "labor1", mount=False)
    async with trio.open_nursery() as n:
        await n.start(daemon.serve)
        try:
            eng = daemon.engines["appslv"]
            before = set(_names(daemon.nursery.child_tasks))
            await eng.up()
            assert eng.running  # up returns once the volume's nursery is open
            runner = [t for t in daemon.nursery.child_tasks if t.name not in before]
            assert len(runner) == 1 and runner[0].name.endswith("_run")  # one runner hosts all of it
            await wait_for(lambda: eng.members["labor2"].state.value != "disconnected", what="dialling")
            await eng.down()
            assert not eng.running
            assert set(_names(daemon.nursery.child_tasks)) == before  # nothing of the volume is left
            assert admin.offline_status(load_config(cfg_path), "labor1", "appslv")["state_map"]["clean"] is True
        finally:
            daemon.stop()


class _Crash(Exception):
    pass


async def test_a_crashed_task_of_the_daemon_still_closes_volumes_cleanly(tmp_path):
    cfg_path = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")])
    init_in_sync(cfg_path, "labor1", ["labor2"])
    daemon = NodeDaemon(load_config(cfg_path), "labor1", mount=False)

    async def crash_soon():
        await trio.sleep(0.2)
        raise _Crash("a child task of the daemon failed")

    with pytest.RaisesGroup(_Crash, flatten_subgroups=True):
        async with trio.open_nursery() as n:
            await n.start(daemon.serve)
            await daemon.engines["appslv"].up()
            await daemon.engines["appslv"].promote(force=True)  # labor2 is not running: no quorum
            await daemon.engines["appslv"].write(0, b"x" * 4096)
            daemon.nursery.start_soon(crash_soon)
            await trio.sleep_forever()
    eng = daemon.engines["appslv"]
    assert not eng.is_up and not eng.running
    st = admin.offline_status(load_config(cfg_path), "labor1", "appslv")
    assert st["state_map"]["clean"] is True  # closed by the daemon's finally, not left for crash recovery


async def test_a_path_a_member_dialled_in_is_a_task_of_the_volume(tmp_path):
    # labor1 dials (the lower name), labor2 accepts: the accepted path must run
    # in labor2's volume nursery, not in the listener that accepted it, so that
    # the volume (not the daemon) owns it and down ends it.
    cfg_path = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")])
    init_in_sync(cfg_path, "labor1", ["labor2"])
    config = load_config(cfg_path)
    dialler, acceptor = NodeDaemon(config, "labor1", mount=False), NodeDaemon(config, "labor2", mount=False)
    async with trio.open_nursery() as n:
        await n.start(dialler.serve)
        await n.start(acceptor.serve)
        try:
            near, far = dialler.engines["appslv"], acceptor.engines["appslv"]
            await far.up()
            await near.up()
            await wait_for(lambda: near.members["labor2"].connected and far.members["labor1"].connected,
                           what="the session to open")
            accepted = [t for t in far.nursery.child_tasks if "run_accepted_path" in t.name]
            assert len(accepted) == 1  # one path per session in this config
            await far.down()
            assert not far.running
            await wait_for(lambda: not near.members["labor2"].connected, what="the dialler to see the path end")
        finally:
            dialler.stop()
            acceptor.stop()
