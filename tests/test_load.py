"""The load models against a real service with a known capacity: one worker, 5 ms per request.

The service is a plain function holding a lock for 5 ms (a serial server of capacity 200/s), so
each model's expected numbers are known and the assertions can fail when the logic is wrong.
"""

import threading
import time

import pytest

from optimize.bench.load import arrival_times, batch_point, closed_loop, open_loop
from optimize.bench.measure import MeasureConfig

SERVICE_S = 0.005


def serial_service():
    lock = threading.Lock()

    def send(batch: int) -> None:
        with lock:
            deadline = time.perf_counter() + SERVICE_S * batch
            while time.perf_counter() < deadline:
                time.sleep(0.0005)
    return send


def test_arrivals_are_seeded_and_at_the_rate():
    poisson = arrival_times(200, 5.0, "poisson", seed=1)
    assert 900 < len(poisson) < 1100 and (poisson == arrival_times(200, 5.0, "poisson", seed=1)).all()
    constant = arrival_times(100, 2.0, "constant", seed=0)
    assert len(constant) == 200 and constant[1] == pytest.approx(0.01)


class SimulatedClock:
    """A time source that only the simulated service moves: what a measurement then reports is
    exact, whatever else the machine is doing."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def service(self, seconds_per_item: float):
        def send(batch: int) -> None:
            self.now += seconds_per_item * batch
        return send


def test_batch_sweep_counts_items_per_request():
    clock = SimulatedClock()
    point = batch_point(clock.service(SERVICE_S), 4, MeasureConfig(window_s=0.2, max_windows=4, time_limit_s=3), clock)
    summary = point.summary()
    assert summary["load"] == "batch=4" and summary["items_per_request"] == 4
    assert summary["p50_ms"] == pytest.approx(20.0) and summary["p99_ms"] == pytest.approx(20.0)
    assert summary["throughput_items_per_s"] == pytest.approx(200.0)  # 4 items per 20 ms


def test_closed_loop_queues_behind_a_serial_service():
    point = closed_loop(serial_service(), 3, duration_s=1.0)
    summary = point.summary()
    assert 30 < summary["requests_per_s"] < 215  # never above the capacity of 200/s
    # Three callers always in flight: by Little's law the mean latency is 3 / throughput, about
    # three service times (the lock is not fair, so the median alone proves little).
    mean_s = sum(point.latencies_s) / len(point.latencies_s)
    assert mean_s == pytest.approx(3 / summary["requests_per_s"], rel=0.2)
    assert mean_s > 2 * SERVICE_S


def test_open_loop_below_capacity_is_on_time():
    summary = open_loop(serial_service(), 50, duration_s=1.5, seed=2).summary()
    assert summary["late_send_pct"] < 10 and summary["unfinished"] == 0
    assert summary["p50_ms"] < 12 and summary["scheduled"] > 50


def test_open_loop_above_capacity_shows_growing_latency_and_late_sends():
    summary = open_loop(serial_service(), 400, duration_s=1.5, max_in_flight=4, seed=3, drain_s=0.5).summary()
    # Twice the capacity: the backlog grows for the whole run, and latency counts from the schedule.
    assert summary["late_send_pct"] > 30
    assert summary["p99_ms"] > 300 and summary["p99_ms"] > 10 * summary["p50_ms"] / 10
    assert summary["requests_per_s"] < 230
    windows = summary["window_p50_ms"]
    assert windows[-1] > windows[0]


class Engine:
    """An engine answering in 2 ms on the simulated clock, or 10 ms while the shared ``noise`` flag is up."""

    def __init__(self, name: str, log: list[str], noise: list[bool], clock: SimulatedClock):
        from optimize.inputs.specs import TensorSpec

        self.name, self.log, self.noise, self.clock = name, log, noise, clock
        self.inputs = [TensorSpec("x", (-1, 2))]

    def infer(self, feeds):
        if not self.log or self.log[-1] != self.name:
            self.log.append(self.name)
        self.clock.now += 0.010 if self.noise[0] else 0.002
        return {"y": feeds["x"]}


def test_rounds_interleave_engines_and_a_disturbed_round_does_not_move_p50():
    import numpy as np

    from optimize.bench.load import LoadPlan
    from optimize.bench.run import bench_engines

    log: list[str] = []
    noise = [False]
    clock = SimulatedClock()
    runners = {"a": Engine("a", log, noise, clock), "b": Engine("b", log, noise, clock)}
    plan = LoadPlan(batch_sizes=(1,), concurrency=(), rates=(), rate_fractions=(), rounds=3,
                    measure=MeasureConfig(warmup_iterations=2, warmup_s=0.0, window_s=0.05, max_windows=3,
                                          time_limit_s=1.0))
    ticks = []

    def tick(engine: str, label: str | None) -> None:  # the second round of both engines runs during a disturbance
        if label is not None:
            ticks.append(label)
            noise[0] = len(ticks) in (2, 3)

    points = bench_engines(runners, {"x": np.zeros((4, 2), np.float32)}, plan, threading.Event(), tick, clock)
    assert log == ["a", "b", "a", "b", "a", "b"]  # round by round, not all of one engine first
    for name in ("a", "b"):
        summary = points[name][0].summary()
        assert summary["rounds"] == 3 and len(summary["round_p50_ms"]) == 3
        assert sorted(summary["round_p50_ms"]) == pytest.approx([2.0, 2.0, 10.0])  # the disturbed round is reported...
        assert summary["p50_ms"] == pytest.approx(2.0)  # ...but the median round is an undisturbed one
        assert summary["spread_pct"] == pytest.approx(400.0)


def test_the_report_keeps_points_whose_sender_fell_behind_out_of_the_engines_curve(tmp_path):
    from optimize.bench.report import markdown, plots, sender_fell_behind

    def point(kind, value, throughput, p99, late=0.0):
        return {"kind": kind, "value": value, "load": f"{kind}={value:g}", "throughput_items_per_s": throughput,
                "p99_ms": p99, "p50_ms": p99 / 2, "p90_ms": p99, "p95_ms": p99, "max_ms": p99, "spread_pct": 1.0,
                "late_send_pct": late, "late_sends": int(late), "stable": True, "errors": 0}

    points = [point("batch", 1, 100, 1), point("concurrency", 4, 300, 3), point("concurrency", 1, 100, 1),
              point("rate", 50, 50, 1, 0.5), point("rate", 900, 400, 2000, 99.0)]
    assert [sender_fell_behind(p) for p in points] == [False, False, False, False, True]
    report = {"engines": {"ort-fp32": {"points": points}}, "model_name": "m", "created": "now",
              "machine": {"cpu": "cpu", "cores": 2}, "runner_config": {}, "cross_check": {"ort-fp32": {
                  "benchmark_app_p50_ms": 0.5, "ours_p50_ms": 0.6, "ours_over_benchmark_app": 1.2}}}
    assert plots(report, tmp_path) == ["latency_vs_batch.png", "latency_vs_throughput.png"]
    text = markdown(report, [])
    assert "sender fell behind (over 5% of requests sent late)" in text and "ort-fp32 at rate=900" in text
    assert "The winner is chosen on this report's own measurement (batch=1" in text
