"""The side-by-side benchmark charges a daemon's CPU to the span a fio job ran."""

from __future__ import annotations

from tools.bench_side import TICK, cpu_between, job_span


def test_a_job_of_eight_threads_spans_its_wall_clock_runtime_not_the_sum_of_its_threads():
    # fio's group_reporting sums job_runtime over threads: 8 threads of 4 s
    # report 32,008 ms (anchors' psyncwrite8, seen in a run's raw JSON).
    fio = {"timestamp_ms": 1_000_000_000, "jobs": [{"job_runtime": 32_008, "job options": {"numjobs": "8"}}]}
    start, end = job_span(fio)
    assert end == 1_000_000.0 and abs((end - start) - 4.001) < 1e-9
    single = {"timestamp_ms": 1_000_000_000, "jobs": [{"job_runtime": 4_000, "job options": {}}]}
    assert job_span(single) == (999_996.0, 1_000_000.0)


def test_cpu_is_taken_from_the_samples_around_the_span_or_not_at_all():
    points = [(t, t * TICK // 2, 0) for t in range(10)]  # half a core, sampled each second
    assert cpu_between(points, 2.0, 6.0) == 2.0
    assert cpu_between(points, -1.0, 6.0) is None  # no sample before the start: unknown, not a guess

