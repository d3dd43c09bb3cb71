"""Triton's statistics extension: what ``/v2/models/{m}/stats`` and gRPC's ModelStatistics report."""

from __future__ import annotations

import collections
import time
from typing import Any


class Stats:
    """``/v2/models/{m}/stats`` as Triton's statistics extension defines it (durations cumulative, ns).

    ``inference_count`` counts rows (a batch-4 request adds 4), ``execution_count`` engine calls;
    ``inference_stats`` counts requests: ``success`` and ``fail`` end to end, ``queue`` waiting for
    an engine, ``compute_input`` decoding the request and stacking or padding the batch,
    ``compute_infer`` the engine call of its batch, ``compute_output`` cutting its rows out and
    encoding the response; ``batch_stats`` the same three per engine call, by batch size."""

    PHASES = ("queue", "compute_input", "compute_infer", "compute_output")

    def __init__(self) -> None:
        self.success = [0, 0]
        self.fail = [0, 0]
        self.phases = {name: [0, 0] for name in self.PHASES}
        self.batches: dict[int, dict[str, list[int]]] = {}
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.outcomes: collections.Counter = collections.Counter()
        self.durations: collections.deque = collections.deque(maxlen=100_000)  # for the summary at exit

    def record(self, outcome: str, seconds: float, rows: int = 0, phases: dict[str, float] | None = None) -> None:
        ok = outcome == "ok"
        bucket = self.success if ok else self.fail
        bucket[0] += 1
        bucket[1] += int(seconds * 1e9)
        self.outcomes[outcome] += 1
        if ok:
            self.inference_count += rows
            for name, value in (phases or {}).items():
                self.phases[name][0] += 1
                self.phases[name][1] += int(value * 1e9)
            self.durations.append(seconds)
            self.last_inference_ms = int(time.time() * 1000)

    def executed(self, rows: int, timing: Any) -> None:
        self.execution_count += 1
        batch = self.batches.setdefault(rows, {name: [0, 0] for name in self.PHASES[1:]})
        for name, value in zip(self.PHASES[1:], (timing.input_s, timing.infer_s, timing.output_s)):
            batch[name][0] += 1
            batch[name][1] += int(value * 1e9)

    def to_json(self, name: str, version: str) -> dict[str, Any]:
        def duration(pair: list[int]) -> dict[str, int]:
            return {"count": pair[0], "ns": pair[1]}

        inference = {"success": duration(self.success), "fail": duration(self.fail),
                     **{n: duration(v) for n, v in self.phases.items()},
                     "cache_hit": duration([0, 0]), "cache_miss": duration([0, 0])}
        batches = [{"batch_size": size, **{n: duration(v) for n, v in phases.items()}}
                   for size, phases in sorted(self.batches.items())]
        return {"model_stats": [{"name": name, "version": version, "last_inference": self.last_inference_ms,
                                 "inference_count": self.inference_count, "execution_count": self.execution_count,
                                 "inference_stats": inference, "batch_stats": batches}]}

    def summary(self) -> str:
        """One line: requests by outcome and the answered requests' p50/p99."""
        total = sum(self.outcomes.values())
        parts = ", ".join(f"{n} {name}" for name, n in sorted(self.outcomes.items())) or "none"
        text = f"{total} inference request(s) ({parts})"
        if self.durations:
            ms = sorted(d * 1000 for d in self.durations)
            text += f"; answered p50 {ms[len(ms) // 2]:.2f} ms, p99 {ms[min(len(ms) - 1, int(len(ms) * 0.99))]:.2f} ms"
        return text
