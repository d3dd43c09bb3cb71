"""Drift monitoring in the server: live bin counts over tumbling windows, tested against the profile.

Every engine batch is kept (a reference to its arrays, nothing copied) until a window's worth of
samples has arrived; then the features and bins of all of them are computed at once
(``Profile.sample_bins``: a few vectorised numpy operations whose fixed cost is shared by the
window's requests), the window is tested (``WindowTest``, calibrated once at start-up for that
size) and a new one begins. Nothing is done per metric on the request path: the Prometheus series
are produced from the monitor's arrays when ``/metrics`` is scraped.

Series (``model``, ``version`` on all; ``feature`` and ``bin`` where said):
- ``drift_samples_total``, ``drift_windows_total``, ``drift_alarms_total`` (counters);
- ``drift_feature_alarms_total{feature}``: windows in which that feature alone passed the threshold;
- ``drift_window_p_value``, ``drift_feature_p_value{feature}``, ``drift_feature_statistic{feature}``
  (gauges, the last complete window);
- ``drift_bin_samples_total{feature,bin}`` (counters): every sample's bin, so counts summed across
  replicas over any interval give a fleet-wide window (``optimize drift --metrics/--prometheus``);
- ``drift_window_size``, ``drift_alpha``, ``drift_threshold`` (gauges: the test's settings).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from optimize.drift.profile import Profile


class DriftMonitor:
    """Watches one served target against its reference ``Profile``: ``observe`` keeps each engine
    batch, every ``window`` samples are binned and tested (``WindowTest`` at ``alpha``), and
    ``collect`` yields the ``drift_*`` series for the metrics registry."""

    def __init__(self, profile: Profile, model: str, version: str, window: int | None = None,
                 alpha: float | None = None):
        self.profile = profile
        self.window = int(window or profile.window)
        self.test = profile.window_test(alpha)
        self.threshold = self.test.threshold(self.window)  # calibrate now, not on the first full window
        self.labels = {"model": model, "version": version}
        features = len(profile.features)
        self.current = np.zeros((features, self.test.width), np.int64)
        self.filled = 0
        self.cumulative = np.zeros((features, self.test.width), np.int64)
        self.samples = 0
        self.windows = 0
        self.alarms = 0
        self.feature_alarms = np.zeros(features, np.int64)
        self.last: Any = None
        spec = profile.extractor.spec
        self._inputs = [i["name"] for i in spec["inputs"]] + (["attention_mask"] if any(
            i["method"] == "tokens" for i in spec["inputs"]) else [])
        self._outputs = [o["name"] for o in spec["outputs"]]
        self._pending: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
        self._pending_rows = 0

    def observe(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        self._pending.append(({n: feeds[n] for n in self._inputs if n in feeds}, {n: outputs[n] for n in self._outputs}))
        self._pending_rows += len(next(iter(outputs.values())))
        if self.filled + self._pending_rows >= self.window:
            self.flush()

    def flush(self) -> None:
        """Bin every kept sample, closing each window that fills."""
        if not self._pending:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        try:
            feeds = {n: np.concatenate([f[n] for f, _ in pending]) for n in pending[0][0]}
            outputs = {n: np.concatenate([o[n] for _, o in pending]) for n in pending[0][1]}
            bins = self.profile.sample_bins(feeds, outputs)
        except ValueError:  # batches of different shapes (token inputs of several lengths): one at a time
            bins = np.concatenate([self.profile.sample_bins(f, o) for f, o in pending])
        start = 0
        while start < len(bins):
            take = min(len(bins) - start, self.window - self.filled)
            counts = self.test.counts(bins[start:start + take])
            self.current += counts
            self.cumulative += counts
            self.filled += take
            start += take
            if self.filled == self.window:
                self._close_window()
        self.samples += len(bins)

    def _close_window(self) -> None:
        result = self.test.test(self.current, self.window)
        self.windows += 1
        self.alarms += int(result.alarm)
        self.feature_alarms += result.p_values <= self.threshold
        self.last = result
        self.current[:] = 0
        self.filled = 0

    def collect(self) -> Iterator[Any]:
        self.flush()  # a scrape sees every sample served so far
        keys, values = list(self.labels), list(self.labels.values())
        names = self.profile.names

        def counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, help_text, labels=keys)
            family.add_metric(values, value)
            return family

        def gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, help_text, labels=keys)
            family.add_metric(values, value)
            return family

        yield counter("drift_samples", "Samples seen by the drift monitor.", self.samples)
        yield counter("drift_windows", "Complete windows tested.", self.windows)
        yield counter("drift_alarms", "Windows whose drift test alarmed.", self.alarms)
        per_feature = CounterMetricFamily("drift_feature_alarms", "Windows in which this feature passed the "
                                          "threshold.", labels=[*keys, "feature"])
        for name, count in zip(names, self.feature_alarms):
            per_feature.add_metric([*values, name], int(count))
        yield per_feature
        yield gauge("drift_window_size", "Samples per drift window.", self.window)
        yield gauge("drift_alpha", "False-alarm rate per window the threshold is set for.", self.test.alpha)
        yield gauge("drift_threshold", "Smallest feature p-value at which a window alarms.", self.threshold)
        if self.last is not None:
            yield gauge("drift_window_p_value", "The last window's p-value, adjusted across features.",
                        self.last.p_value)
            p_values = GaugeMetricFamily("drift_feature_p_value", "The last window's p-value per feature.",
                                         labels=[*keys, "feature"])
            statistics = GaugeMetricFamily("drift_feature_statistic", "The last window's chi-square per feature.",
                                           labels=[*keys, "feature"])
            for name, p, s in zip(names, self.last.p_values, self.last.statistics):
                p_values.add_metric([*values, name], float(p))
                statistics.add_metric([*values, name], float(s))
            yield p_values
            yield statistics
        bins = CounterMetricFamily("drift_bin_samples", "Samples per feature bin (sum across replicas for a "
                                   "fleet-wide test).", labels=[*keys, "feature", "bin"])
        for i, feature in enumerate(self.profile.features):
            for b in range(feature.bins):
                bins.add_metric([*values, feature.name, str(b)], int(self.cumulative[i, b]))
        yield bins
