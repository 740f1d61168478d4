"""The command line as an operator runs it: real subprocesses on a temp config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gmd.configvalues import QUORUM_LOSS_NOTES

from ..conftest import write_cluster_config

BIN = Path(sys.executable).parent
MiB = 1 << 20


def run(*args, env_extra=None, tool="gmd", check_rc=None):
    env = dict(os.environ)
    env.pop("GMD_CONFIG", None)
    env.pop("GMD_NODE", None)
    env.update(env_extra or {})
    p = subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, env=env, timeout=60)
    if check_rc is not None:
        assert p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
    return p


@pytest.fixture
def cfg(tmp_path):
    return write_cluster_config(tmp_path, size="256MiB")


def test_init_dirty_status_round_trip(cfg, tmp_path):
    env = {"GMD_CONFIG": str(cfg), "GMD_NODE": "labor1"}
    p = run("init", "appslv", env_extra=env, check_rc=0)
    assert "created state map" in p.stdout
    img = tmp_path / "data/labor1/appslv.img"
    assert img.stat().st_size == 256 * MiB and img.stat().st_blocks == 0  # sparse

    st = json.loads(run("status", "appslv", "--json", env_extra=env, check_rc=0).stdout)
    assert st["daemon"] is False and st["role"] == "secondary"
    assert st["members"]["labor1"]["disk"] == "inconsistent"
    assert st["members"]["labor1"]["link"] == "local"
    assert st["members"]["labor2"]["link"] == "unknown"
    # For people: plain text off a terminal, and what to do next.
    human = run("status", "appslv", env_extra=env, check_rc=0).stdout
    assert "\x1b" not in human
    assert "! daemon not running on labor1" in human and "'gmd daemon --node labor1'" in human
    assert "'gmd dirty appslv'; on the others: 'gmd clean appslv'" in human

    p = run("-l", "appslv", tool="gmddirty", env_extra=env, check_rc=0)
    assert "copy source" in p.stdout

    st = json.loads(run("status", "appslv", "--json", env_extra=env, check_rc=0).stdout)
    assert st["volume"] == "appslv" and st["node"] == "labor1" and st["size"] == 256 * MiB
    assert st["mode"] == "mwc" and st["device"] is None
    assert st["members"]["labor1"] == {
        "disk": "uptodate", "link": "local", "mode": "mwc", "out_of_sync_bytes": 0,
        "copy": None, "pending_copy": None,
    }
    peer = st["members"]["labor2"]
    assert peer["disk"] == "inconsistent" and peer["out_of_sync_bytes"] == 256 * MiB
    assert peer["pending_copy"] == {"kind": "full", "fence": 0}
    assert st["quorum"] == {"votes": None, "needed": 2, "expected": 2, "ok": None, "expected_override": None,
                            "policy": "suspend", "policy_note": QUORUM_LOSS_NOTES["suspend"]}
    assert st["state_map"]["clean"] is True and st["state_map"]["recovery_needed"] is False

    human = run("status", "appslv", env_extra=env, check_rc=0).stdout
    assert "labor2" in human and "full copy pending" in human and "daemon not running" in human


def test_the_other_side_becomes_the_target(cfg):
    run("init", "appslv", "--config", str(cfg), "--node", "labor2", check_rc=0)
    p = run("-l", "appslv", "--config", str(cfg), "--node", "labor2", tool="gmdclean", check_rc=0)
    assert "copy target" in p.stdout
    st = json.loads(run("status", "appslv", "--json", "--config", str(cfg), "--node", "labor2", check_rc=0).stdout)
    assert st["members"]["labor2"]["disk"] == "inconsistent"
    assert st["members"]["labor2"]["out_of_sync_bytes"] == 256 * MiB
    assert st["members"]["labor2"]["pending_copy"] == {"kind": "full", "fence": 0}


def test_destructive_marks_need_force(cfg):
    env = {"GMD_CONFIG": str(cfg), "GMD_NODE": "labor1"}
    run("init", "appslv", env_extra=env, check_rc=0)
    run("dirty", "appslv", env_extra=env, check_rc=0)
    p = run("clean", "appslv", env_extra=env, check_rc=1)
    assert "discards its data" in p.stderr and "--force" in p.stderr
    p = run("clean", "appslv", "--dry-run", "--force", "--json", env_extra=env, check_rc=0)
    assert json.loads(p.stdout)["dry_run"] is True
    st = json.loads(run("status", "appslv", "--json", env_extra=env, check_rc=0).stdout)
    assert st["members"]["labor1"]["disk"] == "uptodate"  # the dry run changed nothing
    run("clean", "appslv", "--force", env_extra=env, check_rc=0)
    # Once cleaned, this copy held data before: making it the source again is a
    # deliberate act.
    p = run("dirty", "appslv", env_extra=env, check_rc=1)
    assert "overwrites the other members" in p.stderr
    run("dirty", "appslv", "--force", env_extra=env, check_rc=0)
    st = json.loads(run("status", "appslv", "--json", env_extra=env, check_rc=0).stdout)
    assert st["members"]["labor1"]["disk"] == "uptodate"


def test_init_refuses_to_replace_a_map_without_force(cfg, tmp_path):
    env = {"GMD_CONFIG": str(cfg), "GMD_NODE": "labor1"}
    run("init", "appslv", env_extra=env, check_rc=0)
    run("dirty", "appslv", env_extra=env, check_rc=0)
    p = run("init", "appslv", env_extra=env, check_rc=1)
    assert "exists already" in p.stderr
    st = json.loads(run("status", "appslv", "--json", env_extra=env, check_rc=0).stdout)
    assert st["members"]["labor1"]["disk"] == "uptodate"  # untouched
    run("init", "appslv", "--force", env_extra=env, check_rc=0)
    st = json.loads(run("status", "appslv", "--json", env_extra=env, check_rc=0).stdout)
    assert st["members"]["labor1"]["disk"] == "inconsistent"


@pytest.mark.parametrize(
    "args,rc,text",
    [
        (["status", "nosuch"], 2, 'unknown volume "nosuch"'),
        (["status", "appslv", "--node", "labor9"], 2, "labor9"),
        (["frobnicate"], 2, "invalid choice"),
        (["init"], 2, "VOLUME"),
        (["status", "appslv"], 1, "gmd init"),  # no map yet
    ],
)
def test_errors_and_exit_codes(cfg, args, rc, text):
    p = run(*args, env_extra={"GMD_CONFIG": str(cfg), "GMD_NODE": "labor1"}, check_rc=rc)
    assert text in p.stderr


def test_config_error_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('secret = "x"\n[nodes.a]\naddress = "127.0.0.1:1"\n[volumes.v]\nsize = "10MiB"\nregion_size = "65000"\n'
                   '[volumes.v.members.a]\ndevice = "d"\nstatemap = "s"\n')
    p = run("status", "--config", str(bad), "--node", "a", check_rc=1)
    assert str(bad) in p.stderr and "volumes.v.region_size" in p.stderr and "power of two" in p.stderr
    p = run("status", env_extra={"GMD_CONFIG": str(tmp_path / "missing.toml")}, check_rc=1)
    assert "missing.toml" in p.stderr


def test_corrupt_map_is_reported_not_treated_as_clean(cfg, tmp_path):
    env = {"GMD_CONFIG": str(cfg), "GMD_NODE": "labor1"}
    run("init", "appslv", env_extra=env, check_rc=0)
    sm = tmp_path / "data/labor1/appslv.sm"
    with open(sm, "r+b") as f:
        f.write(b"\xff" * 8192)
    p = run("status", "appslv", "--json", env_extra=env, check_rc=1)
    assert "both superblock slots are unusable" in p.stderr and p.stdout == ""
    p = run("dirty", "appslv", env_extra=env, check_rc=1)
    assert "both superblock slots" in p.stderr


def test_help_and_version_and_python_m():
    p = run("--help", check_rc=0)
    assert "exit codes" in p.stdout and "gmddirty -l appslv" in p.stdout
    assert run("--version", check_rc=0).stdout.startswith("gmd ")
    p = subprocess.run([sys.executable, "-m", "gmd", "--version"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("gmd ")


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_script_completes_commands_and_options():
    script = run("completion", "bash", check_rc=0).stdout
    # What bash does on "gmd sta<TAB>" and "gmd status --js<TAB>" once the script is sourced.
    probe = script + """
