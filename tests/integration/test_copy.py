"""The copy engine with real daemons: full copy behind a fence, hash-compared,
under load, resumed after the target is killed."""

from __future__ import annotations

import os
import random
import re
import shutil

import trio

from gmd import admin
from gmd.config import load_config
from transport.wanproxy import WanProxy, WanSettings

from .harness import (
    GMD,
    MiB,
    NodeSpec,
    backing,
    daemon_processes,
    file_hash,
    free_ports,
    in_process_daemon,
    wait_for,
    write_config,
)
from .test_replication import primary_alone_keeps_quorum, random_writes

REGION = 64 * 1024


def source_and_target(cfg_path, *, fill_source: bool = True, seed_target_from_source: bool = False):
    """labor1 the copy source (dirty) with random data, labor2 the target (clean)."""
    cfg = load_config(cfg_path)
    for node in ("labor1", "labor2"):
        admin.init_volume(cfg, node, "appslv")
    src = cfg.member("appslv", "labor1").device
    if fill_source:
        rng = random.Random(77)
        with open(src, "r+b") as f:
            for off in range(0, cfg.volume("appslv").size, 4 * MiB):
                f.seek(off)
                f.write(rng.randbytes(4 * MiB))
    if seed_target_from_source:
        shutil.copyfile(src, cfg.member("appslv", "labor2").device)
    admin.mark_dirty(cfg, "labor1", "appslv")
    admin.mark_clean(cfg, "labor2", "appslv")
    return cfg


async def primary_up(d, procs):
    await trio.to_thread.run_sync(lambda: procs["labor2"].request(op="up", volume="appslv"))
    eng = d.engines["appslv"]
    await eng.up()
    await wait_for(lambda: eng.members["labor2"].connected, what="connected")
    await eng.promote()
    return eng


