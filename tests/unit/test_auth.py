"""transport.auth: the HMAC challenge-response over the hello transcript.

The MACs are computed over real HELLO frame bytes from :class:`Connection`, so
"any change in either hello" means a change a peer or a man in the middle could
actually make on the wire.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.auth import LABEL, NONCE_BYTES, auth_mac, new_nonce, verify_mac
from transport.codec import Connection, Hello

SECRET = "change-me"


def hello_bytes(node: str, nonce: bytes | None = None, **kw) -> bytes:
    hello = Hello(node=node, nonce=new_nonce() if nonce is None else nonce, **kw)
    return Connection().send(hello)


CH = hello_bytes("labor1")
SH = hello_bytes("labor2")


def test_nonces_are_32_fresh_random_bytes():
    nonces = [new_nonce() for _ in range(64)]
    assert NONCE_BYTES == 32
    assert all(isinstance(n, bytes) and len(n) == 32 for n in nonces)
    assert len(set(nonces)) == len(nonces)
    assert len(set(b"".join(nonces))) > 200  # not a counter or a constant pattern


def test_mac_is_a_sha256_hmac_and_deterministic():
    mac = auth_mac(SECRET, "client", CH, SH)
    assert isinstance(mac, bytes) and len(mac) == 32
    assert auth_mac(SECRET, "client", CH, SH) == mac
    assert auth_mac(SECRET.encode(), "client", CH, SH) == mac  # str and bytes secrets agree
    key = hashlib.sha256(b"gmd-peer-secret-v1|" + SECRET.encode()).digest()
    expected = hmac.new(key, b"|".join(
        [LABEL, b"client", hashlib.sha256(CH).digest(), hashlib.sha256(SH).digest()]), hashlib.sha256).digest()
    assert mac == expected


def test_mac_differs_by_role():
    assert auth_mac(SECRET, "client", CH, SH) != auth_mac(SECRET, "server", CH, SH)


def test_mac_differs_by_secret():
    # The key is a hash of the secret, so even secrets HMAC's zero padding would
    # equate stay different.
    assert auth_mac("k", "client", CH, SH) != auth_mac("k\0", "client", CH, SH)
    macs = {auth_mac(s, "client", CH, SH) for s in (SECRET, "change-mE", "change-me ", "", b"\xff" * 100)}
    assert len(macs) == 5


def test_mac_differs_when_the_hellos_swap_places():
    assert auth_mac(SECRET, "client", CH, SH) != auth_mac(SECRET, "client", SH, CH)


@pytest.mark.parametrize("which", ["client", "server"])
@pytest.mark.parametrize("change", [
    pytest.param(lambda: hello_bytes("labor1", nonce=b"\0" * 32), id="nonce"),
    pytest.param(lambda: hello_bytes("labor3"), id="node"),
    pytest.param(lambda: hello_bytes("labor1", protocol_max=4), id="protocol"),
])
def test_mac_binds_every_field_of_either_hello(which, change):
    ch, sh = CH, SH
    if which == "client":
        ch = change()
    else:
        sh = change()
    assert (ch, sh) != (CH, SH)
    for role in ("client", "server"):
        assert auth_mac(SECRET, role, ch, sh) != auth_mac(SECRET, role, CH, SH)
        assert not verify_mac(SECRET, role, ch, sh, auth_mac(SECRET, role, CH, SH))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["client", "server"]), st.booleans(), st.data())
def test_any_byte_change_in_either_hello_changes_the_mac(role, in_client, data):
    target = CH if in_client else SH
    pos = data.draw(st.integers(0, len(target) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="xor mask")
    changed = bytearray(target)
    changed[pos] ^= mask
    ch, sh = (bytes(changed), SH) if in_client else (CH, bytes(changed))
    assert auth_mac(SECRET, role, ch, sh) != auth_mac(SECRET, role, CH, SH)
    # truncation and extension too
    cut = data.draw(st.integers(0, len(target) - 1), label="cut")
    ch2, sh2 = (CH[:cut], SH) if in_client else (CH, SH[:cut])
    assert auth_mac(SECRET, role, ch2, sh2) != auth_mac(SECRET, role, CH, SH)
    ch3, sh3 = (CH + b"\0", SH) if in_client else (CH, SH + b"\0")
    assert auth_mac(SECRET, role, ch3, sh3) != auth_mac(SECRET, role, CH, SH)


@pytest.mark.parametrize("role", ["client", "server"])
def test_verify_accepts_the_right_mac(role):
    assert verify_mac(SECRET, role, CH, SH, auth_mac(SECRET, role, CH, SH)) is True
    assert verify_mac(SECRET.encode(), role, CH, SH, auth_mac(SECRET, role, CH, SH)) is True


@pytest.mark.parametrize("role", ["client", "server"])
def test_verify_refuses_wrong_macs(role):
    right = auth_mac(SECRET, role, CH, SH)
    other = "server" if role == "client" else "client"
    for bad in (
        bytes([right[0] ^ 1]) + right[1:],  # one bit off
        right[:-1],  # truncated
        right + b"\0",  # extended
        b"",
        b"\0" * 32,
        auth_mac(SECRET, other, CH, SH),  # reflected from the other role
        auth_mac("another-secret", role, CH, SH),  # a different secret
        auth_mac(SECRET, role, SH, CH),  # the hellos swapped
    ):
        assert verify_mac(SECRET, role, CH, SH, bad) is False, bad


def test_a_recorded_exchange_does_not_replay_with_a_fresh_nonce():
    old_server_mac = auth_mac(SECRET, "server", CH, SH)
    fresh_ch = hello_bytes("labor1")  # same identity, new nonce
    assert not verify_mac(SECRET, "server", fresh_ch, SH, old_server_mac)


@pytest.mark.parametrize("role", ["Client", "SERVER", "", "peer", "client ", None, b"client"])
def test_bad_role_raises_value_error(role):
    with pytest.raises(ValueError, match="role must be client or server"):
        auth_mac(SECRET, role, CH, SH)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="role must be client or server"):
        verify_mac(SECRET, role, CH, SH, b"\0" * 32)  # type: ignore[arg-type]
