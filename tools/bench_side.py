"""The side-by-side benchmark: ``../shared/bench/anchors.sh`` (the same fio
jobs against a raw file, the Python-FUSE passthrough, QEMU's userspace mirrors
and gmd's setups), plus what the anchors do not measure for gmd: each daemon's
peak RSS and its CPU seconds per GiB written, job by job.

While anchors.sh runs, this samples ``/proc`` for the gmd daemons of its
setups (found by the config path anchors.sh gives them under its work
directory; nothing is signalled), and afterwards charges each daemon's CPU
time between a fio job's start and end to that job. With ``--baseline REV``
the gmd setups also run from a worktree of ``REV`` (as ``gmd-<kind>-base``)
in the same run, so before and after are measured side by side, interleaved
the way anchors.sh interleaves its setups. Not a test: nothing asserts a speed.

    sudo .venv/bin/python -m tools.bench_side [--setups ...] [--jobs ...] [--runtime 4] [--repeats 3]
                                              [--baseline REV [--baseline-setups ...]] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "bench"
DEFAULT_SETUPS = "raw fuse-py qemu-mirror-sync qemu-quorum gmd-local gmd-sync gmd-mwc gmd-async"
DEFAULT_JOBS = "seqwrite seqread randwrite randread syncwrite psyncwrite8"
SAMPLE_EVERY = 0.2  # seconds between looks at the daemons' /proc entries
GiB = 1 << 30
TICK = os.sysconf("SC_CLK_TCK")


def daemon_of(pid: int, workdir: str) -> tuple[str, str] | None:
    """(setup kind, node) of a gmd daemon started by anchors.sh, else None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in argv if a]
    if "daemon" not in args or "--config" not in args or "--node" not in args:
        return None
    config = args[args.index("--config") + 1]
    if not config.startswith(workdir + "/gmd-"):
        return None
    kind = Path(config).parent.name.removeprefix("gmd-")
    if "-P" in args:  # started by the --baseline launcher
        kind += "-base"
    return kind, args[args.index("--node") + 1]


