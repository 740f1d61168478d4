"""The handshake under bad input, at both levels.

* Over in-memory streams (virtual time): a fake peer runs the handshake but
  damages one of its frames (a flipped byte, a frame cut short, garbage, a
  valid frame of the wrong type, a length beyond the bound) or stalls. The
  real end always fails with :class:`LinkRefused` naming why, within the
  handshake deadline, and never judges an intro (nor reveals its own) for a
  peer that did not prove the secret.
* Pure: a peer's intro ``info`` of any shape is judged by
  :meth:`gmd.handshake.Handshake.check_peer_hello` as a refusal reason or
  None, never an exception.

(test_link.py and test_codec.py hold the hand-picked cases and the codec's own
fuzzing; this adds the handshake as a whole.)"""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gmd.handshake import Handshake
from gmd.replication import MemberLink
from statemap import Role
from statemap.statemap import StateMap
from transport.auth import auth_mac, new_nonce
from transport.codec import (
    CLOSED,
    NEED_DATA,
    PREAUTH_MAX_PAYLOAD,
    Auth,
    Connection,
    Error,
    FrameType,
    Hello,
    Intro,
    Ping,
    ProtocolError,
    State,
    WriteAck,
    _encode,
    frame_bytes,
)
from transport.link import HANDSHAKE_TIMEOUT, LinkRefused, client_handshake, server_handshake
from transport.messages import IntroInfo

SECRET = "s"
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def intro(node: str, **kw) -> Intro:
    args = dict(node=node, volume="appslv", size=1 << 30, region_size=65536, extent_size=4 << 20,
                session="s1", info={"role": "secondary", "generation": {"current": "g1"}})
    args.update(kw)
    return Intro(**args)


# ------------------------------------------------- over streams, a damaging peer

STEPS = ["hello", "auth", "intro"]
damage = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10_000)),  # then close
    st.tuples(st.just("stall"), st.integers(0, 10_000)),  # part of the frame, then silence
    st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=300)),
    st.tuples(st.just("wrong"), st.sampled_from([
        Ping(1), WriteAck(1), State({"role": "primary"}), Error("no"), Hello("labor9", b"\x00" * 32),
        Auth(b"\x01" * 32), "intro",
    ])),
    st.tuples(st.just("oversize"), st.integers(PREAUTH_MAX_PAYLOAD + 1, 2**32 - 1),
              st.sampled_from(list(FrameType))),
)


def _damaged(frame: bytes, how: tuple) -> tuple[bytes, bool]:
    """The bytes sent instead of ``frame``, and whether to close after them."""
    kind = how[0]
    if kind == "flip":
        buf = bytearray(frame)
        buf[how[1] % len(buf)] ^= how[2]
        return bytes(buf), False
    if kind in ("cut", "stall"):
        return frame[:how[1] % len(frame)], kind == "cut"
    if kind == "garbage":
        return how[1], False
    if kind == "wrong":
        # Another node's intro: well formed, but not the node that authenticated.
        ev = intro("labor9") if how[1] == "intro" else how[1]
        return frame_bytes(*_encode(ev)), False
    length, ftype = how[1], how[2]
    return struct.pack("<2sBBIQ", b"GM", ftype, 0, length, 0), False


async def _fake_peer(stream, role: str, me: str, step: str, how: tuple) -> None:
    """Run the handshake as ``role``, damaging the frame of ``step``; then
    close (or, for ``stall``, keep silent)."""
    conn = Connection()

    async def send(frame: bytes, this: str) -> bool:
        if this != step:
            await stream.send_all(frame)
            return True
        bad, close = _damaged(frame, how)
        await stream.send_all(bad)
        if close:
            await stream.send_eof()
        return False

    async def receive():
        while True:
            ev = conn.next_event()
            if ev is CLOSED:
                raise EOFError
            if ev is not NEED_DATA:
                return ev
            conn.receive_data(await stream.receive_some(65536))

    try:
        if role == "server":
            await receive()
            theirs = conn.last_frame
        mine = conn.send(Hello(node=me, nonce=new_nonce()))
        if not await send(mine, "hello"):
            return
        if role == "client":
            await receive()
            theirs = conn.last_frame
            client_hello, server_hello = mine, theirs
        else:
            client_hello, server_hello = theirs, mine
            await receive()  # the client's AUTH
        if not await send(conn.send(Auth(auth_mac(SECRET, role, client_hello, server_hello))), "auth"):
            return
        await receive()  # the server's AUTH, or the client's INTRO
        await send(conn.send(intro(me)), "intro")
        while await stream.receive_some(65536):  # read what the real end answers, until it closes
            pass
    except (ProtocolError, EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _run_against_fake(real: str, step: str, how: tuple) -> tuple[object, list[Intro]]:
    """The real end's result (a link or LinkRefused) against a fake peer that
    damages ``step``, in virtual time; and the intros the real end judged."""
    judged: list[Intro] = []

    def judge(theirs: Intro):
        judged.append(theirs)
        return intro("labor2") if real == "server" else None

    async def main():
        a, b = trio.testing.memory_stream_pair()
        result = {}

        async def run_real():
            try:
                if real == "server":
                    result["real"] = await server_handshake(b, "labor2", SECRET, judge, label="real")
                else:
                    result["real"] = await client_handshake(b, intro("labor2"), SECRET, judge, label="real")
            except LinkRefused as e:
                result["real"] = e
            done.set()

        done = trio.Event()
        start = trio.current_time()
        async with trio.open_nursery() as n:
            n.start_soon(run_real)
            n.start_soon(_fake_peer, a, "client" if real == "server" else "server", "labor1", step, how)
            with trio.move_on_after(HANDSHAKE_TIMEOUT + 1):
                await done.wait()
            n.cancel_scope.cancel()  # the fake peer, whatever it waits for
        assert "real" in result and trio.current_time() - start <= HANDSHAKE_TIMEOUT + 0.1, \
            "the handshake outlived its deadline"
        return result["real"]

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)), judged


