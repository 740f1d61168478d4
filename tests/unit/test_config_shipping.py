"""The config keys of how data is shipped to a member: compression and the
bandwidth limit with its schedule, as volume defaults and member overrides,
and every mistake named by its key."""

from __future__ import annotations

import datetime

import pytest

from gmd.config import Shipping

from .test_config import assert_error, parse, volume

MEMBERS = """\
[volumes.v.members.a]
device = "/dev/a"
statemap = "/sm/a"
[volumes.v.members.b]
device = "/dev/b"
statemap = "/sm/b"
"""


def with_member_b(extra: str, body: str = 'size = "1GiB"') -> str:
    return volume(body, MEMBERS + extra)


def test_nothing_said_means_no_compression_and_no_limit():
    vol = parse(volume()).volume("v")
    assert vol.shipping == Shipping() == vol.members["b"].shipping
    assert (Shipping().compress, Shipping().compress_level, Shipping().bandwidth) == ("none", 3, 0)


def test_the_volume_sets_the_default_and_a_member_overrides_key_by_key():
    text = with_member_b('compress_level = 1\nbandwidth = "2MiB"\n',
                         body='size = "1GiB"\ncompress = "zstd"\ncompress_level = 9\nbandwidth = 10000000\n'
                              'bandwidth_schedule = [{from = "08:00", to = "18:00", '
                              'days = ["mon", "fri"], bandwidth = "1MiB"}]')
    vol = parse(text).volume("v")
    a, b = vol.members["a"].shipping, vol.members["b"].shipping
    assert (a.compress, a.compress_level, a.bandwidth) == ("zstd", 9, 10_000_000)
    assert (b.compress, b.compress_level, b.bandwidth) == ("zstd", 1, 2 << 20)
    assert a.bandwidth_schedule == b.bandwidth_schedule  # not overridden: the volume's
    (rule,) = b.bandwidth_schedule
    assert (rule.start, rule.end, rule.days, rule.bandwidth) == (8 * 60, 18 * 60, frozenset({0, 4}), 1 << 20)
    assert b.schedule.at(datetime.datetime(2024, 6, 7, 9, 0)) == (1 << 20, 0)  # a Friday morning
    assert b.schedule.at(datetime.datetime(2024, 6, 8, 9, 0)) == (2 << 20, None)  # Saturday: b's own default


def test_a_schedule_as_an_array_of_tables_with_toml_times_and_midnight_windows():
    text = volume('size = "1GiB"\n'
                  '[[volumes.v.bandwidth_schedule]]\nfrom = 22:00:00\nto = "06:00"\nbandwidth = 0\n'
                  '[[volumes.v.bandwidth_schedule]]\nfrom = "00:00"\nto = "24:00"\nbandwidth = 65536\n',
                  '[volumes.v.members.a]\ndevice = "/dev/a"\nstatemap = "/sm/a"\n')
    rules = parse(text).volume("v").shipping.bandwidth_schedule
    assert [(r.start, r.end, len(r.days), r.bandwidth) for r in rules] == [(1320, 360, 7, 0), (0, 1440, 7, 65536)]


def test_a_member_can_turn_the_schedule_off():
    text = with_member_b("bandwidth_schedule = []\n",
                         body='size = "1GiB"\nbandwidth_schedule = [{from = "08:00", to = "09:00", bandwidth = 0}]')
    vol = parse(text).volume("v")
    assert vol.members["b"].shipping.bandwidth_schedule == ()
    assert len(vol.members["a"].shipping.bandwidth_schedule) == 1


