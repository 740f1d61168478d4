"""The witness's grant decisions (pure logic, clock passed in)."""

import pytest
from hypothesis import given, settings, strategies as st

from quorum.witness import LEASE, MARGIN, Claim, VolumeRecord, WitnessBook

QUIET = LEASE + MARGIN
OLD = "0a1b2c3d" * 4  # the identity of a volume's earlier life
NEW = "9f8e7d6c" * 4  # a volume built again with the same name


def claim(node, current="g1", history=(), outdated=(), identity=None):
    return Claim("appslv", node, current, tuple(history), frozenset(outdated), identity)


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
    assert book.records[("appslv", None)].to_json() == {"generation": "g2", "parent": "g1", "outdated": ["labor2"],
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
    again = WitnessBook(1000.0, WitnessBook.records_from_json(book.to_json())[0])
    assert not again.promote(claim("labor2", "g1"), 1000 + QUIET + 1).granted


def test_record_changes_are_reported_so_they_are_written_before_the_answer():
    book = started()
    assert book.renew(claim("labor1"), 0).record_changed
    assert not book.renew(claim("labor1"), 1).record_changed
    assert book.renew(claim("labor1", "g2", ["g1"], outdated={"labor2"}), 2).record_changed


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["renew", "promote", "restart", "release"]),
                          st.sampled_from(["labor1", "labor2", "labor3"]),
                          st.sampled_from([None, OLD, NEW]),
                          st.floats(0, 3)), max_size=60))
def test_no_two_nodes_ever_hold_the_votes_at_once(steps):
    """Whatever the order of renewals, promotions and witness restarts, the
    leases as the nodes see them (LEASE from each granted request) never overlap
    for two different nodes, whatever volume identities they claim."""
    now = 0.0
    book = WitnessBook(now)
    held: dict[tuple, float] = {}  # (node, identity) -> end of its lease on its own clock
    for op, node, identity, dt in steps:
        now += dt
        if op == "restart":
            book = WitnessBook(now, WitnessBook.records_from_json(book.to_json())[0])
            continue
        if op == "release":
            if held.get((node, identity), 0) > now:
                book.release("appslv", node, identity)
                held[(node, identity)] = now  # a clean step-down ends its lease at once
            continue
        d = (book.renew if op == "renew" else book.promote)(claim(node, identity=identity), now)
        if d.granted:
            held[(node, identity)] = now + LEASE
            others = [n for n, end in held.items() if n != (node, identity) and end > now]
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


# ------------------------------------------------------- volume identities


def test_a_registration_of_another_identity_is_never_applied():
    # The old life: labor1 wrote without labor2 and registered it outdated.
    book = started()
    assert book.renew(claim("labor1", "g2", ["g1"], outdated={"labor2"}, identity=OLD), 0).granted
    # The volume built again with the same names: its own fresh record decides.
    d = book.renew(claim("labor2", "n1", identity=NEW), 100)
    assert d.granted and d.record_changed
    assert d.notes == (f"witness also holds volume appslv under identity {OLD[:8]}\u2026, "
                       "a different volume's life: not applied",)
    assert d.reason == "lease for 4 s; " + d.notes[0]
    # Neither record changed the other.
    assert book.records[("appslv", OLD)] == VolumeRecord("g2", "g1", {"labor2"}, "labor1")
    assert book.records[("appslv", NEW)] == VolumeRecord("n1", "", set(), "labor2")
    # The old life's rule still holds for a claim of the old identity.
    d = book.promote(claim("labor2", "g1", identity=OLD), 200)
    assert not d.granted and d.reason.startswith("labor2 is outdated: primary labor1 registered generation g2")
    assert f"under identity {NEW[:8]}" in d.reason


def test_the_new_life_registers_its_own_outdated_members():
    book = started()
    book.renew(claim("labor1", "g2", ["g1"], outdated={"labor2"}, identity=OLD), 0)
    book.renew(claim("labor1", "n2", ["n1"], outdated={"labor3"}, identity=NEW), 100)
    assert not book.promote(claim("labor3", "n1", identity=NEW), 200).granted
    assert book.promote(claim("labor2", "n2", ["n1"], identity=NEW), 200).granted  # outdated in OLD only


def test_a_claim_without_identity_is_its_own_life():
    """Maps from before identities keep working; their record is not applied to
    an identified volume's claims, nor the other way round."""
    book = started()
    book.renew(claim("labor1", "g2", ["g1"], outdated={"labor2"}), 0)
    d = book.promote(claim("labor2", "g1"), 100)
    assert not d.granted and "labor2 is outdated" in d.reason and not d.notes
    d = book.promote(claim("labor2", "n1", identity=NEW), 100)
    assert d.granted
    assert d.notes == ("witness also holds volume appslv without an identity (registered from a map made "
                       "before volume identities), a different volume's life: not applied",)


