"""Automatic takeover's decisions (quorum/takeover.py): who takes over, and
when a primary must fence itself; and the config keys that switch it on."""

from __future__ import annotations

from pathlib import Path

import pytest

from gmd.config import ConfigError, parse_config
from quorum.takeover import FENCE_AFTER, PeerView, defer_to, fresh_votes, lease_left, must_fence, promotion_order
from quorum.votes import Grant


def test_synchronous_members_take_over_before_async_ones_then_config_order():
    order = promotion_order([("far", "async"), ("b", "mwc"), ("a", "sync"), ("dr", "async")])
    assert order == ["b", "a", "far", "dr"]


def test_a_secondary_defers_to_a_connected_primary_and_to_promotable_members_ahead_of_it():
    order = ["a", "b", "c"]
    up = PeerView(connected=True, primary=False, uptodate=True)
    assert defer_to("b", order, {"a": up, "c": up}) == "a"
    # Members behind it in the order never hold it back.
    assert defer_to("a", order, {"b": up, "c": up}) is None
    # One ahead that is away, or not uptodate, cannot take over: no waiting for it.
    assert defer_to("b", order, {"a": PeerView(False, False, True), "c": up}) is None
    assert defer_to("b", order, {"a": PeerView(True, False, False), "c": up}) is None
    # A primary in sight, wherever it stands in the order.
    assert defer_to("a", order, {"c": PeerView(True, True, True)}) == "c"


def test_a_primary_fences_only_when_neither_members_nor_a_renewing_witness_give_quorum():
    assert not must_fence(member_votes=2, needed=2, fresh_witness_votes=0)
    assert not must_fence(member_votes=1, needed=2, fresh_witness_votes=1)
    assert must_fence(member_votes=1, needed=2, fresh_witness_votes=0)


def test_only_recent_grants_are_fresh():
    now = 100.0
    answers = {"W": (True, "lease", now - 0.9), "X": (True, "lease", now - FENCE_AFTER - 0.1),
               "Y": (False, "no answer", now - 0.1)}
    assert fresh_votes(answers, {"W": 1, "X": 1, "Y": 1}, now) == 1
    assert fresh_votes({}, {"W": 1}, now) == 0


def test_lease_left_is_the_longest_running_grant_or_zero():
    g = {"W": Grant(103.0, "g", frozenset()), "X": Grant(101.0, "g", frozenset())}
    assert lease_left(g, 100.0) == 3.0
    assert lease_left(g, 200.0) == 0.0
    assert lease_left({}, 1.0) == 0.0


BASE = """
secret = "s"
[nodes.a]
address = ["127.0.0.1:7001"]
[nodes.b]
address = ["127.0.0.1:7002"]
[volumes.v]
size = "64MiB"
{extra}
[volumes.v.members.a]
device = "/tmp/a.img"
statemap = "/tmp/a.sm"
[volumes.v.members.b]
device = "/tmp/b.img"
statemap = "/tmp/b.sm"
"""


def parse(extra: str):
    return parse_config(BASE.format(extra=extra), file="gmd.toml", base_dir=Path("/tmp"))


def test_takeover_keys_parse_with_commands_as_argv_or_shell():
    v = parse('auto_promote = true\nstart_command = "mount $GMD_LOOP /srv"\n'
              'stop_command = ["/usr/bin/umount", "/srv"]\ncommand_timeout = 20').volumes["v"]
    assert v.auto_promote is True
    assert v.start_command == ("/bin/sh", "-c", "mount $GMD_LOOP /srv")
    assert v.stop_command == ("/usr/bin/umount", "/srv")
    assert v.command_timeout == 20
    d = parse("").volumes["v"]
    assert (d.auto_promote, d.start_command, d.stop_command, d.command_timeout) == (False, None, None, 60)


@pytest.mark.parametrize("extra, key, words", [
    ('auto_promote = "yes"', "auto_promote", "expected true or false"),
    ("start_command = []", "start_command", "expected a command"),
    ('stop_command = ["umount", ""]', "stop_command", "expected a command"),
    ('stop_command = "umount\\u0000x"', "stop_command", "NUL"),
    ("command_timeout = 0", "command_timeout", "too small"),
])
def test_bad_takeover_keys_are_named(extra, key, words):
    with pytest.raises(ConfigError) as e:
        parse(extra)
    assert f"volumes.v.{key}" in str(e.value) and words in str(e.value)


class _Roles:
    device_path = "/run/gmd/a/v"
    loop_device = None


class _Engine:
    """Just what ServiceCommands reads of a volume."""

    def __init__(self, **commands):
        self.name, self.node, self.roles = "v", "a", _Roles()
        self.config = parse("\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in commands.items())).volumes["v"]


async def test_the_start_command_gets_the_volume_in_its_environment(tmp_path):
    from gmd.takeover import ServiceCommands
    out = tmp_path / "env"
    svc = ServiceCommands(_Engine(start_command=f"env | grep ^GMD_ | sort > {out}; echo started"))
    result = await svc.run("start", "auto-promote")
    assert result["ok"] and result["rc"] == 0 and result["output"] == "started"
    env = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert env == {"GMD_DEVICE": "/run/gmd/a/v", "GMD_EVENT": "start", "GMD_LOOP": "", "GMD_NODE": "a",
                   "GMD_REASON": "auto-promote", "GMD_VOLUME": "v"}
    assert svc.last["start"] is result
    assert await svc.run("stop", "operator") is None  # none configured: nothing runs


async def test_a_stop_command_that_hangs_is_killed_with_its_children_at_the_deadline(tmp_path):
    from gmd.takeover import ServiceCommands
    pidfile = tmp_path / "child"
    svc = ServiceCommands(_Engine(stop_command=f"sleep 60 & echo $! > {pidfile}; wait"))
    # 2 s: time enough for the shell to start its child on a loaded machine
    result = await svc.run("stop", "self-fence", timeout=2.0)
    assert not result["ok"] and "killed after 2.0 s" in result["error"]
    child = Path(f"/proc/{int(pidfile.read_text())}/stat")
    # The whole process group went (a killed child may linger as a zombie
    # until its new parent reaps it: dead all the same).
    assert not child.exists() or child.read_text().rsplit(")", 1)[1].split()[0] == "Z"


async def test_a_failing_or_missing_command_is_reported_not_raised(tmp_path):
    from gmd.takeover import ServiceCommands
    svc = ServiceCommands(_Engine(start_command="echo nope >&2; exit 3"))
    result = await svc.run("start", "operator")
    assert not result["ok"] and result["rc"] == 3 and result["output"] == "nope"
    svc = ServiceCommands(_Engine(start_command=["/nonexistent/start-app"]))
    result = await svc.run("start", "operator")
    assert not result["ok"] and "cannot run it" in result["error"]


def test_a_takeover_state_asked_every_second_is_logged_once_per_kind(caplog):
    import logging

    from gmd.takeover import Takeover

    caplog.set_level(logging.INFO, logger="gmd.takeover")
    t = Takeover(_Engine())
    for left in (4.7, 3.7, 2.7):
        t._set(f"cannot promote yet: witness W: granting nothing for {left} s more", logging.INFO)
    t._set("cannot promote yet: labor2 holds the primary lease", logging.INFO)
    assert [r.getMessage() for r in caplog.records] == [
        "v: takeover: cannot promote yet: witness W: granting nothing for 4.7 s more",
        "v: takeover: cannot promote yet: labor2 holds the primary lease"]
    assert t.state == "cannot promote yet: labor2 holds the primary lease"
