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


# ------------------------------------------------- the view for people (rich)

import io  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402

import pytest  # noqa: E402
from rich.console import Console  # noqa: E402

from tools.cli import build_parser  # noqa: E402
from tools.status_text import next_steps, status_view, wants_colour  # noqa: E402


def copying(**extra):
    """labor1 primary, copying to labor2 at 32 MiB/s, 40 MiB to go."""
    copy = {"kind": "full", "done_bytes": 24 << 20, "total_bytes": 64 << 20, "sent_bytes": 24 << 20,
            "rate_bytes_per_s": 32 << 20, "eta_s": 65.0}
    return status(node="labor1", role="primary", quorum={"votes": 2, "needed": 2, "expected": 2, "ok": True,
                                                         "witnesses": {}},
                  members={"labor1": member(disk="uptodate", link="local", mode="mwc", out_of_sync_bytes=0),
                           "labor2": member(disk="inconsistent", mode="mwc", out_of_sync_bytes=40 << 20,
                                            peer_role="secondary", replication="catching-up", paths=2,
                                            copy=copy)}, **extra)


def on_a_terminal(st, width=120):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system="standard", width=width)
    console.print(status_view(st, colour=True, width=width))
    return out.getvalue()


def test_colour_only_on_a_terminal_and_never_with_no_color():
    assert wants_colour(True, {}) and not wants_colour(False, {})
    assert not wants_colour(True, {"NO_COLOR": "1"})
    st = copying()
    plain = format_status(st)
    assert "\x1b" not in plain
    coloured = on_a_terminal(st)
    assert "\x1b[" in coloured and "inconsistent" in coloured
    assert "\x1b[32muptodate" in coloured  # green: all is well


def test_the_member_table_shows_roles_modes_disk_link_and_replication():
    text = format_status(copying())
    assert table_row(text, "labor1").split()[:5] == ["labor1", "primary", "mwc", "uptodate", "local"]
    row = table_row(text, "labor2").split()
    assert row[:7] == ["labor2", "secondary", "mwc", "inconsistent", "connected", "catching-up", "2"]
    assert "40.0 MiB" in table_row(text, "labor2")


def test_a_running_copy_has_a_bar_with_done_total_rate_and_eta():
    text = format_status(copying())
    bar = next(line for line in text.splitlines() if "full copy to labor2" in line)
    assert re.search(r"\[#+\.+\]", bar)  # 37% filled
    assert "24.0 MiB of 64.0 MiB" in bar and "37%" in bar and "32.0 MiB/s" in bar and "ETA 1 min 05 s" in bar
    assert "━" in on_a_terminal(copying())  # rich's bar on a terminal


def test_a_running_verify_and_merge_have_bars_too():
    st = copying()
    st["members"]["labor2"]["copy"] = {**st["members"]["labor2"]["copy"], "kind": "merge", "eta_s": None}
    st["members"]["labor2"]["verify"] = {"kind": "verify", "done_bytes": 1 << 20, "total_bytes": 4 << 20,
                                         "sent_bytes": 0, "rate_bytes_per_s": 1 << 20, "eta_s": 3.0,
                                         "differing_regions": 2}
    text = format_status(st)
    assert "merge to labor2" in text and "ETA -" in text
    line = next(x for x in text.splitlines() if "verify of labor2" in x)
    assert "25%" in line and "ETA 3 s" in line and "2 differing so far" in line


def test_a_narrow_terminal_moves_lag_and_rpo_to_the_note():
    st = copying()
    st["members"]["labor2"]["rpo"] = {"bytes": 40 << 20, "seconds": 9.5, "seconds_lower_bound": True,
                                      "alert": False}
    assert "40.0 MiB / at least 9.5 s" in table_row(format_status(st), "labor2")
    narrow = format_status(st, width=80)
    lines = narrow.splitlines()
    at = next(i for i, line in enumerate(lines) if "full copy to labor2" in line)
    assert all(len(line) <= 80 for line in (table_row(narrow, "labor2"), lines[at], lines[at + 1]))
    assert "[#" in lines[at] and "24.0 MiB of 64.0 MiB" in lines[at + 1] and "ETA 1 min 05 s" in lines[at + 1]
    assert "RPO 40.0 MiB / at least 9.5 s" in notes(narrow)["labor2"]


def test_the_quorum_policys_note_is_shown_under_the_quorum_line():
    q = {"votes": 1, "needed": 1, "expected": 2, "ok": True, "witnesses": {}, "policy": "continue",
         "policy_note": "two sites without a witness: a cut link stops the secondary site"}
    lines = format_status(status(quorum=q)).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  quorum:"))
    assert lines[at + 1] == f"  on quorum loss (continue): {q['policy_note']}"


# Every hint names a command the CLI accepts, quoted as the CLI's own messages quote them.
def commands_in(steps):
    found = re.findall(r"'(gmd [^']+)'", " ".join(s.advice for s in steps))
    for cmd in found:
        build_parser().parse_args(shlex.split(cmd)[1:])  # SystemExit: not a real command
    return found


def test_daemon_not_running_and_volume_down():
    offline = status(daemon=False, quorum={"votes": None, "needed": 2, "expected": 2, "ok": None})
    (step,) = next_steps(offline, daemon_reachable=False)
    assert step.state == "daemon not running on labor2"
    assert commands_in([step]) == ["gmd daemon --node labor2", "gmd up appslv"]
    (step,) = next_steps(offline, daemon_reachable=True)
    assert step.state == "appslv is down on labor2" and commands_in([step]) == ["gmd up appslv"]
    assert "daemon not running on labor2" in format_status(offline)  # shown under the view
    assert next_steps(status()) == [s for s in next_steps(status()) if "daemon" not in s.state]


