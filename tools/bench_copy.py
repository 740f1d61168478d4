"""Copy-engine benchmark: full copy and mini-copy of a member, against nbdcopy and rsync.

Both nodes are real ``gmd daemon`` subprocesses on 127.0.0.1 (the primary
``bench1`` serves its FUSE file, the member ``bench2`` runs --no-mount), driven
only through their control sockets; volume mode ``mwc``, 64 KiB regions, backing
files under --workdir. Every timed step starts with ``sync; echo 3 >
/proc/sys/vm/drop_caches`` and then --settle seconds (3 by default) of waiting:
see :func:`page_reporting` for why. Each repetition measures:

* ``full``: the primary's backing file holds random data (written once per run,
  fully allocated), the member's is fallocated zeros; primary ``gmddirty`` (full
  copy, not --skip-initial-copy), member ``gmdclean``. Timed from the member's
  ``up`` (then the primary's ``up``, and ``primary`` once the member is
  connected) until the primary's status shows the member ``uptodate``. MB/s
  are 10^6 bytes of the volume per second.
* ``nbdcopy``: the full-copy reference, ``nbdcopy --flush`` of the primary's
  backing file to ``nbdkit file`` (a fallocated file) on 127.0.0.1.
* ``mini 1%`` / ``mini 10%``: from an in-sync cluster the member's volume goes
  ``down``, its backing file is saved (``cp --sparse=never``), random data is
  written to a random 1% (10%) of the regions through the primary's FUSE file
  (pwrite + fsync); timed from the member's ``up`` until it is ``uptodate``.
  "reconnect" is the part of that until the primary shows the link connected.
* ``rsync 1%`` / ``rsync 10%``: the same delta with ``rsync -I --inplace
  --no-whole-file --fsync`` from the primary's backing file to an rsync daemon
  on 127.0.0.1 whose destination is the saved pre-delta copy.

After every copy both files are compared (xxh3); a difference prints FAIL and
makes the exit status 1. "sent" is the copy's ``sent_bytes`` as last seen in a
status poll (every 10 ms, so the last few ms of a pass may be missing), or
rsync's "Total bytes sent". The table shows medians; ratios are medians of the
per-repetition ratios. A repetition in which a gmd daemon dies is reported
loudly (with the ends of the daemons' logs) and re-run on a fresh cluster, up to
5 tries; the crashes are listed under the table. Not a test: nothing here
asserts a speed. Needs root.

    .venv/bin/python -m tools.bench_copy [--size 1GiB] [--repeats 3] [--workdir /var/tmp/gmd-bench] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import xxhash

from gmd import admin, control
from gmd.config import Config, load_config, parse_size
from tools.cluster_config import NodeSpec, write_cluster_config
from tools.procs import (
    die_with_parent,
    free_port,
    is_mounted,
    machine,
    stop_process,
    unmount_fuse,
)

MiB = 1 << 20
PIECE = 64 * MiB
REGION = 64 * 1024
PRIMARY, MEMBER = "bench1", "bench2"  # bench1 sorts first: the primary dials the member
PCTS = (1, 10)
ATTEMPTS = 5  # tries per repetition when a gmd daemon dies (a bug to fix, reported loudly)


class DaemonDied(RuntimeError):
    """A gmd daemon exited during a repetition (a gmd bug, not a slow copy)."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


SETTLE = 3.0  # seconds after dropping the page cache before a timed copy starts (--settle)


