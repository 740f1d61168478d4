"""The event stream's logic: events derived from status snapshots, the
bounded per-reader queue, hook matching and environment, hook config."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import trio

from gmd.config import ConfigError, parse_config
from gmd.configmodel import Hook
from gmd.eventfeed import EventHub
from gmd.events import KINDS, LogEvents, VolumeEvents
from gmd.hooks import hook_environment, matches

COMMON = {"seq", "time", "node", "volume", "kind", "now"}


def status(**over):
    """A primary's status snapshot with one connected, uptodate member."""
    st = {
        "volume": "appslv", "node": "labor1", "role": "primary",
        "quorum": {"ok": True, "votes": 2, "needed": 2, "expected": 2, "suspended_writes_since": None},
        "members": {
            "labor1": {"disk": "uptodate", "link": "local", "copy": None},
            "labor2": {"disk": "uptodate", "link": "connected", "reason": None, "open_paths": [0],
                       "replication": "shipping", "copy": None, "verify": None, "last_verify": None},
        },
        "copies": [], "rpo_alert": {"members_over": []}, "test_failover": {"active": False},
    }
    for k, v in over.items():
        st[k] = v
    return st


def kinds(events):
    return [e["kind"] for e in events]


def test_now_tells_the_current_state_and_every_field_is_listed_for_its_kind():
    ve = VolumeEvents("appslv")
    assert ve.update(status())  # the first snapshot: the volume came up
    now = ve.now()
    assert all(e["now"] for e in now)
    assert kinds(now)[:3] == ["volume", "role", "quorum"]
    by = {(e["kind"], e.get("member")): e for e in now}
    assert by[("role", None)] == {"kind": "role", "volume": "appslv", "role": "primary", "was": None, "now": True}
    assert by[("link", "labor2")]["link"] == "connected"
    assert by[("path", "labor2")] == {"kind": "path", "volume": "appslv", "member": "labor2", "path": 0,
                                      "state": "up", "now": True}
    assert by[("disk", "labor1")]["disk"] == "uptodate"
    for e in now:
        assert set(e) <= COMMON | {"member"} | set(KINDS[e["kind"]]), e


def test_a_down_volume_is_told_as_down():
    ve = VolumeEvents("appslv")
    assert ve.update(None) == []  # never seen up: nothing changed
    assert ve.now() == [{"kind": "volume", "volume": "appslv", "state": "down", "now": True}]


def test_member_loss_quorum_loss_and_suspended_writes():
    ve = VolumeEvents("appslv")
    ve.update(status())
    lost = status()
    lost["members"]["labor2"].update(link="connecting", reason="connection lost", open_paths=[], replication=None,
                                     disk="unknown")
    lost["quorum"].update(ok=False, votes=1, suspended_writes_since=1700000000.0)
    events = ve.update(lost)
    assert kinds(events) == ["quorum", "suspended", "disk", "link", "path", "replication"]
    q, s, d, link, p, r = events
    assert (q["ok"], q["was"], q["votes"]) == (False, True, 1)
    assert s["suspended"] is True and s["since"] == 1700000000.0
    assert (link["member"], link["link"], link["was"], link["reason"]) == ("labor2", "connecting", "connected",
                                                                          "connection lost")
    assert (p["path"], p["state"]) == (0, "down")
    assert ve.update(copy.deepcopy(lost)) == []  # nothing changed: nothing told


def test_split_brain_is_its_own_event():
    ve = VolumeEvents("appslv")
    ve.update(status())
    sb = status()
    sb["members"]["labor2"].update(link="standalone", open_paths=[], replication=None,
                                   reason="split-brain: labor1 and labor2 hold diverging data of appslv; ...")
    events = ve.update(sb)
    assert "split_brain" in kinds(events)
    assert [e for e in events if e["kind"] == "split_brain"][0]["member"] == "labor2"


def copy_entry(number, done, total, running, kind="full"):
    return {"member": "labor2", "kind": kind, "pass": number, "sent_bytes": done, "done_bytes": done,
            "total_bytes": total, "started_at": 1.0, "seconds": 2.0, "running": running}


def test_a_copy_is_told_at_start_milestones_and_end_once():
    ve = VolumeEvents("appslv")
    ve.update(status())
    told = []
    for done in (0, 10, 30, 80, 100):
        st = status(copies=[copy_entry(1, done, 100, running=done < 100)])
        st["members"]["labor2"]["copy"] = {"rate_bytes_per_s": 50, "eta_s": 1.0} if done < 100 else None
        told += ve.update(st)
    assert kinds(told) == ["copy_start", "copy_progress", "copy_progress", "copy_end"]
    assert [e["percent"] for e in told if e["kind"] == "copy_progress"] == [25, 75]  # 30 passed 25, 80 passed 50 and 75
    end = told[-1]
    assert end["complete"] is True and end["pass"] == 1 and end["copy"] == "full" and end["member"] == "labor2"
    for e in told:
        assert set(e) <= COMMON | {"member"} | set(KINDS[e["kind"]]), e
    # down and up again: the history still holds pass 1, which is not told again
    ve.update(None)
    again = kinds(ve.update(status(copies=[copy_entry(1, 100, 100, running=False)])))
    assert again[0] == "volume" and not {"copy_start", "copy_end"} & set(again)