def test_one_lease_per_volume_name_whatever_the_identity():
    """Two lives of one name at once on one witness wait for each other's lease;
    neither is told it was superseded (no step-down for another volume's lease)."""
    book = started()
    assert book.renew(claim("labor1", identity=OLD), 0).granted
    d = book.renew(claim("labor1", identity=NEW), 1)
    assert not d.granted and not d.superseded
    assert d.reason.startswith(f"labor1 of identity {OLD[:8]}\u2026 (a different volume's life) holds the "
                               "primary lease for appslv")
    assert not book.promote(claim("labor2", identity=NEW), 2).granted
    book.release("appslv", "labor1", NEW)  # not the holder: nothing ends
    assert not book.promote(claim("labor2", identity=NEW), 3).granted
    book.release("appslv", "labor1", OLD)
    assert book.promote(claim("labor2", identity=NEW), 3).granted


def test_holdings_list_every_record_with_its_identity_and_lease():
    book = started()
    book.renew(claim("labor1", "g2", ["g1"], outdated={"labor2"}, identity=OLD), 0)
    book.renew(claim("labor2", "p1"), 100)
    book.renew(claim("labor2", "n1", identity=NEW), 200)
    assert book.holdings(200) == [
        {"volume": "appslv", "identity": None, "generation": "p1", "parent": "", "outdated": [],
         "primary": "labor2", "lease": None},
        {"volume": "appslv", "identity": OLD, "generation": "g2", "parent": "g1", "outdated": ["labor2"],
         "primary": "labor1", "lease": None},
        {"volume": "appslv", "identity": NEW, "generation": "n1", "parent": "", "outdated": [],
         "primary": "labor2", "lease": "labor2"},
    ]


def test_queries_and_refusals_create_no_record():
    book = started()
    book.renew(claim("labor1", identity=OLD), 0)
    book.query(claim("labor2", identity=NEW), 1)
    book.promote(claim("labor2", identity=NEW), 2)  # refused: labor1's lease runs
    assert list(book.records) == [("appslv", OLD)]


# ------------------------------------------------------------ state file


def test_format_2_keeps_each_identity_record_through_a_restart():
    book = started()
    book.renew(claim("labor1", "g2", ["g1"], outdated={"labor2"}, identity=OLD), 0)
    book.renew(claim("labor2", "p1"), 100)
    raw = book.to_json()
    assert raw["format"] == 2
    assert [(r["volume"], r["identity"]) for r in raw["records"]] == [("appslv", None), ("appslv", OLD)]
    records, ignored = WitnessBook.records_from_json(raw)
    assert records == book.records and ignored == []


def test_format_1_records_are_ignored_and_named():
    """Records of a witness from before identities name no volume's life."""
    raw = {"format": 1, "volumes": {"appslv": {"generation": "g2", "parent": "g1", "outdated": ["labor2"],
                                               "primary": "labor1"}, "db": {}}}
    records, ignored = WitnessBook.records_from_json(raw)
    assert records == {} and ignored == ["appslv", "db"]
    book = WitnessBook(0.0, records, fresh_start=False)
    assert book.promote(claim("labor2", "n1", identity=NEW), 1).granted


@pytest.mark.parametrize("raw, why", [
    ([], "not a gmd witness state"),
    ({"format": "2", "records": []}, "not a gmd witness state"),
    ({"format": 3, "records": []}, "unknown format 3"),
    ({"format": 1, "volumes": []}, "format 1 without a volumes object"),
    ({"format": 2, "volumes": {}}, "format 2 without a records list"),
    ({"format": 2, "records": [{"identity": OLD}]}, "record 1 names no volume"),
    ({"format": 2, "records": [{"volume": "v", "identity": 5}]}, r"record 1 \(volume v\): the volume identity"),
    ({"format": 2, "records": [{"volume": "v", "outdated": "b"}]}, r"record 1 \(volume v\): bad outdated list"),
    ({"format": 2, "records": [{"volume": "v"}, {"volume": "v", "identity": None}]},
     r"volume v identity \(none\) is recorded twice"),
])
def test_a_damaged_state_says_what_is_wrong(raw, why):
    with pytest.raises(ValueError, match=why):
        WitnessBook.records_from_json(raw)
