"""The human form of a volume's status (tools/status_text.py)."""

from __future__ import annotations

from tools.status_text import format_status


def status(**extra):
    st = {"volume": "appslv", "node": "labor2", "role": "secondary", "mode": "mwc", "size": 64 << 20,
          "daemon": True, "device": None,
          "state_map": {"path": "/var/lib/gmd/appslv.sm", "clean": False, "generation": "g", "updated": 0.0,
                        "warnings": []},
          "quorum": {"votes": 1, "needed": 2, "expected": 3, "ok": False, "witnesses": {}},
          "members": {}}
    st.update(extra)
    return st


def test_the_takeover_state_and_a_failed_command_are_shown():
    text = format_status(status(takeover={
        "auto_promote": True, "state": "cannot promote yet: labor1 holds the primary lease", "fences": 1,
        "commands": {"stop": {"ok": False, "rc": 3, "error": None, "argv": ["/usr/local/sbin/stop-app"]},
                     "start": {"ok": True, "rc": 0, "argv": ["true"]}}}))
    assert "automatic takeover: cannot promote yet: labor1 holds the primary lease; 1 self-fence(s)" in text
    assert "stop command FAILED (exit 3): /usr/local/sbin/stop-app" in text
    assert "start command" not in text


def test_without_auto_promote_nothing_about_takeover_is_shown():
    assert "takeover" not in format_status(status(takeover={"auto_promote": False, "state": "off",
                                                            "commands": {}}))


def notes(text):
    """The members' note lines (``  NAME: ...``) by member."""
    return {line.split()[0][:-1]: line for line in text.splitlines() if line.startswith("  labor")
            and line.split()[0].endswith(":")}


def table_row(text, name):
    """The member's row of the table."""
    return next(line for line in text.splitlines() if line.split()[:1] == [name])


def member(**extra):
    m = {"disk": "outdated", "link": "connected", "mode": "async", "out_of_sync_bytes": 1 << 20}
    m.update(extra)
    return m


def test_the_consistency_of_members_is_shown_when_worth_a_look():
    text = format_status(status(members={
        "labor2": member(link="local", consistency={
            "consistent": True, "consistent_at": "2026-12-01T10:00:00.000Z", "catching_up": True,
            "undo_log": {"path": "/u", "size": 64 << 20, "used": 3 << 20, "regions": 48, "active": True}}),
        "labor3": member(consistent=False, consistent_at=None),
        "labor4": member(consistent=True, consistent_at="2026-12-01T09:00:00.000Z",
                         catch_up_refused="undo log /x holds 64 MiB more, the catch-up needs 300 MiB"),
        "labor5": member(disk="uptodate", out_of_sync_bytes=0, consistent=True,
                         consistent_at="2026-12-01T11:00:00.000Z")}))
    row = notes(text)
    assert "consistent at 2026-12-01T10:00:00.000Z (undo log 3.0 MiB of 64.0 MiB)" in row["labor2"]
    assert "NOT consistent (catching up without an undo log)" in row["labor3"]
    assert "catch-up refused: undo log /x holds 64 MiB more, the catch-up needs 300 MiB" in row["labor4"]
    assert "labor5" not in row  # level and in order: nothing to say


def test_a_far_members_rpo_backlog_and_wire_are_shown():
    far = member(rpo={"bytes": 3 << 20, "seconds": 42.0, "seconds_lower_bound": False, "alert": True},
                 backlog={"state": "waiting", "waiting_writes": 768, "memory_bytes": 2 << 20, "journal": "/j",
                          "journal_used_bytes": 1 << 20, "journal_limit": 1 << 30, "oldest_seconds": 42.0},
                 wire={"compress": "zstd", "data_bytes": 4000, "wire_bytes": 1000, "bandwidth_limit": 4 << 20})
    text = format_status(status(role="primary", members={"labor3": far}))
    assert "3.0 MiB / 42.0 s ALERT" in table_row(text, "labor3")
    assert "! labor3 RPO over the alert threshold: 3.0 MiB / 42.0 s" in text
    assert "768 writes wait in order (2.0 MiB in memory, journal 1.0 MiB of 1.0 GiB), oldest 42.0 s" in text
    assert "zstd 4.0:1" in text and "limit 4.0 MiB/s" in text
    dropped = member(backlog={"state": "bitmap", "waiting_writes": 0, "dropped_reason": "journal /j is full"})
    assert "write order lost (journal /j is full): bitmap tracking" in format_status(
        status(role="primary", members={"labor3": dropped}))


def test_a_test_failover_is_one_line_here_and_a_note_on_the_primary():
    tf = {"active": True, "started_at": "2026-12-01T10:00:01.000Z", "consistent_at": "2026-12-01T10:00:00.900Z",
          "image": "/run/gmd/labor3/appslv@test", "loop": "/dev/loop3", "kept_bytes": 2 << 20, "kept_regions": 32,
          "space": 1 << 30, "overlay_bytes": 4096, "ended_reason": None}
    text = format_status(status(test_failover=tf))
    assert ("test failover: image /run/gmd/labor3/appslv@test, loop /dev/loop3 as of 2026-12-01T10:00:00.900Z; "
            "kept 2.0 MiB + written 4.0 KiB of 1.0 GiB") in text
    ended = format_status(status(test_failover={**tf, "active": False, "ended_reason": "out of space: ..."}))
    assert "last test failover ended: out of space: ..." in ended and "test failover: image" not in ended
    member = {"disk": "uptodate", "link": "connected", "mode": "async", "out_of_sync_bytes": 0,
              "test_failover": {"active": True}}
    assert "test failover runs there" in format_status(status(role="primary", members={"labor3": member}))
    assert "test failover" not in format_status(status(test_failover={**tf, "active": False}))
