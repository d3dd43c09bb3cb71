"""``optimize drift``: the server's drift test offline on a data file, or fleet-wide on summed counts.

Offline: the data goes through the target's own Runner and the server's own ``StreamMonitor``
(every scale, as the server tests it); one more test takes all of it at once (the most sensitive
view of a file), and a classifier with a calibration gets the file's estimated accuracy. Fleet-wide: the ``drift_bin_samples_total`` counters of several replicas, read
twice an interval apart from their ``/metrics`` (or as ``increase()`` from Prometheus), are summed
into one window, and that window is tested with a threshold calibrated for its size, so a fleet
gets one test with one false-alarm rate; ``drift_expected_correct_total`` over
``drift_samples_total`` gives the fleet's estimated accuracy over the interval.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from optimize.drift.profile import Profile
from optimize.drift.stream import StreamMonitor
from optimize.errors import InputSpecError, OptimizeError


def scan(bundle: Path, target: str, feeds: dict[str, np.ndarray], window: int | None = None,
         scales: tuple[int, ...] | None = None, requests_per_false_alarm: float | None = None,
         alpha: float | None = None, batch_size: int = 32) -> dict[str, Any]:
    """Test ``feeds`` (the model's inputs) against ``target``'s profile, at every scale as the
    server does (``StreamMonitor``), and all of it at once."""
    from optimize.bundle.folder import load_runner

    profile = Profile.load(bundle, target)
    monitor = StreamMonitor(profile, window, scales, requests_per_false_alarm)
    count = len(next(iter(feeds.values())))
    if count < monitor.window:
        raise InputSpecError(f"{count} samples: fewer than one window of {monitor.window} (--window)")
    bins, correct = [], []
    with load_runner(bundle, target) as runner:
        for start in range(0, count, batch_size):
            batch = {k: np.ascontiguousarray(v[start:start + batch_size]) for k, v in feeds.items()}
            outputs = runner.infer(batch)
            monitor.observe(batch, outputs)
            bins.append(profile.sample_bins(batch, outputs))
            if profile.estimates_accuracy:
                correct.append(profile.expected_correct(outputs))
    monitor.flush()
    test = profile.window_test(alpha)
    whole = test.test(test.counts(np.concatenate(bins)), count)
    names = profile.names
    return {"target": target, "samples": count, "window": monitor.window, "alpha": test.alpha,
            "threshold": whole.threshold, "requests_per_false_alarm": monitor.requests_per_false_alarm,
            "scales": [{**s.scale.to_json(), "windows": s.windows, "alarms": s.alarms,
                        "alarm_rate": s.alarms / s.windows if s.windows else 0.0, "first_alarm_at": s.first_alarm,
                        "feature_alarms": {n: int(c) for n, c in zip(names, s.feature_alarms)}}
                       for s in monitor.scales],
            **_accuracy(profile, float(np.concatenate(correct).mean()) if correct else None),
            "whole": whole.to_json(names), "drift": bool(whole.alarm)}


def _accuracy(profile: Profile, estimate: float | None) -> dict[str, Any]:
    if not profile.estimates_accuracy:
        return {"estimated_accuracy": None, "no_estimate": profile.calibration["reason"]}
    return {"estimated_accuracy": estimate, "reference_accuracy": profile.reference_accuracy}


def _scrape(url: str) -> str:
    target = url.rstrip("/") + ("" if url.rstrip("/").endswith("/metrics") else "/metrics")
    try:
        with urllib.request.urlopen(target, timeout=10) as response:
            return response.read().decode()
    except OSError as exc:
        raise OptimizeError(f"cannot read {target}: {exc}") from None


TOTALS = ("drift_samples", "drift_expected_correct")


def bin_counts(text: str, model: str | None = None) -> dict[Any, float]:
    """``drift_bin_samples_total`` by (feature, bin) from one Prometheus exposition, and the
    ``drift_samples_total`` and ``drift_expected_correct_total`` counters by name."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[Any, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "drift_bin_samples" and family.name not in TOTALS:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and (model is None or sample.labels.get("model") == model):
                key = family.name if family.name in TOTALS else (sample.labels["feature"], int(sample.labels["bin"]))
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def _window(profile: Profile, counts: dict[Any, float], source: str) -> tuple[np.ndarray, int]:
    counts = {k: v for k, v in counts.items() if k not in TOTALS}
    test = profile.window_test()
    matrix = np.zeros((len(profile.features), test.width), np.int64)
    known = {f.name: i for i, f in enumerate(profile.features)}
    unknown = sorted({f for f, _ in counts} - set(known))
    if unknown:
        raise OptimizeError(f"{source} reports drift features {unknown} this bundle's profile does not have: "
                            f"another model or bundle version")
    for (feature, b), value in counts.items():
        matrix[known[feature], b] = int(round(value))
    totals = matrix.sum(axis=1)
    if not totals.any():
        raise OptimizeError(f"{source}: no drift samples counted in the interval (no traffic, or monitoring off)")
    return matrix, int(totals.max())


def fleet_from_metrics(bundle: Path, target: str, urls: list[str], interval_s: float,
                       model: str | None = None, alpha: float | None = None) -> dict[str, Any]:
    """Read every replica's counters, wait ``interval_s``, read again: the difference is one fleet window."""
    profile = Profile.load(bundle, target)
    before = [bin_counts(_scrape(u), model) for u in urls]
    time.sleep(interval_s)
    after = [bin_counts(_scrape(u), model) for u in urls]
    summed: dict[tuple[str, int], float] = {}
    for first, second in zip(before, after):
        for key, value in second.items():
            summed[key] = summed.get(key, 0.0) + value - first.get(key, 0.0)
    return _fleet(profile, summed, f"{len(urls)} replica(s) over {interval_s:g} s", alpha)


def fleet_from_prometheus(bundle: Path, target: str, url: str, range_text: str, model: str | None = None,
                          alpha: float | None = None) -> dict[str, Any]:
    """``sum by (feature, bin) (increase(drift_bin_samples_total[range]))`` from a Prometheus server."""
    profile = Profile.load(bundle, target)
    selector = f'{{model="{model}"}}' if model else ""

    def query(expr: str) -> list[dict[str, Any]]:
        address = url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(address, timeout=30) as response:
                answer = json.loads(response.read())
        except (OSError, ValueError) as exc:
            raise OptimizeError(f"cannot query Prometheus at {url}: {exc}") from None
        if answer.get("status") != "success":
            raise OptimizeError(f"Prometheus at {url} answered: {answer.get('error', answer)}")
        return answer["data"]["result"]

    summed: dict[Any, float] = {(r["metric"]["feature"], int(r["metric"]["bin"])): float(r["value"][1]) for r in
                                query(f"sum by (feature, bin) (increase(drift_bin_samples_total{selector}[{range_text}]))")}
    for name in TOTALS:
        for r in query(f"sum(increase({name}_total{selector}[{range_text}]))"):
            summed[name] = float(r["value"][1])
    return _fleet(profile, summed, f"Prometheus {url} over {range_text}", alpha)


def _fleet(profile: Profile, summed: dict[Any, float], source: str, alpha: float | None) -> dict[str, Any]:
    matrix, n = _window(profile, summed, source)
    test = profile.window_test(alpha)
    result = test.test(matrix, n)
    samples = summed.get("drift_samples", 0.0)
    estimate = summed["drift_expected_correct"] / samples if samples and "drift_expected_correct" in summed else None
    return {"target": profile.target, "source": source, "samples": n, "alpha": test.alpha,
            "threshold": result.threshold, **_accuracy(profile, estimate), "whole": result.to_json(profile.names),
            "drift": result.alarm}
