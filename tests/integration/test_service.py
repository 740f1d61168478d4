"""The daemons as systemd runs them (Type=notify): the rendered unit's command
line and environment, $NOTIFY_SOCKET set, READY=1 only once the node's
configured volumes are up, STOPPING=1 and a clean exit on SIGTERM. The test
plays the service manager: it listens on the notify socket. (systemd itself
is not PID 1 where these run; the unit files are checked by systemd-analyze
in tests/unit/test_units.py.)"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from gmd import admin
from gmd.config import load_config
from tools import units

from .harness import GMD, DaemonProcess, NodeSpec, WitnessProcess, die_with_parent, free_ports, in_process_daemon, \
    init_in_sync, witness_table, write_config


class NotifyListener:
    """The service manager's end of $NOTIFY_SOCKET: an abstract-namespace
    datagram socket (as systemd's own), each datagram parsed into a dict."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.name = f"gmd-test-notify-{os.getpid()}-{id(self)}"
        self.sock.bind("\0" + self.name)

    @property
    def env_value(self) -> str:
        return "@" + self.name

    def next(self, timeout: float = 30.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines() if line)

    def until(self, key: str, timeout: float = 30.0) -> tuple[list[dict[str, str]], dict[str, str]]:
        """Datagrams up to the first carrying ``key``: (those before, that one)."""
        before = []
        while True:
            msg = self.next(timeout)
            if key in msg:
                return before, msg
            before.append(msg)

    def pending(self) -> list[dict[str, str]]:
        self.sock.setblocking(False)
        out = []
        try:
            while True:
                data = self.sock.recv(4096).decode()
                out.append(dict(line.split("=", 1) for line in data.splitlines() if line))
        except BlockingIOError:
            return out

    def close(self):
        self.sock.close()


@pytest.fixture
def notify(monkeypatch):
    listener = NotifyListener()
    monkeypatch.setenv("NOTIFY_SOCKET", listener.env_value)  # the daemons the test starts inherit it
    try:
        yield listener
    finally:
        listener.close()


def unit_command(cfg, key: str, instance: str) -> tuple[list[str], dict[str, str]]:
    """``key`` (ExecStart, ExecReload) of the rendered gmd@.service for
    ``instance``, as argv, and the environment the unit sets."""
    text = next(u.text for u in units.render(Path(GMD), cfg) if u.name == "gmd@.service")
    lines = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    env_name, env_value = lines["Environment"].split("=", 1)
    return lines[key].replace("%i", instance).split(), {env_name: env_value}


def test_node_daemon_is_ready_only_with_its_up_volumes_attached_and_stops_cleanly(tmp_path, notify):
    cfg = write_config(tmp_path, [NodeSpec("labor1", node={"up": ["appslv"]}), NodeSpec("labor2")])
    init_in_sync(cfg, "labor1", ["labor2"])
    # Started as systemd starts gmd@labor1 (labor2 stays off: the volume comes up all the same).
    argv, unit_env = unit_command(cfg, "ExecStart", "labor1")
    assert argv == [GMD, "daemon", "--node", "labor1"] and unit_env == {"GMD_CONFIG": str(cfg)}
    env = {**os.environ, **unit_env}
    daemon = DaemonProcess(cfg, "labor1", tmp_path)  # for its control requests and clean-up
    with open(daemon.log_path, "ab") as log:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                preexec_fn=die_with_parent)
    try:
        before, ready = notify.until("READY")
        # Asked at once, as a unit ordered after gmd@labor1 would: the volume is up.
        assert daemon.request(op="status", volume="appslv")["up"] is True
        assert ready["READY"] == "1"
        assert ready["STATUS"] == "node labor1: appslv secondary uptodate"  # what the state was at READY
        assert [m["STATUS"] for m in before] == ["node labor1: starting", "node labor1: attaching appslv"]
        reload_argv, _ = unit_command(cfg, "ExecReload", "labor1")  # systemctl reload gmd@labor1
        assert subprocess.run(reload_argv, env=env, capture_output=True, timeout=60).returncode == 0
        proc.send_signal(signal.SIGTERM)  # systemctl stop: KillSignal=SIGTERM
        assert proc.wait(timeout=60) == 0, daemon.log()
        msgs = notify.pending()
        assert any(m.get("STOPPING") == "1" for m in msgs), msgs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        daemon.remove_dead_mount()
    st = admin.offline_status(load_config(cfg), "labor1", "appslv")
    assert st["state_map"]["clean"] is True


