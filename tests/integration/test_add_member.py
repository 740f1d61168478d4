"""Adding a member to a volume in use (issue 6): the config gains labor3, the
running daemons reload it, labor3 is initialized and brought up, and a full
copy fills it while labor1 keeps writing; then it counts for quorum."""

from __future__ import annotations

import trio

from gmd import admin
from gmd.config import load_config

from .harness import (
    DaemonProcess,
    NodeSpec,
    backing,
    daemon_processes,
    file_hash,
    in_process_daemon,
    init_in_sync,
    wait_for,
    write_config,
)
from .test_quorum import count, run_in_thread, writer
from .test_replication import start_primary


async def test_a_member_added_online_is_filled_by_a_full_copy_under_load_and_joins_quorum(tmp_path):
    specs = [NodeSpec("labor1"), NodeSpec("labor2")]
    cfg = write_config(tmp_path, specs, mode="sync")
    init_in_sync(cfg, "labor1", ["labor2"])
    with daemon_processes(cfg, ["labor2"], tmp_path) as procs:
        async with in_process_daemon(cfg, "labor1") as d:
            eng = await start_primary(d, procs)
            acked: dict = {}
            count[0] = 0
            stop = trio.Event()
            async with trio.open_nursery() as n:
                for seed in range(2):
                    n.start_soon(writer, eng, acked, stop, seed)
                await wait_for(lambda: count[0] > 100, what="writes flowing")
                # The operator adds labor3 to the (shared) config file ...
                write_config(tmp_path, [*specs, NodeSpec("labor3")], mode="sync")
                admin.init_volume(load_config(cfg), "labor3", "appslv")
                labor3 = DaemonProcess(cfg, "labor3", tmp_path)
                labor3.start()
                try:
                    # ... and reloads it in the running daemons.
                    reply = await d.reload()
                    assert reply["added"] == {"appslv": ["labor3"]}
                    await run_in_thread(lambda: procs["labor2"].request(op="reload"))
                    await run_in_thread(lambda: labor3.request(op="up", volume="appslv"))
                    await wait_for(lambda: eng.status()["members"]["labor3"]["disk"] == "uptodate", timeout=120,
                                   what="labor3 filled")
                    assert any(name == "labor3" and p.kind == "full" for name, p in eng.copier.history)
                    n_before = count[0]
                    await wait_for(lambda: count[0] > n_before + 50, what="writes after the copy")
                    stop.set()
                finally:
                    stop.set()
            await eng.flush()
            try:
                q = eng.status()["quorum"]
                assert (q["expected"], q["votes"]) == (3, 3)
                await wait_for(lambda: labor3.status()["members"]["labor2"]["link"] == "connected",
                               what="labor2 and labor3 connected")
                h = file_hash(backing(tmp_path, "labor1"))
                assert h == file_hash(backing(tmp_path, "labor2")) == file_hash(backing(tmp_path, "labor3"))
            finally:
                labor3.stop()
                labor3.remove_dead_mount()


async def test_reload_refuses_changes_it_cannot_apply_online(tmp_path):
    specs = [NodeSpec("labor1"), NodeSpec("labor2")]
    cfg = write_config(tmp_path, specs, mode="sync")
    init_in_sync(cfg, "labor1", ["labor2"])
    async with in_process_daemon(cfg, "labor1") as d:
        write_config(tmp_path, specs, mode="sync", size="128MiB")
        try:
            await d.reload()
        except Exception as e:
            assert "size changed (67108864 -> 134217728)" in str(e) and "nothing applied" in str(e)
        else:
            raise AssertionError("a size change was applied online")
        assert d.engines["appslv"].config.size == 64 << 20


async def test_reload_switches_automatic_takeover_on_while_the_volume_runs(tmp_path):
    specs = [NodeSpec("labor1"), NodeSpec("labor2")]
    cfg = write_config(tmp_path, specs, mode="sync")
    init_in_sync(cfg, "labor1", ["labor2"])
    async with in_process_daemon(cfg, "labor1") as d:
        eng = d.engines["appslv"]
        await eng.up()
        assert eng.status()["takeover"]["auto_promote"] is False
        write_config(tmp_path, specs, mode="sync", extra_volume="auto_promote = true")
        await d.reload()
        assert eng.status()["takeover"]["auto_promote"] is True
        # The running takeover loop follows the new setting (labor1 alone has no
        # quorum: it waits, it does not promote).
        await wait_for(lambda: eng.status()["takeover"]["state"] != "off", what="the takeover loop to notice")
        assert eng.role.value == "secondary"
        await eng.down()