complete -p gmd >/dev/null || exit 3
COMP_WORDS=(gmd sta); COMP_CWORD=1; COMP_LINE="gmd sta"; COMP_POINT=${#COMP_LINE}
_shtab_gmd gmd sta gmd; echo "commands: ${COMPREPLY[*]}"
COMP_WORDS=(gmd status --js); COMP_CWORD=2; COMP_LINE="gmd status --js"; COMP_POINT=${#COMP_LINE}
_shtab_gmd gmd --js status; echo "options: ${COMPREPLY[*]}"
"""
    out = subprocess.run(["bash", "--norc", "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "commands: status" in out.stdout and "options: --json" in out.stdout, out.stdout


def test_witness_and_quorum_commands_refuse_bad_arguments(cfg):
    env = {"GMD_CONFIG": str(cfg), "GMD_NODE": "labor1"}
    p = run("witness", "--name", "tiebreak", env_extra=env, check_rc=2)
    assert "no witness 'tiebreak'" in p.stderr and "witnesses: none" in p.stderr
    p = run("quorum", "appslv", "--expected-votes", "0", env_extra=env, check_rc=2)
    assert "--expected-votes must be at least 1" in p.stderr
    p = run("quorum", "appslv", "--expected-votes", "2", "--reset", env_extra=env, check_rc=2)
    assert "not allowed with argument" in p.stderr


def test_a_daemon_whose_port_is_taken_says_which_address_and_why(tmp_path):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "gmd.toml"
        cfg.write_text(f'secret = "s"\n[nodes.a]\naddress = ["127.0.0.1:{port}"]\ncontrol = "a.sock"\nmount = "m"\n')
        r = run("daemon", "--config", str(cfg), "--node", "a")
    assert r.returncode == 1
    assert f"node a: cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr
    assert "Traceback" not in r.stderr and "sub-exception" not in r.stderr


def test_status_watch_off_a_terminal_prints_a_frame_each_interval_and_ctrl_c_ends_it(cfg):
    """Off a terminal (a log, a pipe) --watch prints one plain frame per
    interval under a time stamp; Ctrl-C (SIGINT) ends it with exit 0."""
    import signal

    env = {**os.environ, "GMD_CONFIG": str(cfg), "GMD_NODE": "labor1"}
    run("init", "appslv", env_extra={"GMD_CONFIG": str(cfg), "GMD_NODE": "labor1"}, check_rc=0)
    proc = subprocess.Popen([str(BIN / "gmd"), "status", "appslv", "--watch", "--interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    import threading

    deadline = threading.Timer(30, proc.kill)  # a watch that prints nothing fails the test, never hangs it
    deadline.start()
    try:
        frames, seen = 0, []
        for line in proc.stdout:
            seen.append(line)
            frames += line.startswith("--- ") and "gmd status appslv every 0.2 s" in line
            if frames == 2:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        deadline.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert frames == 2 and proc.returncode == 0, (frames, proc.returncode, err)
    text = "".join(seen) + out
    assert "appslv on labor1: secondary" in text and "\x1b" not in text
