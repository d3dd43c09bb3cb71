"""The server's Prometheus metrics, named as DESIGN.md's table says, on a registry of their own.

Seconds for durations, ``_total`` for counters, histograms (they aggregate across replicas). Every
series carries ``model`` and ``version``; ``model_info`` adds the target, precision and bundle; the
request counter and the end-to-end histogram add the front end's ``protocol`` (``http``, ``grpc``).
Queue, compute and batch-size series are per engine call, whose batch mixes both.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from serve.batching import BatchObserver

OUTCOMES = ("ok", "client_error", "rejected", "server_error")
PROTOCOLS = ("http", "grpc")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = CONTENT_TYPE_LATEST
log = logging.getLogger("serve")
# ``*_created`` series double the exposition and no dashboard or rule of ours reads them.
disable_created_metrics()


class ServerMetrics(BatchObserver):
    """Every series of one served model; ``render()`` is the ``/metrics`` body."""

    def __init__(self, model: str, version: str, target: str, precision: str, bundle: str,
                 queue_capacity: int, registry: CollectorRegistry | None = None, content: str = ""):
        self.registry = registry or CollectorRegistry()
        labels = ("model", "version")
        self.requests = Counter("inference_requests", "Inference requests by protocol and outcome.",
                                (*labels, "protocol", "outcome"), registry=self.registry)
        self.duration = Histogram("inference_request_duration_seconds", "End-to-end request time in the server.",
                                  (*labels, "protocol"), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue = Histogram("inference_queue_duration_seconds", "Time a request waited for an engine.",
                               labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.compute = Histogram("inference_compute_duration_seconds", "Engine time per batch.",
                                 labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch = Histogram("inference_batch_size", "Rows per engine call.", labels,
                               buckets=BATCH_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("inference_requests_in_flight", "Requests being handled now.", labels,
                               registry=self.registry)
        self.capacity = Gauge("inference_queue_capacity", "Requests the queue holds before rejecting.", labels,
                              registry=self.registry)
        self.info = Gauge("model_info", "The model served (always 1); content_hash: what answers requests.",
                          (*labels, "target", "precision", "bundle", "content_hash"), registry=self.registry)
        self.truncated = Counter("inference_text_truncated", "Texts cut at the model's serving length.", labels,
                                 registry=self.registry)
        self.non_finite = Counter("inference_non_finite_samples", "Samples holding NaN or an infinity, in their "
                                  "inputs (answered, or refused with --reject-non-finite) or in the engine's outputs.",
                                  (*labels, "tensor"), registry=self.registry)
        self._labels = {"model": model, "version": version}
        self.capacity.labels(**self._labels).set(queue_capacity)
        self.info.labels(**self._labels, target=target, precision=precision, bundle=bundle, content_hash=content).set(1)
        self.texts_truncated = self.truncated.labels(**self._labels)
        self.non_finite_inputs = self.non_finite.labels(**self._labels, tensor="input")
        self.non_finite_outputs = self.non_finite.labels(**self._labels, tensor="output")
        self._duration = {p: self.duration.labels(**self._labels, protocol=p) for p in PROTOCOLS}
        self._queue = self.queue.labels(**self._labels)
        self._compute = self.compute.labels(**self._labels)
        self._batch = self.batch.labels(**self._labels)
        self.gauge_in_flight = self.in_flight.labels(**self._labels)
        self._outcomes = {(p, o): self.requests.labels(**self._labels, protocol=p, outcome=o)
                          for p in PROTOCOLS for o in OUTCOMES}
        self.monitor: Any = None
        self.monitor_errors = 0
        self.on_execution: Any = None  # the app's statistics (``/v2/models/{m}/stats``) of each engine call

    def finished(self, outcome: str, seconds: float, protocol: str = "http") -> None:
        self._outcomes[protocol, outcome].inc()
        if outcome == "ok":
            self._duration[protocol].observe(seconds)

    def queued(self, seconds: float) -> None:
        self._queue.observe(seconds)

    def computed(self, seconds: float, rows: int) -> None:
        self._compute.observe(seconds)
        self._batch.observe(rows)

    def executed(self, rows: int, timing: Any) -> None:
        if self.on_execution is not None:
            self.on_execution(rows, timing)

    def attach(self, monitor: Any) -> None:
        """Feed served batches to a drift monitor and export its series (made at scrape time)."""
        self.monitor = monitor
        self.registry.register(monitor)

    def served(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        if self.monitor is not None:
            try:
                self.monitor.observe(feeds, outputs)
            except Exception as exc:  # monitoring must never fail a request
                self.monitor_errors += 1
                if self.monitor_errors == 1:
                    log.warning("drift monitor failed (requests are unaffected): %s: %s", type(exc).__name__, exc, exc_info=exc)

    def render(self) -> bytes:
        return generate_latest(self.registry)