def test_a_pass_that_began_and_ended_between_two_looks_is_told_whole():
    ve = VolumeEvents("appslv")
    ve.update(status())
    events = ve.update(status(copies=[copy_entry(4, 50, 100, running=False, kind="mini")]))
    assert kinds(events) == ["copy_start", "copy_end"]
    assert events[1]["complete"] is False and events[1]["copy"] == "mini"


def test_history_from_before_the_watch_is_not_told():
    ve = VolumeEvents("appslv")
    events = ve.update(status(copies=[copy_entry(1, 100, 100, running=False)]))
    assert "copy_end" not in kinds(events)


def test_a_verify_is_told_at_start_and_end():
    ve = VolumeEvents("appslv")
    ve.update(status())
    st = status()
    st["members"]["labor2"]["verify"] = {"done_bytes": 0, "total_bytes": 100, "eta_s": None}
    assert kinds(ve.update(st)) == ["verify_start"]
    st = copy.deepcopy(st)
    st["members"]["labor2"]["verify"] = {"done_bytes": 60, "total_bytes": 100, "eta_s": 2.0}
    assert [e["percent"] for e in ve.update(st)] == [50]
    st = copy.deepcopy(st)
    st["members"]["labor2"].update(verify=None, last_verify={"compared_bytes": 100, "differing_regions": 2})
    (end,) = ve.update(st)
    assert (end["kind"], end["differing_regions"], end["compared_bytes"]) == ("verify_end", 2, 100)


async def test_a_slow_reader_loses_the_oldest_events_and_is_told_how_many():
    hub = EventHub("labor1", limit=3)
    sub = hub.subscribe("appslv")
    other = hub.subscribe("dbvol")
    hub.publish([{"kind": "role", "volume": "appslv", "role": "primary", "was": None} for _ in range(10)])
    first = await sub.next()
    assert first["kind"] == "dropped" and first["count"] == 7
    rest = [await sub.next() for _ in range(3)]
    assert [e["seq"] for e in rest] == [8, 9, 10]
    assert all(e["node"] == "labor1" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"])
               for e in rest)
    assert not other.queue  # another volume's reader got none of them
    with trio.move_on_after(0.05) as idle:
        await sub.next()
    assert idle.cancelled_caught  # nothing more: the reader waits


def test_warnings_naming_a_volume_become_error_events():
    hub = EventHub("labor1")
    sub = hub.subscribe(None)
    handler = LogEvents(hub, lambda name: name in ("labor1", "appslv"), quiet=("gmd.hooks",))
    logger = logging.getLogger("gmd.test_events")
    logger.addHandler(handler)
    try:
        logger.warning("%s: peer closed the link: %s", "appslv", "bye")
        logger.warning("someone else: not ours")
        logging.getLogger("gmd.hooks").addHandler(handler)
        logging.getLogger("gmd.hooks").warning("appslv: hook 0 failed")
        logger.info("appslv: only information")
    finally:
        logger.removeHandler(handler)
        logging.getLogger("gmd.hooks").removeHandler(handler)
    assert [(e["kind"], e["volume"], e["level"], e["message"]) for e in sub.queue] == [
        ("error", "appslv", "warning", "appslv: peer closed the link: bye")]


def test_a_hook_matches_its_kinds_and_conditions():
    lost = Hook(on=("link",), run=("true",), where=(("was", ("connected",)),))
    assert matches(lost, {"kind": "link", "was": "connected", "link": "connecting"})
    assert not matches(lost, {"kind": "link", "was": "connecting", "link": "connected"})
    assert not matches(lost, {"kind": "disk", "was": "connected"})
    assert matches(Hook(on=("split_brain", "quorum"), run=("true",)), {"kind": "quorum", "ok": False})


def test_a_hook_gets_the_event_in_its_environment():
    event = {"seq": 7, "time": "2026-12-02T01:00:00.000Z", "node": "labor1", "volume": "appslv", "kind": "link",
             "member": "labor2", "link": "connecting", "was": "connected", "reason": None}
    env = hook_environment(event, base={"PATH": "/bin"})
    assert env["PATH"] == "/bin"
    assert (env["GMD_EVENT"], env["GMD_VOLUME"], env["GMD_NODE"], env["GMD_MEMBER"], env["GMD_WAS"],
            env["GMD_LINK"], env["GMD_SEQ"], env["GMD_REASON"]) == (
        "link", "appslv", "labor1", "labor2", "connected", "connecting", "7", "")
    assert '"member": "labor2"' in env["GMD_EVENT_JSON"]
    assert hook_environment({"kind": "quorum", "ok": False})["GMD_OK"] == "false"


