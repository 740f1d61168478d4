"""``gmd events`` and hooks with real daemons: the stream's JSON across a
full copy and the loss of a member, ``--now``, and a hook run on the loss
with the event in its environment."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
from pathlib import Path

import trio

from gmd.events import KINDS

from .harness import GMD, MiB, NodeSpec, backing, daemon_processes, file_hash, wait_for, write_config
from .test_copy import source_and_target

COMMON = {"seq", "time", "node", "volume", "kind", "now"}
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class EventReader:
    """``gmd events`` as a subprocess; its lines parsed in a thread."""

    def __init__(self, config: Path, node: str, *args: str):
        self.proc = subprocess.Popen([GMD, "events", "--config", str(config), "--node", node, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.lines: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def drain(self) -> list[dict]:
        while True:
            try:
                e = self.lines.get_nowait()
            except queue.Empty:
                return self.events
            if e is not None:
                self.events.append(e)

    def seen(self, kind: str, **fields) -> dict | None:
        for e in self.drain():
            if e["kind"] == kind and all(e.get(k) == v for k, v in fields.items()):
                return e
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def assert_shapes(events: list[dict], node: str) -> None:
    """Every event has the common fields and only its kind's; seq increases."""
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    for e in events:
        assert e["kind"] in KINDS, e
        assert e["node"] == node and TIME.fullmatch(e["time"]), e
        assert set(e) <= COMMON | {"member"} | set(KINDS[e["kind"]]), e


async def test_events_across_a_copy_and_a_member_loss_and_a_hook_on_the_loss(tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    cfg_path = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")], mode="mwc", size="32MiB",
                            extra_volume=(
                                'copy_rate = "8MiB"\n'  # 4 s of full copy: its milestones are seen
                                "[[hooks]]\n"
                                'on = ["link"]\n'
                                'where = {was = "connected"}\n'
                                f'run = "env | grep ^GMD_ > {hooks}/$GMD_NODE.$GMD_SEQ"\n'))
    source_and_target(cfg_path)  # labor1 the source, labor2 gets a full copy
    readers: list[EventReader] = []
    try:
        with daemon_processes(cfg_path, ["labor1", "labor2"], tmp_path) as procs:
            follow = EventReader(cfg_path, "labor1", "--now")  # every change, from before the volume is up
            readers.append(follow)
            # subscribed once its --now part ended: the volume is down
            await wait_for(lambda: follow.seen("now_end"), what="the reader")
            assert [(e["kind"], e.get("state"), e.get("now")) for e in follow.events] == [
                ("volume", "down", True), ("now_end", None, None)]
            for node in ("labor2", "labor1"):
                await trio.to_thread.run_sync(lambda n=node: procs[n].request(op="up", volume="appslv"))
            await wait_for(lambda: follow.seen("link", member="labor2", link="connected"), what="connected")
            await trio.to_thread.run_sync(lambda: procs["labor1"].request(op="primary", volume="appslv"))
            start = await wait_for(lambda: follow.seen("copy_start", member="labor2"), what="copy start")
            assert start["copy"] == "full" and start["total_bytes"] == 32 * MiB

            # --now while the copy runs: the state, then now_end, and the reader exits
            snap = await trio.to_thread.run_sync(lambda: subprocess.run(
                [GMD, "events", "appslv", "--now-only", "--config", str(cfg_path), "--node", "labor1"],
                capture_output=True, text=True, timeout=30))
            assert snap.returncode == 0, snap.stderr
            now = [json.loads(line) for line in snap.stdout.splitlines()]
            assert_shapes(now, "labor1")
            assert now[-1]["kind"] == "now_end" and all(e.get("now") for e in now[:-1])
            told = {(e["kind"], e.get("member")): e for e in now}
            assert told[("role", None)]["role"] == "primary"
            assert told[("link", "labor2")]["link"] == "connected"
            assert told[("path", "labor2")]["state"] == "up"
            assert told[("quorum", None)]["ok"] is True
            assert told[("copy_start", "labor2")]["copy"] == "full"  # the running copy

            end = await wait_for(lambda: follow.seen("copy_end", member="labor2"), timeout=60, what="copy end")
            assert end["complete"] is True and end["done_bytes"] == 32 * MiB
            assert [e["percent"] for e in follow.events if e["kind"] == "copy_progress"] == [25, 50, 75]
            await wait_for(lambda: follow.seen("disk", member="labor2", disk="uptodate"), what="uptodate")
            assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))

            procs["labor2"].kill()  # the member is lost
            lost = await wait_for(lambda: follow.seen("link", member="labor2", was="connected"), what="loss")
            assert lost["link"] in ("connecting", "disconnected")
            await wait_for(lambda: follow.seen("path", member="labor2", state="down"), what="path down")
            await wait_for(lambda: follow.seen("quorum", ok=False), what="quorum lost")

            # the hook ran on labor1 with the event in its environment
            hook_file = hooks / f"labor1.{lost['seq']}"
            await wait_for(lambda: hook_file.exists() and hook_file.read_text().strip(), what="hook output")
            await wait_for(lambda: follow.seen("hook", ok=True, on_seq=lost["seq"]), what="hook event")
            env = dict(line.split("=", 1) for line in hook_file.read_text().splitlines())
            assert env["GMD_EVENT"] == "link" and env["GMD_VOLUME"] == "appslv" and env["GMD_NODE"] == "labor1"
            assert env["GMD_MEMBER"] == "labor2" and env["GMD_WAS"] == "connected"
            assert env["GMD_SEQ"] == str(lost["seq"]) and json.loads(env["GMD_EVENT_JSON"])["kind"] == "link"
            assert not [f for f in os.listdir(hooks) if not f.startswith("labor1.")]  # labor2 saw no loss

            assert_shapes(follow.drain(), "labor1")
            kinds = [e["kind"] for e in follow.events]
            assert kinds[2] == "volume" and follow.events[2]["state"] == "up"
            assert kinds.index("copy_start") < kinds.index("copy_end") < kinds.index("hook")
    finally:
        for r in readers:
            r.stop()
            print("events seen:", *r.drain(), sep="\n  ")  # shown when the test fails


def test_events_of_an_unknown_volume_and_without_a_daemon_are_clear_errors(tmp_path):
    cfg_path = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")])
    r = subprocess.run([GMD, "events", "--config", str(cfg_path), "--node", "labor1"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1 and "no gmd daemon" in r.stderr and "Traceback" not in r.stderr
    with daemon_processes(cfg_path, ["labor1"], tmp_path):
        r = subprocess.run([GMD, "events", "nosuch", "--config", str(cfg_path), "--node", "labor1"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "no volume 'nosuch'" in r.stderr, r.stderr
        r = subprocess.run([GMD, "events", "--count", "0", "--config", str(cfg_path), "--node", "labor1"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "--count must be at least 1" in r.stderr
        # A reader that stops reading ends the stream, though no event comes to fail the write.
        r = subprocess.run(f"{GMD} events --now --config {cfg_path} --node labor1 | head -1", shell=True,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and json.loads(r.stdout)["kind"] == "volume" and r.stderr == "", r.stderr
