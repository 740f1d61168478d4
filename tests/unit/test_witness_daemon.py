"""The witness daemon's handling of bad input: its state file and requests."""

import json

import pytest

from gmd.config import parse_config
from gmd.errors import GmdError
from gmd.witness import WitnessDaemon

CONFIG = ('secret = "s"\n[nodes.a]\naddress = "127.0.0.1:9001"\n[nodes.b]\naddress = "127.0.0.1:9002"\n'
          '[witnesses.w]\naddress = "127.0.0.1:9009"\nstate = "w.json"\n'
          '[volumes.v]\nsize = "1GiB"\n[volumes.v.members.a]\ndevice = "d"\nstatemap = "s"\n'
          '[volumes.v.members.b]\ndevice = "d"\nstatemap = "s"\n')


def config(tmp_path):
    return parse_config(CONFIG, file=str(tmp_path / "gmd.toml"), base_dir=tmp_path)


async def test_a_damaged_state_file_stops_the_witness_with_the_reason(tmp_path):
    (tmp_path / "w.json").write_text('{"format": 1, "volumes": {"v": {"generation": 7}}}')
    with pytest.raises(GmdError, match=r"w.json is damaged .*bad generation.*move it aside only"):
        WitnessDaemon(config(tmp_path), "w")


async def test_bad_requests_are_answered_as_such_and_change_nothing(tmp_path):
    w = WitnessDaemon(config(tmp_path), "w")
    for node, req in (
        ("a", {"id": 1, "op": "renew", "volume": "nope", "current": "g"}),
        ("c", {"id": 2, "op": "renew", "volume": "v", "current": "g"}),
        ("a", {"id": 3, "op": "renew", "volume": "v", "current": 5}),
        ("a", {"id": 4, "op": "steal", "volume": "v", "current": "g"}),
        ("a", {"id": 5, "op": "promote", "volume": "v", "current": "g", "outdated": [1]}),
    ):
        reply = w._answer(node, req)
        assert reply["id"] == req["id"] and reply["granted"] is False and "bad request" in reply["reason"]
    assert not (tmp_path / "w.json").exists() and not w.book.leases


async def test_a_grant_that_changes_the_registration_is_written_first(tmp_path):
    w = WitnessDaemon(config(tmp_path), "w")
    w.book.quiet_until = 0  # as if the restart wait were over
    reply = w._answer("a", {"id": 1, "op": "renew", "volume": "v", "current": "g2", "history": ["g1"],
                            "outdated": ["b"]})
    assert reply["granted"] and reply["votes"] == 1
    saved = json.loads((tmp_path / "w.json").read_text())["volumes"]["v"]
    assert (saved["generation"], saved["parent"], saved["outdated"], saved["primary"]) == ("g2", "g1", ["b"], "a")
    assert oct((tmp_path / "w.json").stat().st_mode & 0o777) == "0o600"
