"""Drift monitoring in the server: ``StreamMonitor`` (``optimize.drift.stream``) as a Prometheus collector.

Nothing is done per metric on the request path: the series are produced from the monitor's arrays
when ``/metrics`` is scraped. For large inputs the server runs the monitor behind
``BackgroundMonitor``: a served batch is handed to a thread of its own, so binning images (about a
millisecond each for ResNet-sized ones) never delays an answer; small inputs are watched inline,
where a thread's wake-ups would cost more than the binning.

Series (``model``, ``version`` on all; ``scale`` is the samples per window):
- ``drift_samples_total``; ``drift_windows_total{scale}``, ``drift_alarms_total{scale}`` (counters);
- ``drift_feature_alarms_total{scale,feature}``: windows in which that feature passed the threshold;
- ``drift_window_p_value{scale}``, ``drift_feature_p_value{scale,feature}``,
  ``drift_feature_statistic{scale,feature}`` (gauges, the scale's last complete window);
- ``drift_bin_samples_total{feature,bin}`` (counters): every sample's bin, so counts summed across
  replicas over any interval give a fleet-wide window (``optimize drift --metrics/--prometheus``);
- ``drift_window_step{scale}``, ``drift_alpha{scale}``, ``drift_threshold{scale}`` and
  ``drift_requests_per_false_alarm`` (gauges: the test's settings);
- classifiers whose profile has a confidence calibration (``optimize.drift.accuracy``):
  ``drift_reference_accuracy``, ``drift_estimated_accuracy{scale}`` (the scale's last window),
  ``drift_expected_correct_total`` (samples the calibration expects right, so an interval's
  estimate is its increase over ``drift_samples_total``'s, summed across replicas) and
  ``drift_accuracy_alert_drop`` (the drop below the reference the alert rule fires at).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from optimize.drift.profile import Profile
from optimize.drift.stream import StreamMonitor

ACCURACY_ALERT_DROP = 0.05
BACKLOG_WINDOWS = 20  # fast windows of samples that may wait for the monitor's thread before some are dropped
SCRAPE_WAIT_S = 5.0  # how long a scrape waits for the backlog to be observed
LOG = logging.getLogger("serve")


class DriftMonitor(StreamMonitor):
    """The served target's ``StreamMonitor``; ``collect`` yields the ``drift_*`` series for the
    metrics registry."""

    def __init__(self, profile: Profile, model: str, version: str, window: int | None = None,
                 scales: tuple[int, ...] | None = None, requests_per_false_alarm: float | None = None,
                 accuracy_alert_drop: float = ACCURACY_ALERT_DROP):
        super().__init__(profile, window, scales, requests_per_false_alarm)
        self.labels = {"model": model, "version": version}
        self.accuracy_alert_drop = float(accuracy_alert_drop)

    def collect(self) -> Iterator[Any]:
        self.flush()  # a scrape sees every sample served so far
        keys, values = list(self.labels), list(self.labels.values())
        names = self.profile.names

        def family(kind: type, name: str, help_text: str, extra: tuple[str, ...] = ()) -> Any:
            return kind(name, help_text, labels=[*keys, *extra])

        def single(kind: type, name: str, help_text: str, value: float) -> Any:
            metric = family(kind, name, help_text)
            metric.add_metric(values, value)
            return metric

        def per_scale(kind: type, name: str, help_text: str, value: Any) -> Any:
            metric = family(kind, name, help_text, ("scale",))
            for state in self.scales:
                got = value(state)
                if got is not None:
                    metric.add_metric([*values, str(state.scale.samples)], got)
            return metric

        def per_feature(kind: type, name: str, help_text: str, value: Any) -> Any:
            metric = family(kind, name, help_text, ("scale", "feature"))
            for state in self.scales:
                got = value(state)
                if got is not None:
                    for feature, number in zip(names, got):
                        metric.add_metric([*values, str(state.scale.samples), feature], float(number))
            return metric

        yield single(CounterMetricFamily, "drift_samples", "Samples seen by the drift monitor.", self.samples)
        yield per_scale(CounterMetricFamily, "drift_windows", "Complete windows tested, per scale (samples per "
                        "window).", lambda s: s.windows)
        yield per_scale(CounterMetricFamily, "drift_alarms", "Windows whose drift test alarmed, per scale.",
                        lambda s: s.alarms)
        yield per_feature(CounterMetricFamily, "drift_feature_alarms", "Windows in which this feature passed the "
                          "threshold.", lambda s: s.feature_alarms)
        yield per_scale(GaugeMetricFamily, "drift_window_step", "Samples between two tests of this scale.",
                        lambda s: s.scale.step)
        yield per_scale(GaugeMetricFamily, "drift_alpha", "False-alarm rate per test of this scale.",
                        lambda s: s.scale.alpha)
        yield per_scale(GaugeMetricFamily, "drift_threshold", "Smallest feature p-value at which a window of this "
                        "scale alarms.", lambda s: self.test.threshold(s.scale.samples, s.scale.alpha))
        yield single(GaugeMetricFamily, "drift_requests_per_false_alarm", "Mean unshifted samples between false "
                     "alarms, all scales together, the thresholds are set for.", self.requests_per_false_alarm)
        yield per_scale(GaugeMetricFamily, "drift_window_p_value", "The scale's last window's p-value, adjusted "
                        "across features.", lambda s: None if s.last is None else s.last.p_value)
        yield per_feature(GaugeMetricFamily, "drift_feature_p_value", "The scale's last window's p-value per "
                          "feature.", lambda s: None if s.last is None else s.last.p_values)
        yield per_feature(GaugeMetricFamily, "drift_feature_statistic", "The scale's last window's chi-square per "
                          "feature.", lambda s: None if s.last is None else s.last.statistics)
        if self.estimates:
            yield single(GaugeMetricFamily, "drift_reference_accuracy", "Labelled accuracy of the reference "
                         "(held-out data at build time).", self.profile.reference_accuracy)
            yield per_scale(GaugeMetricFamily, "drift_estimated_accuracy", "The scale's last window's accuracy "
                            "estimated without labels (thresholded confidence).", lambda s: s.estimate)
            yield single(CounterMetricFamily, "drift_expected_correct", "Samples the thresholded confidence expects "
                         "right (over drift_samples_total: the estimated accuracy).", self.correct_total)
            yield single(GaugeMetricFamily, "drift_accuracy_alert_drop", "Estimated accuracy this far below the "
                         "reference's fires the alert.", self.accuracy_alert_drop)
        bins = family(CounterMetricFamily, "drift_bin_samples", "Samples per feature bin (sum across replicas for "
                      "a fleet-wide test).", ("feature", "bin"))
        for i, feature in enumerate(self.profile.features):
            for b in range(feature.bins):
                bins.add_metric([*values, feature.name, str(b)], int(self.cumulative[i, b]))
        yield bins


class BackgroundMonitor:
    """A ``DriftMonitor`` fed from a thread of its own: ``observe`` only queues the batch (the
    request path pays a queue put), the thread bins and tests. A scrape waits for what is queued,
    so it sees every sample served before it. When the monitor falls behind by more than
    ``BACKLOG_WINDOWS`` fast windows, further batches are not watched and are counted in
    ``drift_samples_dropped_total`` (answers are never held back for monitoring)."""

    def __init__(self, monitor: DriftMonitor):
        self.monitor = monitor
        self.dropped = 0
        self.errors = 0
        self._limit = BACKLOG_WINDOWS * monitor.window
        self._backlog = 0
        self._lock = threading.Lock()  # the monitor's state: the thread observes, a scrape reads
        self._drained = threading.Condition()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="drift-monitor", daemon=True)
        self._thread.start()

    def __getattr__(self, name: str) -> Any:  # the settings the server logs (scales, profile, ...)
        return getattr(self.monitor, name)

    def observe(self, feeds: dict[str, Any], outputs: dict[str, Any]) -> None:
        rows = len(next(iter(outputs.values())))
        with self._drained:
            if self._backlog + rows > self._limit:
                self.dropped += rows
                return
            self._backlog += rows
        self._queue.put((feeds, outputs, rows))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            feeds, outputs, rows = item
            try:
                with self._lock:
                    self.monitor.observe(feeds, outputs)
            except Exception as exc:  # monitoring must never stop: say it once, keep serving
                self.errors += 1
                if self.errors == 1:
                    LOG.warning("drift monitor failed (requests are unaffected): %s: %s", type(exc).__name__, exc,
                                exc_info=exc)
            finally:
                with self._drained:
                    self._backlog -= rows
                    if self._backlog == 0:
                        self._drained.notify_all()

    def wait(self, timeout_s: float = SCRAPE_WAIT_S) -> bool:
        """Until every queued batch is observed (at most ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        with self._drained:
            while self._backlog and time.monotonic() < deadline:
                self._drained.wait(deadline - time.monotonic())
            return self._backlog == 0

    def collect(self) -> Iterator[Any]:
        self.wait()
        with self._lock:
            families = list(self.monitor.collect())
        dropped = CounterMetricFamily("drift_samples_dropped", "Samples served but not watched: the drift "
                                      "monitor was behind.", labels=list(self.monitor.labels))
        dropped.add_metric(list(self.monitor.labels.values()), self.dropped)
        return iter([*families, dropped])

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
