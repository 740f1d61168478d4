"""gmd.sdnotify: the datagrams systemd's notify socket gets, and where they go."""

from __future__ import annotations

import socket

from gmd.sdnotify import MAX_STATUS, ServiceNotifier, encode, notify_address


def test_the_address_forms_systemd_hands_out():
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@/org/freedesktop/systemd1/notify/123") == b"\0/org/freedesktop/systemd1/notify/123"
    assert notify_address(None) is None and notify_address("") is None
    assert notify_address("vsock:2:1234") is None  # not spoken here: nothing is sent


def test_a_value_stays_on_its_line_and_a_long_status_is_cut():
    assert encode({"READY": "1", "STATUS": "a\nSTOPPING=1"}) == b"READY=1\nSTATUS=a STOPPING=1\n"
    long = encode({"STATUS": "x" * 1000}).decode()
    assert len(long) == len("STATUS=\n") + MAX_STATUS and long.endswith("...\n")


def test_the_variable_is_taken_from_the_environment_so_children_do_not_inherit_it():
    env = {"NOTIFY_SOCKET": "@abc", "PATH": "/bin"}
    notifier = ServiceNotifier.from_environment(env)
    try:
        assert notifier.active and notifier.address == b"\0abc"
        assert env == {"PATH": "/bin"}
    finally:
        notifier.close()
    idle = ServiceNotifier.from_environment({})
    assert not idle.active and idle.ready("x") is False  # no service manager: nothing sent, no error


def test_notifications_arrive_as_one_datagram_each(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(path)
        manager.settimeout(5)
        notifier = ServiceNotifier(path)
        try:
            assert notifier.ready("node labor1: appslv primary uptodate")
            assert manager.recv(4096) == b"READY=1\nSTATUS=node labor1: appslv primary uptodate\n"
            assert notifier.stopping("bye")
            assert manager.recv(4096) == b"STOPPING=1\nSTATUS=bye\n"
        finally:
            notifier.close()


def test_a_manager_that_went_away_is_not_an_error(tmp_path, caplog):
    notifier = ServiceNotifier(str(tmp_path / "gone"))
    try:
        assert notifier.status("a") is False and notifier.status("b") is False
    finally:
        notifier.close()
    assert len([r for r in caplog.records if "cannot notify" in r.getMessage()]) == 1  # said once
