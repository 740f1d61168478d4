"""The volumes a node brings up at start (nodes.N.up, nodes.N.up_loop), and
the config file's ownership and mode the daemons warn about."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gmd.config import ConfigError, config_file_risks, parse_config

BASE = """\
secret = "s"
[nodes.a]
address = "10.0.0.1:7799"
{a}
[nodes.b]
address = "10.0.0.2:7799"
[volumes.v]
size = "1GiB"
[volumes.v.members.a]
device = "/dev/a"
statemap = "/var/lib/gmd/v.sm"
[volumes.v.members.b]
device = "/dev/b"
statemap = "/var/lib/gmd/v.sm"
[volumes.w]
size = "1GiB"
[volumes.w.members.b]
device = "/dev/bw"
statemap = "/var/lib/gmd/w.sm"
[volumes.x]
size = "1GiB"
[volumes.x.members.a]
device = "/dev/ax"
statemap = "/var/lib/gmd/x.sm"
"""


def parse(a: str):
    return parse_config(BASE.format(a=a), file="t.toml", base_dir=Path("/etc/gmd"))


def error(a: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(a)
    return info.value


def test_up_and_up_loop_are_read_per_node_and_default_to_none():
    cfg = parse('up = ["v"]\nup_loop = ["x"]')
    assert (cfg.node("a").up, cfg.node("a").up_loop) == (("v",), ("x",))
    assert (cfg.node("b").up, cfg.node("b").up_loop) == ((), ())


@pytest.mark.parametrize("a, key, fragment", [
    ('up = ["nope"]', "nodes.a.up[0]", '"nope" is not a configured volume (volumes: v, w, x)'),
    ('up = ["vv"]', "nodes.a.up[0]", 'did you mean "v"'),
    ('up_loop = ["v", "w"]', "nodes.a.up_loop[1]", 'volume "w" has no member on node a (members: b)'),
    ('up = ["v", "v"]', "nodes.a.up[1]", 'volume "v" is listed twice'),
    ('up = ["v"]\nup_loop = ["v"]', "nodes.a.up_loop", 'volume "v" is also in up'),
    ('up = "v"', "nodes.a.up", "expected a list of volume names"),
    ('up = [3]', "nodes.a.up[0]", "expected a volume name"),
])
def test_a_wrong_up_list_is_refused_naming_the_entry(a, key, fragment):
    e = error(a)
    assert e.key == key and fragment in e.message, str(e)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the file to root and to uid 1 needs root")
def test_config_file_risks_name_owner_and_who_may_write(tmp_path):
    f = tmp_path / "gmd.toml"
    f.write_text("")
    os.chown(f, 0, 0)
    os.chmod(f, 0o600)
    assert config_file_risks(f) == []
    os.chmod(f, 0o640)
    assert config_file_risks(f) == []  # readable by a group is the administrator's choice
    os.chmod(f, 0o662)
    assert config_file_risks(f) == [f"{f} is writable by its group and others (mode 0662)"]
    os.chmod(f, 0o600)
    os.chown(f, 1, 0)
    assert config_file_risks(f) == [f"{f} is owned by uid 1, not root"]
    assert config_file_risks(tmp_path / "missing.toml") == []  # reading it reports that
