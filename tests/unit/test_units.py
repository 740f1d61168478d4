"""gmd install-units: the rendered systemd units, checked by systemd-analyze,
and what installing them writes or refuses."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gmd.errors import Refused
from tools import units
from tools.cli import main
from tools.cluster_config import NodeSpec, witness_table, write_cluster_config

GMD = Path(sys.executable).parent / "gmd"  # the real one: systemd-analyze checks ExecStart exists


def test_rendering_puts_in_the_gmd_executable_and_the_config():
    rendered = {u.name: u.text for u in units.render(GMD, Path("/etc/gmd/gmd.toml"))}
    assert set(rendered) == {"gmd@.service", "gmd-witness@.service"}
    node, witness = rendered["gmd@.service"], rendered["gmd-witness@.service"]
    assert f"ExecStart={GMD.absolute()} daemon --node %i\n" in node
    assert f"ExecStart={GMD.absolute()} witness --name %i\n" in witness
    for text in rendered.values():
        assert "Environment=GMD_CONFIG=/etc/gmd/gmd.toml\n" in text and "Type=notify\n" in text
        assert "@GMD@" not in text and "@CONFIG@" not in text


@pytest.mark.parametrize("config, char", [("/etc/my gmd/gmd.toml", " "), ("/etc/gmd/100%.toml", "%"),
                                          ("/etc/$HOME.toml", "$"), ('/etc/"x".toml', '"')])
def test_a_path_the_unit_would_have_to_quote_is_refused(config, char):
    with pytest.raises(Refused) as info:
        units.render(GMD, Path(config))
    assert info.value.rule == "units-unsafe-path" and repr(char) in str(info.value)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_rendered_units(tmp_path):
    steps = units.plan(tmp_path, units.render(GMD, Path("/etc/gmd/gmd.toml")), force=False)
    units.install(steps)
    # Templates are verified through an instance, as systemd would load them.
    for template, instance in (("gmd@.service", "gmd@labor1.service"),
                               ("gmd-witness@.service", "gmd-witness@tiebreak.service")):
        shutil.copy(tmp_path / template, tmp_path / instance)
    proc = subprocess.run(["systemd-analyze", "verify", *(str(p) for p in sorted(tmp_path.iterdir()))],
                          capture_output=True, text=True, timeout=60)
    # Unknown keys and bad values are only warnings (exit 0): any line about our units fails too.
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "gmd" in line]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


def test_install_writes_once_leaves_the_same_alone_and_refuses_a_different_one(tmp_path):
    rendered = units.render(GMD, Path("/etc/gmd/gmd.toml"))
    steps = units.plan(tmp_path, rendered, force=False)
    assert [s.action for s in steps] == ["write", "write"]
    units.install(steps)
    unit = tmp_path / "gmd@.service"
    assert unit.read_text() == rendered[0].text and stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert [s.action for s in units.plan(tmp_path, rendered, force=False)] == ["unchanged", "unchanged"]
    unit.write_text(unit.read_text() + "LimitNOFILE=9\n")  # an administrator's edit
    with pytest.raises(Refused) as info:
        units.plan(tmp_path, rendered, force=False)
    assert info.value.rule == "units-differ" and str(unit) in str(info.value)
    steps = units.plan(tmp_path, rendered, force=True)
    assert [s.action for s in steps] == ["replace", "unchanged"]
    units.install(steps)
    assert unit.read_text() == rendered[0].text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gmd-witness@.service", "gmd@.service"]  # no temp left


def test_a_missing_unit_directory_is_refused(tmp_path):
    with pytest.raises(Refused) as info:
        units.plan(tmp_path / "nope", units.render(GMD, Path("/etc/gmd/gmd.toml")), force=False)
    assert info.value.rule == "units-dir-missing"


def test_the_command_prints_what_it_wrote_and_the_next_steps(tmp_path, capsys):
    cfg = write_cluster_config(tmp_path, [NodeSpec("labor1", address=[17990]), NodeSpec("labor2", address=[17991])],
                               tables=witness_table("tiebreak", 17992))
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    assert main(["install-units", "--config", str(cfg), "--dir", str(unit_dir), "--node", "labor2"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {unit_dir / 'gmd@.service'}" in out and f"GMD_CONFIG={cfg}" in out
    assert "systemctl daemon-reload" in out and "systemctl enable --now gmd@labor2" in out
    assert "gmd@labor1" not in out and "gmd-witness@tiebreak" in out
    (unit_dir / "gmd@.service").write_text("edited\n")
    assert main(["install-units", "--config", str(cfg), "--dir", str(unit_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "differs (needs --force)" in out and "nothing written" in out
    assert (unit_dir / "gmd@.service").read_text() == "edited\n"
    assert main(["install-units", "--config", str(cfg), "--dir", str(unit_dir)]) == 1
    assert "use --force" in capsys.readouterr().err
