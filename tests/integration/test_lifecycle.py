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
