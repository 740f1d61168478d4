"""The witness process and its state file (issue 12, item 6), with real
``gmd witness`` processes: one state file per witness, what it holds is logged
at start, a file from before volume identities is ignored, and a volume rebuilt
with the same names is not judged by its old life's registration."""

from __future__ import annotations

import json
import os
import subprocess

import trio

from .harness import (
    GMD,
    NodeSpec,
    WitnessProcess,
    daemon_processes,
    free_ports,
    in_process_daemon,
    init_in_sync,
    wait_for,
    witness_table,
    write_config,
)

OLD = "0a1b2c3d" * 4
NEW = "9f8e7d6c" * 4


def witness_config(directory, port=None, *, state="data/W/witness.json", name="gmd.toml"):
    port = port or free_ports(1)[0]
    table = witness_table("W", port).replace('state = "data/W/witness.json"', f'state = "{state}"')
    return write_config(directory, [NodeSpec("labor1"), NodeSpec("labor2")], extra_tables=table, name=name)


def run_witness_briefly(config):
    """``gmd witness`` without --debug, as an operator starts it, expected to
    refuse: (exit code, stderr)."""
    p = subprocess.run([GMD, "witness", "--config", str(config), "--name", "W"], capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    return p.returncode, p.stderr


def test_a_second_witness_on_the_same_state_file_refuses_to_start(tmp_path):
    cfg = witness_config(tmp_path)
    first = WitnessProcess(cfg, "W", tmp_path)
    try:
        first.start()
        # Another port, the same state file: refused, with the holder named.
        other = witness_config(tmp_path, name="other.toml")
        rc, err = run_witness_briefly(other)
        state = tmp_path / "data/W/witness.json"
        assert rc == 1
        assert err == (f"gmd: error: witness W: state file {state} is in use by another witness "
                       f"(pid {first.proc.pid} holds {state}.lock); two witnesses may not share one state "
                       "file: give each its own 'state' path\n")
        assert first.proc.poll() is None  # the first one serves on
    finally:
        first.stop()
    # Once the first has stopped, the file is free again.
    again = WitnessProcess(cfg, "W", tmp_path)
    try:
        again.start()
    finally:
        again.stop()


class OperatorWitness(WitnessProcess):
    """``gmd witness`` as an operator starts it: no --debug."""

    def argv(self) -> list[str]:
        return [a for a in super().argv() if a != "--debug"]


def test_the_witness_logs_what_it_holds_at_start(tmp_path):
    cfg = witness_config(tmp_path)
    w = OperatorWitness(cfg, "W", tmp_path)
    try:
        w.start()
    finally:
        w.stop()
    assert "gmd: INFO: witness W: holds no registrations" in w.log()
    state = tmp_path / "data/W/witness.json"
    state.write_text(json.dumps({"format": 2, "records": [
        {"volume": "appslv", "identity": OLD, "generation": "g2", "parent": "g1", "outdated": ["labor2"],
         "primary": "labor1"},
        {"volume": "appslv", "identity": None, "generation": "p7", "parent": "", "outdated": [],
         "primary": "labor2"}]}))
    w.log_path.unlink()
    try:
        w.start()
    finally:
        w.stop()
    held = [line for line in w.log().splitlines() if ": holds " in line]
    assert held == [
        "gmd: INFO: witness W: holds volume appslv identity (none): generation p7, primary labor2, outdated: none",
        f"gmd: INFO: witness W: holds volume appslv identity {OLD[:8]}\u2026: generation g2, primary labor1, "
        "outdated: labor2",
    ]


def test_a_format_1_state_file_is_ignored_with_one_log_line(tmp_path):
    cfg = witness_config(tmp_path)
    state = tmp_path / "data/W/witness.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"format": 1, "volumes": {"appslv": {
        "generation": "g2", "parent": "g1", "outdated": ["labor1"], "primary": "labor2"}}}))
    w = WitnessProcess(cfg, "W", tmp_path)
    try:
        w.start()
    finally:
        w.stop()
    ignored = [line for line in w.log().splitlines() if "format 1" in line]
    assert ignored == [
        f"gmd: WARNING: witness W: state file {state} is format 1 (from before volume identities): its "
        "registrations of appslv are ignored, as they name no volume identity and so cannot be matched to any "
        "volume's life; each primary registers again when it renews"]
    assert "witness W: holds no registrations" in w.log()