def test_split_brain_points_to_resolve_dry_run():
    reason = "split-brain: labor2 and labor1 hold diverging data of appslv; nothing is overwritten"
    st = status(quorum={"votes": 2, "needed": 2, "expected": 3, "ok": True, "witnesses": {}},
                members={"labor2": member(link="local", disk="uptodate", out_of_sync_bytes=0),
                         "labor1": member(link="standalone", reason=reason)})
    (step,) = next_steps(st)
    assert step.state == "labor1 standalone: split-brain"
    assert commands_in([step]) == ["gmd resolve appslv --discard-local --dry-run"]
    assert "! labor1 standalone: split-brain" in format_status(st)
    resolving = {**st, "split_brain": {"resolving_towards": "labor1", "saved_images": []}}
    assert next_steps(resolving) == []
    refused = status(members={"labor1": member(link="standalone", reason="labor1 holds newer data ... "
                                                                          "(split-brain risk)")})
    assert not any("split-brain" in s.state for s in next_steps(refused))


def test_no_quorum_says_who_is_missing_and_the_override_for_a_lost_site():
    q = {"votes": 1, "needed": 2, "expected": 3, "ok": False, "suspended_writes_since": None,
         "witnesses": {"w1": {"connected": False, "reason": "refused", "granted": False, "why": "no lease"}}}
    st = status(role="primary", quorum=q, members={"labor2": member(link="local", disk="uptodate"),
                                                   "labor1": member(link="disconnected", disk="unknown")})
    step = next(s for s in next_steps(st) if s.state.startswith("no quorum"))
    assert step.state == "no quorum: 1 votes present, 2 needed"
    assert "not here: labor1, witness w1" in step.advice
    assert commands_in([step]) == ["gmd quorum appslv --expected-votes 1"]
    suspended = next_steps(status(quorum={**q, "suspended_writes_since": 12.5}))
    assert any(s.state.startswith("no quorum, writes suspended") for s in suspended)
    assert not any(s.state.startswith("no quorum") for s in next_steps(status(quorum={**q, "ok": True})))


def test_an_inconsistent_disk_with_no_source_needs_dirty_and_clean():
    fresh = status(daemon=False, quorum={"votes": None, "needed": 2, "expected": 2, "ok": None},
                   members={"labor2": member(link="local", disk="inconsistent", pending_copy=None),
                            "labor1": member(link="unknown", disk="inconsistent")})
    step = next(s for s in next_steps(fresh, daemon_reachable=True) if "inconsistent" in s.state)
    assert commands_in([step]) == ["gmd dirty appslv", "gmd clean appslv"]
    fresh["members"]["labor1"]["disk"] = "uptodate"  # a source exists: the copy comes by itself
    assert not any("inconsistent" in s.state for s in next_steps(fresh, daemon_reachable=True))


def test_differences_found_by_verify_and_a_member_out_of_sync_need_resync():
    lv = {"finished": 0.0, "compared_bytes": 64 << 20, "differing_regions": 3, "first_offsets": [0]}
    st = copying()
    st["members"]["labor2"].update(copy=None, disk="outdated", replication="shipping", out_of_sync_bytes=3 << 16,
                                   last_verify=lv)
    (step,) = next_steps(st)
    assert step.state == "verify found 3 differing regions on labor2 (192.0 KiB marked)"
    assert commands_in([step]) == ["gmd resync appslv"]
    st["members"]["labor2"]["last_verify"] = None
    assert next_steps(st)[0].state == "labor2 out of sync (192.0 KiB marked)"
    # A copy going, or a member that fell behind (its mini-copy starts by itself): nothing to do.
    assert next_steps(copying()) == []
    st["members"]["labor2"]["replication"] = "behind"
    assert next_steps(st) == []


def test_rpo_over_its_threshold_and_a_member_away_are_warnings():
    far = member(disk="outdated", rpo={"bytes": 3 << 20, "seconds": 42.0, "seconds_lower_bound": False,
                                       "alert": True}, replication="shipping", out_of_sync_bytes=0)
    st = status(role="primary", quorum={"votes": 2, "needed": 2, "expected": 3, "ok": True, "witnesses": {}},
                members={"labor2": member(link="local", disk="uptodate"), "labor3": far,
                         "labor4": member(link="disconnected", disk="outdated", reason="connection refused")})
    steps = {s.state: s for s in next_steps(st)}
    rpo = steps["labor3 RPO over the alert threshold: 3.0 MiB / 42.0 s"]
    assert rpo.severity == "warn" and commands_in([rpo]) == ["gmd status appslv --json"]
    away = steps["labor4 disconnected"]
    assert away.severity == "warn" and commands_in([away]) == ["gmd up appslv"]


def test_status_options_are_checked_before_anything_is_read(capsys):
    from tools.cli import main

    assert main(["status", "appslv", "--interval", "2"]) == 2
    assert "--interval goes with --watch" in capsys.readouterr().err
    assert main(["status", "appslv", "--watch", "--json"]) == 2
    assert "scripts poll 'gmd status --json'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["status", "--watch", "--interval", "0"])
    assert e.value.code == 2 and "between 0.1 and 3600 seconds" in capsys.readouterr().err
