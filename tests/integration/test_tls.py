"""TLS between peers: real certificates from a throwaway CA made with openssl."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import trio

from .harness import (
    NodeSpec,
    backing,
    daemon_processes,
    file_hash,
    in_process_daemon,
    init_in_sync,
    wait_for,
    write_config,
)


def make_ca(d, name):
    d.mkdir(parents=True, exist_ok=True)
    ossl = ["openssl"]
    subprocess.run(ossl + ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                           "-keyout", d / "ca.key", "-out", d / "ca.crt", "-days", "2", "-subj", f"/CN={name}"],
                   check=True, capture_output=True)
    subprocess.run(ossl + ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                           "-keyout", d / "node.key", "-out", d / "node.csr", "-subj", "/CN=gmd-node"],
                   check=True, capture_output=True)
    subprocess.run(ossl + ["x509", "-req", "-in", d / "node.csr", "-CA", d / "ca.crt", "-CAkey", d / "ca.key",
                           "-CAcreateserial", "-out", d / "node.crt", "-days", "2"],
                   check=True, capture_output=True)
    return f'\n[tls]\ncert = "{d}/node.crt"\nkey = "{d}/node.key"\nca = "{d}/ca.crt"\n'


@pytest.fixture
def tls_tables(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make test certificates")
    return make_ca(tmp_path / "pki-a", "gmd-test-ca-a"), make_ca(tmp_path / "pki-b", "gmd-test-ca-b")


async def test_members_replicate_over_tls(tmp_path, tls_tables):
    good, _ = tls_tables
    cfg = write_config(tmp_path, [NodeSpec("labor1"), NodeSpec("labor2")], extra_tables=good)
    init_in_sync(cfg, "labor1", ["labor2"])
    with daemon_processes(cfg, ["labor2"], tmp_path) as procs:
        async with in_process_daemon(cfg, "labor1") as d:
            await trio.to_thread.run_sync(lambda: procs["labor2"].request(op="up", volume="appslv"))
            eng = d.engines["appslv"]
            await eng.up()
            m = eng.members["labor2"]
            await wait_for(lambda: m.connected, what="TLS link")
            assert isinstance(m.session.paths[0].stream, trio.SSLStream)
            await eng.promote()
            for i in range(64):
                await eng.write(i * 65536 + 512, bytes([i + 1]) * 8192)
            await eng.flush()
            assert file_hash(backing(tmp_path, "labor1")) == file_hash(backing(tmp_path, "labor2"))


async def test_a_peer_certified_by_another_ca_is_refused(tmp_path, tls_tables):
    good, other = tls_tables
    nodes = [NodeSpec("labor1"), NodeSpec("labor2")]
    cfg = write_config(tmp_path, nodes, extra_tables=good)
    (tmp_path / "b").mkdir()
    rogue = write_config(tmp_path / "b", nodes, extra_tables=other)
    init_in_sync(cfg, "labor1", [])
    init_in_sync(rogue, "labor2", [])
    with daemon_processes(rogue, ["labor2"], tmp_path) as procs:
        async with in_process_daemon(cfg, "labor1") as d:
            await trio.to_thread.run_sync(lambda: procs["labor2"].request(op="up", volume="appslv"))
            eng = d.engines["appslv"]
            await eng.up()
            m = eng.members["labor2"]
            await wait_for(lambda: m.state.value == "standalone", what="refused")
            assert "TLS" in m.reason
            await wait_for(lambda: "TLS handshake failed" in procs["labor2"].log(), what="refusal logged on labor2")
            assert not m.connected