def drop_caches() -> None:
    """Drop the page cache, then let the machine settle (see :func:`page_reporting`)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
    time.sleep(SETTLE)


def page_reporting() -> str | None:
    """Whether this (virtual) machine hands free memory back to its host.

    With free page reporting, memory freed by dropping the page cache goes
    back to the host about 2 s later, and each page touched again after that
    costs a fault in the host. A copy started right after the drop runs partly
    on memory not yet handed back and is flattered: measured here, nbdcopy of
    1 GiB ran at 700-990 MB/s started at once and 430-440 MB/s started 3 s
    later. Every timed copy therefore starts --settle seconds after the drop,
    in the state a long-running server is in."""
    try:
        order = Path("/sys/module/page_reporting/parameters/page_reporting_order").read_text().strip()
    except OSError:
        return None
    return f"free page reporting on (order {order})"


def fallocated(path: Path, size: int) -> None:
    """A fresh, fully allocated file of zeros."""
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)


def file_hash(path: Path) -> int:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while piece := f.read(PIECE):
            h.update(piece)
    return h.intdigest()


def write_config(directory: Path, size: int) -> Config:
    # The primary's site holds 2 of 3 votes: it keeps quorum (and keeps
    # writing) while the member is down for the mini-copy scenarios.
    specs = [NodeSpec(n, votes=2 if n == PRIMARY else 1,
                      member={"device": f"data/{n}.img", "statemap": f"data/{n}.sm"}) for n in (PRIMARY, MEMBER)]
    (directory / "data").mkdir()
    path = write_cluster_config(directory, specs, volume="vol", size=size, mode="mwc", secret="bench",
                                volume_settings={"region_size": "64KiB"})
    return load_config(path)


def prepare_full_copy(cfg: Config, size: int) -> None:
    """Fresh state maps; the primary's data is the source, the member's zeros the target."""
    fallocated(Path(cfg.member("vol", MEMBER).device), size)
    for n in (PRIMARY, MEMBER):
        admin.init_volume(cfg, n, "vol", force=True)
    admin.mark_dirty(cfg, PRIMARY, "vol")
    admin.mark_clean(cfg, MEMBER, "vol")


def start_daemon(cfg: Config, node: str, logfile: Path, *, mount: bool) -> subprocess.Popen:
    gmd = str(Path(sys.executable).parent / "gmd")
    cmd = [gmd, "daemon", "--config", str(cfg.path), "--node", node] + ([] if mount else ["--no-mount"])
    with open(logfile, "ab") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                preexec_fn=die_with_parent)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else b""
    if not line.startswith(b"ready"):
        stop_process(proc, timeout=10)
        raise RuntimeError(f"daemon {node} did not start: {line!r}; see {logfile}")
    return proc


def ctl(cfg: Config, node: str, op: str, **fields) -> dict:
    reply = control.request(cfg.node(node).control, {"op": op, "volume": "vol", **fields})
    if not reply.get("ok"):
        raise RuntimeError(f"{op} on {node} failed: {reply.get('error', reply)}")
    return reply


def wait_connected(cfg: Config, procs: list[subprocess.Popen], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while ctl(cfg, PRIMARY, "status")["status"]["members"][MEMBER]["link"] != "connected":
        if time.monotonic() > end or any(p.poll() is not None for p in procs):
            raise RuntimeError(f"{MEMBER} did not connect to {PRIMARY} in {timeout} s")
        time.sleep(0.01)


def wait_uptodate(cfg: Config, t0: float, timeout: float, procs: list[subprocess.Popen]) -> dict:
    """Poll the primary until the member is connected, uptodate, with nothing
    out of sync and no copy running; seconds since ``t0``, reconnect time, sent bytes."""
    connected = None
    sent: dict[str, int] = {}  # copy kind -> sent_bytes last seen
    while True:
        st = ctl(cfg, PRIMARY, "status")["status"]
        now = time.perf_counter()
        m = st["members"][MEMBER]
        if m["link"] == "connected" and connected is None:
            connected = now - t0
        if m["copy"]:
            sent[m["copy"]["kind"]] = m["copy"]["sent_bytes"]
        if (m["link"] == "connected" and m["disk"] == "uptodate" and not m["out_of_sync_bytes"]
                and not m["copy"]):
            return {"seconds": now - t0, "reconnect": connected, "sent": sum(sent.values())}
        if now - t0 > timeout or any(p.poll() is not None for p in procs):
            raise RuntimeError(f"member not uptodate after {now - t0:.1f} s: {m}")
        time.sleep(0.01)


def check_same(a: Path, b: Path, what: str, failures: list[str]) -> bool:
    same = file_hash(a) == file_hash(b)
    if not same:
        failures.append(what)
        log(f"!!!!!! FAIL: {what}: {a} and {b} differ !!!!!!")
    return same


def wait_listening(port: int, proc: subprocess.Popen, what: str) -> None:
    end = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port}") from None
            time.sleep(0.05)


def write_delta(device: str, size: int, pct: int, seed: int) -> int:
    """Random data over a random ``pct`` % of the regions, through the FUSE file,
    from a thread: a write the daemon never completes must not hang the run."""
    regions = size // REGION
    chosen = sorted(random.Random(seed).sample(range(regions), max(1, round(regions * pct / 100))))
    error: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(device, os.O_WRONLY)
            try:
                for r in chosen:
                    os.pwrite(fd, os.urandom(REGION), r * REGION)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            error.append(e)

    writer = threading.Thread(target=run, daemon=True)
    writer.start()
    timeout = 60 + len(chosen) * REGION / 1e6  # at least 1 MB/s
    writer.join(timeout)
    if writer.is_alive():
        raise RuntimeError(f"writes to {device} not done after {timeout:.0f} s (suspended? see the primary's log)")
    if error:
        raise error[0]
    return len(chosen)


def rsync_copy(src: Path, dst_dir: Path, d: Path) -> dict:
    """rsync ``src`` onto ``dst_dir``/b.img through an rsync daemon on 127.0.0.1 (resync.sh t_rsync)."""
    port = free_port()
    conf = d / "rsyncd.conf"
    conf.write_text(f"use chroot = false\n[dst]\n    path = {dst_dir}\n    read only = false\n"
                    "    uid = root\n    gid = root\n")
    daemon = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}", "--address=127.0.0.1",
                               f"--port={port}", f"--log-file={d / 'rsyncd.log'}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
    try:
        wait_listening(port, daemon, "rsync daemon")
        drop_caches()
        t0 = time.perf_counter()
        r = subprocess.run(["rsync", "-I", "--inplace", "--no-whole-file", "--fsync", "--stats", str(src),
                            f"rsync://127.0.0.1:{port}/dst/b.img"], capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"rsync failed ({r.returncode}): {r.stderr.strip()}")
        m = re.search(r"^Total bytes sent: ([\d,]+)", r.stdout, re.MULTILINE)
        return {"seconds": seconds, "sent": int(m.group(1).replace(",", "")) if m else None}
    finally:
        stop_process(daemon, timeout=10)


def nbdcopy_copy(src: Path, dst: Path, size: int, d: Path) -> dict:
    """``nbdcopy --flush`` of ``src`` to ``nbdkit file`` on 127.0.0.1 (resync.sh t_nbdcopy)."""
    fallocated(dst, size)
    port = free_port()
    with open(d / "nbdkit.log", "ab") as err:
        server = subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", str(dst)],
                                  stdout=subprocess.DEVNULL, stderr=err, preexec_fn=die_with_parent)
    try:
        wait_listening(port, server, "nbdkit")
        drop_caches()
        t0 = time.perf_counter()
        r = subprocess.run(["nbdcopy", "--flush", str(src), f"nbd://127.0.0.1:{port}/"], capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"nbdcopy failed ({r.returncode}): {r.stderr.strip()}")
    finally:
        stop_process(server, timeout=20)
    return {"seconds": seconds, "MBps": size / seconds / 1e6, "changed": size, "sent": None}


def repetition(rep: int, cfg: Config, d: Path, size: int, have_nbd: bool, failures: list[str]) -> dict:
    primary_img, member_img = Path(cfg.member("vol", PRIMARY).device), Path(cfg.member("vol", MEMBER).device)
    out: dict = {}
    if have_nbd:  # before the cluster starts: both copies read the same pristine source
        dst = d / "nbd-dst.img"
        out["nbdcopy"] = nbdcopy_copy(primary_img, dst, size, d)
        out["nbdcopy"]["identical"] = check_same(primary_img, dst, f"rep {rep} nbdcopy", failures)
        dst.unlink()
        log(f"rep {rep} full copy  nbdcopy {out['nbdcopy']['seconds']:7.2f} s {out['nbdcopy']['MBps']:7.1f} MB/s")
    prepare_full_copy(cfg, size)
    procs: list[subprocess.Popen] = []
    timeout = 120 + size / 5e6
    try:
        procs.append(start_daemon(cfg, MEMBER, d / f"{MEMBER}.log", mount=False))
        procs.append(start_daemon(cfg, PRIMARY, d / f"{PRIMARY}.log", mount=True))
        drop_caches()
        t0 = time.perf_counter()
        ctl(cfg, MEMBER, "up")
        ctl(cfg, PRIMARY, "up")
        wait_connected(cfg, procs)  # promotion may need the member's vote
        device = ctl(cfg, PRIMARY, "primary")["device"]
        full = wait_uptodate(cfg, t0, timeout, procs)
        full["MBps"], full["changed"] = size / full["seconds"] / 1e6, size
        full["identical"] = check_same(primary_img, member_img, f"rep {rep} gmd full copy", failures)
        out["full"] = full
        log(f"rep {rep} full copy  gmd     {full['seconds']:7.2f} s {full['MBps']:7.1f} MB/s  "
            f"sent {full['sent'] / 1e6:7.1f} MB  reconnect {full['reconnect']:.2f} s")
        for pct in PCTS:
            ctl(cfg, MEMBER, "down")
            saved = d / "rsync-dst"
            saved.mkdir(exist_ok=True)
            subprocess.run(["cp", "--sparse=never", str(member_img), str(saved / "b.img")], check=True)
            t = time.perf_counter()
            n = write_delta(device, size, pct, seed=rep * 1000 + pct)
            wrote = time.perf_counter() - t
            drop_caches()
            t0 = time.perf_counter()
            ctl(cfg, MEMBER, "up")
            mini = wait_uptodate(cfg, t0, timeout, procs)
            mini["changed"] = n * REGION
            mini["identical"] = check_same(primary_img, member_img, f"rep {rep} gmd mini-copy {pct}%", failures)
            rs = rsync_copy(primary_img, saved, d)
            rs["changed"] = n * REGION
            rs["identical"] = check_same(primary_img, saved / "b.img", f"rep {rep} rsync {pct}%", failures)
            shutil.rmtree(saved)
            out[f"mini{pct}"], out[f"rsync{pct}"] = mini, rs
            log(f"rep {rep} mini {pct:2d}%   gmd     {mini['seconds']:7.2f} s  sent {mini['sent'] / 1e6:7.1f} MB  "
                f"reconnect {mini['reconnect']:.2f} s  ({n} regions written in {wrote:.2f} s)")
            log(f"rep {rep} mini {pct:2d}%   rsync   {rs['seconds']:7.2f} s  sent {(rs['sent'] or 0) / 1e6:7.1f} MB")
    except Exception as e:
        for p in procs:  # a crashing daemon may still be on its way out
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
        dead = [f"{n} (exit status {p.returncode})" for n, p in zip((MEMBER, PRIMARY), procs) if p.poll() is not None]
        if dead:
            raise DaemonDied(f"rep {rep}: gmd daemon {', '.join(dead)} died; {type(e).__name__}: {e}") from e
        raise
    finally:
        for p in reversed(procs):
            stop_process(p)
        unmount(cfg.node(PRIMARY).mount)
    return out


def unmount(path: Path) -> None:
    """A FUSE mount a killed daemon left behind."""
    unmount_fuse(path)
    if is_mounted(path):
        subprocess.run(["umount", "-l", os.path.realpath(path)], capture_output=True, check=False)
    if is_mounted(path):
        log(f"WARNING: could not unmount {path}")


def log_tails(d: Path, n: int) -> str:
    """The ends of the daemons' logs (they go with the directory)."""
    out = []
    for node in (PRIMARY, MEMBER):
        if (d / f"{node}.log").exists():
            lines = (d / f"{node}.log").read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- last lines of {node}'s log:\n" + "\n".join(lines))
    return "\n".join(out)


