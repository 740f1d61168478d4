"""Write-path benchmark: the volume engine with one member on loopback.

Runs, for each setup (local-only, sync, mwc, async), two workloads against the
primary's engine, the way the FUSE front will drive it, each on a fresh cluster,
after one discarded warm-up, with the setup order rotated every repetition:

* ``seq``:  1 MiB sequential writes, 4 in flight (fio's seqwrite job), MB/s
* ``rand``: 4 KiB random writes, 16 in flight (fio's randwrite job), IOPS

With ``--metrics`` the primary also serves its Prometheus endpoint, scraped
once a second from a thread meanwhile (docs/BENCHMARKS.md, "Metrics on the
write path").

The primary runs in this process (its engine is the thing measured); the member
is a real ``gmd daemon`` subprocess over TCP on 127.0.0.1. Setups are
interleaved per repetition so they see the same machine state; the table shows
medians. Not a test: nothing here asserts a speed.

    .venv/bin/python -m tools.bench_write [--seconds 5] [--repeats 3] [--size 1GiB]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import trio

from gmd import control
from gmd.config import load_config, parse_size
from gmd.daemon import NodeDaemon
from tools.cluster_config import write_bench_cluster
from tools.procs import die_with_parent, free_ports, machine, stop_process

MiB = 1 << 20
SETUPS = ("local", "sync", "mwc", "async")
BACKING = "zeroed"  # or "fallocated" (--backing)
METRICS = False  # --metrics: the primary serves its metrics endpoint, scraped every second


def start_member(config: Path, log: Path) -> subprocess.Popen:
    gmd = str(Path(sys.executable).parent / "gmd")
    proc = subprocess.Popen([gmd, "daemon", "--config", str(config), "--node", "bench2", "--no-mount"],
                            stdout=subprocess.PIPE, stderr=open(log, "ab"), stdin=subprocess.DEVNULL,
                            preexec_fn=die_with_parent)
    line = proc.stdout.readline()
    if not line.startswith(b"ready"):
        proc.kill()
        raise RuntimeError(f"member daemon did not start: {line!r}; see {log}")
    reply = control.request(load_config(config).node("bench2").control, {"op": "up", "volume": "vol"})
    if not reply.get("ok"):
        raise RuntimeError(f"member up failed: {reply}")
    return proc


async def run_workload(engine, kind: str, seconds: float, size: int) -> float:
    """Returns MB/s for seq, IOPS for rand."""
    block = MiB if kind == "seq" else 4096
    depth = 4 if kind == "seq" else 16
    payload = os.urandom(block)
    done = 0
    pos = [0]
    rng = random.Random(1)
    deadline = trio.current_time() + seconds

    async def worker():
        nonlocal done
        while trio.current_time() < deadline:
            if kind == "seq":
                offset = pos[0]
                pos[0] = (pos[0] + block) % size
            else:
                offset = rng.randrange(0, size // block) * block
            await engine.write(offset, payload)
            done += 1

    t0 = time.perf_counter()
    async with trio.open_nursery() as n:
        for _ in range(depth):
            n.start_soon(worker)
    await engine.flush()
    elapsed = time.perf_counter() - t0
    return done * block / elapsed / 1e6 if kind == "seq" else done / elapsed


async def bench_setup(setup: str, kind: str, seconds: float, size: int, workdir: Path) -> dict[str, float]:
    """One workload on a fresh cluster of ``setup``: its rate, and the share of
    written bytes the member received (below 1: it fell behind, async only)."""
    d = Path(tempfile.mkdtemp(prefix=f"gmd-bench-{setup}-", dir=workdir))
    port = free_ports(1)[0] if METRICS else None
    config = write_bench_cluster(d, setup, size, backing=BACKING, metrics=port)
    member = None
    scraping = threading.Event()
    try:
        if setup != "local":
            member = await trio.to_thread.run_sync(start_member, config, d / "bench2.log")
        daemon = NodeDaemon(load_config(config), "bench1", mount=False)
        async with trio.open_nursery() as n:
            await n.start(daemon.serve)
            engine = daemon.engines["vol"]
            await engine.up()
            m = engine.members.get("bench2")
            if m is not None:
                with trio.fail_after(30):
                    while not m.connected:
                        await trio.sleep(0.02)
            await engine.promote()
            if port is not None:
                scraping.set()
                threading.Thread(target=scrape_every_second, args=(port, scraping), daemon=True).start()
            rate = await run_workload(engine, kind, seconds, size)
            scraping.clear()
            shipped = m.bytes_shipped / max(1, engine.writepath.bytes_written) if m is not None else 1.0
            if setup == "async" and m is not None:
                with trio.fail_after(120):  # let the member catch up before teardown
                    while m.queued_bytes and m.connected:
                        await trio.sleep(0.05)
            daemon.stop()
        return {"rate": rate, "shipped": shipped}
    finally:
        scraping.clear()
        if member is not None:
            stop_process(member)
        subprocess.run(["rm", "-rf", str(d)], check=False)


def scrape_every_second(port: int, running: threading.Event) -> None:
    """What a (busy) Prometheus does to the primary while it is measured."""
    while running.is_set():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
                reply.read()
        except OSError:
            if running.is_set():
                raise  # the endpoint failed while measured: the run must not pass for one with metrics
            return  # the run ended and the daemon went meanwhile
        time.sleep(1.0)


async def main_async(args) -> dict:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in args.setups}
    # The first cluster a process runs is always slow (imports, cold caches):
    # run one short workload first and discard it.
    await bench_setup(args.setups[0], "seq", 1.0, args.size, workdir)
    for rep in range(args.repeats):
        # Rotate the order each repetition: a setup must not always follow the
        # same neighbour (the page cache and writeback state it leaves behind).
        order = args.setups[rep % len(args.setups):] + args.setups[:rep % len(args.setups)]
        for setup in order:
            seq = await bench_setup(setup, "seq", args.seconds, args.size, workdir)
            rand = await bench_setup(setup, "rand", args.seconds, args.size, workdir)
            r = {"seq_MBps": seq["rate"], "rand_iops": rand["rate"],
                 "seq_shipped": seq["shipped"], "rand_shipped": rand["shipped"]}
            runs[setup].append(r)
            print(f"rep {rep + 1} {setup:6s} seq {r['seq_MBps']:8.1f} MB/s   rand {r['rand_iops']:8.0f} IOPS"
                  f"   shipped {r['seq_shipped']:.2f}/{r['rand_shipped']:.2f}", file=sys.stderr, flush=True)
    med = {s: {k: statistics.median(r[k] for r in runs[s])
               for k in ("seq_MBps", "rand_iops", "seq_shipped", "rand_shipped")} for s in runs}
    return {"machine": machine(), "seconds": args.seconds, "repeats": args.repeats, "size": args.size,
            "median": med, "runs": runs}


def markdown(result: dict) -> str:
    med = result["median"]
    base = med.get("local")
    lines = [f"Machine: {result['machine']}; {result['repeats']} interleaved repetitions (order rotated) of "
             f"{result['seconds']:.0f} s per workload, medians; volume {result['size'] // MiB} MiB.", "",
             "| setup | 1 MiB seq write MB/s | 4 KiB rand write IOPS | seq vs local | rand vs local "
             "| share shipped to member (seq / rand) |",
             "|---|---:|---:|---:|---:|---:|"]
    for s, m in med.items():
        rs = f"{m['seq_MBps'] / base['seq_MBps']:.2f}" if base else "-"
        rr = f"{m['rand_iops'] / base['rand_iops']:.2f}" if base else "-"
        shipped = "-" if s == "local" else f"{m['seq_shipped']:.2f} / {m['rand_shipped']:.2f}"
        lines.append(f"| {s} | {m['seq_MBps']:.0f} | {m['rand_iops']:.0f} | {rs} | {rr} | {shipped} |")
    if "sync" in med and "mwc" in med:
        lines.append("")
        lines.append(f"mwc / sync: seq {med['mwc']['seq_MBps'] / med['sync']['seq_MBps']:.2f}, "
                     f"rand {med['mwc']['rand_iops'] / med['sync']['rand_iops']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_write", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="per workload (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--size", default="1GiB", help="volume size (default 1GiB)")
    p.add_argument("--setups", default=",".join(SETUPS), help="comma list of " + ",".join(SETUPS))
    p.add_argument("--backing", choices=("zeroed", "fallocated"), default="zeroed",
                   help="backing files written through with zeros (default: like a block device) or "
                        "preallocated with fallocate (first writes convert unwritten extents)")
    p.add_argument("--metrics", action="store_true",
                   help="the primary serves its metrics endpoint, scraped every second meanwhile")
    p.add_argument("--workdir", default="/var/tmp/gmd-bench", help="on the local disk")
    p.add_argument("--json", metavar="FILE", help="also write the full result as JSON")
    args = p.parse_args(argv)
    args.size = parse_size(args.size, file="--size", key="size")
    args.setups = [s for s in args.setups.split(",") if s]
    bad = [s for s in args.setups if s not in SETUPS]
    if bad:
        p.error(f"unknown setup(s) {bad}; choose from {', '.join(SETUPS)}")
    global BACKING, METRICS
    BACKING = args.backing
    METRICS = args.metrics
    result = trio.run(main_async, args)
    result["backing"] = args.backing
    result["metrics"] = args.metrics
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