def test_a_volume_that_cannot_come_up_fails_the_start_and_never_reports_ready(tmp_path, notify):
    cfg = write_config(tmp_path, [NodeSpec("labor1", node={"up": ["appslv"]}), NodeSpec("labor2")])
    # No 'gmd init': labor1 has no state map for appslv.
    try:
        proc = subprocess.run([GMD, "daemon", "--config", str(cfg), "--node", "labor1"], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
    finally:
        DaemonProcess(cfg, "labor1", tmp_path).remove_dead_mount()
    assert proc.returncode == 1, proc.stderr
    assert "ready" not in proc.stdout
    assert "appslv could not come up at start" in proc.stderr
    assert "nodes.labor1.up" in proc.stderr  # where the operator takes it out
    assert "Traceback" not in proc.stderr
    msgs = notify.pending()
    assert not any("READY" in m for m in msgs), msgs
    assert any(m.get("STOPPING") == "1" and "could not come up" in m["STATUS"] for m in msgs), msgs


async def test_up_loop_volumes_come_up_as_gmd_up_loop(tmp_path):
    cfg = write_config(tmp_path, [NodeSpec("labor1", node={"up_loop": ["appslv"]}), NodeSpec("labor2")])
    init_in_sync(cfg, "labor1", ["labor2"])
    async with in_process_daemon(cfg, "labor1") as daemon:
        assert await daemon.attach_configured() == ["appslv"]
        engine = daemon.engines["appslv"]
        assert engine.is_up and engine.roles.want_loop  # a loop device whenever labor1 is primary


def test_witness_reports_ready_once_listening_and_stopping_on_sigterm(tmp_path, notify):
    (port,) = free_ports(1)
    cfg = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")], extra_tables=witness_table("W", port))
    os.chmod(cfg, 0o666)  # anyone may change who gets the votes: a warning, not a refusal
    witness = WitnessProcess(cfg, "W", tmp_path)
    try:
        witness.start()
        _, ready = notify.until("READY")
        assert ready["STATUS"] == f"witness W: listening on 127.0.0.1:{port}; 0 registrations"
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass  # it listens at READY
        assert witness.stop() == 0
        assert any(m.get("STOPPING") == "1" for m in notify.pending())
    finally:
        witness.stop()
    assert f"WARNING: witness W: {cfg} is writable by its group and others (mode 0666)" in witness.log()


def _systemd_manages_this_host() -> bool:
    # sd_booted(3): systemd is the service manager when this directory exists.
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


@pytest.mark.skipif(not _systemd_manages_this_host(),
                    reason="systemd is not the service manager here (no /run/systemd/system); the units are "
                           "checked by systemd-analyze verify in tests/unit/test_units.py and run as systemd "
                           "would by the tests above")
def test_systemd_starts_the_node_unit_once_its_volume_is_up_and_stops_it_cleanly(tmp_path):
    node = f"gmdtest{os.getpid()}"  # an instance no real node of this host has
    cfg = write_config(tmp_path, [NodeSpec(node, node={"up": ["appslv"]}), NodeSpec("labor2")])
    init_in_sync(cfg, node, ["labor2"])
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    for u in units.render(Path(GMD), cfg):
        (unit_dir / u.name).write_text(u.text)
    unit = f"gmd@{node}.service"

    def systemctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=timeout)

    assert systemctl("link", str(unit_dir / "gmd@.service")).returncode == 0
    try:
        systemctl("daemon-reload")
        started = systemctl("start", unit)  # Type=notify: returns once the daemon sent READY=1
        assert started.returncode == 0, started.stderr + systemctl("status", unit).stdout
        assert systemctl("is-active", unit).stdout.strip() == "active"
        daemon = DaemonProcess(cfg, node, tmp_path)
        assert daemon.request(op="status", volume="appslv")["up"] is True  # up when systemd called it started
        stopped = systemctl("stop", unit, timeout=360)
        assert stopped.returncode == 0, stopped.stderr
        assert systemctl("is-active", unit).stdout.strip() == "inactive"
    finally:
        systemctl("stop", unit, timeout=360)
        systemctl("disable", "gmd@.service")  # also removes the link
        systemctl("daemon-reload")
        DaemonProcess(cfg, node, tmp_path).remove_dead_mount()
    st = admin.offline_status(load_config(cfg), node, "appslv")
    assert st["state_map"]["clean"] is True  # a clean stop, not a kill
