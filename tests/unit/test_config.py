"""gmd.config: the cluster TOML file, its defaults and every mistake it refuses."""

import os
import textwrap
from pathlib import Path

import pytest

from gmd.config import (
    DEFAULT_CONFIG_PATH,
    Address,
    Config,
    ConfigError,
    Member,
    load_config,
    parse_config,
    parse_size,
    resolve_config_path,
    resolve_node,
)

BASE_DIR = Path("/etc/gmd")

# The example from docs/DESIGN.md, "Configuration", verbatim.
DESIGN_EXAMPLE = """\
secret = "change-me"                 # peer authentication

[nodes.labor1]
address = ["10.25.172.32:7799", "10.25.172.31:7799"]   # one or more paths
control = "/run/gmd/labor1.sock"
mount = "/run/gmd/labor1"
votes = 1

[nodes.labor2]
address = ["10.25.182.42:7799"]
votes = 1

[witnesses.tiebreak]
address = "10.25.192.10:7800"
votes = 1

[volumes.appslv]
size = "4GiB"
mode = "mwc"
[volumes.appslv.members.labor1]
device = "/dev/rappslv00_lv"
statemap = "/var/lib/gmd/appslv.sm"
[volumes.appslv.members.labor2]
device = "/dev/rappslv00_lv"
statemap = "/var/lib/gmd/appslv.sm"
"""

# A small valid config that error tests extend or alter.
NODES = """\
secret = "s"
[nodes.a]
address = "10.0.0.1:7799"
[nodes.b]
address = "10.0.0.2:7799"
[witnesses.w]
address = "10.0.0.3:7800"
"""


def volume(body: str = 'size = "1GiB"', members: str | None = None) -> str:
    """NODES plus volume ``v`` with ``body`` and (by default) members on a and b."""
    if members is None:
        members = """\
            [volumes.v.members.a]
            device = "/dev/a"
            statemap = "/var/lib/gmd/v.sm"
            [volumes.v.members.b]
            device = "/dev/b"
            statemap = "/var/lib/gmd/v.sm"
            """
    return NODES + "[volumes.v]\n" + textwrap.dedent(body) + "\n" + textwrap.dedent(members)


def parse(text: str) -> Config:
    return parse_config(text, file="test.toml", base_dir=BASE_DIR)


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value


def assert_error(text: str, key: str, *fragments: str) -> ConfigError:
    err = error_of(text)
    assert err.file == "test.toml"
    assert err.key == key, str(err)
    for fragment in fragments:
        assert fragment in err.message, str(err)
    return err


# ---------------------------------------------------------------- valid configs


def test_design_example_parses_with_defaults():
    cfg = parse(DESIGN_EXAMPLE)
    assert cfg.path == Path("test.toml")
    assert cfg.secret == "change-me"
    assert list(cfg.nodes) == ["labor1", "labor2"]

    labor1 = cfg.node("labor1")
    assert labor1.addresses == (Address("10.25.172.32", 7799), Address("10.25.172.31", 7799))
    assert labor1.control == Path("/run/gmd/labor1.sock")
    assert labor1.mount == Path("/run/gmd/labor1")
    assert labor1.votes == 1

    labor2 = cfg.node("labor2")  # control and mount from the defaults
    assert labor2.addresses == (Address("10.25.182.42", 7799),)
    assert labor2.control == Path("/run/gmd/labor2.sock")
    assert labor2.mount == Path("/run/gmd/labor2")

    tiebreak = cfg.witnesses["tiebreak"]
    assert tiebreak.addresses == (Address("10.25.192.10", 7800),)
    assert tiebreak.votes == 1

    vol = cfg.volume("appslv")
    assert vol.size == 4 * 1024**3
    assert vol.region_size == 64 * 1024
    assert vol.extent_size == 4 * 1024**2
    assert vol.mode == "mwc"
    assert list(vol.members) == ["labor1", "labor2"]
    assert cfg.member("appslv", "labor2") == Member(
        node="labor2",
        device=Path("/dev/rappslv00_lv"),
        statemap=Path("/var/lib/gmd/appslv.sm"),
        mode="mwc",
        votes=1,
    )
    assert cfg.volumes_for_node("labor1") == [vol]


def test_defaults_for_minimal_config():
    cfg = parse(volume())
    assert cfg.node("a").votes == 1
    assert cfg.node("a").control == Path("/run/gmd/a.sock")
    assert cfg.node("a").control_timeout == 10
    vol = cfg.volume("v")
    assert (vol.region_size, vol.extent_size, vol.mode) == (65536, 4 * 1024**2, "mwc")


def test_control_timeout_is_read_per_node():
    cfg = parse(NODES.replace("[nodes.b]", "[nodes.b]\ncontrol_timeout = 2"))
    assert (cfg.node("a").control_timeout, cfg.node("b").control_timeout) == (10, 2)


