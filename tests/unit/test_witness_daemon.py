"""The witness daemon's handling of bad input: its state file and requests;
volume identities in its answers; its state file's lock and saving."""

import json
import logging
import os
import threading
from contextlib import contextmanager

import pytest
import trio

from gmd import witness as witness_module
from gmd.config import load_config
from gmd.errors import GmdError
from gmd.witness import WitnessDaemon
from tools.cluster_config import NodeSpec, witness_table, write_cluster_config

OLD = "0a1b2c3d" * 4
NEW = "9f8e7d6c" * 4


def config(tmp_path):
    """Volume v on nodes a and b, witness w keeping its registrations in w.json
    (fixed ports: nothing listens in these tests)."""
    path = write_cluster_config(tmp_path, [NodeSpec("a", address=[9001]), NodeSpec("b", address=[9002])],
                                volume="v", size="1GiB", tables=witness_table("w", 9009, state="w.json"))
    return load_config(path)


@contextmanager
def witness_daemon(tmp_path):
    """A witness daemon past its restart wait; its state file lock released after."""
    w = WitnessDaemon(config(tmp_path), "w")
    w.book.quiet_until = 0  # as if the restart wait were over
    try:
        yield w
    finally:
        w.close()


def renew(rid, current, identity=None, history=(), outdated=()):
    req = {"id": rid, "op": "renew", "volume": "v", "current": current, "history": list(history),
           "outdated": list(outdated)}
    if identity is not None:
        req["identity"] = identity
    return req


async def test_a_damaged_state_file_stops_the_witness_with_the_reason(tmp_path):
    (tmp_path / "w.json").write_text('{"format": 2, "records": [{"volume": "v", "generation": 7}]}')
    with pytest.raises(GmdError, match=r"w.json is damaged .*bad generation.*move it aside only"):
        WitnessDaemon(config(tmp_path), "w")


async def test_bad_requests_are_answered_as_such_and_change_nothing(tmp_path):
    with witness_daemon(tmp_path) as w:
        await answer_bad_requests(w)
    assert not (tmp_path / "w.json").exists() and not w.book.leases


async def answer_bad_requests(w):
    for node, req in (
        ("a", {"id": 1, "op": "renew", "volume": "nope", "current": "g"}),
        ("c", {"id": 2, "op": "renew", "volume": "v", "current": "g"}),
        ("a", {"id": 3, "op": "renew", "volume": "v", "current": 5}),
        ("a", {"id": 4, "op": "steal", "volume": "v", "current": "g"}),
        ("a", {"id": 5, "op": "promote", "volume": "v", "current": "g", "outdated": [1]}),
        ("a", {"id": 6, "op": "renew", "volume": "v", "current": "g", "identity": 7}),
        ("a", {"id": 7, "op": "renew", "volume": "v", "current": "g", "identity": ""}),
        ("a", {"id": 8, "op": "renew", "volume": "v", "current": "g", "identity": "x" * 129}),
        ("c", {"id": 9, "op": "status", "volume": "v"}),
    ):
        reply = await w._answer(node, req)
        assert reply["id"] == req["id"] and reply["granted"] is False and "bad request" in reply["reason"]


async def test_a_grant_that_changes_the_registration_is_written_first(tmp_path):
    with witness_daemon(tmp_path) as w:
        reply = await w._answer("a", renew(1, "g2", OLD, ["g1"], ["b"]))
    assert reply["granted"] and reply["votes"] == 1
    assert json.loads((tmp_path / "w.json").read_text()) == {"format": 2, "records": [
        {"volume": "v", "identity": OLD, "generation": "g2", "parent": "g1", "outdated": ["b"], "primary": "a"}]}
    assert oct((tmp_path / "w.json").stat().st_mode & 0o777) == "0o600"
    assert [n for n in os.listdir(tmp_path) if ".tmp" in n] == []


async def test_a_claim_is_judged_by_its_own_identity_and_the_other_is_named_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gmd.witness")
    with witness_daemon(tmp_path) as w:
        # The old life: a wrote without b.
        assert (await w._answer("a", renew(1, "g2", OLD, ["g1"], ["b"])))["granted"]
        w.book.release("v", "a", OLD)
        # The volume built again with the same names: b is its primary.
        for rid in (2, 3, 4):
            reply = await w._answer("b", renew(rid, "n1", NEW))
            assert reply["granted"], reply
        note = f"witness also holds volume v under identity {OLD[:8]}\u2026, a different volume's life: not applied"
        assert reply["notes"] == [note] and reply["reason"] == f"lease for 4 s; {note}"
        status = await w._answer("a", {"id": 5, "op": "status", "volume": "v"})
    assert [(r["identity"], r["generation"], r["outdated"], r["primary"], r["lease"]) for r in status["records"]] \
        == [(OLD, "g2", ["b"], "a", None), (NEW, "n1", [], "b", "b")]
    logged = [r.getMessage() for r in caplog.records if "witness also holds" in r.getMessage()]
    assert logged == [f"witness w: b claims volume v with identity {NEW[:8]}\u2026; {note}"]
    saved = json.loads((tmp_path / "w.json").read_text())["records"]
    assert [(r["identity"], r["primary"]) for r in saved] == [(OLD, "a"), (NEW, "b")]


