"""The measuring core: warm-up, repeated timed windows until stable, percentiles with spread.

As perf_analyzer does, measurement runs in windows and stops once the last ``stable_windows``
windows agree on their median within ``tolerance`` (or when ``time_limit_s`` runs out, which is
reported as not stable). Every latency sample is kept, so percentiles come from all of them and
their spread from the per-window medians.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class MeasureConfig:
    warmup_iterations: int = 5
    warmup_s: float = 0.5
    window_s: float = 1.0
    min_window_iterations: int = 5
    stable_windows: int = 3
    tolerance: float = 0.10
    max_windows: int = 12
    time_limit_s: float = 30.0


@dataclasses.dataclass
class Measurement:
    """Latency samples (seconds) of one workload and what they summarise to."""

    samples_s: list[float]
    window_medians_s: list[float]
    stable: bool
    items_per_call: int = 1

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.samples_s, q) * 1000)

    @property
    def median_ms(self) -> float:
        return self.percentile_ms(50)

    @property
    def spread_pct(self) -> float:
        """Range of the per-window medians relative to their median (percent)."""
        medians = np.asarray(self.window_medians_s)
        return float((medians.max() - medians.min()) / np.median(medians) * 100) if len(medians) else 0.0

    def summary(self) -> dict[str, Any]:
        total = sum(self.samples_s)
        return {"p50_ms": self.median_ms, "p90_ms": self.percentile_ms(90),
                "p95_ms": self.percentile_ms(95), "p99_ms": self.percentile_ms(99),
                "max_ms": float(max(self.samples_s) * 1000), "mean_ms": float(np.mean(self.samples_s) * 1000),
                "throughput_per_s": len(self.samples_s) * self.items_per_call / total if total else 0.0,
                "iterations": len(self.samples_s), "windows": len(self.window_medians_s),
                "window_p50_ms": [m * 1000 for m in self.window_medians_s],
                "spread_pct": self.spread_pct, "stable": self.stable}


def measure(call: Callable[[], Any], config: MeasureConfig = MeasureConfig(),
            items_per_call: int = 1, clock: Callable[[], float] = time.perf_counter) -> Measurement:
    """Time ``call`` until the window medians are stable or the time limit is reached (``clock``: the
    time source, in seconds; the tests give one that the workload itself advances)."""
    start = clock()
    for i in range(10**9):
        call()
        if i + 1 >= config.warmup_iterations and clock() - start >= config.warmup_s:
            break
    samples: list[float] = []
    medians: list[float] = []
    stable = False
    deadline = clock() + config.time_limit_s
    while len(medians) < config.max_windows:
        window: list[float] = []
        window_start = clock()
        while len(window) < config.min_window_iterations or clock() - window_start < config.window_s:
            t0 = clock()
            call()
            window.append(clock() - t0)
            if clock() > deadline and len(window) >= config.min_window_iterations:
                break
        samples.extend(window)
        medians.append(float(np.median(window)))
        if len(medians) >= config.stable_windows:
            recent = np.asarray(medians[-config.stable_windows:])
            if (recent.max() - recent.min()) <= config.tolerance * np.median(recent):
                stable = True
                break
        if clock() > deadline:
            break
    return Measurement(samples, medians, stable, items_per_call)


def interleaved(calls: dict[str, Callable[[], Any]], rounds: int = 5,
                config: MeasureConfig = MeasureConfig(window_s=0.5, max_windows=4, time_limit_s=5.0)
                ) -> dict[str, list[Measurement]]:
    """Measure several workloads in turn, ``rounds`` times, so drift on a noisy machine hits all alike."""
    results: dict[str, list[Measurement]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            results[name].append(measure(call, config))
    return results


def round_medians(calls: dict[str, Callable[[], Any]], rounds: int, config: MeasureConfig) -> dict[str, dict[str, Any]]:
    """Per workload, measured ``interleaved``: the p50 of every round, their median and spread (range
    over median, percent): what a choice between engines compares, round by round."""
    out = {}
    for name, runs in interleaved(calls, rounds=rounds, config=config).items():
        medians = np.asarray([m.median_ms for m in runs])
        out[name] = {"p50_ms": float(np.median(medians)), "p50_ms_per_round": medians.round(4).tolist(),
                     "spread_pct": float((medians.max() - medians.min()) / np.median(medians) * 100)}
    return out


# A brief comparison of engines at batch 1 (the build's INT8 scheme choice, the server's --reselect):
# interleaved rounds of short measurements; two engines differ only beyond the paired ratios' spread.
COMPARISON_ROUNDS = 5
BRIEF = MeasureConfig(warmup_iterations=3, warmup_s=0.05, window_s=0.1, min_window_iterations=3,
                      stable_windows=2, tolerance=0.10, max_windows=3, time_limit_s=1.5)
MIN_TIE = 0.02  # paired ratios closer to 1 than this are a tie whatever the spread


def paired_ratio(slow: dict[str, Any], fast: dict[str, Any]) -> tuple[float, float]:
    """(median, interquartile range) of the per-round ratios slow/fast of two ``round_medians``
    entries: measured in the same round, so the machine's drift cancels."""
    ratios = np.asarray(slow["p50_ms_per_round"]) / np.asarray(fast["p50_ms_per_round"])
    q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
    return float(q50), float(q75 - q25)


def faster(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """``a`` is faster than ``b`` by more than the measured spread."""
    ratio, iqr = paired_ratio(b, a)
    return ratio - 1.0 > max(MIN_TIE, iqr)