def summarize(runs: list[dict]) -> dict:
    def med(key: str, field: str):
        vals = [r[key][field] for r in runs if key in r and r[key].get(field) is not None]
        return statistics.median(vals) if vals else None

    def ratio(a: str, af: str, b: str, bf: str):
        vals = [r[a][af] / r[b][bf] for r in runs if a in r and b in r and r[b][bf]]
        return statistics.median(vals) if vals else None

    for r in runs:  # the copy engine's own time: after the link is back
        for k in ("full", *(f"mini{p}" for p in PCTS)):
            if k in r and r[k].get("reconnect") is not None:
                r[k]["copy"] = r[k]["seconds"] - r[k]["reconnect"]
    s = {k: {f: med(k, f) for f in ("seconds", "MBps", "changed", "sent", "reconnect", "copy")}
         for k in ("full", "nbdcopy", "mini1", "mini10", "rsync1", "rsync10")}
    s["ratios"] = {"gmd_full_vs_nbdcopy_MBps": ratio("full", "MBps", "nbdcopy", "MBps")}
    for p in PCTS:
        s["ratios"][f"full_vs_mini{p}"] = ratio("full", "seconds", f"mini{p}", "seconds")
        s["ratios"][f"rsync{p}_vs_mini{p}"] = ratio(f"rsync{p}", "seconds", f"mini{p}", "seconds")
        s["ratios"][f"full_vs_mini{p}_copy"] = ratio("full", "copy", f"mini{p}", "copy")
        s["ratios"][f"rsync{p}_vs_mini{p}_copy"] = ratio(f"rsync{p}", "seconds", f"mini{p}", "copy")
    return s