def test_a_damaged_state_file_is_one_line_naming_it(tmp_path):
    cfg = witness_config(tmp_path)
    state = tmp_path / "data/W/witness.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"format": 2, "records": [{"volume": "appslv", "identity": 5}]')
    rc, err = run_witness_briefly(cfg)
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"gmd: error: witness W: state file {state} is damaged (")


async def start_primary(daemon, procs):
    """Like test_replication.start_primary."""
    eng = daemon.engines["appslv"]
    for p in procs.values():
        await trio.to_thread.run_sync(lambda p=p: p.request(op="up", volume="appslv"))
    await eng.up()
    for name in procs:
        await wait_for(lambda name=name: eng.members[name].connected, what=f"{name} connected")
    await eng.promote()
    return eng


async def test_a_volume_rebuilt_with_the_same_names_is_not_judged_by_its_old_life(tmp_path):
    """Two clusters one after the other, the same names and one witness state
    file. The first one's primary writes without labor2 (registered outdated,
    generation forked); the second's primary, with its own identity, keeps
    writing with the witness when its secondary dies."""
    shared = tmp_path / "shared-witness.json"
    identities = []
    for life in (1, 2):
        d = tmp_path / f"cluster{life}"
        d.mkdir()
        ports = free_ports(1)
        table = witness_table("W", ports[0], votes=1).replace('state = "data/W/witness.json"', f'state = "{shared}"')
        # labor1 holds 2 votes: with labor2 (1) it has quorum; alone it needs the witness (1): 2 of 4 < 3.
        cfg = write_config(d, [NodeSpec("labor1", votes=2), NodeSpec("labor2")], mode="sync", extra_tables=table)
        init_in_sync(cfg, "labor1", ["labor2"])  # gmd init + gmd dirty: each life gets its own identity
        w = WitnessProcess(cfg, "W", d)
        try:
            w.start()
            with daemon_processes(cfg, ["labor2"], d) as procs:
                async with in_process_daemon(cfg, "labor1") as daemon:
                    eng = await start_primary(daemon, procs)
                    identities.append(eng.statemap.identity)
                    assert eng.status()["state_map"]["identity"] == identities[-1]
                    # The secondary learned it from its primary.
                    await wait_for(lambda: procs["labor2"].status()["state_map"]["identity"] == identities[-1],
                                   what="labor2 adopts the volume identity")
                    await wait_for(lambda: eng.status()["quorum"]["witnesses"]["W"]["granted"], what="lease")
                    await eng.write(0, b"a" * 4096)
                    procs["labor2"].kill()
                    with trio.fail_after(20):
                        await eng.write(4096, bytes([life]) * 4096)  # with the witness's vote
                    await trio.sleep(1.5)  # renewals under the witness's registration
                    with trio.fail_after(20):
                        await eng.write(8192, bytes([life]) * 4096)
                    assert eng.role.value == "primary", eng.status()
        finally:
            w.stop()
        if life == 2:
            OLD, NEW = identities
            assert OLD and NEW and OLD != NEW
            log = w.log()
            assert f"labor1 claims volume appslv with identity {NEW[:8]}\u2026; witness also holds volume " \
                   f"appslv under identity {OLD[:8]}\u2026, a different volume's life: not applied" in log
    saved = json.loads(shared.read_text())["records"]
    assert {(r["identity"], r["primary"]) for r in saved} == {(identities[0], "labor1"), (identities[1], "labor1")}
    assert all(r["outdated"] == ["labor2"] for r in saved)
    assert os.path.exists(f"{shared}.lock")
