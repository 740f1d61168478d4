"""The pure quorum arithmetic (quorum.votes): majorities, votes present, grants."""

import pytest

import quorum.generations
import statemap.format
from quorum import (
    Grant,
    answer_counts,
    answered_votes,
    expected_votes,
    granted_votes,
    has_quorum,
    member_votes,
    votes_needed,
)
from quorum.votes import ANSWER_FRESH_FOR


def test_a_quorum_is_a_strict_majority():
    assert [votes_needed(n) for n in range(1, 7)] == [1, 2, 2, 3, 3, 4]
    assert has_quorum(2, 3) and not has_quorum(1, 3)
    assert not has_quorum(2, 4)  # half is not a majority: two halves could both write
    assert has_quorum(0, 3, forced=True)


def test_expected_votes_are_the_sum_unless_overridden():
    assert expected_votes([1, 1, 1]) == 3
    assert expected_votes([1, 1, 1], 1) == 1
    with pytest.raises(ValueError):
        expected_votes([1], 0)


def test_members_present_count_with_their_votes():
    assert member_votes(1, []) == 1
    assert member_votes(2, [1, 3]) == 6


def test_a_grant_covers_its_generation_and_no_more_members_left_behind():
    g = Grant(until=10.0, generation="g1", outdated=frozenset({"b"}))
    assert g.covers("g1", frozenset({"b"}), now=9.0)
    assert g.covers("g1", frozenset(), now=9.0)  # writing without fewer members is covered
    assert not g.covers("g1", frozenset({"b", "c"}), now=9.0)  # a member the witness does not know is behind
    assert not g.covers("g2", frozenset({"b"}), now=9.0)  # another generation
    assert not g.covers("g1", frozenset({"b"}), now=10.0)  # expired


def test_granted_votes_count_only_covering_grants_of_known_witnesses():
    grants = {"w1": Grant(10.0, "g", frozenset()), "w2": Grant(5.0, "g", frozenset()),
              "gone": Grant(10.0, "g", frozenset())}
    votes_of = {"w1": 2, "w2": 1, "w3": 1}
    assert granted_votes(grants, votes_of, "g", frozenset(), now=6.0) == 2
    assert granted_votes(grants, votes_of, "g", frozenset(), now=1.0) == 3
    assert granted_votes(grants, votes_of, "other", frozenset(), now=1.0) == 0


def test_a_secondary_counts_fresh_granting_answers():
    assert answer_counts(True, 0.0, ANSWER_FRESH_FOR - 0.1)
    assert not answer_counts(True, 0.0, ANSWER_FRESH_FOR)
    assert not answer_counts(False, 0.0, 0.0)
    answers = {"w1": (True, "ok", 0.0), "w2": (False, "no", 0.0), "w3": (True, "old", -100.0)}
    assert answered_votes(answers, {"w1": 1, "w2": 1, "w3": 1, "w4": 1}, now=1.0) == 1


def test_the_comparison_takes_no_generation_from_the_state_map_format():
    # Defined once, where generations are made and persisted.
    assert quorum.generations.NO_GENERATION is statemap.format.NO_GENERATION