def markdown(result: dict) -> str:
    med, r = result["median"], result["median"]["ratios"]

    def f(v, fmt: str, scale: float = 1.0) -> str:
        return "-" if v is None else format(v / scale, fmt)

    def row(label: str, key: str) -> str:
        m = med[key]
        return (f"| {label} | {f(m['seconds'], '.2f')} | {f(m['MBps'], '.0f')} | {f(m['changed'], '.1f', 1e6)} "
                f"| {f(m['sent'], '.1f', 1e6)} | {f(m['reconnect'], '.2f')} | |")

    lines = [(f"Machine: {result['machine']}; {result['repeats']} repetitions, medians; volume "
              f"{result['size'] // MiB} MiB, 64 KiB regions, mode mwc; both daemons on 127.0.0.1; "
              f"page cache dropped {result['settle']:g} s before each timed copy"
              f"{'; ' + result['page_reporting'] if result['page_reporting'] else ''}. "
              "gmd's MB sent: the last status sample "
              "(10 ms polls) before the copy ended, a lower bound."), "",
             "| copy | seconds | MB/s | MB to copy | MB sent | of which reconnect s | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|",
             row("full copy, gmd", "full")]
    if result["nbdcopy"]:
        lines.append(row("full copy, nbdcopy -> nbdkit", "nbdcopy"))
        lines.append(f"| gmd full / nbdcopy (MB/s) | | | | | | {f(r['gmd_full_vs_nbdcopy_MBps'], '.2f')} |")
    else:
        lines.append("| full copy, nbdcopy -> nbdkit | skipped: nbdcopy or nbdkit not installed | | | | | |")
    for p in PCTS:
        lines.append(row(f"mini-copy {p}%, gmd", f"mini{p}"))
    for p in PCTS:
        lines.append(row(f"rsync {p}%", f"rsync{p}"))
    for p in PCTS:
        lines.append(f"| gmd full / gmd mini {p}% (seconds) | | | | | | {f(r[f'full_vs_mini{p}'], '.1f')} |")
    for p in PCTS:
        lines.append(f"| rsync {p}% / gmd mini {p}% (seconds) | | | | | | {f(r[f'rsync{p}_vs_mini{p}'], '.2f')} |")
    for p in PCTS:
        lines.append(f"| gmd full / gmd mini {p}%, copy time only (reconnect excluded) | | | | | | "
                     f"{f(r[f'full_vs_mini{p}_copy'], '.1f')} |")
    for p in PCTS:
        lines.append(f"| rsync {p}% / gmd mini {p}%, copy time only | | | | | | "
                     f"{f(r[f'rsync{p}_vs_mini{p}_copy'], '.2f')} |")
    if result["daemon_crashes"]:
        lines += ["", (f"**{len(result['daemon_crashes'])} gmd daemon crash(es)**, repetition re-run each time: "
                       + "; ".join(result["daemon_crashes"]))]
    if result["failures"]:
        lines += ["", f"**FAIL**: copies not identical: {'; '.join(result['failures'])}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_copy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1GiB", help="volume size (default 1GiB)")
    p.add_argument("--repeats", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--workdir", default="/var/tmp/gmd-bench", help="on the local disk, not tmpfs")
    p.add_argument("--json", metavar="FILE", help="also write the full result as JSON")
    p.add_argument("--settle", type=float, default=SETTLE,
                   help=f"seconds between dropping the page cache and a timed copy (default {SETTLE:g})")
    args = p.parse_args(argv)
    if args.settle < 0:
        p.error("--settle must not be negative")
    globals()["SETTLE"] = args.settle
    size = parse_size(args.size, file="--size", key="size")
    if size % REGION:
        p.error("--size must be a multiple of 64KiB")
    if os.geteuid() != 0:
        p.error("run as root (drop_caches, FUSE mount, rsync daemon uid)")
    if not shutil.which("rsync"):
        p.error("rsync is not installed")
    have_nbd = bool(shutil.which("nbdcopy") and shutil.which("nbdkit"))
    if not have_nbd:
        log("nbdcopy or nbdkit not installed: skipping the nbdcopy -> nbdkit reference")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="gmd-copy-", dir=workdir))
    runs: list[dict] = []
    failures: list[str] = []
    crashes: list[str] = []
    try:
        cfg = write_config(d, size)
        log(f"writing {size // MiB} MiB of random data to the primary's backing file")
        with open(cfg.member("vol", PRIMARY).device, "wb") as f:
            f.writelines(os.urandom(min(PIECE, size - off)) for off in range(0, size, PIECE))
            os.fsync(f.fileno())
        for rep in range(1, args.repeats + 1):
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    runs.append(repetition(rep, cfg, d, size, have_nbd, failures))
                    break
                except DaemonDied as e:
                    crashes.append(str(e))
                    log(f"!!!!!! {e}\n" + log_tails(d, 25))
                    if attempt == ATTEMPTS:
                        raise
                    log(f"!!!!!! repeating repetition {rep} on a fresh cluster")
                except BaseException:
                    log(log_tails(d, 15))
                    raise
    finally:
        unmount(d / "run" / PRIMARY)
        if not is_mounted(d / "run" / PRIMARY):
            shutil.rmtree(d, ignore_errors=True)
    result = {"machine": machine(), "settle": args.settle, "page_reporting": page_reporting(), "size": size,
              "repeats": args.repeats, "nbdcopy": have_nbd,
              "failures": failures, "daemon_crashes": crashes, "median": summarize(runs), "runs": runs}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