def test_witnesses_and_volumes_are_optional():
    cfg = parse('secret = "s"\n[nodes.a]\naddress = "h:1"\n')
    assert cfg.witnesses == {} and cfg.volumes == {}
    assert cfg.volumes_for_node("a") == []


def test_member_overrides_mode_and_votes_else_inherits():
    text = volume(
        'size = "1GiB"\nmode = "sync"',
        """\
        [volumes.v.members.a]
        device = "/dev/a"
        statemap = "/sm/a"
        [volumes.v.members.b]
        device = "/dev/b"
        statemap = "/sm/b"
        mode = "async"
        votes = 0
        """,
    ).replace('address = "10.0.0.1:7799"', 'address = "10.0.0.1:7799"\nvotes = 2')
    vol = parse(text).volume("v")
    assert (vol.members["a"].mode, vol.members["a"].votes) == ("sync", 2)
    assert (vol.members["b"].mode, vol.members["b"].votes) == ("async", 0)


def test_explicit_geometry_and_ipv6_address():
    text = volume('size = 1048576\nregion_size = "4KiB"\nextent_size = "1M"').replace(
        '"10.0.0.2:7799"', '["[fd00::2]:7799", "host-b.example:7799"]'
    )
    cfg = parse(text)
    vol = cfg.volume("v")
    assert (vol.size, vol.region_size, vol.extent_size) == (1048576, 4096, 1048576)
    assert [str(a) for a in cfg.node("b").addresses] == ["[fd00::2]:7799", "host-b.example:7799"]


def test_relative_paths_resolve_against_config_directory():
    text = volume(
        members="""\
        [volumes.v.members.a]
        device = "disks/a.img"
        statemap = "../state/./v.sm"
        """
    ).replace('address = "10.0.0.1:7799"', 'address = "10.0.0.1:7799"\ncontrol = "run/a.sock"')
    cfg = parse_config(text, file="x.toml", base_dir=Path("/srv/cluster"))
    assert cfg.node("a").control == Path("/srv/cluster/run/a.sock")
    assert cfg.member("v", "a").device == Path("/srv/cluster/disks/a.img")
    assert cfg.member("v", "a").statemap == Path("/srv/state/v.sm")


def test_same_device_path_on_different_nodes_is_fine():
    text = volume(
        members="""\
        [volumes.v.members.a]
        device = "/dev/vg/lv"
        statemap = "/sm"
        [volumes.v.members.b]
        device = "/dev/vg/lv"
        statemap = "/sm"
        """
    )
    assert parse(text).member("v", "b").device == Path("/dev/vg/lv")


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("512MiB", 512 * 1024**2),
        ("4GiB", 4 * 1024**3),
        ("4G", 4 * 1024**3),
        ("64k", 64 * 1024),
        ("1.5GiB", 1536 * 1024**2),
        ("1TiB", 1024**4),
        ("2PiB", 2 * 1024**5),
        ("100B", 100),
        ("64 KiB", 65536),
        (" 8m ", 8 * 1024**2),
        ("2.0", 2),
    ],
)
def test_parse_size_valid(value, expected):
    assert parse_size(value, file="f", key="k") == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("4GB", 'use "GiB"'),
        ("10kb", "ambiguous"),
        ("-1", "negative"),
        (-1, "negative"),
        ("abc", "is not a size"),
        ("", "is not a size"),
        ("4 X", 'unknown unit "X"'),
        ("1.3KiB", "not a whole number of bytes"),
        ("0.5", "not a whole number of bytes"),
        (0, "is zero"),
        ("0GiB", "is zero"),
        (True, "got boolean true"),
        (1.5, "float"),
        ([1], "got an array"),
        ("99999999999PiB", "too large"),
    ],
)
def test_parse_size_rejects(value, fragment):
    with pytest.raises(ConfigError) as info:
        parse_size(value, file="f.toml", key="volumes.v.size")
    assert (info.value.file, info.value.key) == ("f.toml", "volumes.v.size")
    assert fragment in info.value.message


def test_parse_size_minimum():
    assert parse_size(0, file="f", key="k", minimum=0) == 0
    with pytest.raises(ConfigError, match="smaller than the minimum 4096"):
        parse_size(100, file="f", key="k", minimum=4096)


@pytest.mark.parametrize(
    ("toml_value", "fragment"),
    [
        ('"4GB"', "ambiguous"),
        ('"-1"', "negative"),
        ('"abc"', "is not a size"),
        ('"1.3KiB"', "not a whole number"),
        ("0", "is zero"),
        ("true", "boolean"),
        ("1.5", "float"),
    ],
)
def test_bad_volume_size_in_config(toml_value, fragment):
    assert_error(volume(f"size = {toml_value}"), "volumes.v.size", fragment)


def test_region_size_not_power_of_two():
    err = assert_error(
        volume('size = "1GiB"\nregion_size = 65000'),
        "volumes.v.region_size",
        "65000 is not a power of two",
        '"64KiB"',
    )
    assert str(err).startswith("test.toml: volumes.v.region_size: ")


