"""Device benchmark: the same workloads as bench_write, through the FUSE file.

Setups: ``passthrough`` (shared/bench/fuse_passthrough.py, a minimal pyfuse3 +
trio single-file passthrough: the Python-FUSE limit on this machine), and gmd's
volume file with no member (``local``) and one member on loopback in each mode.
Every daemon is a subprocess; this process only does I/O on the file, from
threads (``os.pwrite`` releases the GIL): 1 MiB sequential writes from 4 threads
on their own stripes (MB/s), 4 KiB random writes from 16 threads (IOPS). Each
workload ends with an fsync; medians over interleaved repetitions with the
order rotated. Not a test: nothing here asserts a speed.

    .venv/bin/python -m tools.bench_fuse [--seconds 5] [--repeats 3] [--size 1GiB]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gmd import control
from gmd.config import load_config, parse_size
from tools.cluster_config import write_bench_cluster
from tools.procs import die_with_parent, is_mounted, machine, stop_process, unmount_fuse

MiB = 1 << 20
SETUPS = ("passthrough", "local", "sync", "mwc", "async")
PASSTHROUGH = Path(__file__).resolve().parents[2] / "shared" / "bench" / "fuse_passthrough.py"


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "ab"), stdin=subprocess.DEVNULL,
                            preexec_fn=die_with_parent)


def _wait_ready(proc: subprocess.Popen, what: str) -> None:
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else b""
    if not line.startswith(b"ready"):
        raise RuntimeError(f"{what} did not start: {line!r}")


def workload(path: str, kind: str, seconds: float, size: int) -> float:
    block, threads = (MiB, 4) if kind == "seq" else (4096, 16)
    payload = os.urandom(block)
    counts = [0] * threads
    deadline = time.monotonic() + seconds
    stripe = size // threads

    def run(i: int) -> None:
        fd = os.open(path, os.O_RDWR)
        rng = random.Random(i)
        pos = i * stripe
        try:
            while time.monotonic() < deadline:
                if kind == "seq":
                    os.pwrite(fd, payload, pos)
                    pos += block
                    if pos + block > (i + 1) * stripe:
                        pos = i * stripe
                else:
                    os.pwrite(fd, payload, rng.randrange(0, size // block) * block)
                counts[i] += 1
            os.fsync(fd)
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    n = sum(counts)
    return n * block / elapsed / 1e6 if kind == "seq" else n / elapsed


def bench_setup(setup: str, kind: str, seconds: float, size: int, workdir: Path) -> float:
    d = Path(tempfile.mkdtemp(prefix=f"gmd-fuse-{setup}-", dir=workdir))
    procs: list[subprocess.Popen] = []
    mounts: list[Path] = []
    try:
        if setup == "passthrough":
            mnt = d / "mnt"
            mnt.mkdir()
            img = d / "img"
            with open(img, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, size)
            p = _start([sys.executable, str(PASSTHROUGH), "--size", str(size), str(mnt), str(img)], d / "pt.log")
            procs.append(p)
            mounts.append(mnt)
            end = time.monotonic() + 30
            while not is_mounted(mnt):
                if time.monotonic() > end or p.poll() is not None:
                    raise RuntimeError(f"passthrough did not mount; see {d / 'pt.log'}")
                time.sleep(0.02)
            path = str(mnt / "vol")
        else:
            config = write_bench_cluster(d, setup, size)
            cfg = load_config(config)
            nodes = ["bench1"] if setup == "local" else ["bench2", "bench1"]
            for n in nodes:
                p = _start([sys.executable, "-m", "gmd", "daemon", "--config", str(config), "--node", n],
                           d / f"{n}.log")
                procs.append(p)
                _wait_ready(p, f"daemon {n}")
                mounts.append(cfg.node(n).mount)
                control.request(cfg.node(n).control, {"op": "up", "volume": "vol"})
            ctl = cfg.node("bench1").control
            end = time.monotonic() + 30
            while setup != "local":
                st = control.request(ctl, {"op": "status", "volume": "vol"})["status"]
                if st["members"]["bench2"]["link"] == "connected":
                    break
                if time.monotonic() > end:
                    raise RuntimeError("member did not connect")
                time.sleep(0.05)
            path = control.request(ctl, {"op": "primary", "volume": "vol"})["device"]
        return workload(path, kind, seconds, size)
    finally:
        for p in reversed(procs):
            stop_process(p)
        for m in mounts:
            unmount_fuse(m)
        subprocess.run(["rm", "-rf", str(d)], check=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_fuse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", default="1GiB")
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--workdir", default="/var/tmp/gmd-bench")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    size = parse_size(args.size, file="--size", key="size")
    setups = [s for s in args.setups.split(",") if s]
    if bad := [s for s in setups if s not in SETUPS]:
        p.error(f"unknown setup(s) {bad}")
    if "passthrough" in setups and not PASSTHROUGH.exists():
        p.error(f"{PASSTHROUGH} not found (shared/bench/ beside the checkout)")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    bench_setup(setups[0], "seq", 1.0, size, workdir)  # warm-up, discarded
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in setups}
    for rep in range(args.repeats):
        order = setups[rep % len(setups):] + setups[:rep % len(setups)]
        for s in order:
            r = {"seq_MBps": bench_setup(s, "seq", args.seconds, size, workdir),
                 "rand_iops": bench_setup(s, "rand", args.seconds, size, workdir)}
            runs[s].append(r)
            print(f"rep {rep + 1} {s:11s} seq {r['seq_MBps']:8.1f} MB/s  rand {r['rand_iops']:8.0f} IOPS",
                  file=sys.stderr, flush=True)
    med = {s: {k: statistics.median(r[k] for r in runs[s]) for k in ("seq_MBps", "rand_iops")} for s in runs}
    base = med.get("passthrough")
    print(f"Machine: {machine()}; {args.repeats} interleaved repetitions (order rotated) of {args.seconds:.0f} s "
          f"per workload, medians; volume {size // MiB} MiB; writes through the FUSE file.\n")
    print("| setup | 1 MiB seq write MB/s (4 threads) | 4 KiB rand write IOPS (16 threads) | seq vs passthrough | rand vs passthrough |")
    print("|---|---:|---:|---:|---:|")
    for s, m in med.items():
        rs = f"{m['seq_MBps'] / base['seq_MBps']:.2f}" if base else "-"
        rr = f"{m['rand_iops'] / base['rand_iops']:.2f}" if base else "-"
        print(f"| {s} | {m['seq_MBps']:.0f} | {m['rand_iops']:.0f} | {rs} | {rr} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "median": med, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
