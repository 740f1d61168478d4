"""Control requests fuzzed: any JSON value, any bytes on a line, requests with
one defect (an unknown op, an unknown field, a field of the wrong type, a
missing field). The parser refuses each with a :class:`BadRequest` naming what
was wrong; a real control server (in process) answers each with ``{"ok":
false, "error": ...}`` and keeps serving.

(test_requests.py holds the hand-picked refusals; tests/integration/
test_control.py the same against a daemon process.)"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gmd.config import load_config
from gmd.daemon import NodeDaemon
from gmd.errors import ExitCode, exit_code_for
from gmd.requests import OPS, BadRequest, check_request, decode_line
from tools.cluster_config import NodeSpec, write_cluster_config

FUZZ = settings(max_examples=200, deadline=None)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
ops = st.sampled_from(sorted(OPS))


def _refused(value) -> str:
    with pytest.raises(BadRequest) as e:
        check_request(value)
    message = str(e.value)
    assert message and "\n" not in message
    assert exit_code_for(e.value) == ExitCode.USAGE
    return message


def _valid(op: str) -> dict:
    """A request of ``op`` with every required field given a good value."""
    req: dict = {"op": op}
    for name, spec in OPS[op].items():
        if spec.required:
            req[name] = spec.choices[0] if spec.choices else "appslv"
    return req


def _wrong_value(spec):
    """Values of ``spec``'s field that it refuses."""
    return json_values.filter(lambda v: not spec.accepts(v))


@FUZZ
@given(json_values)
def test_any_json_value_is_checked_or_refused_with_a_bad_request(value):
    try:
        checked = check_request(value)
    except BadRequest as e:
        event("refused")
        assert str(e) and "\n" not in str(e)
        return
    event("accepted")
    assert checked["op"] in OPS and set(checked) <= {"op", *OPS[checked["op"]]}


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode)
       | st.integers(1, 5000).map(lambda n: b"[" * n) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_line_decodes_or_is_refused_with_a_bad_request(line):
    try:
        value = decode_line(line)
    except BadRequest as e:
        assert str(e).startswith(("control request is not valid JSON", "empty control request"))
        return
    try:
        check_request(value)
    except BadRequest:
        pass


@FUZZ
@given(ops, st.data())
def test_one_defect_is_refused_naming_the_op_and_the_field(op, data):
    fields = OPS[op]
    defects = ["unknown op", "unknown field"]
    if fields:
        defects.append("wrong type")
    if any(spec.required for spec in fields.values()):
        defects.append("missing")
    defect = data.draw(st.sampled_from(defects))
    event(defect)
    req = _valid(op)
    if defect == "unknown op":
        bad = data.draw(st.text(min_size=1, max_size=10).filter(lambda s: s not in OPS) | json_values.filter(
            lambda v: not isinstance(v, str)))
        req["op"] = bad
        assert "unknown op" in _refused(req)
    elif defect == "unknown field":
        name = data.draw(st.text(min_size=1, max_size=10).filter(lambda s: s not in fields and s != "op"))
        req[name] = data.draw(json_values)
        assert f"{op}: unknown field {name!r}" in _refused(req)
    elif defect == "wrong type":
        name = data.draw(st.sampled_from(sorted(fields)))
        req[name] = data.draw(_wrong_value(fields[name]))
        message = _refused(req)
        assert message.startswith(f"{op}: field {name!r} must be {fields[name].expected}, got ")
    else:
        name = data.draw(st.sampled_from(sorted(n for n, spec in fields.items() if spec.required)))
        del req[name]
        assert f"{op}: missing field {name!r}" in _refused(req)


# ------------------------------------------------------- a real control server


@pytest.fixture
def node_config():
    """A one-node config whose control socket path is short enough for AF_UNIX."""
    d = Path(tempfile.mkdtemp(prefix="gmdctl", dir="/tmp"))
    try:
        path = write_cluster_config(d, [NodeSpec("labor1")])
        yield load_config(path)
    finally:
        shutil.rmtree(d)


async def _exchange(path: Path, line: bytes) -> dict:
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(line)
        await stream.send_eof()
        buf = b""
        while chunk := await stream.receive_some(65536):
            buf += chunk
    assert buf.endswith(b"\n") and buf.count(b"\n") == 1, buf
    return json.loads(buf)


bad_lines = st.one_of(
    st.binary(min_size=1, max_size=200).filter(lambda b: b"\n" not in b),
    json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
    st.builds(lambda op, k, v: json.dumps({"op": op, k: v}).encode(), ops,
              st.text(min_size=1, max_size=8).filter(lambda s: s != "op" and s != "volume"), json_values),
    st.builds(lambda op: json.dumps({"op": op}).encode(), st.text(max_size=8).filter(lambda s: s not in OPS)),
    st.integers(1000, 200_000).map(lambda n: b"[" * n),
    st.just(b"   "),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(bad_lines, min_size=1, max_size=8))
def test_a_real_control_server_refuses_each_bad_line_and_keeps_serving(node_config, lines):
    daemon = NodeDaemon(node_config, "labor1", mount=False)
    control = node_config.node("labor1").control

    async def main():
        async with trio.open_nursery() as n:
            await n.start(daemon._serve_control)
            for line in lines:
                reply = await _exchange(control, line + b"\n")
                if reply.get("ok"):  # a random line that is, after all, a good request
                    continue
                assert reply["exit_code"] == ExitCode.USAGE, reply
                assert isinstance(reply["error"], str) and reply["error"]
                assert "Traceback" not in reply["error"] and not reply["error"].startswith(
                    ("AttributeError", "TypeError", "KeyError", "RecursionError", "ValueError"))
                pong = await _exchange(control, b'{"op": "ping"}\n')
                assert pong["ok"] and pong["node"] == "labor1"
            n.cancel_scope.cancel()

    trio.run(main)
    assert not control.exists()  # the server removed its socket
