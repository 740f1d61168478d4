"""Typed peer messages: every field declared, unknown keys and wrong types refused by name."""

from __future__ import annotations

import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statemap.states import DiskState, Role
from transport.codec import RemoteProtocolError
from transport.messages import (
    DiskName,
    GenerationInfo,
    IntroInfo,
    MarkedSummary,
    PeerState,
    RoleName,
    WitnessReply,
    WitnessRequest,
    decode,
)


def test_the_names_match_the_state_maps_enums():
    assert set(typing.get_args(RoleName)) == {r.value for r in Role}
    assert set(typing.get_args(DiskName)) == {d.value for d in DiskState}


@pytest.mark.parametrize("message", [
    IntroInfo(role="primary", disk="uptodate", generation=GenerationInfo("g2", ("g1",), {"labor2": "g2"}),
              marked={"labor2": MarkedSummary(3, [(0, 2), (7, 1)])}, discard_local=None, promoted_at=1.5e9,
              identity="ab" * 16, awaiting_full_copy=True),
    IntroInfo(witness=True),
    IntroInfo(poke=True, refused="volume appslv is down on labor2"),
    PeerState(role="secondary"),
    PeerState(your_disk="outdated", generation="g3", identity="cd" * 16),
    PeerState(take_over=True),
    PeerState(take_over_failed="no quorum"),
    WitnessRequest(7, "promote", "appslv", identity="ef" * 16, current="g2", history=("g1",), outdated=("labor2",)),
    WitnessReply(7, True, "lease for 6 s", votes=1, notes=("witness also holds ...",)),
], ids=lambda m: type(m).__name__)
def test_messages_round_trip_through_their_json_fields(message):
    import json

    fields = json.loads(json.dumps(message.to_fields()))  # as the codec carries them
    assert decode(type(message), fields, "test") == message


@pytest.mark.parametrize("kind, fields, message", [
    (PeerState, {"rol": "primary"}, r"state: Object contains unknown field `rol`"),
    (PeerState, {"role": "boss"}, r"state: Invalid enum value 'boss' - at `\$.role`"),
    (PeerState, {"your_disk": 5}, r"state: Expected `str \| null`, got `int` - at `\$.your_disk`"),
    (PeerState, {"take_over": "yes"}, r"state: Expected `bool`, got `str` - at `\$.take_over`"),
    (PeerState, [1], r"state: Expected `object`, got `array`"),
    (IntroInfo, {"generation": {"current": "g", "history": "g0"}},
     r"intro: Expected `array`, got `str` - at `\$.generation.history`"),
    (IntroInfo, {"marked": {"labor2": {"count": "3"}}}, r"Expected `int`, got `str` - at `\$.marked\[...\].count`"),
    (IntroInfo, {"promoted_at": True}, r"at `\$.promoted_at`"),
    (WitnessRequest, {"id": 1, "op": "steal", "volume": "v"}, r"Invalid enum value 'steal' - at `\$.op`"),
    (WitnessReply, {"id": 1, "granted": 1, "reason": "x"}, r"Expected `bool`, got `int` - at `\$.granted`"),
])
def test_an_unknown_key_or_a_wrong_type_is_a_protocol_error_naming_it(kind, fields, message):
    what = "intro" if kind is IntroInfo else "state"
    with pytest.raises(RemoteProtocolError, match=message):
        decode(kind, fields, what)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                      max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["role", "your_disk", "disk", "generation", "identity", "take_over",
                                        "take_over_failed", "other"]), json_values, max_size=4))
def test_any_json_object_decodes_or_is_refused_cleanly(fields):
    for kind in (PeerState, IntroInfo):
        try:
            decode(kind, fields, "state")
        except RemoteProtocolError:
            pass