@pytest.mark.parametrize("real", ["client", "server"])
def test_the_fake_peer_undamaged_completes_the_handshake(real):
    """The fake peer is a faithful one when it damages nothing."""
    out, judged = _run_against_fake(real, "none", ("flip", 0, 1))
    assert not isinstance(out, LinkRefused), out
    assert [i.node for i in judged] == ["labor1"]


@FUZZ
@given(st.sampled_from(["client", "server"]), st.sampled_from(STEPS), damage)
def test_a_peer_that_damages_any_handshake_frame_is_refused_in_time(real, step, how):
    event(f"{how[0]} {step}")
    out, judged = _run_against_fake(real, step, how)
    assert isinstance(out, LinkRefused), f"damage accepted: {out!r}"
    assert str(out)
    # A peer without a proof of the secret, or with a damaged intro, is never judged.
    assert judged == []


# ------------------------------------------------------- pure: the intro verdict

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
names = st.sampled_from(["labor1", "labor2", "labor3", ""])
generations = st.sampled_from(["g1", "g2", "0" * 16, ""])
# Values of the declared types (so the verdict itself is reached), and of any type.
info_values = {
    "role": st.sampled_from(["primary", "secondary"]) | st.none(),
    "disk": st.sampled_from(["uptodate", "outdated", "inconsistent"]) | st.none(),
    "generation": st.none() | st.fixed_dictionaries(
        {"current": generations},
        optional={"history": st.lists(generations, max_size=3).map(tuple),
                  "bitmap_for": st.dictionaries(names, generations, max_size=2)}),
    "marked": st.dictionaries(names, st.fixed_dictionaries(
        {"count": st.integers()}, optional={"runs": st.none() | st.lists(st.tuples(st.integers(), st.integers()),
                                                                           max_size=2)}), max_size=2),
    "discard_local": names | st.none(),
    "promoted_at": st.none() | st.floats(allow_nan=False),
    "identity": st.sampled_from(["ours", "theirs", ""]) | st.none(),
    "awaiting_full_copy": st.booleans(),
    "poke": st.booleans(),
    "witness": st.booleans(),
    "refused": st.none() | st.text(max_size=8),
}
infos = st.one_of(
    st.fixed_dictionaries({}, optional=info_values),
    st.dictionaries(st.sampled_from(sorted(info_values)) | st.text(max_size=6), json_values, max_size=4),
)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """What Handshake needs of its engine, around a real state map."""
    path = tmp_path_factory.mktemp("fuzz_handshake") / "appslv.sm"
    sm = StateMap.create(path, volume="appslv", size=1 << 30, region_size=65536, extent_size=4 << 20,
                         member="labor1", peers=["labor2", "labor3"])
    sm.begin_use()
    sm.make_copy_source()
    local = SimpleNamespace(statemap=sm)
    v = SimpleNamespace(
        config=SimpleNamespace(size=1 << 30, region_size=65536, extent_size=4 << 20, split_brain="disconnect"),
        going_down=False, local=local, name="appslv", node="labor1", require_up=lambda: local,
        resolver=SimpleNamespace(discarding=None), role=Role.SECONDARY,
        frames=SimpleNamespace(resume_points=dict),
        members={m: MemberLink(m, "sync", queue_limit=1, volume="appslv") for m in ("labor2", "labor3")},
    )
    yield v
    sm.close()


@FUZZ
@given(infos, st.sampled_from(["disconnect", "discard-secondary", "discard-younger-primary",
                               "discard-least-changes"]),
       st.sampled_from([Role.PRIMARY, Role.SECONDARY]), st.sampled_from(["labor2", "labor9"]))
def test_any_intro_info_is_judged_as_a_reason_or_accepted_never_an_exception(volume, info, policy, role, node):
    sm = volume.local.statemap
    if info.get("identity") == "ours":
        info = {**info, "identity": sm.identity}
    volume.config.split_brain, volume.role, volume.resolver.discarding = policy, role, None
    known = set(IntroInfo.__struct_fields__)
    event("declared keys" if set(info) <= known else "undeclared keys")
    verdict = Handshake(volume).check_peer_hello(intro(node, info=info))
    assert verdict is None or (isinstance(verdict, str) and verdict)
    event("accepted" if verdict is None else "refused")
    if not set(info) <= known:
        assert verdict is not None  # an undeclared key is never half understood


@pytest.mark.parametrize("info", [{"generation": None}, {"generation": None, "role": "primary"}])
def test_an_intro_without_a_generation_is_judged_not_a_traceback(volume, info):
    volume.config.split_brain, volume.role, volume.resolver.discarding = "disconnect", Role.SECONDARY, None
    verdict = Handshake(volume).check_peer_hello(intro("labor2", info=info))
    assert verdict is None or isinstance(verdict, str)
