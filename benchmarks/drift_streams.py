"""Streams of requests through the real drift monitor: the pools they are drawn from, false alarms,
detection delays and the fast window's own power (for ``benchmarks.drift``)."""

from __future__ import annotations

import numpy as np

from optimize.drift.features import probabilities
from serve.monitor import DriftMonitor

BEFORE = 2000  # unshifted requests before a shift, plus a random offset of up to as many again
CHUNK = 20  # requests per observe call: one fast window, so every test's position is known
ESTIMATE_SCALE = 200


class Pool:
    """Feeds and the engine's outputs for a set of samples, sliced by index."""

    def __init__(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray], labels: np.ndarray | None = None):
        self.feeds, self.outputs, self.labels = feeds, outputs, labels
        self.size = len(next(iter(outputs.values())))

    def take(self, index: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        return {k: v[index] for k, v in self.feeds.items()}, {k: v[index] for k, v in self.outputs.items()}


def infer_pool(runner, feeds: dict[str, np.ndarray], labels: np.ndarray | None = None, batch: int = 64) -> Pool:
    count = len(next(iter(feeds.values())))
    parts = [runner.infer({k: np.ascontiguousarray(v[s:s + batch]) for k, v in feeds.items()})
             for s in range(0, count, batch)]
    return Pool(feeds, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, labels)


def run_stream(monitor: DriftMonitor, sources: list[tuple[Pool, int]], rng: np.random.Generator,
               temperature: float | None = None) -> tuple[list[dict], np.ndarray]:
    """Feed ``count`` requests from each pool in turn, in chunks of one fast window. Returns each
    test (request index that closed it, scale, alarm, estimate) and, given a ``temperature``, each
    request's raw and calibrated top-class probability (n, 2)."""
    events, raw = [], []
    plan = [(pool, i) for pool, count in sources for i in rng.integers(0, pool.size, size=count)]
    for start in range(0, len(plan), CHUNK):
        part = plan[start:start + CHUNK]
        feeds, outputs = {}, {}
        for pool in {id(p): p for p, _ in part}.values():
            index = np.array([i for p, i in part if p is pool])
            f, o = pool.take(index)
            for k, v in f.items():
                feeds.setdefault(k, []).append(v)
            for k, v in o.items():
                outputs.setdefault(k, []).append(v)
        feeds = {k: np.concatenate(v) for k, v in feeds.items()}
        outputs = {k: np.concatenate(v) for k, v in outputs.items()}
        if temperature is not None:
            y = next(iter(outputs.values())).astype(np.float32)
            raw.append(np.stack([probabilities(y, False).max(axis=1),
                                 probabilities(y, False, temperature).max(axis=1)], axis=1))
        before = [(s.windows, s.alarms) for s in monitor.scales]
        monitor.observe(feeds, outputs)
        monitor.flush()
        for state, (windows, alarms) in zip(monitor.scales, before):
            if state.windows > windows:
                events.append({"end": start + len(part), "scale": state.scale.samples,
                               "alarm": state.alarms > alarms, "estimate": state.estimate})
    return events, (np.concatenate(raw) if raw else np.zeros((0, 2)))


def false_alarms(profile, pool: Pool, requests: int, window: int, rng: np.random.Generator) -> dict:
    monitor = DriftMonitor(profile, "bench", "v", window)
    events, _ = run_stream(monitor, [(pool, requests)], rng)
    per_scale = {}
    for state in monitor.scales:
        mine = [e for e in events if e["scale"] == state.scale.samples]
        per_scale[state.scale.samples] = {"windows": len(mine), "alarms": sum(e["alarm"] for e in mine),
                                          "alarm_rate": sum(e["alarm"] for e in mine) / max(len(mine), 1),
                                          "alpha": state.scale.alpha}
    alarms = sum(s["alarms"] for s in per_scale.values())
    return {"requests": requests, "alarms": alarms, "per_scale": per_scale,
            "requests_per_false_alarm": requests / alarms if alarms else float("inf")}


def detection(profile, normal: Pool, shift: Pool, streams: int, after: int, window: int,
              rng: np.random.Generator, accuracy: float | None) -> list[dict]:
    out = []
    for _ in range(streams):
        monitor = DriftMonitor(profile, "bench", "v", window)
        start = BEFORE + int(rng.integers(0, BEFORE))
        temperature = profile.calibration["temperature"] if accuracy is not None else None
        events, raw = run_stream(monitor, [(normal, start), (shift, after)], rng, temperature)
        first = {}
        for e in events:
            if e["alarm"] and e["end"] > start and e["scale"] not in first:
                first[e["scale"]] = e["end"] - start
        record = {"start": start, "delay": {s.scale.samples: first.get(s.scale.samples) for s in monitor.scales}}
        found = [d for d in record["delay"].values() if d is not None]
        record["delay_any"] = min(found) if found else None
        if accuracy is not None:
            full = [e for e in events if e["scale"] == ESTIMATE_SCALE and e["end"] - ESTIMATE_SCALE >= start]
            record["estimate_error"] = [abs(e["estimate"] - accuracy) * 100 for e in full]
            means = [raw[e["end"] - ESTIMATE_SCALE:e["end"]].mean(axis=0) for e in full]
            record["raw_error"] = [abs(float(w[0]) - accuracy) * 100 for w in means]
            record["calibrated_error"] = [abs(float(w[1]) - accuracy) * 100 for w in means]
        out.append(record)
    return out


def summarise(records: list[dict], scales: list[int]) -> dict:
    def rate(values, limit=None):
        return float(np.mean([v is not None and (limit is None or v <= limit) for v in values]))

    def median(values):
        found = [v for v in values if v is not None]
        return float(np.median(found)) if found else None

    out = {"streams": len(records),
           "per_scale": {s: {"detected": rate([r["delay"][s] for r in records]),
                             "median_delay": median([r["delay"][s] for r in records])} for s in scales},
           "any": {"detected": rate([r["delay_any"] for r in records]),
                   "within_200": rate([r["delay_any"] for r in records], 200),
                   "within_1000": rate([r["delay_any"] for r in records], 1000),
                   "median_delay": median([r["delay_any"] for r in records])}}
    if records and "estimate_error" in records[0]:
        out["estimate_mae"] = float(np.mean([v for r in records for v in r["estimate_error"]]))
        out["raw_confidence_mae"] = float(np.mean([v for r in records for v in r["raw_error"]]))
        out["calibrated_confidence_mae"] = float(np.mean([v for r in records for v in r["calibrated_error"]]))
    return out


def fast_window_cost(profile, pool: Pool, window: int, rng: np.random.Generator, alpha_fast: float,
                     windows: int = 500) -> dict:
    """Share of fully shifted fast windows that alarm at the scale's alpha and at the former 1%."""
    test = profile.window_test()
    got = {"alpha": 0, "one_percent": 0}
    for _ in range(windows):
        feeds, outputs = pool.take(rng.integers(0, pool.size, size=window))
        counts = test.counts(profile.sample_bins(feeds, outputs))
        got["alpha"] += test.test(counts, window, alpha_fast).alarm
        got["one_percent"] += test.test(counts, window, 0.01).alarm
    return {k: v / windows for k, v in got.items()}
