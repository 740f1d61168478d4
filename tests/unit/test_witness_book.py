"""The witness's grant decisions (pure logic, clock passed in)."""

from hypothesis import given, settings, strategies as st

from quorum.witness import LEASE, MARGIN, Claim, WitnessBook

QUIET = LEASE + MARGIN


def claim(node, current="g1", history=(), outdated=()):
    return Claim("appslv", node, current, tuple(history), frozenset(outdated))


def started(now=0.0):
    return WitnessBook(now, fresh_start=False)


def test_the_primary_keeps_its_lease_while_it_renews():
    book = started()
    assert book.renew(claim("labor1"), 0).granted
    for t in range(1, 20):
        assert book.renew(claim("labor1"), t).granted
        d = book.promote(claim("labor2"), t + 0.5)
        assert not d.granted and "labor1 holds the primary lease" in d.reason


def test_a_silent_primary_loses_the_lease_after_lease_and_margin():
    book = started()
    book.renew(claim("labor1"), 10)
    assert not book.promote(claim("labor2"), 10 + LEASE).granted  # its lease may still run on its side
    assert book.promote(claim("labor2"), 10 + LEASE + MARGIN + 0.01).granted
    d = book.renew(claim("labor1"), 10 + LEASE + MARGIN + 0.02)
    assert not d.granted and d.superseded


def test_a_member_the_primary_wrote_without_is_never_promoted():
    book = started()
    book.renew(claim("labor1", "g2", ["g1"], outdated={"labor2"}), 0)
    d = book.promote(claim("labor2", "g1"), 100)
    assert not d.granted and "labor2 is outdated" in d.reason
    assert book.records["appslv"].to_json() == {"generation": "g2", "parent": "g1", "outdated": ["labor2"],
                                             "primary": "labor1"}


def test_a_node_without_the_registered_generation_is_refused():
    book = started()
    book.renew(claim("labor1", "g2", ["g1"]), 0)
    d = book.promote(claim("labor3", "g0"), 100)
    assert not d.granted and "does not hold generation g2" in d.reason
    assert book.promote(claim("labor2", "g3", ["g2", "g1"]), 100).granted


def test_a_restarted_witness_grants_nothing_until_old_leases_ended():
    records = started().records
    book = WitnessBook(50.0, records)  # restarted at t=50
    assert not book.promote(claim("labor2"), 50 + QUIET - 0.01).granted
    assert not book.renew(claim("labor1"), 50 + QUIET - 0.01).granted
    # The primary renewed during the quiet time: it goes first.
    d = book.promote(claim("labor2"), 50 + QUIET + 0.01)
    assert not d.granted and "labor1 renewed as primary" in d.reason
    assert book.renew(claim("labor1"), 50 + QUIET + 0.02).granted


def test_registration_survives_a_restart_through_json():
    book = started()
    book.renew(claim("labor1", "g2", ["g1"], outdated={"labor2"}), 0)
    again = WitnessBook(1000.0, WitnessBook.records_from_json(book.to_json()))
    assert not again.promote(claim("labor2", "g1"), 1000 + QUIET + 1).granted


def test_record_changes_are_reported_so_they_are_written_before_the_answer():
    book = started()
    assert book.renew(claim("labor1"), 0).record_changed
    assert not book.renew(claim("labor1"), 1).record_changed
    assert book.renew(claim("labor1", "g2", ["g1"], outdated={"labor2"}), 2).record_changed


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["renew", "promote", "restart", "release"]),
                          st.sampled_from(["labor1", "labor2", "labor3"]),
                          st.floats(0, 3)), max_size=60))
def test_no_two_nodes_ever_hold_the_votes_at_once(steps):
    """Whatever the order of renewals, promotions and witness restarts, the
    leases as the nodes see them (LEASE from each granted request) never overlap
    for two different nodes."""
    now = 0.0
    book = WitnessBook(now)
    held: dict[str, float] = {}  # node -> end of its lease on its own clock
    for op, node, dt in steps:
        now += dt
        if op == "restart":
            book = WitnessBook(now, WitnessBook.records_from_json(book.to_json()))
            continue
        if op == "release":
            if node in held and held[node] > now:
                book.release("appslv", node)
                held[node] = now  # a clean step-down ends its lease at once
            continue
        d = (book.renew if op == "renew" else book.promote)(claim(node), now)
        if d.granted:
            held[node] = now + LEASE
            others = [n for n, end in held.items() if n != node and end > now]
            assert not others, f"{node} granted while {others} still hold a lease"


def test_a_node_still_at_the_parent_generation_and_not_outdated_may_take_over():
    # A registered g2 and crashed before committing it (no write completed in g2).
    book = started()
    book.renew(claim("labor1", "g1"), 0)
    book.renew(claim("labor1", "g2", ["g1"], outdated={"labor2"}), 1)
    assert book.promote(claim("labor3", "g1"), 100).granted  # in sync when g2 began
    book2 = started()
    book2.renew(claim("labor1", "g2", ["g1"], outdated={"labor2"}), 1)
    assert not book2.promote(claim("labor2", "g1"), 100).granted
    assert book2.renew(claim("labor1", "g1"), 100).granted  # itself, restarted before the commit
