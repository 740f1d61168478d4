"""Planned switchover (issue 6, test d), with real daemons: labor1's daemon in
the test's trio loop (its engine's write is the application), labor2 a
subprocess whose FUSE file the test writes after it took over."""

from __future__ import annotations

import os

import pytest
import trio

from gmd.errors import GmdError

from .harness import (
    MiB,
    NodeSpec,
    backing,
    daemon_processes,
    file_hash,
    in_process_daemon,
    init_in_sync,
    wait_for,
    write_config,
)
from .test_quorum import (
    _pwrite_sync,
    assert_acknowledged_present,
    count,
    run_in_thread,
    writer,
)
from .test_replication import start_primary


async def test_switchover_under_load_swaps_roles_and_loses_nothing(tmp_path):
    cfg = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")], mode="mwc")
    init_in_sync(cfg, "labor1", ["labor2"])
    with daemon_processes(cfg, ["labor2"], tmp_path) as procs:
        async with in_process_daemon(cfg, "labor1") as d:
            eng = await start_primary(d, procs)
            acked: dict = {}
            unacked: dict = {}
            failures: list = []
            count[0] = 0
            stop = trio.Event()
            async with trio.open_nursery() as n:
                for seed in range(4):
                    n.start_soon(writer, eng, acked, stop, seed, failures, unacked)
                await wait_for(lambda: count[0] > 200, what="writes flowing")
                result = await eng.switchover("labor2")
                stop.set()
            assert result == {"primary": "labor2", "secondary": "labor1"}
            # Writes issued after the hand-over were refused, never half-done.
            assert failures and all(not isinstance(e, OSError) or e.errno == 5 for e in failures)
            assert eng.role.value == "secondary"
            st2 = await run_in_thread(procs["labor2"].status)
            assert st2["role"] == "primary" and st2["members"]["labor1"]["disk"] == "uptodate"
            # Every write labor1 acknowledged is on the new primary.
            assert_acknowledged_present(backing(tmp_path, "labor2"), acked, unacked)
            # Replication runs the other way now.
            data = os.urandom(MiB)
            await run_in_thread(_pwrite_sync, st2["device"], data, 40 * MiB)
            with open(backing(tmp_path, "labor1"), "rb") as f:
                f.seek(40 * MiB)
                assert f.read(MiB) == data
            assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))


async def test_switchover_to_a_member_that_is_not_uptodate_is_refused(tmp_path):
    cfg = write_config(tmp_path, [NodeSpec("labor1", votes=2), NodeSpec("labor2")], mode="mwc")
    init_in_sync(cfg, "labor1", ["labor2"])
    with daemon_processes(cfg, ["labor2"], tmp_path) as procs:
        async with in_process_daemon(cfg, "labor1") as d:
            eng = await start_primary(d, procs)
            await run_in_thread(lambda: procs["labor2"].request(op="down", volume="appslv"))
            await wait_for(lambda: not eng.members["labor2"].connected, what="labor2 down")
            await eng.write(0, b"z" * 65536)  # labor2 misses it
            with pytest.raises(GmdError, match="switchover to labor2 refused: labor2 is not connected"):
                await eng.switchover("labor2")
            assert eng.role.value == "primary"
            await eng.write(65536, b"y" * 65536)  # still serving
