"""``gmd drill`` end to end: real daemons, a real witness, real FUSE mounts and
WAN proxy processes, the verifying workload on the primary's volume file.

Each drill is run as the operator runs it (``gmd drill ... --json``, in a
subprocess with its temporary directory under the test's), and judged by its
JSON report; afterwards nothing of it may be left: no process whose command
line names that directory, no mount under it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.drill import Drill
from tools.drill_cluster import LocalCluster
from tools.procs import processes_naming, running

GMD = str(Path(sys.executable).parent / "gmd")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (FUSE mounts)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not shutil.which("fusermount3"):
        return "fusermount3 is not installed"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def leftovers(directory: Path) -> list[str]:
    """Processes and mounts that still name ``directory``."""
    found = [f"process {p}" for p in processes_naming(directory)]
    with open("/proc/self/mounts") as f:
        found += [f"mount {line.split()[1]}" for line in f if str(directory) in line]
    return found


def drill(tmp_path: Path, *args: str, warmup: float = 1.0) -> tuple[int, dict, str]:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    report = tmp_path / "report.md"
    r = subprocess.run([GMD, "drill", *args, "--json", "--report", str(report), "--warmup", str(warmup),
                        "--outage", "1"], capture_output=True, text=True, env=env, timeout=600)
    try:
        doc = json.loads(r.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"no JSON report (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    assert report.read_text().startswith("# gmd drill: "), "the Markdown report was not written"
    assert not leftovers(tmp_path), leftovers(tmp_path)
    return r.returncode, doc, r.stderr


def why(doc: dict, err: str) -> str:
    """A failed drill, said briefly: its failed checks, its error and the end of its progress."""
    failed = [f"{c['name']}: {c['detail']}" for c in doc["checks"] if not c["passed"]]
    return "\n".join([*failed, f"error: {doc['error']}", *err.splitlines()[-25:]])


def checks(doc: dict) -> dict[str, bool]:
    return {c["name"]: c["passed"] for c in doc["checks"]}


# The kill-primary drill runs in every test run (./quickstart test): the
# whole story, under load, with the real CLI; the others are in test-all.
@pytest.mark.parametrize("fault", ["kill-primary", pytest.param("partition-primary", marks=pytest.mark.slow)])
def test_the_primary_lost_in_mwc_is_taken_over_automatically_with_nothing_acknowledged_lost(tmp_path, fault):
    rc, doc, err = drill(tmp_path, "--fault", fault, "--mode", "mwc")
    assert rc == 0 and doc["passed"], why(doc, err)
    assert doc["takeover"].startswith("automatic")
    f = doc["figures"]
    assert f["rpo_writes"] == 0 and f["rpo_bytes"] == 0
    assert 0 < f["rto_seconds"] < 60
    assert f["writes_before_fault"] > 0 and f["heal_passes"] in ("mini", "merge", "merge, mini", "none")
    names = checks(doc)
    assert names["RPO 0: every acknowledged write on the new primary"]
    assert names["members byte-identical (xxh3-128 of the backing files)"]
    if fault == "partition-primary":
        assert names["the cut-off primary fenced itself before its lease ended"]
        assert f["fence_lease_left_seconds"] > 0


@pytest.mark.slow
def test_a_killed_secondary_does_not_stop_the_primary_and_is_mini_copied_back(tmp_path):
    rc, doc, err = drill(tmp_path, "--fault", "kill-secondary")
    assert rc == 0 and doc["passed"], why(doc, err)
    names = checks(doc)
    assert names["labor1 writes on through the fault"]
    assert names["labor2 mini-copied back"]
    assert doc["figures"]["heal_passes"] == "mini"
    assert doc["figures"]["rto_seconds"] == 0.0


@pytest.mark.slow
def test_an_async_member_taking_over_is_an_exact_prefix_and_its_loss_is_reported(tmp_path):
    rc, doc, err = drill(tmp_path, "--fault", "kill-primary", "--mode", "async", "--wan-delay", "0.02")
    assert rc == 0 and doc["passed"], why(doc, err)
    assert checks(doc)["async copy is an exact prefix of the acknowledged writes"]
    f = doc["figures"]
    v = doc["verifications"]["after failover"]
    # What was lost is what the prefix analysis found missing, in writes, bytes and age.
    assert f["rpo_writes"] == v["lost_writes"] and f["rpo_bytes"] == v["lost_writes"] * 4096
    assert f["rpo_seconds"] >= 0 and v["is_prefix"] and v["corrupt"] == 0


@pytest.mark.slow
def test_three_sites_primary_killed_metro_has_everything_far_site_is_an_exact_prefix(tmp_path):
    """Issue 16 (a): metro mwc + far async (30 ms, 20 MB/s cap, 0 votes), the
    primary SIGKILLed at a random moment under the stamping workload."""
    warmup = round(random.uniform(0.5, 3.0), 2)
    rc, doc, err = drill(tmp_path, "--fault", "kill-primary", "--sites", "3", warmup=warmup)
    assert rc == 0 and doc["passed"], why(doc, err)
    names = checks(doc)
    assert names["RPO 0: every acknowledged write on the new primary"]  # the metro member took over
    assert names["far site labor3 is an exact prefix of the acknowledged writes"]
    assert names["far member labor3 caught up from labor2 without a full copy"]
    f, v = doc["figures"], doc["verifications"]["far site labor3 at the primary's loss"]
    assert v["is_prefix"] and v["corrupt"] == 0
    assert f["far_rpo_writes_labor3"] == v["lost_writes"] and f["far_rpo_bytes_labor3"] == v["lost_writes"] * 4096
    assert "labor3 far: 30 ms" in doc["cluster"]


@pytest.mark.slow
def test_a_cut_far_link_is_frozen_at_a_prefix_raises_the_rpo_alert_and_catches_up(tmp_path):
    rc, doc, err = drill(tmp_path, "--fault", "cut-far-link", "--sites", "3")
    assert rc == 0 and doc["passed"], why(doc, err)
    names = checks(doc)
    assert names["far site labor3 cut off is an exact prefix of the acknowledged writes"]
    assert names["the RPO alert is raised for labor3"]
    assert names["the RPO alert for labor3 ends once it caught up"]
    assert names["far member labor3 caught up without a full copy"]
    assert doc["figures"]["far_rpo_bytes_at_heal"] > 0 and doc["figures"]["far_rpo_seconds_at_heal"] > 5


def test_cut_far_link_needs_a_far_site(tmp_path):
    rc, doc, err = drill(tmp_path, "--fault", "cut-far-link")
    assert rc == 1 and not doc["passed"] and "--sites 3" in doc["error"]


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("mkfs.ext4") or not shutil.which("losetup"), reason="needs mkfs.ext4, losetup")
def test_a_secondary_whose_disk_fills_is_marked_and_caught_up_once_it_has_room(tmp_path):
    rc, doc, err = drill(tmp_path, "--fault", "disk-full-secondary")
    assert rc == 0 and doc["passed"], why(doc, err)
    names = checks(doc)
    assert names["labor1 writes on through the fault"]
    assert names["labor1 marked what labor2 could not store"]
    assert names["labor2 mini-copied back"]
    assert doc["figures"]["secondary_out_of_sync_during_fault"] > 0
    r = subprocess.run(["losetup", "-a"], capture_output=True, text=True)
    assert str(tmp_path) not in r.stdout, f"loop device left: {r.stdout}"


def test_a_bad_fault_is_a_usage_error_naming_the_choices(tmp_path):
    r = subprocess.run([GMD, "drill", "--fault", "unplug-everything"], capture_output=True, text=True)
    assert r.returncode == 2 and "kill-primary" in r.stderr and "Traceback" not in r.stderr


def test_a_configured_cluster_is_never_overwritten_without_being_told(tmp_path):
    cfg = tmp_path / "gmd.toml"
    cfg.write_text('secret = "s"\n[nodes.a]\naddress = ["127.0.0.1:17990"]\ncontrol = "a.sock"\nmount = "m"\n'
                   '[volumes.v]\nsize = "64MiB"\n[volumes.v.members.a]\ndevice = "a.img"\nstatemap = "a.sm"\n')
    r = subprocess.run([GMD, "drill", "--fault", "kill-secondary", "--config", str(cfg), "--volume", "v"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "--overwrite" in r.stdout + r.stderr


@pytest.mark.slow
def test_start_and_stop_commands_run_around_every_role_change_and_the_fence_comes_first(tmp_path):
    """partition-primary with start/stop commands that log who ran them and why:
    the cut-off primary's stop (self-fence) comes before the survivor's start
    (auto-promote), and the failback's switchover stops and starts again."""
    events = tmp_path / "events"
    line = f'echo "$GMD_NODE $GMD_EVENT $GMD_REASON $GMD_DEVICE" >> {events}'
    cluster = LocalCluster(directory=tmp_path / "c", volume_settings={"start_command": line, "stop_command": line})
    try:
        cluster.init_volume("labor1")
        cluster.start()
        cluster.wait("connected", lambda: cluster.status("labor1")["members"]["labor2"]["link"] == "connected")
        cluster.ask("labor1", op="primary", volume="appslv")
        report = Drill(cluster, fault="partition-primary", mode="mwc", seed=7, warmup=1, outage=1,
                       work_dir=tmp_path).run()
    finally:
        cluster.teardown()
    assert report.passed, report.table()
    got = [tuple(x.split()[:3]) for x in events.read_text().splitlines()]
    assert got[0] == ("labor1", "start", "operator")
    assert got.index(("labor1", "stop", "self-fence")) < got.index(("labor2", "start", "auto-promote"))
    i = got.index(("labor2", "stop", "switchover"))
    assert ("labor1", "start", "switchover") in got[i:]
    assert all(x.split()[3].endswith("/appslv") for x in events.read_text().splitlines())
    assert not leftovers(tmp_path), leftovers(tmp_path)


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_hand_run() -> tuple[str, list[str]]:
    """The config and the commands of the README's drill on a cluster started
    by hand (the shell block after its introduction)."""
    text = README.read_text()
    start = text.index("The README's two-host example, with both nodes on this machine")
    block = text[text.index("```sh\n", start) + 6:]
    block = block[:block.index("```")]
    config = block[block.index("<<'EOF'\n") + 8:block.index("\nEOF\n")]
    commands = []
    for line in block[block.index("\nEOF\n") + 5:].splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith(("export ", "mkdir ", "cd ")):
            commands.append(line)
    return config, commands