async def test_a_claim_without_identity_still_works(tmp_path):
    with witness_daemon(tmp_path) as w:
        reply = await w._answer("a", renew(1, "g1"))
        assert reply["granted"] and reply["notes"] == []
        assert list(w.book.records) == [("v", None)]


async def test_a_format_1_state_file_is_ignored_with_a_warning(tmp_path, caplog):
    (tmp_path / "w.json").write_text(json.dumps({"format": 1, "volumes": {
        "v": {"generation": "g2", "parent": "g1", "outdated": ["b"], "primary": "a"}}}))
    with witness_daemon(tmp_path) as w:
        assert w.book.records == {}
        assert (await w._answer("b", renew(1, "n1", NEW)))["granted"]
    [line] = [r for r in caplog.records if "format 1" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert line.getMessage() == (
        f"witness w: state file {tmp_path / 'w.json'} is format 1 (from before volume identities): its "
        "registrations of v are ignored, as they name no volume identity and so cannot be matched to any "
        "volume's life; each primary registers again when it renews")


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b'{"format": 9, "records": []}', b""])
async def test_an_unreadable_state_file_is_a_clear_error(tmp_path, content):
    (tmp_path / "w.json").write_bytes(content)
    with pytest.raises(GmdError, match=f"^witness w: state file {tmp_path / 'w.json'} is damaged"):
        WitnessDaemon(config(tmp_path), "w")
    # The failed start released the lock.
    (tmp_path / "w.json").unlink()
    with witness_daemon(tmp_path):
        pass


async def test_a_second_witness_on_the_same_state_file_is_refused(tmp_path):
    with witness_daemon(tmp_path):
        with pytest.raises(GmdError, match=(
                rf"^witness w: state file {tmp_path / 'w.json'} is in use by another witness \(pid {os.getpid()} "
                rf"holds {tmp_path / 'w.json.lock'}\); two witnesses may not share one state file")):
            WitnessDaemon(config(tmp_path), "w")
    with witness_daemon(tmp_path):  # released by close()
        pass


async def test_the_start_log_lists_every_record(tmp_path):
    with witness_daemon(tmp_path) as w:
        assert w.holdings_lines() == ["witness w: holds no registrations"]
        await w._answer("a", renew(1, "g2", OLD, ["g1"], ["b"]))
        await w._answer("a", {"id": 2, "op": "release", "volume": "v", "current": "g2", "identity": OLD})
        await w._answer("b", renew(3, "p1"))
        lines = w.holdings_lines()
    assert lines == [
        "witness w: holds volume v identity (none): generation p1, primary b, outdated: none",
        f"witness w: holds volume v identity {OLD[:8]}\u2026: generation g2, primary a, outdated: b",
    ]


async def test_saving_runs_off_the_event_loop(tmp_path, monkeypatch):
    """A slow disk holds up the request that waits for it, not the witness's
    other work (the links' keepalives and reads)."""
    disk_done = threading.Event()
    real_write = witness_module.write_state_file
    finished_while_loop_ran = []

    def slow_write(path, data):
        finished_while_loop_ran.append(disk_done.wait(timeout=10))
        real_write(path, data)

    monkeypatch.setattr(witness_module, "write_state_file", slow_write)
    with witness_daemon(tmp_path) as w:
        async with trio.open_nursery() as n:
            replies = []

            async def ask():
                replies.append(await w._answer("a", renew(1, "g1", OLD)))

            n.start_soon(ask)
            await trio.sleep(0.05)  # the event loop runs while the save waits
            disk_done.set()
    assert finished_while_loop_ran == [True] and replies[0]["granted"]


async def test_a_claim_refused_again_and_again_is_logged_once_per_kind_of_refusal(tmp_path, caplog):
    """An automatic takeover asks every second while the primary's lease runs:
    the witness says so once, not once a second; a new reason is said again."""
    caplog.set_level(logging.INFO, logger="gmd.witness")

    def refusals():
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and "refused" in r.getMessage()]

    with witness_daemon(tmp_path) as w:
        assert (await w._answer("a", renew(1, "g1", NEW)))["granted"]
        promote = {"id": 2, "op": "promote", "volume": "v", "identity": NEW, "current": "g1", "history": [],
                   "outdated": []}
        for rid in range(2, 12):
            assert not (await w._answer("b", {**promote, "id": rid}))["granted"]
        assert refusals() == ["witness w: v: promote b refused: a holds the primary lease for v"]
        # a writes without b: b's refusal changes kind, and that is said.
        assert (await w._answer("a", renew(12, "g2", NEW, ["g1"], ["b"])))["granted"]
        w.book.release("v", "a", NEW)
        assert not (await w._answer("b", {**promote, "id": 13}))["granted"]
        assert len(refusals()) == 2 and "b is outdated" in refusals()[1]