def sample(pid: int) -> tuple[int, int] | None:
    """(CPU ticks user+system, RSS in KiB) of ``pid``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return ticks, rss


class Sampler(threading.Thread):
    """Samples every gmd daemon of the run until stopped: pid -> [(time, ticks, rss)]."""

    def __init__(self, workdir: str):
        super().__init__(daemon=True)
        self.workdir = workdir
        self.who: dict[int, tuple[str, str]] = {}
        self.samples: dict[int, list[tuple[float, int, int]]] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(SAMPLE_EVERY):
            now = time.time()
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                pid = int(entry)
                if pid not in self.who:
                    who = daemon_of(pid, self.workdir)
                    if who is None:
                        continue
                    self.who[pid] = who
                got = sample(pid)
                if got is not None:
                    self.samples.setdefault(pid, []).append((now, *got))


def cpu_between(points: list[tuple[float, int, int]], start: float, end: float) -> float | None:
    """CPU seconds a daemon used in [start, end], from the samples around it."""
    before = [p for p in points if p[0] <= start]
    after = [p for p in points if p[0] >= end]
    if not before or not after:
        return None
    return (after[0][1] - before[-1][1]) / TICK


def baseline_bench(rev: str, kinds: list[str], tmp: Path) -> tuple[Path, Path]:
    """A copy of the bench directory with ``gmd-<kind>-base`` setups that run
    gmd from a worktree of ``rev``; returns (bench dir, worktree)."""
    tree = tmp / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
    launcher = tmp / "gmd-baseline"
    # -P: no current directory on sys.path, so the worktree's gmd is the one imported.
    launcher.write_text(f"#!/bin/sh\nPYTHONPATH={tree} exec {sys.executable} -P -m gmd \"$@\"\n")
    launcher.chmod(0o755)
    bench = tmp / "bench"
    shutil.copytree(BENCH, bench, ignore=shutil.ignore_patterns("results"))
    (bench / "results").mkdir()
    for kind in kinds:
        name = f"gmd_{kind}_base"
        (bench / "setups" / f"gmd-{kind}-base.sh").write_text(
            f'# gmd-{kind}-base: gmd-{kind} run from a worktree of {rev} (tools/bench_side.py --baseline)\n'
            'source "$(dirname "${BASH_SOURCE[0]}")/gmd-lib.sh"\n'
            f'setup_{name}() {{ GMD_BIN={launcher}; _gmd_setup {kind}; }}\n'
            f'teardown_{name}() {{ _gmd_teardown; GMD_BIN=$GMD_VENV/bin/gmd; }}\n')
    return bench, tree


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_side", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", default=DEFAULT_SETUPS)
    p.add_argument("--jobs", default=DEFAULT_JOBS)
    p.add_argument("--runtime", type=int, default=4, help="seconds per fio job (after its ramp)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline", metavar="REV", help="also run the gmd setups from this git revision")
    p.add_argument("--baseline-setups", metavar="SETUPS",
                   help="the gmd setups run from --baseline too (default: every gmd setup given)")
    p.add_argument("--workdir", default="/var/tmp/gmd-bench")
    p.add_argument("--json", metavar="FILE", help="write the daemons' figures here as JSON")
    args = p.parse_args(argv)
    if not (BENCH / "anchors.sh").exists():
        p.error(f"{BENCH / 'anchors.sh'} not found (the shared bench directory beside the checkout)")
    if os.geteuid() != 0:
        p.error("anchors.sh needs root (FUSE mounts, dropping caches)")
    setups = args.setups.split()
    based = args.baseline_setups.split() if args.baseline_setups else [s for s in setups if s.startswith("gmd-")]
    if bad := [s for s in based if not s.startswith("gmd-") or s not in setups]:
        p.error(f"--baseline-setups must be gmd setups among --setups: {' '.join(bad)}")
    kinds = [s.removeprefix("gmd-") for s in based]
    with tempfile.TemporaryDirectory(prefix="gmd-bench-side-") as tmp_name:
        tmp = Path(tmp_name)
        bench, tree = BENCH, None
        if args.baseline:
            bench, tree = baseline_bench(args.baseline, kinds, tmp)
            # After each setup it is measured against, so both see the same machine state.
            setups = [x for s in setups for x in ([s, f"{s}-base"] if s in based else [s])]
        env = dict(os.environ, SETUPS=" ".join(setups), JOBS=args.jobs, RUNTIME=str(args.runtime),
                   REPEATS=str(args.repeats), WORKDIR=args.workdir, GMD_VENV=str(ROOT / ".venv"),
                   PY=os.environ.get("PY", sys.executable))
        sampler = Sampler(os.path.realpath(args.workdir))
        sampler.start()
        started = time.time()
        try:
            run = subprocess.run(["bash", str(bench / "anchors.sh")], cwd=ROOT, env=env)
        finally:
            sampler.stopping.set()
            sampler.join()
            if tree is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        results = sorted((bench / "results").glob("anchors-*.json"), key=lambda f: f.stat().st_mtime)
        results = [r for r in results if r.stat().st_mtime >= started]
        if run.returncode != 0 or not results:
            print(f"bench_side: anchors.sh failed (exit {run.returncode}); no figures", file=sys.stderr)
            return 1
        result = results[-1]
        if bench is not BENCH:  # keep the run with the others
            for f in result.parent.glob(result.stem + ".*"):
                shutil.copy2(f, BENCH / "results" / f.name)
            shutil.copytree(result.parent / "raw" / result.stem, BENCH / "results" / "raw" / result.stem,
                            dirs_exist_ok=True)
            result = BENCH / "results" / result.name
        figures = daemon_figures(result, sampler)
    print_figures(figures)
    subprocess.run([sys.executable, str(BENCH / "ratios.py"), str(result)], check=False)
    if args.json:
        Path(args.json).write_text(json.dumps({"anchors": str(result), "daemons": figures}, indent=1))
    return 0


def job_span(fio: dict) -> tuple[float, float]:
    """(start, end) in epoch seconds of the measured part of a fio job, from
    its JSON output. With group_reporting (psyncwrite8) ``job_runtime`` is
    the sum over the job's threads, so the wall-clock span is that divided by
    their number (taking it whole charged earlier jobs' CPU to this one)."""
    j = fio["jobs"][0]
    end = fio["timestamp_ms"] / 1000
    threads = int((j.get("job options") or {}).get("numjobs")
                  or (fio.get("global options") or {}).get("numjobs") or 1)
    return end - j["job_runtime"] / 1000 / threads, end


def daemon_figures(result: Path, sampler: Sampler) -> dict:
    """Per gmd setup and job: bytes written, each daemon's CPU seconds per GiB
    written (median over repetitions) and peak RSS (MiB)."""
    run_dir = result.parent / "raw" / result.stem
    out: dict = {}
    for raw in sorted(run_dir.glob("gmd-*.r*.json")):
        setup, job, rep = raw.name.rsplit(".", 3)[:3]
        kind = setup.removeprefix("gmd-")
        try:
            fio = json.loads(raw.read_text())
        except ValueError:
            continue
        start, end = job_span(fio)
        written = sum(x["write"]["io_bytes"] for x in fio["jobs"])
        row = out.setdefault(setup, {}).setdefault(job, {"written_bytes": [], "cpu_s_per_GiB": {},
                                                          "peak_rss_MiB": 0.0})
        row["written_bytes"].append(written)
        for pid, (k, node) in sampler.who.items():
            if k != kind:
                continue
            points = sampler.samples.get(pid, [])
            cpu = cpu_between(points, start, end)
            if cpu is not None and written:
                row["cpu_s_per_GiB"].setdefault(node, []).append(cpu / (written / GiB))
            during = [rss for t, _ticks, rss in points if start <= t <= end]
            row["peak_rss_MiB"] = max(row["peak_rss_MiB"], round(max(during, default=0) / 1024, 1))
    for setup in out:
        kind = setup.removeprefix("gmd-")
        rss = [max(s[2] for s in sampler.samples.get(pid, [(0, 0, 0)])) for pid, (k, _n) in sampler.who.items()
               if k == kind]
        out[setup]["peak_rss_MiB"] = round(max(rss, default=0) / 1024, 1)  # the whole setup: initial copy too
    return out


def print_figures(figures: dict) -> None:
    print("\n| gmd setup | job | written per run (MiB, median) | CPU s per GiB written, per daemon (median) "
          "| peak RSS of a daemon during the job (MiB) | peak RSS of a daemon in the setup, initial copy included (MiB) |")
    print("|---|---|---:|---|---:|---:|")
    for setup, jobs in sorted(figures.items()):
        for job, row in sorted((k, v) for k, v in jobs.items() if k != "peak_rss_MiB"):
            written = statistics.median(row["written_bytes"]) if row["written_bytes"] else 0
            cpu = ", ".join(f"{node} {statistics.median(v):.1f}" for node, v in sorted(row["cpu_s_per_GiB"].items()))
            print(f"| {setup} | {job} | {written / (1 << 20):.0f} | {cpu or '-'} | {row['peak_rss_MiB']} "
                  f"| {jobs['peak_rss_MiB']} |")


if __name__ == "__main__":
    sys.exit(main())
