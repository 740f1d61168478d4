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