@pytest.mark.parametrize("where", ["volumes.v", "volumes.v.members.b"])
@pytest.mark.parametrize("line, key, fragments", [
    ('compress = "lz4"', "compress", ['"lz4" is not a compressor', '"zstd" or "none"']),
    ('compress = "zstandard"', "compress", ['did you mean "zstd"?']),
    ("compress = true", "compress", ["expected one of", "boolean true"]),
    ("compress_level = 0", "compress_level", ["0 is too small", ">= 1"]),
    ("compress_level = 23", "compress_level", ["23 is too large", "1..22"]),
    ('compress_level = "3"', "compress_level", ["expected an integer"]),
    ("bandwidth = -1", "bandwidth", ["negative"]),
    ("bandwidth = 1000", "bandwidth", ["1000 bytes/s is below the least limit 65536 (64KiB)", "0 means no limit"]),
    ('bandwidth = "4MB"', "bandwidth", ["ambiguous"]),
    ("bandwidth = 1.5", "bandwidth", ["float"]),
    ('bandwidth_schedule = "08:00-18:00"', "bandwidth_schedule", ["expected a list of tables"]),
    ("bandwidth_schedule = [1]", "bandwidth_schedule[0]", ["expected a table"]),
    ('bandwidth_schedule = [{to = "18:00", bandwidth = 0}]', "bandwidth_schedule[0].from",
     ['missing required key "from"']),
    ('bandwidth_schedule = [{from = "08:00", bandwidth = 0}]', "bandwidth_schedule[0].to",
     ['missing required key "to"']),
    ('bandwidth_schedule = [{from = "08:00", to = "09:00"}]', "bandwidth_schedule[0].bandwidth",
     ['missing required key "bandwidth"']),
    ('bandwidth_schedule = [{from = "08:00", to = "09:00", bandwidth = 0, day = ["mon"]}]',
     "bandwidth_schedule[0].day", ['unknown key "day"', 'did you mean "days"?']),
    ('bandwidth_schedule = [{from = "8:00", to = "09:00", bandwidth = 0}]', "bandwidth_schedule[0].from",
     ['"8:00" is not a time of day', '"HH:MM"']),
    ('bandwidth_schedule = [{from = "24:00", to = "09:00", bandwidth = 0}]', "bandwidth_schedule[0].from",
     ['"24:00" is not a time of day']),
    ('bandwidth_schedule = [{from = "08:00", to = "09:60", bandwidth = 0}]', "bandwidth_schedule[0].to",
     ['"09:60" is not a time of day', '"24:00"']),
    ("bandwidth_schedule = [{from = 08:00:30, to = \"09:00\", bandwidth = 0}]", "bandwidth_schedule[0].from",
     ["08:00:30 has seconds"]),
    ('bandwidth_schedule = [{from = "08:00", to = "08:00", bandwidth = 0}]', "bandwidth_schedule[0].to",
     ['"to" equals "from" (08:00)', 'to = "24:00"']),
    ('bandwidth_schedule = [{from = "08:00", to = "09:00", bandwidth = 100}]', "bandwidth_schedule[0].bandwidth",
     ["below the least limit"]),
    ('bandwidth_schedule = [{from = "08:00", to = "09:00", bandwidth = 0, days = []}]',
     "bandwidth_schedule[0].days", ["expected a list of days from mon, tue"]),
    ('bandwidth_schedule = [{from = "08:00", to = "09:00", bandwidth = 0, days = "mon"}]',
     "bandwidth_schedule[0].days", ["expected a list of days", 'string "mon"']),
    ('bandwidth_schedule = [{from = "08:00", to = "09:00", bandwidth = 0, days = ["mon", "Tue"]}]',
     "bandwidth_schedule[0].days[1]", ['"Tue" is not a day', 'did you mean "tue"?']),
    ('bandwidth_schedule = [{from = "08:00", to = "09:00", bandwidth = 0, days = ["sat", "sat"]}]',
     "bandwidth_schedule[0].days[1]", ['"sat" is listed twice']),
    ('bandwidth_schedule = [{from = "08:00", to = "09:00", bandwidth = 0}, {from = "x", to = "1", bandwidth = 0}]',
     "bandwidth_schedule[1].from", ['"x" is not a time of day']),
])
def test_every_mistake_is_named_by_its_key(where, line, key, fragments):
    if where == "volumes.v":
        text = volume('size = "1GiB"\n' + line)
    else:
        text = with_member_b(line + "\n")
    assert_error(text, f"{where}.{key}", *fragments)