CONFIG = """
secret = "s"
[nodes.labor1]
address = "127.0.0.1:7001"
[nodes.labor2]
address = "127.0.0.1:7002"
[volumes.appslv]
size = "64MiB"
[volumes.appslv.members.labor1]
device = "/tmp/a.img"
statemap = "/tmp/a.map"
[volumes.appslv.members.labor2]
device = "/tmp/b.img"
statemap = "/tmp/b.map"
"""


def test_hooks_in_the_config():
    cfg = parse_config(CONFIG + """
[[volumes.appslv.hooks]]
on = ["link", "split_brain"]
where = {was = "connected"}
run = "logger -t gmd $GMD_EVENT"
[[volumes.appslv.hooks]]
on = "quorum"
run = ["/usr/local/bin/page", "oncall"]
timeout = 5
""", file="gmd.toml", base_dir=__import__("pathlib").Path("/"))
    h1, h2 = cfg.volume("appslv").hooks
    assert h1.on == ("link", "split_brain") and h1.where == (("was", ("connected",)),)
    assert h1.run == ("/bin/sh", "-c", "logger -t gmd $GMD_EVENT") and h1.timeout == 60
    assert h2.on == ("quorum",) and h2.run == ("/usr/local/bin/page", "oncall") and h2.timeout == 5


@pytest.mark.parametrize("hook, message", [
    ('on = ["lnk"]\nrun = "true"', '"lnk" is not an event kind'),
    ('on = ["dropped"]\nrun = "true"', '"dropped" is not an event kind'),
    ('on = ["link"]', 'missing required key "run"'),
    ('on = []\nrun = "true"', "non-empty list"),
    ('on = ["link"]\nrun = "true"\nwhere = {color = "red"}', 'no field "color"'),
    ('on = ["link"]\nrun = "true"\nwhen = 1', 'unknown key "when"'),
])
def test_bad_hooks_are_refused_naming_the_key(hook, message):
    with pytest.raises(ConfigError) as e:
        parse_config(CONFIG + "[[volumes.appslv.hooks]]\n" + hook + "\n", file="gmd.toml",
                     base_dir=__import__("pathlib").Path("/"))
    assert "volumes.appslv.hooks[0]" in str(e.value) and message in str(e.value)


def test_the_readme_hooks_parse_as_documented():
    readme = (__import__("pathlib").Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("### Hooks: paging someone"):]
    block = section[section.index("```toml\n") + 8:section.index("```\n", section.index("```toml\n") + 8)]
    cfg = parse_config(CONFIG + block, file="README.md", base_dir=__import__("pathlib").Path("/"))
    lost, split, quorum = cfg.volume("appslv").hooks
    assert matches(lost, {"kind": "link", "was": "connected", "member": "labor2"})
    assert matches(split, {"kind": "split_brain", "member": "labor2"})
    assert matches(quorum, {"kind": "quorum", "ok": False}) and not matches(quorum, {"kind": "quorum", "ok": True})
    assert split.timeout == 20


async def test_no_snapshots_are_taken_while_nobody_wants_events_and_a_reader_still_starts_from_now():
    from gmd.eventfeed import EventFeed

    class Volume:
        is_up = True
        looks = 0
        role = "secondary"

        def status(self):
            Volume.looks += 1
            return status(role=self.role)

    vol = Volume()
    wanted = {"hooks": False}
    feed = None

    def want():
        return feed.hub.readers > 0 or wanted["hooks"]

    feed = EventFeed("labor1", lambda: {"appslv": vol}, interval=0.01, wanted=want)
    hooks = feed.hub.subscribe(None, internal=True)  # the hook runner's: not a reader
    async with trio.open_nursery() as n:
        n.start_soon(feed.run)
        await trio.sleep(0.1)
        assert Volume.looks == 0 and not hooks.queue
        vol.role = "primary"  # changed while nobody watched
        sub, first = feed.open_reader("appslv", now=True)
        assert [e["role"] for e in first if e["kind"] == "role"] == ["primary"]  # the state of now
        await trio.sleep(0.1)
        assert Volume.looks > 1  # watched while a reader is there
        sub.close()
        await trio.sleep(0.05)
        seen = Volume.looks
        await trio.sleep(0.1)
        assert Volume.looks == seen  # nobody again: no more snapshots
        wanted["hooks"] = True
        await trio.sleep(0.1)
        assert Volume.looks > seen
        n.cancel_scope.cancel()
