"""The recovery-point figures and the RPO alert (gmd/rpo.py): pure parts."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gmd.config import ConfigError, parse_config
from gmd.rpo import RpoAlert, member_rpo

from .test_config import volume


def rpo(queued=0, age=0.0, oos=0, marked_for=None, before_start=False):
    return member_rpo(queued_bytes=queued, oldest_unacked_age=age, out_of_sync_bytes=oos,
                      marked_for=marked_for, marked_before_start=before_start)


def test_a_member_lacking_nothing_has_rpo_zero():
    r = rpo()
    assert (r.bytes, r.seconds, r.lower_bound) == (0, 0.0, False)


def test_queued_and_marked_bytes_add_up_and_the_oldest_age_counts():
    r = rpo(queued=4096, age=0.5, oos=65536, marked_for=12.0)
    assert r.bytes == 4096 + 65536
    assert r.seconds == 12.0
    assert (r.queued_bytes, r.out_of_sync_bytes, r.oldest_unacked_seconds) == (4096, 65536, 0.5)


def test_marks_from_before_the_daemon_started_are_a_lower_bound():
    r = rpo(oos=65536, marked_for=3.0, before_start=True)
    assert r.seconds == 3.0 and r.lower_bound
    assert r.to_json(alert=False)["seconds_lower_bound"] is True


def test_the_mark_time_does_not_count_without_marks():
    assert rpo(queued=10, age=0.2, marked_for=100.0).seconds == 0.2


@given(queued=st.integers(0, 1 << 40), age=st.floats(0, 1e6), oos=st.integers(0, 1 << 40),
       marked=st.one_of(st.none(), st.floats(0, 1e6)))
def test_rpo_is_never_less_than_either_part(queued, age, oos, marked):
    r = rpo(queued, age, oos, marked)
    assert r.bytes >= queued and r.bytes >= oos
    assert r.seconds >= age
    if oos and marked is not None:
        assert r.seconds >= marked


def test_the_alert_is_reported_once_each_way():
    alert = RpoAlert(seconds=30, limit_bytes=None)
    assert alert.judge("far", rpo(oos=1, marked_for=10.0), 1.0) is None
    state, why = alert.judge("far", rpo(oos=1, marked_for=31.0), 2.0)
    assert state == "over" and "31.0 s of writes > 30 s" in why[0]
    assert alert.judge("far", rpo(oos=1, marked_for=40.0), 3.0) is None  # still over: said already
    assert alert.to_json()["members_over"] == {"far": 2.0}
    assert alert.judge("far", rpo(), 4.0) == ("within", [])
    assert alert.to_json()["members_over"] == {}


def test_the_alert_on_bytes():
    alert = RpoAlert(seconds=None, limit_bytes=1 << 20)
    assert alert.judge("far", rpo(queued=1 << 20), 0.0) is None
    state, why = alert.judge("far", rpo(queued=(1 << 20) + 1), 0.0)
    assert state == "over" and "bytes >" in why[0]


def test_no_threshold_no_alert():
    alert = RpoAlert(None, None)
    assert not alert.enabled
    assert alert.judge("far", rpo(queued=1 << 40, age=1e6), 0.0) is None


def parse(text):
    return parse_config(text, file="test.toml", base_dir=Path("/etc/gmd"))


def test_rpo_alert_keys_are_read():
    v = parse(volume('size = "1GiB"\nrpo_alert_seconds = 60\nrpo_alert_bytes = "1GiB"')).volumes["v"]
    assert (v.rpo_alert_seconds, v.rpo_alert_bytes) == (60, 1 << 30)
    v = parse(volume('size = "1GiB"')).volumes["v"]
    assert (v.rpo_alert_seconds, v.rpo_alert_bytes) == (None, None)


@pytest.mark.parametrize("body, key", [
    ("rpo_alert_seconds = 0", "volumes.v.rpo_alert_seconds"),
    ('rpo_alert_seconds = "soon"', "volumes.v.rpo_alert_seconds"),
    ('rpo_alert_bytes = "lots"', "volumes.v.rpo_alert_bytes"),
    ("rpo_alert_bytes = 0", "volumes.v.rpo_alert_bytes"),
])
def test_bad_rpo_alert_keys_are_named(body, key):
    with pytest.raises(ConfigError) as info:
        parse(volume('size = "1GiB"\n' + body))
    assert info.value.key == key, str(info.value)
