"""Split-brain planning and policies (pure logic)."""

import pytest
from bitarray import bitarray

from gmd.splitbrain import bits_from_runs, marked_summary, plan, policy_loser, runs_of

RS = 65536


def bits(n, *set_):
    b = bitarray(n, endian="little")
    b.setall(0)
    for i in set_:
        b[i] = 1
    return b


def test_runs_round_trip():
    b = bits(100, 1, 2, 3, 50, 99)
    assert runs_of(b) == [[1, 3], [50, 1], [99, 1]]
    assert bits_from_runs(runs_of(b), 100) == b
    with pytest.raises(ValueError):
        bits_from_runs([[99, 2]], 100)


def test_plan_counts_the_union_and_picks_a_bitmap_copy_from_a_common_base():
    gens_a = {"current": "a2", "history": ["g1"], "bitmap_for": {"b": "g1"}}
    gens_b = {"current": "b2", "history": ["g1"], "bitmap_for": {"a": "g1"}}
    p, union = plan("v", "a", "b", local_gens=gens_a, peer_gens=gens_b, local_bits=bits(100, 3, 4),
                    peer_marked=marked_summary(bits(100, 4, 5, 90)), region_size=RS, size=100 * RS, rule="r")
    assert p.common == "g1" and p.bitmap_copy
    assert (p.local_changed, p.peer_changed, p.move_bytes) == (2 * RS, 3 * RS, 4 * RS)
    assert runs_of(union) == [[3, 3], [90, 1]]


def test_plan_without_a_common_bitmap_base_is_a_full_copy():
    gens_a = {"current": "a2", "history": ["g1"], "bitmap_for": {"b": "g0"}}
    gens_b = {"current": "b2", "history": ["g1"], "bitmap_for": {"a": "g1"}}
    p, _ = plan("v", "a", "b", local_gens=gens_a, peer_gens=gens_b, local_bits=bits(10, 1), peer_marked=None,
                region_size=RS, size=10 * RS, rule="r")
    assert not p.bitmap_copy and p.move_bytes == 10 * RS and p.peer_changed is None


def info(role="secondary", promoted_at=None, marked_for=None, count=0):
    return {"role": role, "promoted_at": promoted_at, "marked": {marked_for: {"count": count}} if marked_for else {}}


@pytest.mark.parametrize("policy,a,b,loser", [
    ("disconnect", info("primary"), info(), None),
    ("discard-secondary", info("primary"), info(), "b"),
    ("discard-secondary", info(), info(), None),
    ("discard-younger-primary", info(promoted_at=10.0), info(promoted_at=20.0), "b"),
    ("discard-younger-primary", info(promoted_at=10.0), info(), None),
    ("discard-least-changes", info(marked_for="b", count=5), info(marked_for="a", count=2), "b"),
    ("discard-least-changes", info(marked_for="b", count=2), info(marked_for="a", count=2), None),
])
def test_policies_decide_the_same_on_both_ends(policy, a, b, loser):
    assert policy_loser(policy, "a", a, "b", b)[0] == loser
    assert policy_loser(policy, "b", b, "a", a)[0] == loser  # the other end's view