def test_region_size_below_minimum():
    assert_error(
        volume('size = "1GiB"\nregion_size = "2KiB"'),
        "volumes.v.region_size",
        "smaller than the minimum region size 4096",
    )


def test_extent_smaller_than_region():
    assert_error(
        volume('size = "1GiB"\nregion_size = "1MiB"\nextent_size = "512KiB"'),
        "volumes.v.extent_size",
        "smaller than region_size 1048576 (1MiB)",
    )


def test_extent_not_power_of_two():
    assert_error(
        volume('size = "1GiB"\nextent_size = "3MiB"'),
        "volumes.v.extent_size",
        "not a power of two",
    )


def test_size_not_multiple_of_region_shows_nearest():
    err = assert_error(
        volume("size = 100000"),
        "volumes.v.size",
        "not a multiple of region_size 65536 (64KiB)",
        "65536 (64KiB) or 131072 (128KiB)",
    )
    assert "100000" in err.message


def test_size_smaller_than_region_shows_only_size_above():
    assert_error(volume('size = "1KiB"'), "volumes.v.size", "nearest valid sizes: 65536 (64KiB))")


def test_missing_size():
    assert_error(volume("mode = 'sync'"), "volumes.v.size", 'missing required key "size"')


# ---------------------------------------------------------------- keys and types


@pytest.mark.parametrize(
    ("text", "key", "fragments"),
    [
        (
            volume('sise = "1GiB"'),
            "volumes.v.sise",
            ['unknown key "sise"', "expected one of: size, region_size", 'did you mean "size"?'],
        ),
        (NODES + "[volume.v]\n", "volume", ['did you mean "volumes"?']),
        (
            NODES.replace('[nodes.b]', '[nodes.b]\nvote = 2'),
            "nodes.b.vote",
            ['did you mean "votes"?'],
        ),
        (
            volume(members='[volumes.v.members.a]\ndevice = "/d"\nstatemap = "/s"\nsize = 1\n'),
            "volumes.v.members.a.size",
            ['unknown key "size"', "device, statemap, mode, votes"],
        ),
        ('colour = "blue"\n' + NODES, "colour", ['unknown key "colour"']),
    ],
)
def test_unknown_keys(text, key, fragments):
    err = assert_error(text, key, *fragments)
    if key == "colour":
        assert "did you mean" not in err.message


@pytest.mark.parametrize(
    ("text", "key", "fragments"),
    [
        (NODES.replace('[nodes.b]', '[nodes.b]\nvotes = "1"'), "nodes.b.votes",
         ["expected an integer >= 0", 'got string "1"']),
        (NODES.replace('[nodes.b]', '[nodes.b]\nvotes = true'), "nodes.b.votes",
         ["got boolean true"]),
        (NODES.replace('[nodes.b]', '[nodes.b]\nvotes = -1'), "nodes.b.votes",
         ["-1 is too small"]),
        (NODES.replace('[nodes.b]', '[nodes.b]\ncontrol_timeout = 0'), "nodes.b.control_timeout",
         ["0 is too small (expected an integer >= 1)"]),
        (NODES.replace('[nodes.b]', '[nodes.b]\ncontrol_timeout = "10s"'), "nodes.b.control_timeout",
         ['got string "10s"']),
        (NODES.replace('"10.0.0.2:7799"', "7799"), "nodes.b.address",
         ['"host:port" string or a list', "got integer 7799"]),
        (NODES.replace('"10.0.0.2:7799"', "[]"), "nodes.b.address", ["empty list"]),
        (NODES.replace('"10.0.0.2:7799"', '["10.0.0.2:1", 2]'), "nodes.b.address[1]",
         ["got integer 2"]),
        (NODES.replace('[nodes.b]', '[nodes.b]\ncontrol = { path = "/x" }'), "nodes.b.control",
         ["expected a path (string), got a table"]),
        (NODES.replace('[nodes.b]', '[nodes.b]\nmount = ""'), "nodes.b.mount",
         ["empty string"]),
        ('secret = "s"\n[nodes]\nc = "x"\n', "nodes.c",
         ["expected a table, got string"]),
        (volume('size = "1GiB"\nmembers = "a,b"', members=""), "volumes.v.members",
         ["expected a table, got string"]),
        (volume(members='[volumes.v.members.a]\ndevice = 5\nstatemap = "/s"\n'),
         "volumes.v.members.a.device", ["got integer 5"]),
        (volume(members='[volumes.v.members.a]\ndevice = "/d"\n'),
         "volumes.v.members.a.statemap", ['missing required key "statemap"']),
        (volume('size = "1G"\nmode = 1'), "volumes.v.mode", ["got integer 1"]),
        ('secret = 42\n[nodes.a]\naddress = "h:1"\n', "secret", ["got integer 42"]),
        ('secret = "s"\nnodes = ["a"]\n', "nodes", ["expected a table, got an array"]),
    ],
)
def test_wrong_types(text, key, fragments):
    assert_error(text, key, *fragments)


