"""Two sites without a witness (``on_quorum_loss = "continue"``): where the
config allows it, and what status says of it. The daemon side is in
tests/integration/test_two_sites.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from gmd.config import ConfigError, parse_config


def two_sites(volume: str = 'on_quorum_loss = "continue"\n', *, members: str = "a b", witness: str = "",
              votes_b: int = 1) -> str:
    nodes = "".join(f'[nodes.{n}]\naddress = "127.0.0.1:{9001 + i}"\n' for i, n in enumerate("abc"))
    tables = "".join(f'[volumes.v.members.{n}]\ndevice = "d{n}"\nstatemap = "s{n}"\n'
                     + (f"votes = {votes_b}\n" if n == "b" else "") for n in members.split())
    return f'secret = "s"\n{nodes}{witness}[volumes.v]\nsize = "1GiB"\n{volume}{tables}'


def parse(text: str):
    return parse_config(text, file="t.toml", base_dir=Path("/etc/gmd"))


def refusal(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert info.value.key == "volumes.v.on_quorum_loss"
    assert '"continue" is for two sites without a witness' in info.value.message
    return info.value


def test_two_voting_members_without_a_witness_may_continue():
    assert parse(two_sites()).volume("v").on_quorum_loss == "continue"
    # A witness without votes changes no count: it is allowed.
    text = two_sites(witness='[witnesses.w]\naddress = "127.0.0.1:9009"\nvotes = 0\n')
    assert parse(text).volume("v").on_quorum_loss == "continue"


@pytest.mark.parametrize("text, why", [
    (two_sites(members="a b c"), "this volume has 3 member(s)"),
    (two_sites(members="a"), "this volume has 1 member(s)"),
    (two_sites(votes_b=0), "member b has no vote"),
    (two_sites(witness='[witnesses.w]\naddress = "127.0.0.1:9009"\n'), "witness w holds votes"),
    (two_sites('on_quorum_loss = "continue"\nauto_promote = true\n'), "auto_promote = true is set"),
])
def test_continue_is_refused_where_a_survivor_could_take_over_or_a_majority_survives(text, why):
    assert why in refusal(text).message


def test_the_unknown_policy_message_lists_continue():
    with pytest.raises(ConfigError) as info:
        parse(two_sites('on_quorum_loss = "contineu"\n'))
    assert '"contineu" is not a policy' in info.value.message and '"continue"' in info.value.message


def test_the_default_stays_suspend_and_auto_promote_is_free_with_it():
    v = parse(two_sites('auto_promote = true\n')).volume("v")
    assert (v.on_quorum_loss, v.auto_promote) == ("suspend", True)


def test_status_text_names_the_policy_and_a_primary_writing_alone():
    from gmd.configvalues import QUORUM_LOSS_NOTES
    from tools.status_text import format_status

    st = {"volume": "appslv", "node": "labor1", "role": "primary", "mode": "sync", "size": 64 << 20,
          "daemon": True, "device": None,
          "state_map": {"path": "/s.sm", "clean": False, "generation": "g", "updated": 0.0, "warnings": []},
          "quorum": {"votes": 1, "needed": 2, "expected": 2, "ok": False, "witnesses": {}, "policy": "continue",
                     "policy_note": QUORUM_LOSS_NOTES["continue"], "writing_alone": True},
          "members": {}}
    text = format_status(st)
    assert "NO QUORUM; writing on ALONE (on_quorum_loss = continue)" in text
    assert ("on quorum loss (continue): two sites without witness: the primary writes on alone when its peer is "
            "lost") in text and "forcing it while the primary lives makes a split-brain" in text
    st["quorum"].update(policy="suspend", policy_note=QUORUM_LOSS_NOTES["suspend"], writing_alone=False)
    text = format_status(st)
    assert "ALONE" not in text and "on quorum loss (suspend): without quorum the primary's writes wait" in text