def flip_byte(path, offset: int) -> None:
    """Change one byte of a backing file behind gmd's back."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def member_disk(eng):
    return eng.status()["members"]["labor2"]["disk"]


async def test_full_copy_under_random_writes_ends_identical(tmp_path):
    cfg_path = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")], mode="mwc", size="256MiB")
    source_and_target(cfg_path)
    with daemon_processes(cfg_path, ["labor2"], tmp_path) as procs:
        async with in_process_daemon(cfg_path, "labor1") as d:
            eng = await primary_up(d, procs)
            seen_copying = []

            async def watch():
                while member_disk(eng) != "uptodate":
                    st = eng.status()["members"]["labor2"]
                    if st["copy"]:
                        seen_copying.append(st["copy"])
                    await trio.sleep(0.02)

            async with trio.open_nursery() as n:
                n.start_soon(watch)
                await random_writes(eng, 400, seed=21, size=256 * MiB, workers=4)
                await wait_for(lambda: member_disk(eng) == "uptodate", timeout=120, what="copy done")
            await eng.flush()
            assert seen_copying and seen_copying[0]["kind"] == "full"
            assert seen_copying[0]["total_bytes"] == 256 * MiB
            assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))
            st = eng.status()["members"]["labor2"]
            assert st["out_of_sync_bytes"] == 0 and st["pending_copy"] is None
            st2 = await trio.to_thread.run_sync(procs["labor2"].status)
            assert st2["members"]["labor2"]["disk"] == "uptodate"
            assert st2["state_map"]["generation"] == eng.status()["state_map"]["generation"]


async def test_a_target_seeded_from_an_old_copy_moves_only_what_differs(tmp_path):
    cfg_path = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")], mode="mwc", size="256MiB")
    cfg = source_and_target(cfg_path, seed_target_from_source=True)
    # Since the "backup" was taken, 1% of the source's regions changed.
    rng = random.Random(5)
    changed = rng.sample(range(256 * MiB // REGION), 40)
    with open(cfg.member("appslv", "labor1").device, "r+b") as f:
        for r in changed:
            f.seek(r * REGION)
            f.write(os.urandom(REGION))
    with daemon_processes(cfg_path, ["labor2"], tmp_path) as procs:
        async with in_process_daemon(cfg_path, "labor1") as d:
            eng = await primary_up(d, procs)
            await wait_for(lambda: member_disk(eng) == "uptodate", timeout=120, what="copy done")
            assert eng.copier.bytes_sent == len(changed) * REGION  # not 256 MiB
            assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))


def _set_volume(procs, node: str, op: str):
    return lambda: procs[node].request(op=op, volume="appslv")


async def _write_while_member_down(eng, procs, *, partial: bool) -> list[int]:
    """labor2 goes down; 40 regions, never adjacent, are written (a small
    write inside each when ``partial``); returns their indexes."""
    await trio.to_thread.run_sync(_set_volume(procs, "labor2", "down"))
    await wait_for(lambda: not eng.members["labor2"].connected, what="member down")
    written = list(range(0, 64 * MiB // REGION, 3))[:40]
    for r in written:
        if partial:
            await eng.write(r * REGION + 100, os.urandom(1000))
        else:
            await eng.write(r * REGION, os.urandom(REGION))
    return written


async def test_regions_written_while_a_member_was_down_are_shipped_without_comparing(tmp_path):
    """A region written while the member could not be sent it surely differs
    there: its mini-copy ships it straight away (no hash round trip). A region
    that only may differ (marked as after a broken link) is still compared,
    and moves only if it does differ."""
    async with primary_alone_keeps_quorum(tmp_path) as (eng, procs):
        with trio.fail_after(120):
            written = await _write_while_member_down(eng, procs, partial=True)
            # Marked as a broken link leaves an unacknowledged write: may differ,
            # and here it does not.
            eng.statemap.mark_out_of_sync("labor2", 50 * MiB, REGION)
            sent_before = eng.copier.bytes_sent
            await trio.to_thread.run_sync(_set_volume(procs, "labor2", "up"))
            await wait_for(lambda: member_disk(eng) == "uptodate", timeout=60, what="mini-copy done")
            (mini,) = [p for name, p in eng.copier.history if name == "labor2" and p.kind == "mini"]
            assert mini.total_bytes == (len(written) + 1) * REGION
            assert mini.regions_compared == 1 and mini.regions_differing == 0
            assert eng.copier.bytes_sent - sent_before == len(written) * REGION
            await eng.flush()
            assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))


async def test_a_mini_copy_cut_short_does_not_ship_again_what_the_member_acknowledged(tmp_path):
    """Regions shipped without comparing (written while the member was down)
    and acknowledged before the pass was cut short (the member killed) are
    compared by the next pass, not shipped a second time."""
    async with primary_alone_keeps_quorum(tmp_path) as (eng, procs):
        with trio.fail_after(120):
            member = eng.members["labor2"]
            written = await _write_while_member_down(eng, procs, partial=False)
            eng.copier.rate = 8 * MiB  # 60 MiB to go: over 7 s, far longer than the command takes  # one region every 1/16 s
            sent_before = eng.copier.bytes_sent
            await trio.to_thread.run_sync(_set_volume(procs, "labor2", "up"))
            await wait_for(lambda: "labor2" in eng.copier.running and eng.copier.running["labor2"].done_bytes >= 10 * REGION,
                           what="a quarter copied")
            first = eng.copier.running["labor2"]
            await trio.to_thread.run_sync(procs["labor2"].kill)  # the pass is cut short
            await wait_for(lambda: not member.connected, what="member lost")
            acked_first = first.done_bytes
            assert acked_first < len(written) * REGION
            eng.copier.rate = 0
            await trio.to_thread.run_sync(procs["labor2"].start)
            await trio.to_thread.run_sync(_set_volume(procs, "labor2", "up"))
            await wait_for(lambda: member_disk(eng) == "uptodate", timeout=60, what="caught up")
            passes = [p for name, p in eng.copier.history if name == "labor2"]
            assert len(passes) == 2 and passes[0] is first, [(p.kind, p.done_bytes, p.regions_compared) for p in passes]
            # The second pass compared what the first had delivered, found it equal
            # there, and shipped only the rest (and whatever was still in flight).
            assert passes[1].regions_compared >= acked_first // REGION
            resent = eng.copier.bytes_sent - sent_before - len(written) * REGION
            assert resent <= 2 * REGION, resent
            await eng.flush()
            assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))


async def test_killed_copy_target_resumes_past_the_fence(tmp_path):
    listen = free_ports(1)
    labor2 = NodeSpec("labor2", listen=listen)
    labor2.address = free_ports(1)
    cfg_path = write_config(tmp_path, [NodeSpec("labor1"), labor2], mode="mwc", size="256MiB")
    source_and_target(cfg_path)
    proxy = WanProxy(("127.0.0.1", listen[0]), ("127.0.0.1", labor2.address[0]),
                     WanSettings(bandwidth=60_000_000))  # about 4 s for the whole copy
    async with trio.open_nursery() as pn:
        await pn.start(proxy.serve)
        with daemon_processes(cfg_path, ["labor2"], tmp_path) as procs:
            async with in_process_daemon(cfg_path, "labor1") as d:
                eng = await primary_up(d, procs)
                sm = eng.statemap
                await wait_for(lambda: sm.sb.peers["labor2"].copy and sm.sb.peers["labor2"].copy.fence >= 96 * MiB,
                               timeout=60, what="copy half way")
                await trio.to_thread.run_sync(procs["labor2"].kill)
                await wait_for(lambda: not eng.members["labor2"].connected, what="target lost")
                fence = sm.sb.peers["labor2"].copy.fence
                assert 0 < fence < 256 * MiB
                await trio.to_thread.run_sync(procs["labor2"].start)
                await trio.to_thread.run_sync(lambda: procs["labor2"].request(op="up", volume="appslv"))
                await wait_for(lambda: member_disk(eng) == "uptodate", timeout=120, what="copy done")
                full_passes = [p for name, p in eng.copier.history if p.kind == "full"]
                assert len(full_passes) >= 2 and full_passes[-1].total_bytes == 256 * MiB - fence
                await eng.flush()
                assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))
        pn.cancel_scope.cancel()


async def test_verify_finds_a_flipped_byte_and_resync_repairs_it(tmp_path):
    from .harness import init_in_sync

    cfg_path = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")], mode="mwc", size="64MiB")
    init_in_sync(cfg_path, "labor1", ["labor2"])
    with daemon_processes(cfg_path, ["labor2"], tmp_path) as procs:
        async with in_process_daemon(cfg_path, "labor1") as d:
            eng = await primary_up(d, procs)
            await random_writes(eng, 200, seed=8, size=64 * MiB, workers=4)
            await eng.flush()
            clean = await eng.verify()
            assert clean["labor2"]["differing_regions"] == 0
            # A byte flipped behind gmd's back on the member's disk.
            flip = 37 * MiB + 1234
            flip_byte(backing(tmp_path, "labor2"), flip)
            # Writes keep flowing while verify runs: they must not be reported.
            async with trio.open_nursery() as n:
                n.start_soon(lambda: random_writes(eng, 200, seed=9, size=32 * MiB, workers=4))  # clear of the flip
                report = await eng.verify()
            assert report["labor2"]["differing_regions"] == 1
            assert report["labor2"]["first_offsets"] == [flip // REGION * REGION]
            assert member_disk(eng) == "outdated"
            assert list(eng.statemap.out_of_sync_regions("labor2").search(1)) == [flip // REGION]
            assert eng.resync() == ["labor2"]
            await wait_for(lambda: member_disk(eng) == "uptodate", what="resynced")
            await eng.flush()
            assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))


async def test_a_read_of_an_unmerged_region_merges_it_first(tmp_path):
    from .harness import init_in_sync

    cfg_path = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")], mode="mwc", size="64MiB")
    init_in_sync(cfg_path, "labor1", ["labor2"])
    with daemon_processes(cfg_path, ["labor2"], tmp_path) as procs:
        async with in_process_daemon(cfg_path, "labor1") as d:
            eng = await primary_up(d, procs)
            data = os.urandom(4 * REGION)
            await eng.write(10 * MiB, data)
            await eng.flush()
            # As after a crash: the member's copy of these regions differs and the
            # regions are marked for merging, but no merge pass has reached them.
            with open(backing(tmp_path, "labor2"), "r+b") as f:
                f.seek(10 * MiB)
                f.write(bytes(4 * REGION))
            eng.statemap.mark_out_of_sync("labor2", 10 * MiB, 4 * REGION)
            assert await eng.read(10 * MiB + REGION, 2 * REGION) == data[REGION:3 * REGION]
            with open(backing(tmp_path, "labor2"), "rb") as f:
                f.seek(10 * MiB)
                got = f.read(4 * REGION)
            # The two regions read now match on the member; the others wait for the pass.
            assert got[REGION:3 * REGION] == data[REGION:3 * REGION]
            assert got[:REGION] == bytes(REGION) and got[3 * REGION:] == bytes(REGION)


async def test_copy_rate_limit_is_kept(tmp_path):
    cfg_path = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")], mode="mwc", size="64MiB",
                            extra_volume='copy_rate = "32MiB"')
    source_and_target(cfg_path)
    with daemon_processes(cfg_path, ["labor2"], tmp_path) as procs:
        async with in_process_daemon(cfg_path, "labor1") as d:
            eng = await primary_up(d, procs)
            t0 = trio.current_time()
            # `gmd status` as an operator runs it shows the copy's bar. The copy
            # is slowed while the command reads, so it cannot end before it looks.
            await wait_for(lambda: (eng.status()["members"]["labor2"]["copy"] or {}).get("done_bytes"),
                           what="copy under way")
            eng.copier.rate = 8 * MiB  # 60 MiB to go: over 7 s, far longer than the command takes
            shown = await trio.run_process([GMD, "--config", str(cfg_path), "--node", "labor1", "status", "appslv"],
                                           capture_stdout=True, capture_stderr=True)
            eng.copier.rate = 32 * MiB
            text = shown.stdout.decode()
            bar = next((line for line in text.splitlines() if "full copy to labor2" in line), None)
            assert bar and re.search(r"\[#*\.*\]  [\d.]+ [KM]iB of 64\.0 MiB  \d+%  [\d.]+ [KM]iB/s  ETA \d", bar), text
            assert "\x1b" not in text  # not a terminal: plain text
            await wait_for(lambda: member_disk(eng) == "uptodate", timeout=120, what="copy done")
            elapsed = trio.current_time() - t0
            assert eng.copier.bytes_sent > 60 * MiB  # random source, zero target: nearly all moves
            assert eng.copier.bytes_sent / elapsed <= 32 * MiB * 1.1
            assert eng.status()["copy_rate"] == 32 * MiB
            eng.resync(rate=0)
            assert eng.copier.rate == 0


def test_gmd_verify_follows_a_long_verify_and_reports_a_flipped_byte(tmp_path):
    """The command line as an operator runs it: ``gmd verify`` starts the
    verify in the primary's daemon and follows it in the status, so a verify
    longer than one control request (hours, on a large volume) is fine; the
    status shows its progress and keeps the last report; ``--no-wait`` returns
    at once and a second start is refused while one runs."""
    import json
    import subprocess
    import sys
    import time
    from pathlib import Path

    from .harness import init_in_sync

    # 16 MiB/s over 64 MiB: about 4 s, long enough to watch.
    cfg_path = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")], mode="mwc", size="64MiB",
                            extra_volume='copy_rate = "16MiB"')
    init_in_sync(cfg_path, "labor1", ["labor2"])
    flip = 40 * MiB + 12345
    flip_byte(backing(tmp_path, "labor2"), flip)
    gmd = [str(Path(sys.executable).parent / "gmd"), "--config", str(cfg_path), "--node", "labor1"]
    with daemon_processes(cfg_path, ["labor1", "labor2"], tmp_path) as procs:
        for node in ("labor2", "labor1"):
            procs[node].request(op="up", volume="appslv")
        end = time.monotonic() + 30
        while procs["labor1"].status()["members"]["labor2"]["link"] != "connected":
            assert time.monotonic() < end, "labor2 never connected"
            time.sleep(0.05)
        procs["labor1"].request(op="primary", volume="appslv")

        cli = subprocess.Popen([*gmd, "verify", "appslv", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        try:
            seen = []
            while cli.poll() is None:
                v = procs["labor1"].status()["members"]["labor2"]["verify"]
                if v:
                    seen.append(v)
                time.sleep(0.1)
            out, err = cli.communicate(timeout=60)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        assert cli.returncode == 1, (out, err)  # a difference was found
        report = json.loads(out)["labor2"]
        assert report["differing_regions"] == 1 and report["first_offsets"] == [flip // REGION * REGION]
        assert report["compared_bytes"] == 64 * MiB
        # Progress was visible while it ran, and moved.
        assert seen and seen[0]["kind"] == "verify" and seen[0]["total_bytes"] == 64 * MiB
        assert seen[0]["done_bytes"] < seen[-1]["done_bytes"] <= 64 * MiB
        st = procs["labor1"].status()["members"]["labor2"]
        assert st["verify"] is None and st["last_verify"]["differing_regions"] == 1
        assert st["disk"] == "outdated" and st["out_of_sync_bytes"] == REGION
        shown = subprocess.run([*gmd, "status", "appslv"], capture_output=True, text=True, timeout=10).stdout
        assert "last verify of labor2:" in shown and "64.0 MiB compared, 1 differing regions" in shown, shown

        # Repaired by resync (unlimited now), then a verify started without waiting.
        subprocess.run([*gmd, "resync", "appslv", "--rate", "0"], check=True, capture_output=True, timeout=60)
        end = time.monotonic() + 30
        while procs["labor1"].status()["members"]["labor2"]["disk"] != "uptodate":
            assert time.monotonic() < end, "resync did not finish"
            time.sleep(0.05)
        subprocess.run([*gmd, "resync", "appslv", "--rate", "16MiB"], check=True, capture_output=True, timeout=60)
        first = subprocess.run([*gmd, "verify", "appslv", "--no-wait"], capture_output=True, text=True, timeout=10)
        assert first.returncode == 0 and "verify started" in first.stdout, first
        second = subprocess.run([*gmd, "verify", "appslv", "--no-wait"], capture_output=True, text=True, timeout=10)
        assert second.returncode == 1 and "already being verified" in second.stdout, second
        end = time.monotonic() + 30
        while procs["labor1"].status()["members"]["labor2"]["verify"]:
            assert time.monotonic() < end, "verify did not finish"
            time.sleep(0.1)
        assert procs["labor1"].status()["members"]["labor2"]["last_verify"]["differing_regions"] == 0
    assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))