def test_missing_secret():
    assert_error(NODES.replace('secret = "s"\n', ""), "secret", 'missing required key "secret"')


def test_empty_secret():
    assert_error(NODES.replace('secret = "s"', 'secret = ""'), "secret", "empty string")


def test_missing_nodes():
    assert_error('secret = "s"\n', "nodes", 'missing required key "nodes"')


def test_no_nodes():
    assert_error('secret = "s"\n[nodes]\n', "nodes", "no nodes configured")


def test_secret_not_in_repr():
    assert "change-me" not in repr(parse(DESIGN_EXAMPLE))


# ---------------------------------------------------------------- names and members


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (NODES.replace("[nodes.b]", '[nodes."bad name"]'), 'nodes."bad name"'),
        (NODES.replace("[nodes.b]", '[nodes."-b"]'), "nodes.-b"),
        (NODES.replace("[witnesses.w]", f"[witnesses.{'w' * 65}]"), "witnesses." + "w" * 65),
        (volume().replace("[volumes.v]", '[volumes."v/1"]'), 'volumes."v/1"'),
    ],
)
def test_bad_names(text, key):
    assert_error(text, key, "name", "starting with a letter or digit")


def test_dotted_name_is_allowed_and_quoted_in_keys():
    text = NODES.replace("[nodes.b]", '[nodes."b.x"]\nvotes = "x"')
    assert_error(text, 'nodes."b.x".votes', 'got string "x"')


def test_witness_may_not_share_a_node_name():
    assert_error(
        NODES.replace("[witnesses.w]", "[witnesses.a]"),
        "witnesses.a",
        "already a node",
    )


def test_member_that_is_not_a_node():
    assert_error(
        volume(members='[volumes.v.members.c]\ndevice = "/d"\nstatemap = "/s"\n'),
        "volumes.v.members.c",
        '"c" is not a configured node',
        "configured nodes: a, b",
    )


def test_member_that_is_a_witness():
    assert_error(
        volume(members='[volumes.v.members.w]\ndevice = "/d"\nstatemap = "/s"\n'),
        "volumes.v.members.w",
        "is a witness, not a node",
        "configured nodes: a, b",
    )


def test_no_members():
    assert_error(volume(members="[volumes.v.members]\n"), "volumes.v.members", "no members")


def test_missing_members():
    assert_error(volume(members=""), "volumes.v.members", 'missing required key "members"')


def test_too_many_members():
    nodes = "".join(f'[nodes.n{i}]\naddress = "10.1.0.{i}:7799"\n' for i in range(9))
    members = "".join(
        f'[volumes.v.members.n{i}]\ndevice = "/d"\nstatemap = "/s"\n' for i in range(9)
    )
    text = f'secret = "s"\n{nodes}[volumes.v]\nsize = "1GiB"\n{members}'
    assert_error(text, "volumes.v.members", "9 members", "at most 8")
    # eight is fine
    eight = text.replace('[volumes.v.members.n8]\ndevice = "/d"\nstatemap = "/s"\n', "")
    assert len(parse(eight).volume("v").members) == 8


@pytest.mark.parametrize("where", ["volumes.v", "volumes.v.members.b"])
def test_bad_mode(where):
    text = volume(
        'size = "1GiB"' + ('\nmode = "synch"' if where == "volumes.v" else ""),
        members='[volumes.v.members.b]\ndevice = "/d"\nstatemap = "/s"\n'
        + ('mode = "synch"\n' if where != "volumes.v" else ""),
    )
    assert_error(text, where + ".mode", '"synch" is not a mode', "sync, mwc, async",
                 'did you mean "sync"?')


def test_duplicate_device_on_one_node():
    text = volume() + textwrap.dedent(
        """\
        [volumes.w]
        size = "1GiB"
        [volumes.w.members.a]
        device = "/dev/a"
        statemap = "/var/lib/gmd/w.sm"
        """
    )
    assert_error(
        text,
        "volumes.w.members.a.device",
        "/dev/a on node a is also used by volumes.v.members.a.device",
        "overwrite each other",
    )


def test_duplicate_statemap_on_one_node():
    text = volume() + textwrap.dedent(
        """\
        [volumes.w]
        size = "1GiB"
        [volumes.w.members.b]
        device = "/dev/w"
        statemap = "/var/lib/gmd//v.sm"
        """
    )
    assert_error(text, "volumes.w.members.b.statemap", "volumes.v.members.b.statemap")


def test_statemap_equal_to_device_on_one_node():
    text = volume(members='[volumes.v.members.a]\ndevice = "/x"\nstatemap = "/x"\n')
    assert_error(text, "volumes.v.members.a.statemap", "volumes.v.members.a.device")


# ---------------------------------------------------------------- nodes: paths, addresses