@pytest.mark.slow
def test_the_readme_drill_on_a_cluster_started_by_hand(tmp_path):
    """The README's steps, as written (but for the ports, taken free here):
    daemons and a witness started by hand from one config file, then
    ``gmd drill --config`` with kill-primary and kill-secondary."""
    import shlex

    from gmd import control
    from tools.procs import free_ports, stop_process, unmount_fuse

    config, commands = readme_hand_run()
    ports = free_ports(3)
    for old, new in zip(("7800", "7801", "7802"), ports):
        assert f"127.0.0.1:{old}" in config
        config = config.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
    (tmp_path / "gmd.toml").write_text(config + "\n")
    env = dict(os.environ, GMD_CONFIG=str(tmp_path / "gmd.toml"), TMPDIR=str(tmp_path))
    background: list[subprocess.Popen] = []
    socks = [tmp_path / "run" / "labor1.sock", tmp_path / "run" / "labor2.sock"]
    try:
        for cmd in commands:
            argv = shlex.split(cmd.rstrip("&"))
            if argv[0] == "sleep":  # the README waits for the daemons: here, until they answer
                for sock in socks:
                    end = time.monotonic() + 30
                    while time.monotonic() < end and not _answers(control, sock):
                        time.sleep(0.05)
                continue
            assert argv[0] == "gmd", cmd
            argv[0] = GMD
            if cmd.endswith("&"):
                err = argv.index("2>")
                with open(tmp_path / argv[err + 1], "ab") as log:
                    background.append(subprocess.Popen(argv[:err], cwd=tmp_path, env=env, stderr=log,
                                                       stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL))
                continue
            r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, (cmd, r.stdout[-3000:], r.stderr[-3000:])
            if argv[1] == "drill":
                assert "result: PASSED" in r.stdout, r.stdout
        assert (tmp_path / "kill-primary.md").read_text().startswith("# gmd drill: kill-primary")
    finally:
        # The drill restarted daemons in sessions of their own: stop those by the PID they report.
        for sock in socks:
            pid = _answers(control, sock)
            if pid:
                control.request(sock, {"op": "down", "volume": "appslv", "force": True}, timeout=30)
                os.kill(pid, 15)
                end = time.monotonic() + 30
                while time.monotonic() < end and running(pid):
                    time.sleep(0.05)
        for proc in background:
            stop_process(proc, timeout=30)
        for node in ("labor1", "labor2"):
            unmount_fuse(tmp_path / "run" / node)
    assert not leftovers(tmp_path), leftovers(tmp_path)


def _answers(control, sock: Path) -> int | None:
    try:
        return int(control.request(sock, {"op": "ping"}, timeout=5)["pid"])
    except Exception:
        return None
