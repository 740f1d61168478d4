"""A witness state file damaged every way hypothesis finds: cut short, bytes
flipped, fields of the wrong type, unknown formats, records with bad fields,
JSON nested too deeply, bytes that are not text. Loading it either gives the
records it holds or stops the witness with one error naming the file; it never
starts empty on a damaged file and never fails with a traceback.

(test_witness_daemon.py and test_witness_book.py hold the hand-picked cases.)"""

from __future__ import annotations

import json

import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gmd.config import load_config
from gmd.errors import GmdError
from gmd.witness import WitnessDaemon
from quorum.witness import STATE_FORMAT, VolumeRecord
from tools.cluster_config import NodeSpec, witness_table, write_cluster_config

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

GOOD = {"format": STATE_FORMAT, "records": [
    {"volume": "v", "identity": "9f8e7d6c" * 4, "generation": "a1" * 8, "parent": "b2" * 8,
     "outdated": ["b"], "primary": "a"},
    {"volume": "v", "identity": None, "generation": "c3" * 8, "parent": "", "outdated": [], "primary": None},
]}
GOOD_BYTES = json.dumps(GOOD, indent=1).encode()


@pytest.fixture(scope="module")
def witness(tmp_path_factory):
    """One witness daemon (its state file absent at start); each example
    writes the file and calls the function that loads it."""
    tmp = tmp_path_factory.mktemp("fuzz_witness")
    path = write_cluster_config(tmp, [NodeSpec("a", address=[9001]), NodeSpec("b", address=[9002])],
                                volume="v", size="1GiB", tables=witness_table("w", 9009, state="w.json"))

    async def make():
        return WitnessDaemon(load_config(path), "w")

    w = trio.run(make)
    yield w
    w.close()
    w.state_path.unlink(missing_ok=True)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=15,
)
record_keys = st.sampled_from(["volume", "identity", "generation", "parent", "outdated", "primary"])


@st.composite
def damaged_files(draw) -> bytes:
    kind = draw(st.sampled_from(["cut", "flip", "field", "record", "drop", "format", "value", "deep", "bytes"]))
    event(kind)
    if kind == "cut":
        return GOOD_BYTES[:draw(st.integers(0, len(GOOD_BYTES) - 1))]
    if kind == "flip":
        buf = bytearray(GOOD_BYTES)
        at = draw(st.integers(0, len(buf) - 1))
        buf[at] ^= draw(st.integers(1, 255))
        return bytes(buf)
    raw = json.loads(GOOD_BYTES)
    if kind == "field":  # a record's field of another type or value
        rec = raw["records"][draw(st.integers(0, 1))]
        rec[draw(record_keys)] = draw(json_values)
    elif kind == "record":  # a record that is not one
        raw["records"][draw(st.integers(0, 1))] = draw(json_values)
    elif kind == "drop":
        del raw[draw(st.sampled_from(["format", "records"]))]
    elif kind == "format":
        raw["format"] = draw(json_values.filter(lambda v: v not in (1, 2) or isinstance(v, bool)))
    elif kind == "value":  # any JSON at all
        raw = draw(json_values)
    elif kind == "deep":
        return draw(st.sampled_from([b"[", b'{"a":'])) * draw(st.integers(1000, 200_000))
    else:
        return draw(st.binary(max_size=200))
    return json.dumps(raw).encode()


def _holds_records(content: bytes) -> bool:
    """Whether ``content`` is, after all, a state file an empty witness may start from."""
    try:
        raw = json.loads(content)
    except (ValueError, RecursionError):
        return False
    return isinstance(raw, dict) and type(raw.get("format")) is int and (
        raw["format"] == 1 and isinstance(raw.get("volumes"), dict)
        or raw["format"] == STATE_FORMAT and raw.get("records") == [])


@FUZZ
@given(damaged_files())
def test_a_damaged_state_file_stops_the_witness_with_one_error_naming_it(witness, content):
    witness.state_path.write_bytes(content)
    try:
        records = witness._load()
    except GmdError as e:
        message = str(e)
        assert message.startswith(f"witness w: state file {witness.state_path} is damaged (")
        assert "\n" not in message and "Traceback" not in message
        return
    # Loaded: the damage left a valid state file (a changed generation, say).
    assert all(isinstance(r, VolumeRecord) for r in records.values())
    if not records:
        assert _holds_records(content), "a damaged state file was read as holding nothing"


def test_the_undamaged_file_loads_both_records(witness):
    witness.state_path.write_bytes(GOOD_BYTES)
    records = witness._load()
    assert set(records) == {("v", "9f8e7d6c" * 4), ("v", None)}
    assert records[("v", "9f8e7d6c" * 4)].outdated == {"b"}


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_json_nested_too_deeply_is_damage_not_a_traceback(witness, opener):
    witness.state_path.write_bytes(opener * 100_000)
    with pytest.raises(GmdError, match=r"is damaged \(.*nested too deeply"):
        witness._load()