def test_duplicate_control_path():
    text = NODES.replace("[nodes.b]", '[nodes.b]\ncontrol = "/run/gmd/a.sock"')
    assert_error(text, "nodes.b.control", "/run/gmd/a.sock is also used by nodes.a.control")


def test_duplicate_mount_path():
    text = NODES.replace("[nodes.b]", '[nodes.b]\nmount = "/run/gmd/x/../a"')
    assert_error(text, "nodes.b.mount", "also used by nodes.a.mount")


def test_duplicate_address_within_a_node():
    text = NODES.replace('"10.0.0.2:7799"', '["10.0.0.2:7799", "10.0.0.2:7799"]')
    assert_error(
        text, "nodes.b.address[1]", "10.0.0.2:7799 is also used by nodes.b.address[0]"
    )


def test_duplicate_address_across_nodes():
    text = NODES.replace('"10.0.0.2:7799"', '["10.0.0.9:7799", "10.0.0.1:7799"]')
    assert_error(text, "nodes.b.address[1]", "also used by nodes.a.address")


def test_duplicate_address_node_and_witness_case_insensitive():
    text = (
        NODES.replace('"10.0.0.1:7799"', '"Host-A:7799"')
        .replace('"10.0.0.3:7800"', '"host-a:7799"')
    )
    assert_error(text, "witnesses.w.address", "also used by nodes.a.address")


def test_duplicate_ipv6_address_in_other_spelling():
    text = NODES.replace('"10.0.0.1:7799"', '"[::1]:7799"').replace(
        '"10.0.0.2:7799"', '"[0:0::0001]:7799"'
    )
    assert_error(text, "nodes.b.address", "also used by nodes.a.address")


def test_localhost_and_loopback_are_different_addresses():
    text = NODES.replace('"10.0.0.1:7799"', '"localhost:7799"').replace(
        '"10.0.0.2:7799"', '"127.0.0.1:7799"'
    )
    assert len(parse(text).nodes) == 2


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("10.0.0.2", "has no port"),
        ("10.0.0.2:", "has no port"),
        (":7799", "has no host"),
        ("10.0.0.2:0", "port 0 is out of range (expected 1..65535)"),
        ("10.0.0.2:70000", "port 70000 is out of range"),
        ("10.0.0.2:http", "is not a number"),
        ("fd00::2:7799", "IPv6 addresses need brackets"),
        ("[fd00::2]", "has no port"),
        ("[nothost]:1", "is not an IPv6 address"),
        ("tcp://h:1", "URL scheme"),
        ("bad host:1", "is not a host name"),
    ],
)
def test_bad_address(address, fragment):
    assert_error(NODES.replace("10.0.0.2:7799", address), "nodes.b.address", fragment)


def test_address_str_and_parse():
    assert str(Address("::1", 7799)) == "[::1]:7799"
    assert str(Address("h", 1)) == "h:1"
    assert Address.parse("[::1]:7799") == Address("::1", 7799)
    assert Address.parse("h.example:65535") == Address("h.example", 65535)


# ---------------------------------------------------------------- errors, lookups


def test_config_error_str_with_and_without_key():
    assert str(ConfigError("f.toml", "nodes.a", "bad")) == "f.toml: nodes.a: bad"
    assert str(ConfigError("f.toml", "", "bad")) == "f.toml: bad"


def test_toml_syntax_error_carries_line():
    err = assert_error(NODES + "[volumes.v]\nsize = = 4\n", "", "TOML syntax error", "line 9")
    assert str(err).startswith("test.toml: TOML syntax error")


def test_lookup_errors_list_known_names():
    cfg = parse(DESIGN_EXAMPLE)
    with pytest.raises(ConfigError) as info:
        cfg.node("labor3")
    assert info.value.message.startswith(
        'unknown node "labor3" (configured nodes: labor1, labor2)'
    )

    with pytest.raises(ConfigError, match="configured volumes: appslv"):
        cfg.volume("apps")
    with pytest.raises(ConfigError, match="configured nodes: labor1, labor2"):
        cfg.volumes_for_node("nope")
    with pytest.raises(ConfigError) as info:
        cfg.member("appslv", "tiebreak")
    assert info.value.message == (
        'node "tiebreak" has no member in volume "appslv" (members: labor1, labor2)'
    )


# ---------------------------------------------------------------- path and node resolution


def test_resolve_config_path_precedence():
    env = {"GMD_CONFIG": "/env/gmd.toml"}
    assert resolve_config_path("/cli/gmd.toml", env) == Path("/cli/gmd.toml")
    assert resolve_config_path(None, env) == Path("/env/gmd.toml")
    assert resolve_config_path(None, {}) == DEFAULT_CONFIG_PATH == Path("/etc/gmd/gmd.toml")
    assert resolve_config_path("", {"GMD_CONFIG": ""}) == DEFAULT_CONFIG_PATH


