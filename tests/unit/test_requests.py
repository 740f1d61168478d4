"""The control request schema as pure logic: what is accepted, what is refused
and how the refusal reads."""

from __future__ import annotations

import inspect

import pytest

from gmd.daemon import NodeDaemon
from gmd.errors import ExitCode, exit_code_for
from gmd.requests import OPS, BadRequest, check_request, decode_line, op_of


def refusal(value) -> str:
    with pytest.raises(BadRequest) as e:
        check_request(value)
    assert exit_code_for(e.value) == ExitCode.USAGE
    assert "\n" not in str(e.value)
    return str(e.value)


def test_force_given_as_a_string_is_refused_naming_op_and_field():
    assert refusal({"op": "secondary", "volume": "appslv", "force": "no"}) == \
        "secondary: field 'force' must be true or false, got \"no\""


def test_defaults_are_filled_in_and_given_values_kept():
    assert check_request({"op": "secondary", "volume": "v"}) == {"op": "secondary", "volume": "v", "force": False}
    assert check_request({"op": "up", "volume": "v", "loop": True}) == {"op": "up", "volume": "v", "loop": True}
    assert check_request({"op": "status"}) == {"op": "status", "volume": None}
    assert check_request({"op": "resync", "volume": "v", "rate": 0})["rate"] == 0
    assert check_request({"op": "resolve", "volume": "v", "discard": "local"})["dry_run"] is False
    assert check_request({"op": "ping"}) == {"op": "ping"}


def test_expected_votes_absent_means_show_and_null_means_reset():
    assert "expected_votes" not in check_request({"op": "quorum", "volume": "v"})
    assert check_request({"op": "quorum", "volume": "v", "expected_votes": None})["expected_votes"] is None
    assert check_request({"op": "quorum", "volume": "v", "expected_votes": 3})["expected_votes"] == 3


@pytest.mark.parametrize("value, words", [
    # booleans must be JSON booleans
    ({"op": "up", "volume": "v", "loop": 1}, "up: field 'loop' must be true or false, got 1"),
    ({"op": "down", "volume": "v", "force": "true"}, "down: field 'force' must be true or false, got \"true\""),
    ({"op": "primary", "volume": "v", "force": None}, "primary: field 'force' must be true or false, got null"),
    ({"op": "resolve", "volume": "v", "discard": "local", "dry_run": []},
     "resolve: field 'dry_run' must be true or false, got []"),
    # integers must be integers, not booleans, floats or strings, and in range
    ({"op": "resync", "volume": "v", "rate": True}, "resync: field 'rate' must be an integer >= 0 or null, got true"),
    ({"op": "resync", "volume": "v", "rate": 1.5}, "resync: field 'rate' must be an integer >= 0 or null, got 1.5"),
    ({"op": "resync", "volume": "v", "rate": "50MiB"}, "got \"50MiB\""),
    ({"op": "resync", "volume": "v", "rate": -1}, "got -1"),
    ({"op": "resync", "volume": "v", "rate": 1 << 64}, "resync: field 'rate' must be an integer >= 0"),
    ({"op": "quorum", "volume": "v", "expected_votes": 0}, "quorum: field 'expected_votes' must be an integer >= 1"),
    ({"op": "quorum", "volume": "v", "expected_votes": False}, "got false"),
    # strings must be strings
    ({"op": "up", "volume": 7}, "up: field 'volume' must be a string, got 7"),
    ({"op": "status", "volume": ["a"]}, "status: field 'volume' must be a string or null, got [\"a\"]"),
    ({"op": "switchover", "volume": "v", "to": {"node": "b"}}, "switchover: field 'to' must be a string"),
    ({"op": "resolve", "volume": "v", "discard": "remote"}, "resolve: field 'discard' must be \"local\", got \"remote\""),
    # missing, unknown
    ({"op": "up"}, "up: missing field 'volume'"),
    ({"op": "switchover", "volume": "v"}, "switchover: missing field 'to'"),
    ({"op": "resolve", "volume": "v"}, "resolve: missing field 'discard'"),
    ({"op": "secondary", "volume": "v", "forse": True}, "secondary: unknown field 'forse'"),
    ({"op": "ping", "volume": "v"}, "ping: unknown field 'volume' (fields of ping: none)"),
    ({"op": "explode"}, "unknown op \"explode\""),
    ({"op": "stauts"}, "did you mean 'status'?"),
    ({"op": 3}, "unknown op 3"),
    ({"volume": "v"}, "control request has no field 'op'"),
    # not an object
    (["op", "status"], "must be a JSON object"),
    ("status", "must be a JSON object"),
    (None, "must be a JSON object, got null"),
])
def test_bad_requests_are_refused_with_a_clear_message(value, words):
    assert words in refusal(value)


def test_long_values_are_shortened_in_the_message():
    message = refusal({"op": "up", "volume": "v", "loop": "x" * 10_000})
    assert len(message) < 200 and message.endswith("...")


@pytest.mark.parametrize("line, words", [
    (b"", "empty control request"),
    (b"   \t", "empty control request"),
    (b"{\"op\": ", "not valid JSON"),
    (b"\xff\xfe\x00", "not valid JSON"),
    (b"[" * 100_000, "nested too deeply"),
    (b"1" * 5000, "not valid JSON"),  # more digits than int() converts
])
def test_lines_that_are_not_json_are_refused(line, words):
    with pytest.raises(BadRequest, match=words):
        decode_line(line)


def test_a_valid_line_decodes_to_its_value():
    assert decode_line(b'{"op": "status", "volume": "appslv"}') == {"op": "status", "volume": "appslv"}


def test_op_of_names_only_known_ops():
    assert op_of({"op": "up"}) == "up"
    assert op_of({"op": "explode"}) is None
    assert op_of([1]) is None


def test_every_op_has_a_branch_in_the_daemon():
    source = inspect.getsource(NodeDaemon.handle_control)
    missing = [op for op in OPS if f'op == "{op}"' not in source]
    assert not missing, f"ops without a branch in handle_control: {missing}"
