"""A real daemon refuses peer messages with a key it does not know or a value of the wrong type.

The peer here is authenticated (it knows the secret): what it says is typed
(transport.messages), and a misspelt key or a mistyped value closes the link
with the reason, never silently ignored (issue 13, item 2).
"""

from __future__ import annotations

import pytest
import trio

from transport.codec import Error, Intro, State
from transport.link import LinkClosed, LinkRefused, client_handshake, open_peer_stream

from .harness import NodeSpec, daemon_processes, init_in_sync, wait_for, write_config

SECRET = "test-secret"


@pytest.fixture
def member(tmp_path):
    """labor2 as a real daemon, volume up, its peer labor1 away (the test plays labor1)."""
    spec = NodeSpec("labor2")
    cfg = write_config(tmp_path, [NodeSpec("labor1"), spec], mode="mwc", secret=SECRET)
    init_in_sync(cfg, "labor1", ["labor2"])
    with daemon_processes(cfg, ["labor2"], tmp_path) as procs:
        procs["labor2"].request(op="up", volume="appslv")
        yield procs["labor2"], spec.address[0]


def labor1_intro(generation: str, **info_changes) -> Intro:
    info = {"role": "secondary", "disk": "uptodate",
            "generation": {"current": generation, "history": [], "bitmap_for": {}}}
    info.update(info_changes)
    return Intro(node="labor1", volume="appslv", size=64 << 20, region_size=64 << 10, extent_size=4 << 20,
                 session="typed-test", info=info)


async def connect(port: int, intro: Intro):
    stream = await open_peer_stream("127.0.0.1", port)
    return await client_handshake(stream, intro, SECRET, lambda theirs: None, label="test->labor2")


@pytest.mark.parametrize("fields, reason", [
    ({"rol": "primary"}, "STATE from labor1: Object contains unknown field `rol`"),
    ({"your_disk": 7}, "STATE from labor1: Expected `str | null`, got `int` - at `$.your_disk`"),
    ({"role": "boss"}, "STATE from labor1: Invalid enum value 'boss' - at `$.role`"),
], ids=["unknown-field", "wrong-type", "unknown-role"])
async def test_a_state_frame_with_an_unknown_field_or_a_wrong_type_closes_the_link_with_the_reason(
        member, fields, reason):
    proc, port = member
    generation = proc.status()["state_map"]["generation"]
    link = await connect(port, labor1_intro(generation))
    got_error = None
    async with trio.open_nursery() as n:
        link.start(n)
        await link.send(State(fields))  # at once: frames are judged as they come, bitmap exchange or not
        with trio.fail_after(10):
            try:
                while True:
                    ev = await link.receive()
                    if isinstance(ev, Error):
                        got_error = ev.reason
                        break
            except LinkClosed as e:
                got_error = str(e)
        n.cancel_scope.cancel()
    assert got_error is not None and reason in got_error, got_error
    await wait_for(lambda: reason in proc.log(), what="the reason in the daemon's log")
    assert "Traceback" not in proc.log()


async def test_an_intro_with_an_unknown_key_is_refused_with_the_reason(member):
    proc, port = member
    generation = proc.status()["state_map"]["generation"]
    with pytest.raises(LinkRefused, match=r"intro of labor1: Object contains unknown field `rol`"):
        await connect(port, labor1_intro(generation, rol="primary"))
    with pytest.raises(LinkRefused, match=r"intro of labor1: Expected `bool`, got `str` - at `\$.poke`"):
        await connect(port, labor1_intro(generation, poke="yes"))