def test_resolve_node_precedence():
    cfg = parse(DESIGN_EXAMPLE)
    env = {"GMD_NODE": "labor2"}
    assert resolve_node("labor1", env, cfg, hostname="labor2") == "labor1"
    assert resolve_node(None, env, cfg, hostname="labor1") == "labor2"
    assert resolve_node(None, {}, cfg, hostname="labor1.example.com") == "labor1"


def test_resolve_node_without_any_usable_name():
    cfg = parse(DESIGN_EXAMPLE)
    with pytest.raises(ConfigError) as info:
        resolve_node(None, {}, cfg, hostname="buildhost.example.com")
    err = info.value
    assert (err.file, err.key) == ("test.toml", "")
    assert err.message.startswith(
        "no node given: pass --node NAME or set GMD_NODE (configured nodes: labor1, labor2"
    )
    assert '"buildhost"' in err.message


@pytest.mark.parametrize(
    ("cli", "env", "fragment"),
    [
        ("labor3", {}, 'unknown node "labor3" (given by --node) (configured nodes: labor1, l'),
        (None, {"GMD_NODE": "labr1"}, 'given by GMD_NODE'),
        ("tiebreak", {}, "is a witness, not a node"),
    ],
)
def test_resolve_node_unknown_explicit_name(cli, env, fragment):
    cfg = parse(DESIGN_EXAMPLE)
    with pytest.raises(ConfigError) as info:
        resolve_node(cli, env, cfg, hostname="labor1")  # hostname is not a fallback here
    assert fragment in info.value.message


# ---------------------------------------------------------------- load_config (tmp_path I/O)


def test_load_config_never_writes(tmp_path):
    text = volume(
        members='[volumes.v.members.a]\ndevice = "disks/a.img"\nstatemap = "state/v.sm"\n'
    ).replace('address = "10.0.0.1:7799"',
              'address = "10.0.0.1:7799"\ncontrol = "run/a.sock"\nmount = "mnt/a"')
    path = tmp_path / "gmd.toml"
    path.write_text(text)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # any change would show
    before = sorted(p.name for p in tmp_path.iterdir())
    mtime = path.stat().st_mtime_ns

    cfg = load_config(path)

    assert sorted(p.name for p in tmp_path.iterdir()) == before == ["gmd.toml"]
    assert path.stat().st_mtime_ns == mtime
    assert cfg.path == path
    assert cfg.node("a").control == tmp_path / "run/a.sock"
    assert cfg.node("a").mount == tmp_path / "mnt/a"
    assert cfg.member("v", "a").device == tmp_path / "disks/a.img"
    assert not (tmp_path / "run").exists() and not (tmp_path / "mnt").exists()
    assert not (tmp_path / "state").exists()


def test_load_config_accepts_str_and_design_example(tmp_path):
    path = tmp_path / "gmd.toml"
    path.write_text(DESIGN_EXAMPLE)
    assert load_config(str(path)).volume("appslv").size == 4 * 1024**3


def test_load_config_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.key) == (str(path), "")
    assert "no such file" in info.value.message
    assert "--config" in info.value.message and "GMD_CONFIG" in info.value.message
    assert not path.exists()


def test_load_config_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_load_config_not_utf8(tmp_path):
    path = tmp_path / "gmd.toml"
    path.write_bytes(b'secret = "s"\n# caf\xe9\n')
    with pytest.raises(ConfigError, match="not UTF-8 text: byte 0xe9 at line 2"):
        load_config(path)


