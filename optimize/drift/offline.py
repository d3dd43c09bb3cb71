"""``optimize drift``: the server's drift test offline on a data file, or fleet-wide on summed counts.

Offline: the data goes through the target's own Runner, is cut into windows of the server's size
and each is tested as the server would; one more test takes all of it at once (the most sensitive
view of a file). Fleet-wide: the ``drift_bin_samples_total`` counters of several replicas, read
twice an interval apart from their ``/metrics`` (or as ``increase()`` from Prometheus), are summed
into one window, and that window is tested with a threshold calibrated for its size, so a fleet
gets one test with one false-alarm rate.
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
from optimize.drift.stats import WindowTest
from optimize.errors import InputSpecError, OptimizeError


def _summary(test: WindowTest, names: list[str], results: list[Any]) -> dict[str, Any]:
    alarms = [i for i, r in enumerate(results) if r.alarm]
    return {"windows": len(results), "alarms": len(alarms), "alarm_rate": len(alarms) / len(results) if results else 0.0,
            "first_alarm_window": alarms[0] if alarms else None,
            "feature_alarms": {n: int(sum(r.p_values[i] <= r.threshold for r in results)) for i, n in enumerate(names)}}


def scan(bundle: Path, target: str, feeds: dict[str, np.ndarray], window: int | None = None,
         alpha: float | None = None, batch_size: int = 32) -> dict[str, Any]:
    """Test ``feeds`` (the model's inputs) against ``target``'s profile, window by window and whole."""
    from optimize.bundle import load_runner

    profile = Profile.load(bundle, target)
    window = int(window or profile.window)
    count = len(next(iter(feeds.values())))
    if count < window:
        raise InputSpecError(f"{count} samples: fewer than one window of {window} (--window)")
    with load_runner(bundle, target) as runner:
        bins = np.concatenate([profile.sample_bins(batch, runner.infer(batch)) for batch in (
            {k: np.ascontiguousarray(v[s:s + batch_size]) for k, v in feeds.items()} for s in range(0, count, batch_size))])
    test = profile.window_test(alpha)
    results = [test.test(test.counts(bins[s:s + window]), window) for s in range(0, count - window + 1, window)]
    whole = test.test(test.counts(bins), count)
    return {"target": target, "samples": count, "window": window, "alpha": test.alpha,
            "threshold": test.threshold(window), **_summary(test, profile.names, results),
            "whole": whole.to_json(profile.names), "drift": bool(whole.alarm)}


def _scrape(url: str) -> str:
    target = url.rstrip("/") + ("" if url.rstrip("/").endswith("/metrics") else "/metrics")
    try:
        with urllib.request.urlopen(target, timeout=10) as response:
            return response.read().decode()
    except OSError as exc:
        raise OptimizeError(f"cannot read {target}: {exc}") from None


def bin_counts(text: str, model: str | None = None) -> dict[tuple[str, int], float]:
    """``drift_bin_samples_total`` by (feature, bin) from one Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[tuple[str, int], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "drift_bin_samples":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and (model is None or sample.labels.get("model") == model):
                key = (sample.labels["feature"], int(sample.labels["bin"]))
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def _window(profile: Profile, counts: dict[tuple[str, int], float], source: str) -> tuple[np.ndarray, int]:
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
    query = f"sum by (feature, bin) (increase(drift_bin_samples_total{selector}[{range_text}]))"
    address = url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(address, timeout=30) as response:
            answer = json.loads(response.read())
    except (OSError, ValueError) as exc:
        raise OptimizeError(f"cannot query Prometheus at {url}: {exc}") from None
    if answer.get("status") != "success":
        raise OptimizeError(f"Prometheus at {url} answered: {answer.get('error', answer)}")
    summed = {(r["metric"]["feature"], int(r["metric"]["bin"])): float(r["value"][1])
              for r in answer["data"]["result"]}
    return _fleet(profile, summed, f"Prometheus {url} over {range_text}", alpha)


def _fleet(profile: Profile, summed: dict[tuple[str, int], float], source: str, alpha: float | None) -> dict[str, Any]:
    matrix, n = _window(profile, summed, source)
    test = profile.window_test(alpha)
    result = test.test(matrix, n)
    return {"target": profile.target, "source": source, "samples": n, "alpha": test.alpha,
            "threshold": result.threshold, "whole": result.to_json(profile.names), "drift": result.alarm}