def test_load_config_syntax_error_names_file(tmp_path):
    path = tmp_path / "gmd.toml"
    path.write_text('secret = "s"\n[nodes.a\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path)
    assert "line 2" in info.value.message


def test_listen_addresses_default_to_address_and_may_differ():
    cfg = parse_config(
        'secret = "s"\n[nodes.a]\naddress = ["127.0.0.1:9001", "127.0.0.1:9002"]\n'
        'listen = ["127.0.0.1:8001", "127.0.0.1:8002"]\n[nodes.b]\naddress = "127.0.0.1:9003"\n',
        file="t.toml", base_dir=Path("/tmp"),
    )
    assert [str(a) for a in cfg.node("a").listen_addresses] == ["127.0.0.1:8001", "127.0.0.1:8002"]
    assert [str(a) for a in cfg.node("b").listen_addresses] == ["127.0.0.1:9003"]


def test_listen_needs_one_address_per_path():
    with pytest.raises(ConfigError) as e:
        parse_config(
            'secret = "s"\n[nodes.a]\naddress = ["127.0.0.1:9001", "127.0.0.1:9002"]\nlisten = "127.0.0.1:8001"\n',
            file="t.toml", base_dir=Path("/tmp"),
        )
    assert e.value.key == "nodes.a.listen" and "one per path" in e.value.message


def test_async_queue_size():
    cfg = parse_config(
        'secret = "s"\n[nodes.a]\naddress = "127.0.0.1:9001"\n[volumes.v]\nsize = "1GiB"\nasync_queue = "8MiB"\n'
        '[volumes.v.members.a]\ndevice = "d"\nstatemap = "s"\n',
        file="t.toml", base_dir=Path("/tmp"),
    )
    assert cfg.volume("v").async_queue == 8 << 20


def test_tls_table_needs_cert_key_and_ca():
    base = 'secret = "s"\n[nodes.a]\naddress = "127.0.0.1:9001"\n'
    cfg = parse_config(base + '[tls]\ncert = "c.pem"\nkey = "k.pem"\nca = "ca.pem"\n', file="t.toml", base_dir=Path("/etc/gmd"))
    assert cfg.tls.cert == Path("/etc/gmd/c.pem") and cfg.tls.ca == Path("/etc/gmd/ca.pem")
    with pytest.raises(ConfigError) as e:
        parse_config(base + '[tls]\ncert = "c.pem"\nca = "ca.pem"\n', file="t.toml", base_dir=Path("/etc/gmd"))
    assert e.value.key == "tls.key" and "private key" in e.value.message
    assert parse_config(base, file="t.toml", base_dir=Path("/etc")).tls is None


QUORUM_BASE = ('secret = "s"\n[nodes.a]\naddress = "127.0.0.1:9001"\n[witnesses.w]\naddress = "127.0.0.1:9009"\n'
               '[volumes.v]\nsize = "1GiB"\n{volume}[volumes.v.members.a]\ndevice = "d"\nstatemap = "s"\n')


def test_quorum_loss_policy_and_timeout():
    cfg = parse_config(QUORUM_BASE.format(volume='on_quorum_loss = "fail"\nquorum_timeout = 5\n'), file="t.toml",
                       base_dir=Path("/etc/gmd"))
    assert (cfg.volume("v").on_quorum_loss, cfg.volume("v").quorum_timeout) == ("fail", 5)
    default = parse_config(QUORUM_BASE.format(volume=""), file="t.toml", base_dir=Path("/etc/gmd"))
    assert (default.volume("v").on_quorum_loss, default.volume("v").quorum_timeout) == ("suspend", 30)
    assert default.witnesses["w"].state == Path("/var/lib/gmd/witness-w.json")


def test_unknown_quorum_loss_policy_is_refused_with_a_suggestion():
    e = error_of(QUORUM_BASE.format(volume='on_quorum_loss = "suspnd"\n'))
    assert e.key == "volumes.v.on_quorum_loss" and '"suspnd" is not a policy' in e.message and "suspend" in e.message


def test_quorum_timeout_must_be_a_positive_integer():
    e = error_of(QUORUM_BASE.format(volume="quorum_timeout = 0\n"))
    assert e.key == "volumes.v.quorum_timeout" and "too small" in e.message


def test_witness_state_path_is_relative_to_the_config():
    cfg = parse_config(QUORUM_BASE.replace('address = "127.0.0.1:9009"\n', 'address = "127.0.0.1:9009"\nstate = "w.json"\n')
                       .format(volume=""), file="t.toml", base_dir=Path("/etc/gmd"))
    assert cfg.witnesses["w"].state == Path("/etc/gmd/w.json")


def test_split_brain_policy_is_checked():
    cfg = parse_config(QUORUM_BASE.format(volume='split_brain = "discard-secondary"\n'), file="t.toml",
                       base_dir=Path("/etc/gmd"))
    assert cfg.volume("v").split_brain == "discard-secondary"
    e = error_of(QUORUM_BASE.format(volume='split_brain = "discard-younger"\n'))
    assert e.key == "volumes.v.split_brain" and "not a split-brain policy" in e.message
    assert "discard-younger-primary" in e.message


UNDO_BASE = ('secret = "s"\n[nodes.a]\naddress = "127.0.0.1:9001"\n[volumes.v]\nsize = "1GiB"\n'
             '[volumes.v.members.a]\ndevice = "d"\nstatemap = "s"\n{member}')


def test_undo_log_is_a_member_path_with_a_size():
    cfg = parse_config(UNDO_BASE.format(member='undo_log = "v.undo"\nundo_log_size = "4GiB"\n'), file="t.toml",
                       base_dir=Path("/etc/gmd"))
    m = cfg.member("v", "a")
    assert (m.undo_log, m.undo_log_size) == (Path("/etc/gmd/v.undo"), 4 << 30)
    default = parse_config(UNDO_BASE.format(member='undo_log = "/var/lib/gmd/v.undo"\n'), file="t.toml",
                           base_dir=Path("/etc/gmd"))
    assert default.member("v", "a").undo_log_size == 1 << 30
    none = parse_config(UNDO_BASE.format(member=""), file="t.toml", base_dir=Path("/etc/gmd"))
    assert (none.member("v", "a").undo_log, none.member("v", "a").undo_log_size) == (None, 0)


def test_undo_log_mistakes_name_the_key():
    e = error_of(UNDO_BASE.format(member='undo_log_size = "4GiB"\n'))
    assert e.key == "volumes.v.members.a.undo_log_size" and "without undo_log" in e.message
    e = error_of(UNDO_BASE.format(member='undo_log = "u"\nundo_log_size = "64KiB"\n'))
    assert e.key == "volumes.v.members.a.undo_log_size" and "smaller than the minimum" in e.message
    e = error_of(UNDO_BASE.format(member='undo_log = "u"\nundo_log_size = "4GB"\n'))
    assert e.key == "volumes.v.members.a.undo_log_size"
    e = error_of(UNDO_BASE.format(member='undo_log = 5\n'))
    assert e.key == "volumes.v.members.a.undo_log"
    e = error_of(UNDO_BASE.format(member='undo_log = "s"\n'))  # the state map's own file
    assert e.key == "volumes.v.members.a.undo_log" and "overwrite each other" in e.message


def test_the_readme_three_site_example_parses_as_described():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Three sites: a metro mirror"):]
    block = section.split("```toml\n", 1)[1].split("```", 1)[0]
    v = parse(block).volumes["appslv"]
    assert v.group == "erp" and v.rpo_alert_seconds == 60 and v.auto_promote
    far = v.members["labor3"]
    assert (far.mode, far.votes, far.shipping.compress) == ("async", 0, "zstd")
    assert far.undo_log == Path("/var/lib/gmd/appslv.undo") and far.undo_log_size == 20 << 30
    assert all(v.members[n].journal is not None and v.members[n].mode == "mwc" for n in ("labor1", "labor2"))


def test_test_image_size_is_a_member_size_of_at_least_a_mebibyte():
    cfg = parse_config(UNDO_BASE.format(member='test_image_size = "8GiB"\n'), file="t.toml", base_dir=Path("/etc/gmd"))
    assert cfg.member("v", "a").test_image_size == 8 << 30
    default = parse_config(UNDO_BASE.format(member=""), file="t.toml", base_dir=Path("/etc/gmd"))
    assert default.member("v", "a").test_image_size == 1 << 30
    e = error_of(UNDO_BASE.format(member='test_image_size = "64KiB"\n'))
    assert e.key == "volumes.v.members.a.test_image_size" and "smaller than the minimum" in e.message
    e = error_of(UNDO_BASE.format(member='test_image_size = true\n'))
    assert e.key == "volumes.v.members.a.test_image_size"


def test_metrics_address_of_a_node_and_a_witness():
    """Off unless set; the same address on every node is fine (each binds it
    on its own host), and a node with listen addresses may use its address's port."""
    cfg = parse(NODES.replace('address = "10.0.0.1:7799"', 'address = "10.0.0.1:7799"\nmetrics = "127.0.0.1:9942"')
                .replace('address = "10.0.0.2:7799"', 'address = "10.0.0.2:7799"\nmetrics = "127.0.0.1:9942"')
                .replace('address = "10.0.0.3:7800"', 'address = "10.0.0.3:7800"\nmetrics = "[::1]:9943"'))
    assert cfg.node("a").metrics == Address("127.0.0.1", 9942) == cfg.node("b").metrics
    assert cfg.witnesses["w"].metrics == Address("::1", 9943)
    assert parse(NODES).node("a").metrics is None and parse(NODES).witnesses["w"].metrics is None
    natted = parse('secret = "s"\n[nodes.a]\naddress = "10.0.0.1:7799"\nlisten = "10.0.1.1:7799"\n'
                   'metrics = "10.0.0.1:7799"\n')
    assert natted.node("a").metrics == Address("10.0.0.1", 7799)


@pytest.mark.parametrize(
    ("table", "line", "key", "fragment"),
    [
        ("a", "metrics = 9942", "nodes.a.metrics", 'expected a "host:port" string'),
        ("a", 'metrics = "9942"', "nodes.a.metrics", "has no port"),
        ("a", 'metrics = "http://127.0.0.1:9942"', "nodes.a.metrics", "URL scheme"),
        ("a", 'metrics = "127.0.0.1:99420"', "nodes.a.metrics", "out of range"),
        ("a", 'metrics = "10.0.0.1:7799"', "nodes.a.metrics", "also where this daemon listens for peers"),
        ("a", 'metrics = "0.0.0.0:7799"', "nodes.a.metrics", "needs a port of its own"),
        ("w", 'metrics = "[::]:7800"', "witnesses.w.metrics", "also where this daemon listens"),
        ("w", 'metric = "127.0.0.1:9942"', "witnesses.w.metric", 'did you mean "metrics"'),
    ],
)
def test_metrics_address_mistakes(table, line, key, fragment):
    address = {"a": 'address = "10.0.0.1:7799"', "w": 'address = "10.0.0.3:7800"'}[table]
    e = error_of(NODES.replace(address, f"{address}\n{line}"))
    assert e.key == key and fragment in e.message, e
